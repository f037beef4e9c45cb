"""Files: sha256 of a file or a tree, writes a reader never sees half done (a temporary sibling and a
rename), folders swapped in whole, and trees of hard links for sharing finished work between run folders."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from edgepeft.core.errors import EdgepeftError, first_line

RECORD = "record.json"  # a stage folder's record (see edgepeft.pipeline.stage); never part of its file table
LOCK = ".lock"  # the lock file of a run folder (folder_lock)
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


def table_problems(folder: Path, table: dict[str, dict], source: str = "its record") -> list[str]:
    """What differs between ``folder`` and a ``file_table`` it once had (``source`` names where the table is
    kept, for the messages): missing files, other sizes, other content (re-hashed)."""
    problems = []
    for rel, entry in sorted(table.items()):
        p = Path(folder) / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != entry.get("bytes"):
            problems.append(f"{rel}: size {p.stat().st_size} bytes, {source} says {entry.get('bytes')}")
        elif sha256_file(p) != entry.get("sha256"):
            problems.append(f"{rel}: sha256 differs from {source}")
    return problems


@contextmanager
def folder_lock(folder: Path, hint: str = ""):
    """Hold an exclusive lock on ``folder`` (on its ``.lock`` file) while the block runs; a second process asking
    for it gets one clear error instead of sharing the folder's temporary files. The OS drops the lock when
    its process dies, so a killed run never leaves the folder locked."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / LOCK, "a+")  # noqa: SIM115 (held open for the lock's lifetime)
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            raise EdgepeftError(f"{folder} is in use by another edgepeft process"
                                f"{f' (pid {holder})' if holder.isdigit() else ''}; {hint or 'wait for it to finish'}"
                                ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        f.close()  # closing the file releases the lock


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


def resume_checkpoint(work: Path, fingerprint: str, resume: bool, weights: str, steps: int, say=print):
    """What a stage continues from: ``(tensors, optimizer and scheduler state, meta)`` of the newest checkpoint
    of this fingerprint (as ``write_checkpoint`` wrote it, ``weights`` naming its safetensors file), read whole
    before any of it is applied; None to start from step 0, said in one line when a checkpoint was there.
    Without ``resume`` a checkpoint is only pointed out. One that cannot be read (a corrupt or truncated file)
    is set aside as ``bad-step-N``, with a line saying why, and the one before it is tried: a broken
    checkpoint never blocks every later resume."""
    import torch
    from safetensors.torch import load_file

    ckpt = latest_checkpoint(work, fingerprint)
    if ckpt is not None and not resume:
        say(f"  note: checkpoint {ckpt} exists; pass --resume to continue from it (starting over)")
        return None
    tried = ckpt is not None
    while ckpt is not None:
        try:
            meta = json.loads((ckpt / "meta.json").read_text())
            saved = (load_file(ckpt / weights), torch.load(ckpt / "optim.pt", weights_only=True, map_location="cpu"),
                     meta)
        except Exception as e:  # noqa: BLE001 (whatever the readers raise on a damaged file)
            bad = ckpt.with_name(f"bad-{ckpt.name}")
            shutil.rmtree(bad, ignore_errors=True)
            ckpt.rename(bad)
            say(f"  checkpoint {ckpt.name} cannot be read ({first_line(e)}): set aside as {bad.name}")
            ckpt = latest_checkpoint(work, fingerprint)
            continue
        say(f"  resumed from {ckpt.name} (step {meta['step']} of {steps})")
        return saved
    if tried:
        say("  no readable checkpoint left: starting over")
    return None


def write_checkpoint(work: Path, step: int, meta: dict, tensors: dict, weights: str, optimizer, scheduler) -> Path:
    """``work/step-NNNNNN``: ``tensors`` (safetensors, as ``weights``), the optimizer's and scheduler's state
    (``optim.pt``) and ``meta.json`` (``meta`` and the step), written whole: into a temporary folder, then
    renamed. Keeps the last two checkpoints. ``resume_checkpoint`` reads it back."""
    import torch
    from safetensors.torch import save_file

    final, tmp = work / f"step-{step:06d}", work / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / weights)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(work.glob("step-*"))[:-2]:
        shutil.rmtree(old)
    return final
