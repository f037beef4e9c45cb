"""Stage ``requantize``: the exported fp32 graph's weights to the target's int4 (or int8), block-wise,
fitted on calibration data, with the most sensitive MatMuls kept at int8 when int4 misses the budget.

Every MatMul becomes ONNX Runtime's ``MatMulNBits`` (weight-only, ``block_size`` weights per scale,
symmetric unless the target says otherwise), the output head included; the target's activation precision
picks the kernels' ``accuracy_level`` (int8 activations, level 4, use the integer dot-product kernels).

Method (``edgepeft.onnx.quant``): ``gptq`` (default), ``clip`` (activation-aware range search) or ``rtn``
(round-to-nearest). Both calibrated methods read the inputs of every MatMul on the calibration set
(``edgepeft.calib.sets``: windows of the calibration part of the prose and of the task's training examples).
With ``[tasks]`` the base serves runtime adapters, and the statistics are taken with them active
(``quant.adapter_statistics``): each window under one adapter or the base, as the heal stage deals them.

Mixed precision (``edgepeft.onnx.mixed``): the all-int4 model is scored against the fp32 export on the
calibration windows. If it misses the recipe's ``[evaluate]`` budgets, tightened by ``margin``, the fewest
MatMuls that meet them, chosen by KL saved per extra byte, are kept at int8. The quality gate (stage
``evaluate``) then judges the bundle on held-out data the search never saw. The token embedding reads the
head's quantized weights when the two are tied (``edgepeft.onnx.rewrite``).
"""

from __future__ import annotations

import json
import time

from edgepeft.adapters.spec import RANK_QUANTUM, padded_rank
from edgepeft.calib.sets import calibration_windows
from edgepeft.core.console import mb, progress
from edgepeft.core.errors import EdgepeftError
from edgepeft.core.files import write_atomic
from edgepeft.onnx import quant
from edgepeft.onnx.builder import MODEL, copy_beside_graph, save_graph
from edgepeft.onnx.decoder import Decoder
from edgepeft.onnx.mixed import Candidates, Scorer, search
from edgepeft.pipeline.stage import Stage, StageContext, user_files
from edgepeft.pipeline.tables import RequantizeConfig
from edgepeft.quality.scores import passed, table, verdict


def run(ctx: StageContext) -> None:
    import onnx
    from transformers import AutoConfig, AutoTokenizer

    cfg: RequantizeConfig = ctx.config
    target, budgets = ctx.recipe.target, ctx.recipe.evaluate.budgets()
    src = ctx.artifact("export")
    out = ctx.output
    out.mkdir()
    copy_beside_graph(src, out)
    genai = src / "genai_config.json"
    tokenizer = AutoTokenizer.from_pretrained(src)
    windows, about = calibration_windows(ctx.recipe, tokenizer, cfg.calib_windows, cfg.calib_task_windows,
                                         cfg.calib_window_tokens, cfg.calib_text)
    if not windows:
        raise EdgepeftError(f"[requantize] calib_text {cfg.calib_text!r} is shorter than one window of "
                            f"{cfg.calib_window_tokens} tokens")
    fp32 = onnx.load(str(src / MODEL))
    t0 = time.time()
    stats = {}
    factory = lambda data: Decoder(data, genai_config=genai)  # noqa: E731
    under_adapters = None
    if cfg.method != "rtn" and ctx.recipe.tasks.names:
        # A shared base serves runtime adapters: its statistics are taken under them, each window under one
        # adapter (the prose dealt to the base and to each adapter, each task's examples under its own), as heal
        # fits it. Calibrated on the base alone, GPTQ weighs the down projections' input channels as the base
        # uses them, not as an IA3 scales them.
        from edgepeft.calib.sets import adapter_windows
        from edgepeft.onnx.switchable import adapter_params

        cal, under, under_adapters = adapter_windows(ctx.recipe, tokenizer, cfg.calib_windows,
                                                     cfg.calib_task_windows, cfg.calib_window_tokens, cfg.calib_text)
        config = AutoConfig.from_pretrained(ctx.artifact("merge"))
        params = {name: adapter_params(fp32.graph, config, ctx.artifact("train") / name)[1]
                  for name in ctx.recipe.tasks.names}
        with progress(len(cal), f"calibration statistics (under {len(params)} adapters and the base)",
                      "window") as bar:
            stats = quant.adapter_statistics(fp32, cal, under, params, factory, full=cfg.method == "gptq",
                                             progress=bar.update)
    elif cfg.method != "rtn":
        with progress(len(windows), "calibration statistics", "window") as bar:
            stats = quant.input_statistics(fp32, windows, factory, full=cfg.method == "gptq", progress=bar.update)
    cands = Candidates(fp32, target, cfg.method, stats, cfg.gptq_damp, cfg.gptq_act_order, cfg.keep_int8)
    with progress(len(cands.nodes), f"quantize ({cfg.method}, int{target.bits})", "matmul") as bar:
        for name in cands.nodes:
            cands.quantized(name, 8 if name in cands.always else target.bits)
            bar.update(1)
    quantize_seconds = time.time() - t0

    scorer = Scorer(src / MODEL, genai, {"prose": windows[:about["prose_windows"]][:cfg.measure_windows],
                                         "task": windows[about["prose_windows"]:][:cfg.measure_windows]})
    model, embedding = cands.build()
    first = scorer(model)
    rows = verdict(first, budgets, cfg.margin)
    kept = len(cands.always - {cands.head})
    head = (", head int8" if cands.head in cands.always else "") + (f", {kept} MatMuls kept at int8" if kept else "")
    print(f"  {cfg.method} int{target.bits} block {target.block_size}{head}: {mb(first['bytes'])}; "
          f"on {first['tokens']} "
          f"calibration tokens vs fp32 (worst of prose and task): perplexity "
          f"{100 * first['perplexity_increase']:+.1f}%, KL {first['kl']:.3f}, "
          f"agreement {100 * first['next_token_agreement']:.1f}%")
    found, final = None, first
    if not passed(rows) and cfg.mixed_precision and target.bits < 8:
        print(f"  misses the budgets (x{cfg.margin:g} margin) on calibration data:\n{table(rows)}\n"
              "  searching for the fewest MatMuls to keep at int8:")
        found = search(cands, scorer, budgets, cfg)
        model, embedding = cands.build(set(found["int8"]))
        final = found["steps"][[s["int8_matmuls"] for s in found["steps"]].index(len(found["int8"]))]
        if not found["met"]:
            print("  even with every MatMul at int8 the calibration budgets are missed; the quality gate decides")
    fp32_bytes = sum(p.stat().st_size for p in src.glob("model.onnx*"))
    save_graph(model, out)
    q_bytes = sum(p.stat().st_size for p in out.glob("model.onnx*"))
    int8 = sorted(cands.always) + (found["int8"] if found else [])
    detail = {"method": cfg.method, "calibration": under_adapters or about, "bits": {n: 8 if n in int8 else target.bits
                                                                    for n in cands.nodes}}
    if found:
        detail.update(search_order=found["order"], sensitivity=found["gains"], steps=found["steps"])
    write_atomic(ctx.out / "quantization.json", json.dumps(detail, indent=1) + "\n")
    ops = [n.op_type for n in model.graph.node]
    ctx.figures.update(
        method=cfg.method, weights=target.weights, block_size=target.block_size, symmetric=target.symmetric,
        activations=target.activations, matmulnbits=ops.count("MatMulNBits"), int8_matmuls=len(int8),
        int8_matmul_names=int8, embedding=embedding, fp32_bytes=fp32_bytes, quantized_bytes=q_bytes,
        ratio=round(fp32_bytes / q_bytes, 2), calibration=about,
        statistics_under_adapters=under_adapters, quantize_seconds=round(quantize_seconds, 1),
        calibration_scores={"uniform": first, "final": final}, budgets_met_on_calibration=passed(
            verdict(final, budgets, cfg.margin)), search_steps=found["steps"] if found else [])
    print(f"  {mb(fp32_bytes)} -> {mb(q_bytes)} ({len(int8)} of {len(cands.nodes)} MatMuls at int8, embedding "
          f"{embedding}); calibration vs fp32: perplexity {100 * final['perplexity_increase']:+.1f}%, "
          f"KL {final['kl']:.3f}, agreement {100 * final['next_token_agreement']:.1f}%")


def preflight(recipe) -> None:
    adapter, block, name = recipe.adapter, recipe.target.block_size, recipe.target.name
    _check_widths(recipe, block, name)
    if adapter.method in ("adapter", "unipelt") and adapter.bottleneck % block:
        raise EdgepeftError(f"[adapter] bottleneck {adapter.bottleneck} must be a multiple of target {name}'s "
                            f"block_size {block} (its up-projection is quantized block-wise)")
    if (adapter.method == "lora" and adapter.gated or adapter.method == "unipelt") and padded_rank(adapter.r) % block:
        raise EdgepeftError(f"[adapter] gated LoRA's rank is padded to a multiple of {RANK_QUANTUM} in the graph; "
                            f"target {name}'s block_size {block} must divide it (r = {adapter.r}): use r = {block}")


def _check_widths(recipe, block: int, name: str) -> None:
    """Every weight's input width (what its blocks run along) is a multiple of the target's block_size."""
    import math

    from edgepeft.adapters.lora import head_dim
    from edgepeft.models.sources import load_config, resolve

    config = load_config(resolve(recipe.model.source, recipe.base_dir))
    widths = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
              "num_attention_heads x head_dim": config.num_attention_heads * head_dim(config)}
    bad = [(k, w) for k, w in widths.items() if w % block]
    if bad:
        g = math.gcd(*widths.values())
        fits = max((b for b in (16, 32, 64, 128, 256) if g % b == 0), default=None)
        hint = f"a target with block_size {fits}" if fits else "a model whose widths are multiples of 16"
        raise EdgepeftError(f"[requantize] the model's {bad[0][0]} {bad[0][1]} is not a multiple of target {name}'s "
                            f"block_size {block} (int4 blocks run along it): use {hint}")


STAGE = Stage("requantize", run, sections=("requantize", "precision", "evaluate"),
              reads=("export", "train", "merge"),
              preflight=preflight,
              files=lambda recipe: {**user_files(recipe, "requantize", "calib_text"),
                                    **user_files(recipe, "train", "data", "validation_data")},
              shared=True, description="quantize the ONNX weights for the target on calibration data (GPTQ; "
                                       "int8 where needed)")
