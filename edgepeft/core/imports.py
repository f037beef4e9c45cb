"""The package's static import graph, read from its source with ``ast`` (imports inside functions
included): the code-version part of a stage's fingerprint is the source of every module reachable from the
stage's module, and the layering test checks the graph for cycles and for imports of stages.

An import of ``edgepeft.a.b`` (or ``from edgepeft.a import b``) is an edge to the module ``edgepeft.a.b``
when one exists, else to the nearest enclosing package; importing a module also runs its packages'
``__init__``, so those are edges too.
"""

from __future__ import annotations

import ast
import importlib.util
from functools import cache
from pathlib import Path

ROOT = "edgepeft"


def _package_dirs() -> dict[str, Path]:
    """edgepeft's own folder and ``edgepeft.calib``, which is installed from the top-level ``calib/``."""
    here = Path(__file__).resolve().parents[1]
    spec = importlib.util.find_spec(f"{ROOT}.calib")
    calib = Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None
    return {ROOT: here, **({f"{ROOT}.calib": calib} if calib else {})}


@cache
def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    out = {}
    for prefix, folder in _package_dirs().items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def _target(name: str, modules) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imported(path: Path, module: str, modules) -> set[str]:
    """The edgepeft modules ``module`` (at ``path``) imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parent + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            if name == ROOT or name.startswith(ROOT + "."):
                target = _target(name, modules)
                while target:  # the module and the packages whose __init__ importing it runs
                    if target != module and target in modules:
                        found.add(target)
                    target = target.rpartition(".")[0]
    return found


def graph(files: dict[str, Path]) -> dict[str, set[str]]:
    return {m: imported(p, m, files) for m, p in files.items()}


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (each holds at least one cycle)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out
