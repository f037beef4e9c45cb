"""Typed configuration: dataclasses filled from TOML tables, with a clear error for any bad key or type.

Recipes (``export/*.toml``) are data. Each stage owns one dataclass for its table; this module turns a
table into that dataclass and rejects unknown keys and wrong types with the file and table named.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from edgepeft.core.errors import EdgepeftError

T = TypeVar("T")


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise EdgepeftError(f"{path}: a folder, not a TOML file")
    if not path.is_file():
        raise EdgepeftError(f"{path}: no such file")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise EdgepeftError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise EdgepeftError(f"{path}: not UTF-8 text (byte {e.start}); TOML files are UTF-8") from None
    except OSError as e:
        raise EdgepeftError(f"{path}: cannot read: {e.strerror}") from None


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is Any:
        return True
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def plain_name(name: Any) -> bool:
    """A name that can be a folder of its own: not empty, no separator, not hidden, not ``.``/``..``."""
    return isinstance(name, str) and bool(name) and not any(c in name for c in "/\\\0") \
        and not name.startswith(".") and len(name) <= 128


def _has(value: Any, test) -> bool:
    """Whether a float in ``value`` (or in a list or table inside it) passes ``test`` (math.isnan, math.isinf)."""
    if isinstance(value, float):
        return test(value)
    if isinstance(value, list):
        return any(_has(v, test) for v in value)
    if isinstance(value, dict):
        return any(_has(v, test) for v in value.values())
    return False


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def from_table(cls: type[T], table: dict[str, Any] | None, where: str) -> T:
    """Build dataclass ``cls`` from a TOML table; ``where`` names the table in errors (``file [section]``)."""
    table = table or {}
    if not isinstance(table, dict):
        raise EdgepeftError(f"{where}: expected a table, got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise EdgepeftError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(fields)})")
    kwargs = {}
    for name, value in table.items():
        if _has(value, math.isnan):  # nan compares false with everything: every bound check would let it pass
            raise EdgepeftError(f"{where}: {name} = {value!r}: nan is not a value (inf switches a budget off)")
        if _has(value, math.isinf) and not name.startswith("max_"):
            raise EdgepeftError(f"{where}: {name} = {value!r}: must be finite (inf only lifts a max_* limit)")
        if not _type_ok(value, hints[name]):
            raise EdgepeftError(f"{where}: {name} = {value!r} must be {_describe(hints[name])}")
        kwargs[name] = value
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise EdgepeftError(f"{where}: missing key {missing[0]!r}")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        problem = check()
        if problem:
            raise EdgepeftError(f"{where}: {problem}")
    return obj


def as_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
