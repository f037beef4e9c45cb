"""The pipeline: an ordered list of stages, each one module with a typed config and one entry function.

A run lives in one folder (default ``dist/<recipe name>``). Stage ``S`` writes its artifacts to ``<run>/S/``
and a ``record.json`` there: its config, the fingerprints of its inputs, figures it measured, its time and
the files it wrote. A stage's fingerprint hashes its config, the fingerprints of the stages it reads and
any outside input it names (model files, data files), so a rerun skips every stage whose inputs and config
did not change and redoes everything downstream of a change.

A stage writes into ``<run>/.S.tmp`` and is renamed to ``<run>/S`` only when it finished: a failure or an
interrupt never leaves a half-written stage that a later run would take as done.

Runs share work: a ``shared`` stage (one whose artifacts do not depend on the recipe's name or target
beyond what its fingerprint covers) that finished with the same fingerprint in a sibling run folder
(``dist/android/train`` for ``dist/ios``) is taken from there as hard links, so ``export-ios`` after
``export-android`` trains nothing again. Stages never change their artifacts after finishing, so a link is
as good as a copy (ONNX external data is copied: onnx will not read it through a hard link).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepeft import __version__
from edgepeft.config import as_dict
from edgepeft.errors import EdgepeftError

RECORD = "record.json"


@dataclass
class StageContext:
    """What a stage's entry function gets: its config, where to write, and where its inputs are."""

    name: str
    config: Any
    recipe: Any  # edgepeft.recipe.Recipe
    run_dir: Path
    out: Path  # the temporary folder the stage writes into; renamed to run_dir/name on success
    options: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    figures: dict[str, Any] = field(default_factory=dict)

    def input(self, stage: str) -> Path:
        path = self.run_dir / stage
        if not (path / RECORD).is_file():
            raise EdgepeftError(f"stage {self.name!r} needs stage {stage!r}, which has not run in {self.run_dir}")
        return path

    def record_of(self, stage: str) -> dict:
        return read_record(self.input(stage))

    @property
    def work(self) -> Path:
        """A folder that survives a failed attempt (checkpoints); removed when the stage succeeds."""
        path = self.run_dir / f".{self.name}.work"
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # the recipe tables this stage reads; its config is the first
    reads: tuple[str, ...]  # stages whose artifacts this stage reads
    run: Callable[[StageContext], None]
    outside_inputs: Callable[[Any], dict[str, str]] = lambda recipe: {}
    description: str = ""
    # Cheap checks of the recipe's inputs (model found, data parses), run for every selected stage before
    # the first one starts, so a bad data file fails in a second, not after minutes of earlier stages.
    preflight: Callable[[Any], None] = lambda recipe: None
    # Run by every process under a distributed launcher (accelerate launch / torchrun). Other stages run on
    # the main process only, while the rest wait.
    distributed: bool = False
    # May be taken from a sibling run folder where it finished with the same fingerprint (see the module doc).
    shared: bool = False


def read_record(stage_dir: Path) -> dict:
    return json.loads((stage_dir / RECORD).read_text())


def stage_config(stage: Stage, recipe) -> dict[str, dict]:
    return {s: as_dict(recipe.section(s)) for s in stage.sections}


def fingerprint(stage: Stage, recipe, upstream: dict[str, str], outside: dict[str, str]) -> str:
    payload = {"stage": stage.name, "config": stage_config(stage, recipe), "reads": upstream,
               "outside": outside, "edgepeft": __version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def write_record(stage_dir: Path, record: dict) -> None:
    (stage_dir / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")


def file_table(folder: Path) -> dict[str, dict]:
    from edgepeft.sources import sha256_file

    table = {}
    for p in sorted(folder.rglob("*")):
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
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def finished_elsewhere(run_dir: Path, stage: str, fp: str) -> Path | None:
    """A sibling run's folder of ``stage`` that finished with fingerprint ``fp`` and still has its files."""
    for rec in sorted(run_dir.parent.glob(f"*/{stage}/{RECORD}")):
        other = rec.parent
        if other.parent == run_dir:
            continue
        try:
            record = read_record(other)
        except (OSError, ValueError):
            continue
        if record.get("fingerprint") == fp and all(
                (other / f).is_file() and (other / f).stat().st_size == e["bytes"]
                for f, e in record.get("files", {}).items()):
            return other
    return None


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


def _distributed_state():
    """accelerate's process state when started by a multi-process launcher, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    # accelerate forms a CPU process group (gloo) only when told it runs on the CPU
    return PartialState(cpu=not torch.cuda.is_available())


def run_stages(stages: list[Stage], recipe, run_dir: Path, first: str | None = None, last: str | None = None,
               force: bool = False, options: dict[str, Any] | None = None,
               echo: Callable[[str], None] = print) -> dict[str, dict]:
    """Run ``stages`` from ``first`` to ``last`` (inclusive) in ``run_dir``; returns their records."""
    names = [s.name for s in stages]
    for label, value in (("--from", first), ("--to", last)):
        if value is not None and value not in names:
            raise EdgepeftError(f"{label} {value!r}: unknown stage (stages: {', '.join(names)})")
    i0 = names.index(first) if first else 0
    i1 = names.index(last) if last else len(names) - 1
    if i0 > i1:
        raise EdgepeftError(f"--from {first} comes after --to {last}")
    for stage in stages[i0:i1 + 1]:
        stage.preflight(recipe)
    dist = _distributed_state()
    main = dist is None or dist.is_main_process
    if not main:
        echo = _silent

    def barrier():
        if dist is not None:
            dist.wait_for_everyone()

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict] = {}
    for stage in stages[i0:i1 + 1]:
        barrier()  # every process sees the finished folders of the stages before this one
        upstream = {}
        for dep in stage.reads:
            dep_dir = run_dir / dep
            if not (dep_dir / RECORD).is_file():
                raise EdgepeftError(f"stage {stage.name!r} needs stage {dep!r}, which has not run in {run_dir} "
                                    f"(run without --from, or with --from {dep})")
            upstream[dep] = read_record(dep_dir)["fingerprint"]
        outside = stage.outside_inputs(recipe)
        fp = fingerprint(stage, recipe, upstream, outside)
        final = run_dir / stage.name
        if not force and (final / RECORD).is_file() and read_record(final).get("fingerprint") == fp:
            echo(f"[{stage.name}] unchanged since its last run, skipped ({final})")
            records[stage.name] = read_record(final)
            continue
        other = finished_elsewhere(run_dir, stage.name, fp) if stage.shared and not force else None
        if other is not None:
            if main:
                tmp = run_dir / f".{stage.name}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                link_tree(other, tmp)
                record = {**read_record(tmp), "reused_from": str(other)}
                (tmp / RECORD).unlink()  # a link to the other run's record: replaced, not written through
                write_record(tmp, record)
                replace_dir(tmp, final)
                records[stage.name] = record
                echo(f"[{stage.name}] same inputs as {other}: reused (hard links)")
            continue
        if not main and not stage.distributed:
            continue  # the main process runs it; the next barrier waits for it
        tmp = run_dir / f".{stage.name}.tmp"
        if main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        if stage.distributed:
            barrier()
        ctx = StageContext(stage.name, recipe.section(stage.sections[0]), recipe, run_dir, tmp,
                           dict(options or {}), fp)
        echo(f"[{stage.name}] {stage.description}")
        t0 = time.time()
        try:
            stage.run(ctx)
        except BaseException:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if stage.distributed:
            barrier()
        if not main:
            continue
        record = {"stage": stage.name, "fingerprint": fp, "edgepeft": __version__,
                  "config": stage_config(stage, recipe), "reads": upstream, "outside": outside,
                  "figures": ctx.figures, "seconds": round(time.time() - t0, 2),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": file_table(tmp)}
        write_record(tmp, record)
        replace_dir(tmp, final)
        work = run_dir / f".{stage.name}.work"
        if work.exists():
            shutil.rmtree(work)
        echo(f"[{stage.name}] done in {record['seconds']:.1f} s -> {final}")
        records[stage.name] = record
    barrier()
    return records


def _silent(_: str) -> None:
    pass
