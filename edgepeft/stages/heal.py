"""Stage ``heal``: the requantized graph's block scales and norm weights fitted, by distillation, so that the
int4 model reproduces the model the user trained, (4-bit base + adapter), on the kernels the target runs. The
trained model is taken as the merge stage wrote it: the same function (checked there), in plain fp32.

GPTQ rounds the merged weights once and accepts the difference. Here the integer codes stay, and the
continuous parameters the graph reads are trained (``edgepeft.heal``): every MatMulNBits block scale (the
head's, which the token table shares), and the RMSNorm weights when ``[heal] norms`` is on. The PyTorch mirror
rounds activations to int8 as the target's kernels do (``target.Kernels``: per row on arm64's KleidiAI,
per block on MLAS), gradients passing straight through. The data are calibration windows: the calibration
part of ``[requantize] calib_text`` and the task's training examples, never evaluation data.

The fitted values are written back into the graph; ONNX Runtime must then compute what the mirror computes
(float activations, ``[heal] max_mirror_diff``) or the stage fails. Figures: KL, agreement and perplexity
change against the trained model on calibration windows, before and after, with ONNX Runtime at the
target's accuracy level; the losses, steps and time. A fit that ends worse than it started on calibration data
is not shipped (the requantized graph is). ``steps = 0`` passes the requantized graph through.
"""

from __future__ import annotations

import gc
import platform
import shutil
import time

import numpy as np

from edgepeft.adapters import api as adapters
from edgepeft.calib.sets import calibration_windows
from edgepeft.core.console import progress
from edgepeft.core.errors import EdgepeftError
from edgepeft.core.files import resume_checkpoint, write_atomic
from edgepeft.onnx.builder import MODEL, copy_beside_graph, save_graph
from edgepeft.pipeline.stage import Stage, StageContext, user_files
from edgepeft.pipeline.tables import HealConfig
from edgepeft.quality.scores import score

SCORED_WINDOWS = 8  # calibration windows (half prose, half task where there are) scored before and after


def _scored(windows: list[list[int]], prose: int) -> list[int]:
    """Indices of the windows scored before and after: alternating prose and task windows."""
    prose_i, task_i = list(range(prose)), list(range(prose, len(windows)))
    picked = [i for pair in zip(prose_i, task_i, strict=False) for i in pair]
    picked += prose_i[len(task_i):] + task_i[len(prose_i):]
    return picked[:SCORED_WINDOWS]


def _ort_logits(model, genai, windows: list[list[int]]) -> list:
    """The graph's logits under ONNX Runtime for each window."""
    from edgepeft.onnx.decoder import Decoder

    dec = Decoder(model.SerializeToString(), genai_config=genai)
    return [dec.prefill(w)[0] for w in windows]


def _ort_scores(model, genai, teacher, windows, picked) -> dict:
    """The graph under ONNX Runtime scored against the teacher on the picked windows."""
    ws = [windows[i] for i in picked]
    return score([teacher[i].float().numpy() for i in picked], _ort_logits(model, genai, ws), ws)


def _with_accuracy_level(model, level: int):
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = level
    return copy


def _rounded(figures: dict) -> dict:
    return {k: round(v, 5) if isinstance(v, float) else v for k, v in figures.items()}


def run(ctx: StageContext) -> None:
    import onnx
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from edgepeft.heal.distill import WEIGHTS, Distiller, teacher_log_probs, window_of
    from edgepeft.heal.mirror import GraphWeights, Mirror

    cfg: HealConfig = ctx.config
    kernels = ctx.recipe.kernels
    src, out = ctx.artifact("requantize"), ctx.output
    if cfg.steps == 0:
        shutil.copytree(src, out)
        ctx.figures.update(steps=0, healed=False)
        print("  [heal] steps = 0: the requantized graph ships as it is")
        return
    out.mkdir()
    copy_beside_graph(src, out)
    genai = src / "genai_config.json"
    t_start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(src)
    windows, about = calibration_windows(ctx.recipe, tokenizer, cfg.prose_windows, cfg.task_windows,
                                         cfg.window_tokens, ctx.recipe.requantize.calib_text)
    if not windows:
        raise EdgepeftError(f"[heal] no calibration window of {cfg.window_tokens} tokens in "
                            f"{ctx.recipe.requantize.calib_text!r} or the task's training examples")

    # The trained model, (4-bit base + adapter), as the merge stage wrote it: the adapter merged onto the exactly
    # dequantized base, checked there to agree within [merge] max_logit_diff; plain fp32, faster on a CPU
    # than bitsandbytes' 4-bit layers with the adapter beside them.
    teacher_model = adapters.load_merged(ctx.artifact("merge"))
    with progress(len(windows), "trained model's log-probabilities", "window") as bar:
        teacher = teacher_log_probs(teacher_model, windows, bar.update)
    del teacher_model
    gc.collect()
    teacher_seconds = time.time() - t_start

    graph = GraphWeights(onnx.load(str(src / MODEL)))
    picked = _scored(windows, about["prose_windows"])
    before = _ort_scores(graph.model, genai, teacher, windows, picked)

    config = AutoConfig.from_pretrained(ctx.artifact("merge"))
    scheme = kernels.activation_rounding
    merged = ctx.artifact("merge")
    mirror = Mirror(graph, config, scheme, kernels.bf16_scales, adapters.unmerged_spec(merged),
                    adapters.unmerged_tensors(merged))
    fit = Distiller(mirror, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.norms)
    saved = resume_checkpoint(ctx.work, ctx.fingerprint, ctx.options.get("resume"), WEIGHTS, cfg.steps)
    start = fit.load(saved) if saved is not None else 0
    t_fit = time.time()
    with progress(cfg.steps, f"heal (KL to the trained model, {scheme or 'float'} activations)", "step",
                  initial=start) as bar:
        for step in range(start, cfg.steps):
            i = window_of(step, len(windows), cfg.seed)
            fit.step(windows[i], teacher[i])
            bar.update(1)
            bar.set_postfix(kl=f"{np.mean(fit.losses[-len(windows):]):.4f}")
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                fit.save(ctx.work, step + 1, ctx.fingerprint)
    fit_seconds = time.time() - t_fit
    mirror.write_back()

    # ONNX Runtime must compute what the mirror computes: with float activations (accuracy level 0) the two
    # differ only by float rounding; at the target's level, by how int8 rounding flips fall.
    mirror.set_activations(None)
    check = windows[picked[0]]
    exact = _ort_logits(_with_accuracy_level(graph.model, 0), genai, [check])
    with torch.no_grad():
        mine = mirror.model(input_ids=torch.tensor([check])).logits[0].numpy()
    mirror_diff = float(np.abs(exact[0] - mine).max())
    if mirror_diff > cfg.max_mirror_diff:
        raise EdgepeftError(f"[heal] ONNX Runtime's logits differ from the PyTorch mirror's by {mirror_diff:.2e} "
                            f"(max_mirror_diff {cfg.max_mirror_diff:g}): the fitted values were not written "
                            "back as the mirror computes them")
    fitted = _ort_scores(graph.model, genai, teacher, windows, picked)
    # Never ship a graph the fit made worse (too few steps for the learning rate, say): keep the requantized one.
    healed = fitted["kl"] < before["kl"]
    if healed:
        save_graph(graph.model, out)
    else:
        for f in src.glob("model.onnx*"):
            shutil.copy2(f, out / f.name)
    after = fitted if healed else before

    n = len(windows)
    losses = fit.losses
    figures = {
        "healed": healed, "steps": cfg.steps, "resumed_from_step": start, "activation_rounding": scheme,
        "bf16_scales": kernels.bf16_scales,
        "architecture": kernels.architecture, "norms": cfg.norms, "lr": cfg.lr, "calibration": about,
        "scales": int(sum(p.numel() for p in fit.params["gains"])),
        "norm_weights": int(sum(p.numel() for p in fit.params["norms"])),
        "loss_first_epoch": round(float(np.mean(losses[:n])), 5) if losses else None,
        "loss_last_epoch": round(float(np.mean(losses[-n:])), 5) if losses else None,
        "calibration_before": _rounded(before), "calibration_fitted": _rounded(fitted),
        "calibration_after": _rounded(after),
        "calibration_scored_on": f"ONNX Runtime on this machine ({platform.machine()}), the graph's accuracy_level",
        "mirror_vs_ort_max_logit_diff": mirror_diff, "teacher_seconds": round(teacher_seconds, 1),
        "fit_seconds": round(fit_seconds, 1), "seconds": round(time.time() - t_start, 1),
    }
    write_atomic(ctx.out / "losses.json", "[" + ", ".join(f"{v:.5f}" for v in losses) + "]\n")
    ctx.figures.update(figures)
    b, f = before, fitted
    fit_line = (f"KL {b['kl']:.3f} -> {f['kl']:.3f}, agreement {100 * b['next_token_agreement']:.1f}% -> "
                f"{100 * f['next_token_agreement']:.1f}%, perplexity {100 * b['perplexity_increase']:+.1f}% -> "
                f"{100 * f['perplexity_increase']:+.1f}%")
    what = f"{figures['scales']:,} scales" + (f" and {figures['norm_weights']:,} norm weights" if cfg.norms else "")
    print(f"  fitted {what} in {cfg.steps} steps ({fit_seconds:.0f} s); on {before['tokens']} calibration tokens vs "
          f"the trained model: {fit_line}; ONNX Runtime = mirror within {mirror_diff:.1e}")
    if not healed:
        print("  the fit made the graph worse on calibration data: the requantized graph ships unchanged (more "
              "[heal] steps or a lower lr)")


STAGE = Stage("heal", run, sections=("heal", "requantize", "kernels"), reads=("requantize", "merge"),
              files=lambda recipe: {**user_files(recipe, "requantize", "calib_text"),
                                    **user_files(recipe, "train", "data", "validation_data")},
              shared=True, description="fit the int4 graph's scales and norm weights to the trained model "
                                       "(distillation, on the target's kernels)")
