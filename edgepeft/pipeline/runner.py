"""The runner: executes a recipe's stages in order in one run folder, skipping, sharing and recording them.

Stage ``S`` writes its artifacts to ``<run>/S/`` and a ``record.json`` there: its config, the fingerprints
of its inputs, the figures it measured, its time and the files it wrote. A rerun skips every stage whose
fingerprint (``edgepeft.pipeline.stage``) did not change and whose files are still what its record says
(re-hashed), and redoes everything downstream of a change or of a stage it had to run again.

A stage writes into ``<run>/.S.tmp`` and is renamed to ``<run>/S`` only when it finished: a failure or an
interrupt never leaves a half-written stage that a later run would take as done.

Runs share work: a ``shared`` stage (one whose artifacts do not depend on the recipe's name or target
beyond what its fingerprint covers) that finished with the same fingerprint in a sibling run folder
(``dist/android/train`` for ``dist/ios``) is taken from there as hard links, so ``export-ios`` after
``export-android`` trains nothing again. Stages never change their artifacts after finishing, so a link is
as good as a copy (ONNX external data is copied: onnx will not read it through a hard link).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from edgepeft import __version__
from edgepeft.core.errors import EdgepeftError
from edgepeft.core.files import RECORD, file_table, folder_lock, link_tree, replace_dir
from edgepeft.pipeline.layout import RunDir
from edgepeft.pipeline.stage import (
    Stage,
    StageContext,
    code_version,
    fingerprint,
    hash_files,
    read_record,
    stage_config,
    write_record,
)


def finished_elsewhere(run: RunDir, stage: Stage, fp: str) -> Path | None:
    """A sibling run's folder of ``stage`` that finished with fingerprint ``fp`` and whose files are still, byte
    for byte, what its record says (a changed file is never linked into this run)."""
    for other in run.siblings(stage.name):
        if not (other / RECORD).is_file():
            continue
        try:
            record = read_record(other)
        except (OSError, ValueError):
            continue
        if record.get("fingerprint") == fp and not stage.intact(other, record):
            return other
    return None


def _finished_here(stage: Stage, final: Path, fp: str, echo) -> dict | None:
    """The record of ``stage`` in this run when it finished with fingerprint ``fp`` and its files are intact."""
    if not (final / RECORD).is_file():
        return None
    try:
        record = read_record(final)
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != fp:
        return None
    problems = stage.intact(final, record)
    if problems:
        more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
        echo(f"[{stage.name}] its finished folder changed ({problems[0]}{more}): running it again")
        return None
    return record


def _distributed_state():
    """accelerate's process state when started by a multi-process launcher, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    # accelerate forms a CPU process group (gloo) only when told it runs on the CPU
    return PartialState(cpu=not torch.cuda.is_available())


def _selected(stages: list[Stage], first: str | None, last: str | None) -> list[Stage]:
    names = [s.name for s in stages]
    for label, value in (("--from", first), ("--to", last)):
        if value is not None and value not in names:
            raise EdgepeftError(f"{label} {value!r}: unknown stage (stages: {', '.join(names)})")
    i0 = names.index(first) if first else 0
    i1 = names.index(last) if last else len(names) - 1
    if i0 > i1:
        raise EdgepeftError(f"--from {first} comes after --to {last}")
    return stages[i0:i1 + 1]


def _inputs(stage: Stage, recipe, run: RunDir) -> tuple[dict[str, str], dict[str, str | None]]:
    """The fingerprints of the stages ``stage`` reads, and the hashes of the outside files it declares."""
    upstream = {}
    for dep in stage.reads:
        dep_dir = run.stage(dep)
        if not (dep_dir / RECORD).is_file():
            raise EdgepeftError(f"stage {stage.name!r} needs stage {dep!r}, which has not run in {run} "
                                f"(run without --from, or with --from {dep})")
        upstream[dep] = read_record(dep_dir)["fingerprint"]
    return upstream, {key: hash_files(files) for key, files in stage.files(recipe).items()}


def _reuse(stage: Stage, run: RunDir, other: Path) -> dict:
    """Take ``stage`` from a sibling run's finished folder ``other`` (hard links); returns its record."""
    tmp = run.tmp(stage.name)
    shutil.rmtree(tmp, ignore_errors=True)
    link_tree(other, tmp)
    record = {**read_record(tmp), "reused_from": str(other)}
    (tmp / RECORD).unlink()  # a link to the other run's record: replaced, not written through
    write_record(tmp, record)
    replace_dir(tmp, run.stage(stage.name))
    return record


def _finish(ctx: StageContext, stage: Stage, upstream: dict, outside: dict, seconds: float) -> dict:
    """Record a stage that ran, put its folder in place and drop its work folder; returns the record."""
    record = {"stage": stage.name, "fingerprint": ctx.fingerprint, "edgepeft": __version__,
              "config": stage_config(stage, ctx.recipe), "reads": upstream, "outside": outside,
              "code": code_version(stage.module), "figures": ctx.figures, "seconds": round(seconds, 2),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": file_table(ctx.out)}
    write_record(ctx.out, record)
    replace_dir(ctx.out, ctx.run.stage(stage.name))
    work = ctx.run.work(stage.name)
    if work.exists():
        shutil.rmtree(work)
    return record


def run_stages(stages: list[Stage], recipe, run_dir: Path | RunDir, first: str | None = None,
               last: str | None = None, force: bool = False, options: dict[str, Any] | None = None,
               echo: Callable[[str], None] = print) -> dict[str, dict]:
    """Run ``stages`` from ``first`` to ``last`` (inclusive) in ``run_dir``; returns their records."""
    selected = _selected(stages, first, last)
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    for stage in selected:
        stage.preflight(recipe)
        stage.files(recipe)  # every declared outside file is there, before the first stage starts
    dist = _distributed_state()
    main = dist is None or dist.is_main_process
    if not main:
        echo = _silent

    def barrier():
        if dist is not None:
            dist.wait_for_everyone()

    if main:
        run.path.mkdir(parents=True, exist_ok=True)
    # One run at a time in a run folder: two would share its temporary stage folders. Only the main process
    # holds the lock; the others of a distributed run work under it.
    with folder_lock(run.path, "wait for it to finish, or give this run another --out") if main else nullcontext():
        return _run_selected(selected, recipe, run, force, options, echo, dist, main, barrier)


def _run_selected(selected, recipe, run: RunDir, force, options, echo, dist, main, barrier) -> dict[str, dict]:
    records: dict[str, dict] = {}
    remade: set[str] = set()  # stages run again in this call: whatever reads them is run again too
    for stage in selected:
        barrier()  # every process sees the finished folders of the stages before this one
        upstream, outside = _inputs(stage, recipe, run)
        fp = fingerprint(stage, recipe, upstream, outside)
        final = run.stage(stage.name)
        fresh_inputs = bool(remade.intersection(stage.reads))
        done = None if force or fresh_inputs else _finished_here(stage, final, fp, echo)
        if done is not None:
            echo(f"[{stage.name}] unchanged since its last run, skipped ({final})")
            records[stage.name] = done
            continue
        other = finished_elsewhere(run, stage, fp) if stage.shared and not (force or fresh_inputs) else None
        if other is not None:
            if main:
                records[stage.name] = _reuse(stage, run, other)
                echo(f"[{stage.name}] same inputs as {other}: reused (hard links)")
            continue
        remade.add(stage.name)
        if not main and not stage.distributed:
            continue  # the main process runs it; the next barrier waits for it
        tmp = run.tmp(stage.name)
        if main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        if stage.distributed:
            barrier()
        ctx = StageContext(stage.name, recipe.section(stage.sections[0]), recipe, run, tmp,
                           dict(options or {}), fp, outside=outside)
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
        if main:
            records[stage.name] = _finish(ctx, stage, upstream, outside, time.time() - t0)
            echo(f"[{stage.name}] done in {records[stage.name]['seconds']:.1f} s -> {final}")
    barrier()
    return records


def _silent(_: str) -> None:
    pass
