"""What a stage is: one module of ``edgepeft.stages`` with an entry ``run(ctx)`` and, beside it, its
declaration (``STAGE = Stage(...)``): the recipe tables it reads (its config is the first), the stages whose
artifacts it reads, and every outside file its config keys name.

A stage's fingerprint hashes all it depends on: those tables, the fingerprints of the stages it reads, the
content of every declared outside file, the source of the code it runs (its module and every edgepeft
module that one imports, directly or not: ``code_version``) and the versions of the libraries that
compute its results. A rerun skips a stage whose fingerprint did not change and redoes it and all that
follows when anything in it did: an edited data file, a new edgepeft, a new onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from edgepeft import __version__
from edgepeft.core import imports
from edgepeft.core.config import as_dict
from edgepeft.core.errors import EdgepeftError
from edgepeft.core.files import BUILTIN_PREFIX, RECORD, resolve_path, sha256_files, sha256_tree, table_problems
from edgepeft.pipeline.layout import ARTIFACTS, RunDir

# The libraries whose version can change what a stage computes (the Python version too: the built-in prose
# is Python's own help text).
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "onnx", "onnxruntime",
             "onnxruntime-genai", "numpy", "gguf", "tokenizers")


@dataclass
class StageContext:
    """What a stage's entry function gets: its config, where to write, and where its inputs are."""

    name: str
    config: Any
    recipe: Any  # edgepeft.pipeline.recipe.Recipe
    run: RunDir
    out: Path  # the temporary folder the stage writes into; renamed to run/name on success
    options: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    outside: dict[str, str | None] = field(default_factory=dict)  # the hashes of its declared outside files

    def input(self, stage: str) -> Path:
        """The finished folder of ``stage`` (one this stage declared it reads)."""
        path = self.run.stage(stage)
        if not (path / RECORD).is_file():
            raise EdgepeftError(f"stage {self.name!r} needs stage {stage!r}, which has not run in {self.run}")
        return path

    def artifact(self, stage: str) -> Path:
        """The artifact of a finished stage (``model/``, ``adapter/``)."""
        self.input(stage)
        return self.run.artifact(stage)

    def record_of(self, stage: str) -> dict:
        return read_record(self.input(stage))

    @property
    def output(self) -> Path:
        """Where this stage writes its own artifact."""
        return self.out / ARTIFACTS[self.name]

    @property
    def work(self) -> Path:
        """A folder that survives a failed attempt (checkpoints); removed when the stage succeeds."""
        path = self.run.work(self.name)
        path.mkdir(parents=True, exist_ok=True)
        return path


def no_files(recipe) -> dict[str, list[Path]]:
    return {}


def no_check(recipe) -> None:
    return None


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext], None]
    sections: tuple[str, ...]  # the recipe tables this stage reads; its config is the first
    reads: tuple[str, ...] = ()  # stages whose artifacts this stage reads
    # Every outside file the stage's config keys name: {"table.key": [files]} (``user_files``); hashed into the
    # fingerprint. Raises EdgepeftError for a file that is not there.
    files: Callable[[Any], dict[str, list[Path]]] = no_files
    description: str = ""
    # Cheap checks of the recipe's inputs (model found, data parses), run for every selected stage before
    # the first one starts, so a bad data file fails in a second, not after minutes of earlier stages.
    preflight: Callable[[Any], None] = no_check
    # Run by every process under a distributed launcher (accelerate launch / torchrun). Other stages run on
    # the main process only, while the rest wait.
    distributed: bool = False
    # May be taken from a sibling run folder where it finished with the same fingerprint (edgepeft.pipeline.runner).
    shared: bool = False
    # What is wrong with a finished folder of this stage, given its record (empty: intact). Checked before a
    # rerun skips the stage and before a sibling's folder is reused: a changed byte means running it again.
    intact: Callable[[Path, dict], list[str]] = lambda folder, record: record_intact(folder, record)

    @property
    def module(self) -> str:
        return self.run.__module__


def user_files(recipe, table: str, *keys: str) -> dict[str, list[Path]]:
    """The files that ``[table] key`` names for each key: none for unset or ``builtin:`` values (their content is
    edgepeft's code), else the file or folder, read next to the recipe; a missing one is an error."""
    section = recipe.section(table)
    out = {}
    for key in keys:
        spec = getattr(section, key)
        if not spec or spec.startswith(BUILTIN_PREFIX):
            out[f"{table}.{key}"] = []
            continue
        path = resolve_path(spec, recipe.base_dir)
        if not path.exists():
            raise EdgepeftError(f"[{table}] {key}: file not found: {spec}")
        out[f"{table}.{key}"] = [path]
    return out


def task_files(recipe, table: str, *keys: str) -> dict[str, list[Path]]:
    """``user_files`` of the recipe and of each of its tasks (``tasks.<name>.<table>.<key>``)."""
    out = user_files(recipe, table, *keys)
    for name in recipe.tasks.names:
        out.update({f"tasks.{name}.{k}": v for k, v in user_files(recipe.task(name), table, *keys).items()})
    return out


def hash_files(files: list[Path]) -> str | None:
    """The hash recorded for one declared input: None for none, a folder's tree hash for one folder, else one
    hash over the files' names and contents (``sha256_files``, the base model's hash in a bundle manifest)."""
    if not files:
        return None
    if len(files) == 1 and files[0].is_dir():
        return sha256_tree(files[0])
    return sha256_files(files)


@cache
def code_version(module: str) -> str:
    """A hash of the source of ``module`` and every edgepeft module it imports, directly or not (imports inside
    functions included): it changes whenever any code the stage can run changes."""
    return source_hash(module, imports.module_files())


def source_hash(module: str, files: dict[str, Path]) -> str:
    """One hash over the source files of ``module`` and all it reaches in the import graph of ``files``."""
    h = hashlib.sha256()
    for name in sorted(imports.reachable(imports.graph(files), module)):
        h.update(f"{name}\0".encode() + files[name].read_bytes() + b"\0")
    return h.hexdigest()


@cache
def library_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def stage_config(stage: Stage, recipe) -> dict[str, dict]:
    return {s: as_dict(recipe.section(s)) for s in stage.sections}


def fingerprint(stage: Stage, recipe, upstream: dict[str, str], outside: dict[str, str | None]) -> str:
    payload = {"stage": stage.name, "config": stage_config(stage, recipe), "reads": upstream,
               "outside": outside, "edgepeft": __version__, "code": code_version(stage.module),
               "libraries": library_versions()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def record_intact(folder: Path, record: dict) -> list[str]:
    """The files of a finished stage folder against the table its record holds (sizes and sha256)."""
    if not isinstance(record.get("files"), dict):
        return ["its record has no file table"]
    return table_problems(folder, record["files"])


def read_record(stage_dir: Path) -> dict:
    return json.loads((stage_dir / RECORD).read_text())


def write_record(stage_dir: Path, record: dict) -> None:
    (stage_dir / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
