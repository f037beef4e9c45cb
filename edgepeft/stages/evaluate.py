"""Stage ``evaluate``: the quality gate (``edgepeft.quality.gate``) on the bundle this run just wrote, against
the (4-bit base + adapter) model this run trained. A broken budget fails the run with a table of what broke
and by how much; the figures are written into the bundle either way.
"""

from __future__ import annotations

from edgepeft.core.errors import EdgepeftError
from edgepeft.pipeline.stage import Stage, StageContext, task_files, user_files
from edgepeft.quality.gate import evaluate_bundle, failure
from edgepeft.quality.reference import Reference


def run(ctx: StageContext) -> None:
    bundle = ctx.run.bundle(ctx.recipe.target.name)
    if not ctx.recipe.tasks.names:
        result = evaluate_bundle(bundle, ctx.recipe, ctx.config, Reference.of_run(ctx.run.path))
        ctx.figures.update(_figures(result))
        if not result["passed"]:
            raise EdgepeftError(failure(ctx.recipe.name, result))
        return
    # a multi-adapter bundle: each runtime adapter against its own (4-bit base + adapter), on its task's budgets
    failed = []
    for name in ctx.recipe.tasks.names:
        task = ctx.recipe.task(name)
        result = evaluate_bundle(bundle, task, task.evaluate, Reference.of_run(ctx.run.path, name), adapter=name)
        ctx.figures.setdefault("tasks", {})[name] = _figures(result)
        if not result["passed"]:
            failed.append(failure(f"{ctx.recipe.name} (adapter {name})", result))
    ctx.figures["passed"] = not failed
    if failed:
        raise EdgepeftError("\n".join(failed))


def _figures(result: dict) -> dict:
    return {"passed": result["passed"], "rows": result["rows"],
            **{k: v for k, v in result["figures"].items() if k != "answers_that_differ"}}


STAGE = Stage("evaluate", run, sections=("evaluate", "requantize", "tasks"), reads=("bundle", "quantize", "train"),
              files=lambda recipe: {**task_files(recipe, "evaluate", "text"),
                                    **user_files(recipe, "requantize", "calib_text"),
                                    **task_files(recipe, "train", "data", "validation_data", "replay_text")},
              description="quality gate: the bundle vs (4-bit base + adapter) on held-out data, against the budgets")
