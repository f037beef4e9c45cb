"""Stage ``export``: the merged model as an fp32 ONNX decoder with a KV cache (onnxruntime-genai's model
builder, ``edgepeft.onnx.builder``), checked against PyTorch.

This stage exports fp32 only; ``requantize`` turns the weights into int4/int8 for the target, so the fp32
graph is the reference the quantized one is measured against. What the merge could not fold into the weights
(bottleneck adapters, gated LoRA) is added to the graph as the PyTorch model computes it (``edgepeft.onnx.adapters``).
The stage checks its output: prefill logits on held-out prose and logits of token-by-token decoding through
the KV cache must both match the merged PyTorch model (with its unmerged adapters) within ``max_logit_diff``,
and the graph's opset must not exceed the target's.
"""

from __future__ import annotations

import shutil

import numpy as np

from edgepeft.adapters import api as adapters
from edgepeft.calib.sets import check_windows
from edgepeft.core.errors import EdgepeftError
from edgepeft.onnx.adapters import insert_unmerged, shorten_context
from edgepeft.onnx.builder import EXPORTER, MODEL, build_onnx, opset_of, save_graph
from edgepeft.onnx.decoder import Decoder, decode_logits
from edgepeft.pipeline.stage import Stage, StageContext, user_files
from edgepeft.pipeline.tables import ExportConfig
from edgepeft.quality import reference as torch_reference
from edgepeft.quality.scores import compare


def run(ctx: StageContext) -> None:
    from transformers import AutoTokenizer

    cfg: ExportConfig = ctx.config
    target = ctx.recipe.target
    merged_dir = ctx.artifact("merge")
    out = ctx.output
    seconds = build_onnx(merged_dir, out, "fp32", cache_dir=ctx.out / ".cache", context=target.context)
    shutil.rmtree(ctx.out / ".cache", ignore_errors=True)
    model_file = out / MODEL
    added = _rewrite(merged_dir, out)
    opset = opset_of(model_file)
    if opset > target.opset:
        raise EdgepeftError(f"[export] the graph needs ai.onnx opset {opset}, target {target.name} supports up to "
                            f"{target.opset}")

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    windows = check_windows(ctx.recipe, tokenizer, cfg.eval_windows, cfg.eval_window_tokens, "export")
    model = adapters.load_merged(merged_dir)
    reference = torch_reference.logits(model, windows)
    decoder = Decoder(model_file)
    prefill = compare(reference, [decoder.prefill(w)[0] for w in windows])
    figures = {"exporter": EXPORTER, "export_seconds": round(seconds, 2), "opset": opset, "adapter_nodes": added,
               "onnx_bytes": sum(p.stat().st_size for p in out.glob("model.onnx*")), "prefill": prefill}
    worst = prefill["max_logit_diff"]
    if cfg.decode_check_tokens:
        w = windows[0]
        start = len(w) - cfg.decode_check_tokens
        stepped = decode_logits(decoder, w, start)
        decode = compare([reference[0][start:]], [stepped])
        figures["decode"] = decode
        worst = max(worst, decode["max_logit_diff"])
    figures.update(max_logit_diff=worst, max_logit_diff_allowed=cfg.max_logit_diff)
    ctx.figures.update(figures)
    print(f"  {EXPORTER}: fp32 ONNX, opset {opset}, {seconds:.1f} s; vs merged PyTorch: max |logit diff| "
          f"{worst:.2e} (allowed {cfg.max_logit_diff:g}; prefill {prefill['tokens']} tokens"
          + (f", KV-cache decode {cfg.decode_check_tokens} tokens)" if cfg.decode_check_tokens else ")"))
    if not np.isfinite(worst) or worst > cfg.max_logit_diff:
        raise EdgepeftError(f"[export] the ONNX graph differs from the merged PyTorch model by {worst:.3g} in logits, "
                            f"more than max_logit_diff = {cfg.max_logit_diff:g}")


def _rewrite(merged_dir, out) -> int:
    """What the builder's graph lacks, added in place: the merge folder's unmerged adapters and, for a model
    that scales its token rows (Gemma), the exact scale. The number of adapter nodes added (0: none)."""
    import onnx
    from transformers import AutoConfig

    from edgepeft.models.families import family_of
    from edgepeft.onnx.rewrite import exact_embed_scale

    config = AutoConfig.from_pretrained(merged_dir)
    family = family_of(config)
    spec = adapters.unmerged_spec(merged_dir)
    if spec is None and family.embed_scale is None:
        return 0
    graph = onnx.load(str(out / MODEL))
    if family.embed_scale is not None:
        exact_embed_scale(graph, family.embed_scale)
    added = 0
    if spec is not None:
        from safetensors.numpy import load_file

        added = insert_unmerged(graph, spec, load_file(str(merged_dir / adapters.UNMERGED / adapters.WEIGHTS)),
                                config)
        # positions put in the KV cache ahead of the sequence (a gated prefix is attended apart, not cached)
        ahead = (spec.get("prompt") or {}).get("tokens", 0)
        if spec.get("prefix") and not spec["prefix"].get("gated"):
            ahead = spec["prefix"]["tokens"]
        if ahead:
            shorten_context(out / "genai_config.json", ahead)
    for f in out.glob(f"{MODEL}*"):
        f.unlink()
    save_graph(graph, out)
    return added


# The ai.onnx opset onnxruntime-genai 0.15's model builder writes: a target below it is refused before the
# first stage runs (the built graph's own opset is checked again after the build).
BUILDER_OPSET = 21


def preflight(recipe) -> None:
    if recipe.target.opset < BUILDER_OPSET:
        raise EdgepeftError(f"[export] the graph needs ai.onnx opset {BUILDER_OPSET}, target {recipe.target.name} "
                            f"supports up to {recipe.target.opset}")


STAGE = Stage("export", run, sections=("export", "target_graph"), reads=("merge",), preflight=preflight,
              files=lambda recipe: user_files(recipe, "merge", "eval_text"), shared=True,
              description="export the merged model to fp32 ONNX with a KV cache, check it against PyTorch")
