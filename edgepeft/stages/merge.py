"""Stage ``merge``: fold the adapter into the dequantized 4-bit base and save a plain HF folder.

The adapter was trained against the NF4 weights, so it is merged into exactly those weights, dequantized
(merging into the original fp32 weights instead loses much of the fine-tune: the adapter learned to
correct the 4-bit rounding). The dequantized weights are loaded into a fresh, ordinary model built from
the same config: it is not flagged 4-bit, so peft merges LoRA and IA3 alike (peft refuses to merge IA3
into a model flagged ``is_loaded_in_4bit``, even after ``dequantize()``). Bottleneck adapters cannot be
merged: the folder then holds the dequantized base and, in ``unmerged/``, the adapters the export stage
puts into the graph (``edgepeft.adapters.api.merge_into``).

The stage then checks its own work: on held-out prose (and the task's validation prompts) it compares the
merged model with the reference the user trained, (4-bit base + adapter), and fails if the largest logit
difference is above ``max_logit_diff``.

A recipe with ``[tasks]`` keeps its adapters apart, switched at run time over one base graph
(``edgepeft.onnx.switchable``): the folder then holds the dequantized 4-bit base alone, checked against the
4-bit base itself; the bundle stage puts each task's adapter into its own file.
"""

from __future__ import annotations

from edgepeft.adapters import api as adapters
from edgepeft.calib.data import prompt_ids, recipe_splits
from edgepeft.calib.sets import check_windows
from edgepeft.core.errors import EdgepeftError
from edgepeft.pipeline.stage import Stage, StageContext, user_files
from edgepeft.pipeline.tables import MergeConfig
from edgepeft.quality.reference import compare_logits


def run(ctx: StageContext) -> None:
    import torch
    from transformers import AutoTokenizer

    from edgepeft.models.pytorch import dequantized_model, load_4bit

    cfg: MergeConfig = ctx.config
    qdir = ctx.artifact("quantize")
    adir = ctx.artifact("train")
    if ctx.recipe.tasks.names:
        _base_only(ctx, cfg, qdir)
        return
    tokenizer = AutoTokenizer.from_pretrained(adir)
    with torch.no_grad():
        merged = adapters.merge_into(dequantized_model(qdir), adir, ctx.output)
    tokenizer.save_pretrained(ctx.output)

    reference = adapters.load(load_4bit(qdir, torch.device("cpu")), adir)
    windows = check_windows(ctx.recipe, tokenizer, cfg.eval_windows, cfg.eval_window_tokens, "merge")
    prose = compare_logits(reference, merged, windows)
    val = recipe_splits(ctx.recipe)["validation"]
    prompts = [p for p in (prompt_ids(tokenizer, s) for s in val[:8]) if p]
    task = compare_logits(reference, merged, prompts) if prompts else None
    worst = max(prose["max_logit_diff"], task["max_logit_diff"] if task else 0.0)
    ctx.figures.update(reference="4-bit base + adapter", unmerged=adapters.unmerged_spec(ctx.output),
                       held_out_text=cfg.eval_text, prose=prose, task_prompts=task,
                       max_logit_diff=worst, max_logit_diff_allowed=cfg.max_logit_diff)
    print(f"  merged vs (4-bit base + adapter): max |logit diff| {worst:.2e} (allowed {cfg.max_logit_diff:g}); "
          f"next-token agreement {100 * prose['next_token_agreement']:.2f}% on {prose['tokens']} held-out tokens")
    if not worst <= cfg.max_logit_diff:
        raise EdgepeftError(f"[merge] merged model differs from (4-bit base + adapter) by {worst:.3g} in logits, "
                            f"more than max_logit_diff = {cfg.max_logit_diff:g}")


def _base_only(ctx: StageContext, cfg: MergeConfig, qdir) -> None:
    """The dequantized 4-bit base, saved for export and checked against the 4-bit base it came from."""
    import torch
    from transformers import AutoTokenizer

    from edgepeft.models.pytorch import dequantized_model, load_4bit

    tokenizer = AutoTokenizer.from_pretrained(qdir)
    with torch.no_grad():
        base = dequantized_model(qdir)
        base.save_pretrained(ctx.output, safe_serialization=True)
    tokenizer.save_pretrained(ctx.output)
    windows = check_windows(ctx.recipe, tokenizer, cfg.eval_windows, cfg.eval_window_tokens, "merge")
    prose = compare_logits(load_4bit(qdir, torch.device("cpu")).eval(), base.eval(), windows)
    worst = prose["max_logit_diff"]
    ctx.figures.update(reference="4-bit base", adapters="kept apart: runtime-switchable, one per task",
                       tasks=ctx.recipe.tasks.names, held_out_text=cfg.eval_text, prose=prose, max_logit_diff=worst,
                       max_logit_diff_allowed=cfg.max_logit_diff)
    print(f"  base for {len(ctx.recipe.tasks.names)} runtime adapters: dequantized vs 4-bit base max |logit diff| "
          f"{worst:.2e} (allowed {cfg.max_logit_diff:g})")
    if not worst <= cfg.max_logit_diff:
        raise EdgepeftError(f"[merge] the dequantized base differs from the 4-bit base by {worst:.3g} in logits, "
                            f"more than max_logit_diff = {cfg.max_logit_diff:g}")


STAGE = Stage("merge", run, sections=("merge", "tasks"), reads=("quantize", "train"),
              files=lambda recipe: {**user_files(recipe, "merge", "eval_text"),
                                    **user_files(recipe, "train", "data", "validation_data")},
              shared=True, description="merge the adapter into the dequantized base, check it against "
                                       "(4-bit base + adapter)")
