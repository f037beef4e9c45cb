"""Files: sha256 of a file or a tree, writes a reader never sees half done (a temporary sibling and a
rename), folders swapped in whole, and trees of hard links for sharing finished work between run folders."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

RECORD = "record.json"  # a stage folder's record (see edgepeft.pipeline.stage); never part of its file table
BUILTIN_PREFIX = "builtin:"  # a recipe value naming data edgepeft generates or ships, not a file


def resolve_path(spec: str, base_dir: Path | None) -> Path:
    """A path a recipe names: as written (``~`` expanded) if it exists, else relative to the recipe's folder."""
    path = Path(spec).expanduser()
    if not path.is_absolute() and base_dir is not None and not path.exists():
        path = base_dir / path
    return path


def _feed(h, path: Path, chunk: int = 1 << 22) -> None:
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)


def sha256_files(paths: list[Path]) -> str:
    """One hash over several files, their names included."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        _feed(h, p)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    _feed(h, path)
    return h.hexdigest()


def sha256_tree(folder: Path) -> str:
    """One hash over every file below ``folder``, by relative path and content."""
    h = hashlib.sha256()
    for rel, entry in sorted(file_table(folder).items()):
        h.update(f"{rel}\0{entry['sha256']}\n".encode())
    return h.hexdigest()


def file_table(folder: Path) -> dict[str, dict]:
    """``{relative path: {"bytes", "sha256"}}`` for every file below ``folder`` but a stage record."""
    table = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and p.name != RECORD:
            table[p.relative_to(folder).as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return table


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file through a temporary sibling and a rename: a reader sees the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished folder ``tmp`` where ``final`` is, replacing it."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def link_tree(src: Path, dst: Path) -> None:
    """``dst`` as a tree of hard links to ``src``'s files; copies where the file system cannot link, and for
    ONNX external data, which onnx refuses to read through a file with several links (its guard against
    hard-link attacks)."""
    def link(a, b):
        if str(a).endswith(".data"):
            return shutil.copy2(a, b)
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    shutil.copytree(src, dst, copy_function=link)


def latest_checkpoint(work: Path, fingerprint: str) -> Path | None:
    """The newest ``step-*`` checkpoint folder in ``work`` whose ``meta.json`` has this fingerprint (a checkpoint
    of a run with other inputs is never resumed)."""
    for ckpt in sorted(work.glob("step-*"), reverse=True):
        try:
            if json.loads((ckpt / "meta.json").read_text()).get("fingerprint") == fingerprint:
                return ckpt
        except (OSError, ValueError):
            continue
    return None


def write_checkpoint(work: Path, step: int, meta: dict, write) -> Path:
    """``work/step-NNNNNN`` holding what ``write(folder)`` puts there and ``meta.json`` (``meta`` and the step),
    written whole: into a temporary folder, then renamed. Keeps the last two checkpoints."""
    final, tmp = work / f"step-{step:06d}", work / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(work.glob("step-*"))[:-2]:
        shutil.rmtree(old)
    return final
