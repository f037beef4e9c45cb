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
is not shipped (the requantized graph is): worse is a higher KL, or, with ``[heal] max_answer_drop``, any task
losing answers: the share of the answers in its calibration windows that the graph gives, teacher-forced, exactly
as the trained model does (reported always). A KL over every position can fall while answers are lost.
``steps = 0`` passes the requantized graph through.

With ``[tasks]`` the graph is a shared base that ships with runtime adapters (``edgepeft.onnx.switchable``), and
each adapter is judged against its own (4-bit base + adapter). The base is then fitted under every adapter in
turn: each calibration window is computed under one adapter (the prose windows dealt to the base alone and to
each adapter, each task's training examples under its own), its teacher is that adapter merged onto the
dequantized base, and the mirror applies the adapter's runtime values as the graph's slots will
(``Mirror.set_adapter``); the adapters stay fixed. The figures are given per adapter too. Then, with
``[heal] adapter_steps``, each adapter of the ``adapter_methods`` (IA3 and LoRA by default) has its own values fitted on
the base as shipped (healed or not), the base fixed, against its own teacher, on its share of the prose windows and
its task's training examples each alone (``[heal] adapter_examples``): the adapters were trained on the NF4 base,
and what the int4 base computes otherwise an adapter can absorb for its own task, which a shared base cannot do
for every task at once. A fitted adapter that holds (its examples' answers kept, its prose KL up by no more than
``adapter_max_kl_increase``) is written to ``adapters/<name>.onnx_adapter`` for the bundle.
"""

from __future__ import annotations

import gc
import itertools
import platform
import shutil
import time

import numpy as np

from edgepeft.adapters import api as adapters
from edgepeft.calib.sets import adapter_windows, calibration_windows
from edgepeft.core.console import progress
from edgepeft.core.errors import EdgepeftError
from edgepeft.core.files import resume_checkpoint, write_atomic
from edgepeft.onnx.builder import MODEL, copy_beside_graph, save_graph
from edgepeft.pipeline.stage import Stage, StageContext, task_files, user_files
from edgepeft.pipeline.tables import HealConfig
from edgepeft.quality.scores import score

SCORED_WINDOWS = 8  # calibration windows (half prose, half task where there are) scored before and after


def _scored(windows: list[list[int]], prose: int, under: list[str | None]) -> list[int]:
    """Indices of the windows scored before and after: alternating prose and task windows, and with runtime
    adapters every adapter's (and the base's) windows in turn."""
    groups: dict[tuple, list[int]] = {}
    for i in range(len(windows)):
        groups.setdefault((under[i] or "", i >= prose), []).append(i)
    picked = [i for row in itertools.zip_longest(*(groups[k] for k in sorted(groups))) for i in row if i is not None]
    return picked[:max(SCORED_WINDOWS, 2 * len(groups))]


def _ort_logits(model, genai, windows: list[list[int]], under: list[str | None] | None = None,
                params: dict | None = None) -> list:
    """The graph's logits under ONNX Runtime for each window; with ``under``, each window computed with its
    runtime adapter's values (``params``) fed to the graph's slots, as onnxruntime-genai feeds them."""
    from edgepeft.onnx.decoder import Decoder

    dec = Decoder(model.SerializeToString(), genai_config=genai)
    out = []
    for k, w in enumerate(windows):
        dec.extra = params[under[k]] if under and under[k] else {}
        out.append(dec.prefill(w)[0])
    return out


def _answer_windows(answers) -> list[int]:
    return [i for i, m in enumerate(answers) if m is not None and any(m)]


def _judged(model, genai, teacher, windows, picked, answers, under=None, params=None) -> tuple[dict, dict]:
    """The graph under ONNX Runtime against the teacher, in one pass over the windows either needs (each under
    its adapter): ``_ort_scores`` on the picked windows and ``_answer_agreement`` on the answer windows."""
    need = sorted(set(picked) | set(_answer_windows(answers)))
    logits = dict(zip(need, _ort_logits(model, genai, [windows[i] for i in need],
                                        [under[i] for i in need] if under else None, params), strict=True))
    return (_ort_scores(logits, teacher, windows, picked, under),
            _answer_agreement(logits, teacher, windows, answers, under))


def _ort_scores(logits: dict, teacher, windows, picked, under=None) -> dict:
    """The graph's logits (by window index) scored against the teacher on the picked windows, overall and, with
    adapters, per adapter."""
    ws = [windows[i] for i in picked]
    overall = score([teacher[i].float().numpy() for i in picked], [logits[i] for i in picked], ws)
    if not under:
        return overall
    per = {}
    for name in dict.fromkeys(under[i] for i in picked):
        ks = [i for i in picked if under[i] == name]
        per[name or "(base)"] = _rounded(score([teacher[i].float().numpy() for i in ks], [logits[i] for i in ks],
                                               [windows[i] for i in ks]))
    return {**overall, "per_adapter": per}


def _answer_agreement(logits: dict, teacher, windows, answers, under=None) -> dict[str, float]:
    """Per task (per adapter with ``under``), the share of the answers in its calibration windows (each run of
    answer positions, teacher-forced) whose every token is the graph's top token (``logits`` by window index)
    where it is the trained model's: greedy exact match, on training data, against the trained model. A KL over
    every position (mostly prose, system prompt and question) can fall while these are lost."""
    hits: dict[str, list[int]] = {}
    for i in _answer_windows(answers):
        mask = np.asarray(answers[i][:len(windows[i])], dtype=bool)
        same = logits[i].argmax(-1) == teacher[i].float().numpy().argmax(-1)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
        h = hits.setdefault((under[i] if under else None) or "(task)", [0, 0])
        for start, end in zip(edges[::2], edges[1::2], strict=True):
            h[0] += bool(same[start:end].all())
            h[1] += 1
    return {name: round(h[0] / h[1], 5) for name, h in hits.items()}


def _teacher_model(ctx: StageContext, name: str | None):
    """The trained model as the merge stage wrote it, in fp32; with [tasks], adapter ``name`` merged onto it as its
    single-task merge would be (None: the base alone)."""
    model = adapters.load_merged(ctx.artifact("merge"))
    if name is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, ctx.artifact("train") / name).merge_and_unload().eval()


def _adapter_data(ctx: StageContext, cfg: HealConfig, tokenizer, name: str, windows, under, teacher, answers):
    """What adapter ``name`` is fitted and judged on: its share of the prose windows, and its task's first
    ``[heal] adapter_examples`` training examples, each alone (``calib.sets.task_examples``), with its teacher's
    log-probabilities. The packed task windows read later conversations after earlier ones, which training and
    generation never do: there the calendar IA3's own teacher gave 14.5% of the answers, against 73.4% of
    single examples, and a fit towards it won nothing at the gate (docs/measurements.md)."""
    from edgepeft.calib.data import recipe_splits
    from edgepeft.calib.sets import task_examples
    from edgepeft.heal.distill import teacher_log_probs

    prose = [i for i, u in enumerate(under) if u == name and (not answers or answers[i] is None)]
    masks: list = []
    task = ctx.recipe.task(name)
    examples = task_examples(tokenizer, recipe_splits(task)["train"], cfg.adapter_examples, task.train.max_length,
                             masks)
    model = _teacher_model(ctx, name)
    with progress(len(examples), f"adapter {name}'s trained model on {len(examples)} examples", "example") as bar:
        logp = teacher_log_probs(model, examples, bar.update)
    del model
    gc.collect()
    return ([windows[i] for i in prose] + examples, [teacher[i] for i in prose] + logp,
            [None] * len(prose) + masks)


def _adapter_judged(slotted, genai, trials: list[dict], windows, teacher, masks) -> list[tuple[float | None,
                                                                                              float | None]]:
    """What an adapter's fit answers for, the graph under ONNX Runtime with each of ``trials`` (its slot values)
    fed in turn, in one session: the KL to its teacher on its prose windows (None without), and the share of its
    examples whose answer is given exactly as the example's own labels say, teacher-forced (greedy exact match on
    training data; None without examples). The gate judges the same two things on held-out data: prose against
    the reference, answers against the references. Against the teacher's own answers the labels' pull would count
    as a loss."""
    n = len(windows)
    keys = [f"trial {j}" for j in range(len(trials))]
    logits = _ort_logits(slotted, genai, windows * len(trials), [k for k in keys for _ in windows],
                         dict(zip(keys, trials, strict=True)))
    prose = [i for i, m in enumerate(masks) if m is None]
    shots = [i for i, m in enumerate(masks) if m is not None]
    out = []
    for j in range(len(trials)):
        mine = logits[j * n:(j + 1) * n]
        kl = score([teacher[i].float().numpy() for i in prose], [mine[i] for i in prose],
                   [windows[i] for i in prose])["kl"] if prose else None
        hits = [all(mine[i][t].argmax() == windows[i][t + 1] for t in range(len(windows[i]) - 1) if masks[i][t])
                for i in shots]
        out.append((kl, round(sum(hits) / len(hits), 5) if hits else None))
    return out


def _fit_adapters(ctx: StageContext, cfg: HealConfig, tokenizer, graph, config, methods, params, windows, under,
                  teacher, answers, genai, out) -> dict:
    """Each runtime adapter's own values fitted on the shipped base (``graph``, fixed) against its own teacher
    (``distill.fit_adapter``), on ``_adapter_data``, then judged on the same data with ONNX Runtime as the graph
    with slots computes (``_adapter_judged``): an adapter whose fit raises its prose KL by more than
    ``adapter_max_kl_increase`` or loses its examples' answers (more than ``max_answer_drop``, or any when unset)
    keeps its trained values. Fitted values that hold go to ``out/adapters/<name>`` (the bundle ships them);
    returns the figures per adapter."""
    from edgepeft.heal.distill import fit_adapter
    from edgepeft.heal.mirror import Mirror
    from edgepeft.onnx.switchable import EXTENSION, with_slots, write_adapter

    kernels = ctx.recipe.kernels
    mirror = Mirror(graph, config, kernels.activation_rounding, kernels.bf16_scales)
    slotted = with_slots(graph.model, params)
    keep = 0.0 if cfg.max_answer_drop is None else cfg.max_answer_drop
    figures = {}
    for name in params:
        if methods[name] not in cfg.adapter_methods:
            continue
        data, logp, masks = _adapter_data(ctx, cfg, tokenizer, name, windows, under, teacher, answers)
        if not data:
            raise EdgepeftError(f"[heal] adapter {name} has nothing to be fitted on: no prose window and no training "
                                "example with an answer ([heal] adapter_examples, prose_windows)")
        lr = cfg.adapter_lr or (3e-3 if methods[name] == "ia3" else 3e-4)
        with progress(cfg.adapter_steps, f"fit adapter {name} ({methods[name]}) on the int4 base", "step") as bar:
            def shown(loss, bar=bar):
                bar.update(1)
                bar.set_postfix(kl=f"{loss:.4f}")
            fitted, losses = fit_adapter(mirror, params[name], data, logp, lr, cfg.adapter_steps, cfg.seed, shown,
                                         masks, cfg.adapter_label_weight)
        k = min(len(data), len(losses))
        (kl_before, a_before), (kl_after, a_after) = _adapter_judged(slotted, genai, [params[name], fitted], data,
                                                                     logp, masks)
        lost = a_before is not None and a_after < a_before - keep
        worse = kl_before is not None and kl_after > kl_before * (1 + cfg.adapter_max_kl_increase)
        figures[name] = {"method": methods[name], "lr": lr, "steps": cfg.adapter_steps,
                         "prose_windows": sum(m is None for m in masks), "examples": sum(m is not None for m in masks),
                         "label_weight": cfg.adapter_label_weight,
                         "loss_first_epoch": round(float(np.mean(losses[:k])), 5),
                         "loss_last_epoch": round(float(np.mean(losses[-k:])), 5),
                         "prose_kl_before": None if kl_before is None else round(kl_before, 5),
                         "prose_kl_after": None if kl_after is None else round(kl_after, 5),
                         "answers_before": a_before, "answers_after": a_after, "fitted": not worse and not lost}
        if figures[name]["fitted"]:
            (out / "adapters").mkdir(exist_ok=True)
            write_adapter(fitted, out / "adapters" / f"{name}{EXTENSION}")
        del logp
        gc.collect()
    return figures


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
    names = ctx.recipe.tasks.names
    answers: list = []
    if names:
        windows, under, about = adapter_windows(ctx.recipe, tokenizer, cfg.prose_windows, cfg.task_windows,
                                                cfg.window_tokens, ctx.recipe.requantize.calib_text, answers)
    else:
        windows, about = calibration_windows(ctx.recipe, tokenizer, cfg.prose_windows, cfg.task_windows,
                                             cfg.window_tokens, ctx.recipe.requantize.calib_text, answers)
        under = [None] * len(windows)
    weights = [None if m is None or cfg.answer_weight == 1 else 1 + (cfg.answer_weight - 1) * torch.tensor(
        m, dtype=torch.float32) for m in answers]
    if not windows:
        raise EdgepeftError(f"[heal] no calibration window of {cfg.window_tokens} tokens in "
                            f"{ctx.recipe.requantize.calib_text!r} or the task's training examples")

    # The trained model, (4-bit base + adapter), as the merge stage wrote it: the adapter merged onto the exactly
    # dequantized base, checked there to agree within [merge] max_logit_diff; plain fp32, faster on a CPU
    # than bitsandbytes' 4-bit layers with the adapter beside them. With [tasks] the merge stage wrote the base
    # alone, and each task's teacher is its adapter merged onto it here, as its single-task merge would be: the
    # shared base is fitted to every (4-bit base + adapter) under that adapter's runtime values, and to the base.
    teacher = [None] * len(windows)
    with progress(len(windows), "trained model's log-probabilities", "window") as bar:
        for name in dict.fromkeys(under):
            idx = [i for i, u in enumerate(under) if u == name]
            teacher_model = _teacher_model(ctx, name)
            for i, lp in zip(idx, teacher_log_probs(teacher_model, [windows[i] for i in idx], bar.update),
                             strict=True):
                teacher[i] = lp
            del teacher_model
            gc.collect()
    teacher_seconds = time.time() - t_start

    graph = GraphWeights(onnx.load(str(src / MODEL)))
    config = AutoConfig.from_pretrained(ctx.artifact("merge"))
    params, methods = {}, {}
    if names:
        from edgepeft.onnx.switchable import adapter_params, with_slots

        for name in names:
            methods[name], params[name] = adapter_params(graph.model.graph, config, ctx.artifact("train") / name)
    picked = _scored(windows, about["prose_windows"], under)
    scoring = (lambda m: with_slots(m, params)) if names else (lambda m: m)
    before, answers_before = _judged(scoring(graph.model), genai, teacher, windows, picked, answers,
                                     under if names else None, params)

    scheme = kernels.activation_rounding
    merged = ctx.artifact("merge")
    mirror = Mirror(graph, config, scheme, kernels.bf16_scales, adapters.unmerged_spec(merged),
                    adapters.unmerged_tensors(merged))
    fit = Distiller(mirror, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.norms)
    saved = resume_checkpoint(ctx.work, ctx.fingerprint, ctx.options.get("resume"), WEIGHTS, cfg.steps)
    start = fit.load(saved) if saved is not None else 0
    t_fit = time.time()
    what = f"{scheme or 'float'} activations" + (f", under {len(names)} adapters and the base" if names else "")
    with progress(cfg.steps, f"heal (KL to the trained model, {what})", "step", initial=start) as bar:
        for step in range(start, cfg.steps):
            i = window_of(step, len(windows), cfg.seed)
            if names:
                mirror.set_adapter(params.get(under[i]))
            fit.step(windows[i], teacher[i], weights[i])
            bar.update(1)
            bar.set_postfix(kl=f"{np.mean(fit.losses[-len(windows):]):.4f}")
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                fit.save(ctx.work, step + 1, ctx.fingerprint)
    if names:
        mirror.set_adapter(None)
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
    fitted, answers_fitted = _judged(scoring(graph.model), genai, teacher, windows, picked, answers,
                                     under if names else None, params)
    # Never ship a graph the fit made worse (too few steps for the learning rate, say): keep the requantized one.
    # Worse is a higher KL, or, with [heal] max_answer_drop, any task's answers lost (exact match needs every
    # token of an answer: on the calendar IA3 a fit that lowered KL 0.075 -> 0.055 took greedy exact match on
    # training prompts from 70.3% to 57.8% while its answer tokens' agreement moved by under half a point).
    drop = cfg.max_answer_drop
    lost = [] if drop is None else sorted(n for n, a in answers_fitted.items() if a < answers_before[n] - drop)
    healed = fitted["kl"] < before["kl"] and not lost
    if healed:
        save_graph(graph.model, out)
    else:
        for f in src.glob("model.onnx*"):
            shutil.copy2(f, out / f.name)
    after = fitted if healed else before

    adapter_fit = {}
    if names and cfg.adapter_steps and any(methods[n] in cfg.adapter_methods for n in params):
        shipped = graph if healed else GraphWeights(onnx.load(str(src / MODEL)))
        adapter_fit = _fit_adapters(ctx, cfg, tokenizer, shipped, config, methods, params, windows, under, teacher,
                                    answers, genai, out)

    n = len(windows)
    losses = fit.losses
    figures = {
        "healed": healed, "steps": cfg.steps, "resumed_from_step": start, "activation_rounding": scheme,
        "answer_weight": cfg.answer_weight,
        "bf16_scales": kernels.bf16_scales,
        "architecture": kernels.architecture, "norms": cfg.norms, "lr": cfg.lr, "calibration": about,
        "scales": int(sum(p.numel() for p in fit.params["gains"])),
        "norm_weights": int(sum(p.numel() for p in fit.params["norms"])),
        "loss_first_epoch": round(float(np.mean(losses[:n])), 5) if losses else None,
        "loss_last_epoch": round(float(np.mean(losses[-n:])), 5) if losses else None,
        "calibration_before": _rounded(before), "calibration_fitted": _rounded(fitted),
        "calibration_after": _rounded(after),
        "answer_agreement_before": answers_before, "answer_agreement_fitted": answers_fitted,
        "answers_lost": lost, "adapter_fit": adapter_fit,
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
    if answers_before:
        print("  answers given as the trained model gives them (task windows, teacher-forced): " + ", ".join(
            f"{n} {100 * answers_before[n]:.1f}% -> {100 * answers_fitted[n]:.1f}%" for n in answers_before))
    if lost:
        print(f"  the fit costs the answers of {', '.join(lost)}: the requantized graph ships unchanged")
    elif not healed:
        print("  the fit made the graph worse on calibration data: the requantized graph ships unchanged (more "
              "[heal] steps or a lower lr)")
    for name, f in adapter_fit.items():
        a_before, a_after, k_before, k_after = (f[k] for k in ("answers_before", "answers_after", "prose_kl_before",
                                                               "prose_kl_after"))
        said = ([] if k_before is None else [f"prose KL {k_before:.3f} -> {k_after:.3f}"]) + (
            [] if a_before is None else [f"its {f['examples']} examples' answers {100 * a_before:.1f}% -> "
                                         f"{100 * a_after:.1f}%"])
        print(f"  adapter {name} fitted on the {'healed' if healed else 'requantized'} base in {f['steps']} steps: "
              + ", ".join(said) + ": " + ("ships fitted" if f["fitted"] else "keeps its trained values"))


STAGE = Stage("heal", run, sections=("heal", "requantize", "kernels", "tasks"), reads=("requantize", "merge", "train"),
              files=lambda recipe: {**user_files(recipe, "requantize", "calib_text"),
                                    **task_files(recipe, "train", "data", "validation_data")},
              shared=True, description="fit the int4 graph's scales and norm weights to the trained model "
                                       "(distillation, on the target's kernels)")
