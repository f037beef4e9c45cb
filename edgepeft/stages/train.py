"""Stage ``train``: an adapter on the frozen 4-bit base: LoRA or IA3 (peft), or edgepeft's own bottleneck
adapters, gated LoRA, prefix or prompt tuning, UniPELT (``edgepeft.adapters.api``).

The loop is plain and visible (no hidden trainer): it runs under ``accelerate``, so the same code runs on
one CPU, one GPU, or several under ``accelerate launch`` / ``torchrun`` (DDP). Each process loads the
4-bit base on its own device and takes its slice of every global batch.

Speed (``nox -s bench-train`` measures it against the standard transformers + peft QLoRA recipe): each step's
examples are packed into one row without padding, the prompt prefix they share (system prompt, chat markup)
computed once (``calib.data.pack``: the same loss as padded rows), and attention runs example by example over
that layout instead of over a masked row (``edgepeft.models.packed``); the output head over a 49k vocabulary is
applied only at the positions that predict a labelled token, a chunk at a time, so the full logits are never
held (``training.head_loss``); where the hardware has bfloat16 (``compute_dtype``, as the QLoRA recipe sets it)
the step runs under PyTorch's bf16 autocast, the frozen token table and norms held in bf16, the
adapter and its optimizer state in float32; gradient checkpointing is off unless asked for
(``[train] gradient_checkpointing``). The model set-up, batches, losses and the optimizer step are components
(``edgepeft.adapters.training``) that the benchmark runs too; this module owns the loop: data order,
rehearsal, checkpoints, resuming, figures. Validation runs the model as the quality gate's reference computes
it (float32, ``training.restore``).

Resuming: the data order and the dropout seed of step ``k`` depend only on (seed, k), so a run resumed from
a checkpoint takes exactly the steps an uninterrupted run would have. Checkpoints (adapter, optimizer and
scheduler state) live in ``<run>/.train.work`` until the stage succeeds.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

from edgepeft.adapters import api as adapters
from edgepeft.adapters import training
from edgepeft.calib.data import recipe_splits
from edgepeft.calib.sets import replay_windows
from edgepeft.core.console import mb, progress
from edgepeft.core.errors import EdgepeftError
from edgepeft.core.files import resume_checkpoint, write_checkpoint
from edgepeft.pipeline.stage import Stage, StageContext, task_files, user_files
from edgepeft.pipeline.tables import AdapterConfig, TrainConfig


def preflight(recipe) -> None:
    for name in recipe.tasks.names:
        try:
            preflight(recipe.task(name))
        except EdgepeftError as e:
            raise EdgepeftError(f"[tasks.{name}] {e}") from None
    from edgepeft.models.families import adapter_problem, family_of
    from edgepeft.models.sources import load_config, resolve

    problem = adapter_problem(recipe.adapter, family_of(load_config(resolve(recipe.model.source, recipe.base_dir))))
    if problem:
        raise EdgepeftError(f"[adapter] {problem}")
    cfg = recipe.train
    splits = recipe_splits(recipe)
    if len(splits["train"]) < cfg.batch_size:
        raise EdgepeftError(f"[train] {cfg.data}: {len(splits['train'])} training examples, fewer than "
                            f"batch_size {cfg.batch_size}")
    if cfg.replay_batch:
        user_files(recipe, "train", "replay_text")  # a missing file fails here, before the model loads


ADAPTER_WEIGHTS = "adapter.safetensors"  # a checkpoint's adapter tensors (edgepeft.adapters.api.state)


def _save_checkpoint(work: Path, step: int, fp: str, model, optimizer, scheduler, losses: list[float],
                     replay: list[float]) -> Path:
    return write_checkpoint(work, step, {"fingerprint": fp, "losses": losses, "replay_losses": replay},
                            adapters.state(model), ADAPTER_WEIGHTS, optimizer, scheduler)


def _load_checkpoint(saved: tuple[dict, dict, dict], model, optimizer,
                     scheduler) -> tuple[int, list[float], list[float]]:
    adapter, state, meta = saved
    adapters.set_state(model, adapter)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return meta["step"], meta["losses"], meta.get("replay_losses", [])


def _replay_indices(n: int, batch: int, step: int) -> list[int]:
    """The rehearsal windows of global step ``step``: the next ``batch`` of the ``n``, cycling."""
    return [(step * batch + j) % n for j in range(batch)]


def _loss_figures(losses: list[float], step_times: list[float], tokens: int, replay: list[float]) -> dict:
    out = {"loss_first": losses[0], "loss_last": losses[-1],
           "loss_first10_mean": round(statistics.fmean(losses[:10]), 4),
           "loss_last10_mean": round(statistics.fmean(losses[-10:]), 4), "losses": losses}
    if replay:
        out.update(replay_loss_first10_mean=round(statistics.fmean(replay[:10]), 4),
                   replay_loss_last10_mean=round(statistics.fmean(replay[-10:]), 4), replay_losses=replay)
    if step_times:
        timed = step_times[1:] or step_times
        out.update(step_seconds_median=round(statistics.median(timed), 3),
                   tokens_per_second=round(tokens / sum(step_times), 1))
    return out


def _validation(model, tokenizer, samples, cfg: TrainConfig, method: str) -> dict:
    """Exact match on validation examples of the 4-bit base alone and with the adapter."""
    from edgepeft.quality.answers import exact_match, matcher

    val = [s for s in samples if s.reference is not None][:cfg.eval_examples]
    if not val:
        return {}
    bar = progress(2 * len(val), "exact match (base, then adapter)", "example")
    kw = {"match": matcher(cfg.data), "max_new_tokens": cfg.eval_max_new_tokens, "progress": bar.update}
    with adapters.disabled(model):
        base_acc, _ = exact_match(model, tokenizer, val, **kw)
    tuned_acc, answers = exact_match(model, tokenizer, val, **kw)
    bar.close()
    print(f"  validation exact match on {len(val)} examples: 4-bit base {100 * base_acc:.1f}% -> "
          f"4-bit base + {method} {100 * tuned_acc:.1f}%")
    return {"validation_examples": len(val), "validation_exact_match_base": base_acc,
            "validation_exact_match_adapter": tuned_acc,
            "validation_samples": [{"reference": s.reference, "answer": a}
                                   for s, a in zip(val[:5], answers[:5], strict=True)]}


def run(ctx: StageContext) -> None:
    """One adapter in ``adapter/``, or with ``[tasks]`` one per task in ``adapter/<task>/``, one after the other
    on the same 4-bit base."""
    if not ctx.recipe.tasks.names:
        ctx.figures.update(_fit(ctx, ctx.recipe, ctx.output, ctx.work))
        return
    tasks = {}
    for name in ctx.recipe.tasks.names:
        print(f"  task {name}:")
        tasks[name] = _fit(ctx, ctx.recipe.task(name), ctx.output / name, ctx.work / name)
    ctx.figures.update(tasks=tasks)


def _fit(ctx: StageContext, recipe, output: Path, work: Path) -> dict:
    """Train ``recipe``'s adapter into ``output`` (checkpoints in ``work``); returns its figures."""
    import torch
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from edgepeft.models.pytorch import peak_memory_bytes

    cfg: TrainConfig = recipe.train
    adapter: AdapterConfig = recipe.adapter
    fp = ctx.fingerprint
    work.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    say = print if main else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)

    qdir = ctx.artifact("quantize")
    tokenizer = AutoTokenizer.from_pretrained(qdir)
    splits = recipe_splits(recipe)
    train = training.encoded(tokenizer, splits["train"], cfg)
    world = accelerator.num_processes
    prose = replay_windows(recipe, tokenizer, cfg.steps * cfg.replay_batch * world, cfg.replay_tokens) \
        if cfg.replay_batch else []

    setup = training.trainable_model(qdir, adapter, cfg, accelerator.device)
    model, dtype, packed = setup.model, setup.dtype, setup.packed
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = ctx.record_of("load")["figures"]["parameters"]  # 4-bit packing hides the true count in the model
    params, lr, optimizer, scheduler = training.optimizer_for(model, adapter, cfg, cfg.steps)

    start, losses, replay = 0, [], []
    saved = resume_checkpoint(work, fp, ctx.options.get("resume"), ADAPTER_WEIGHTS, cfg.steps, say)
    if saved is not None:
        start, losses, replay = _load_checkpoint(saved, model, optimizer, scheduler)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    say(f"  {adapter.method}: {trainable:,} trainable parameters ({100 * trainable / total:.2f}% of {total:,}); "
        f"{len(train)} training examples, {cfg.steps} steps of {cfg.batch_size} "
        f"{'packed in one row' if packed else 'padded'} at lr {lr:g}, {str(dtype).split('.')[-1]} matmuls, on "
        f"{accelerator.device}"
        + (f" x {accelerator.num_processes} processes" if accelerator.num_processes > 1 else "")
        + (f"; {cfg.replay_batch} windows of {cfg.replay_tokens} prose tokens rehearsed per step ({len(prose)} "
           f"windows of {cfg.replay_text})" if prose else ""))

    rank = accelerator.process_index
    step_times: list[float] = []
    tokens = 0
    model.train()
    bar = progress(cfg.steps, "train", "step", initial=start, disable=not main)
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 1_000_003 + step)
        idx = training.batch_indices(len(train), cfg.batch_size * world, step, cfg.seed)[rank::world]
        examples = [train[i] for i in idx]
        windows = [prose[i] for i in _replay_indices(len(prose), cfg.replay_batch * world, step)[rank::world]] \
            if prose else []
        inputs = training.step_inputs(examples, tokenizer.pad_token_id, packed, accelerator.device)
        loss, rloss = training.train_step(accelerator, model, inputs, windows, params, optimizer, scheduler,
                                          setup.mixed)
        if rloss is not None:
            replay.append(round(rloss, 4))
        losses.append(round(loss, 4))
        tokens += sum(len(ids) for ids, _ in examples)  # the examples' own tokens, however they are laid out
        step_times.append(time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", s_per_step=f"{step_times[-1]:.2f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps and main:
            _save_checkpoint(work, step + 1, fp, accelerator.unwrap_model(model), optimizer, scheduler, losses,
                             replay)
    bar.close()
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(model)
    if main:
        adapters.save(model, output)
        tokenizer.save_pretrained(output)

    figures = {"method": adapter.method, "trainable_parameters": trainable, "total_parameters": total,
               "processes": world, "global_batch": cfg.batch_size * world, "lr": lr, "steps": cfg.steps,
               "packed": packed, "compute_dtype": str(dtype).split(".")[-1],
               "resumed_from_step": start, **_loss_figures(losses, step_times, tokens, replay),
               "peak_memory_bytes": peak_memory_bytes()}
    say(f"  loss {figures['loss_first10_mean']:.3f} -> {figures['loss_last10_mean']:.3f} (mean of first/last 10 "
        f"steps); {figures.get('step_seconds_median', float('nan')):.2f} s/step, "
        f"{figures.get('tokens_per_second', 0):.0f} tokens/s; peak memory {mb(figures['peak_memory_bytes'])}"
        + (f"; rehearsed prose loss {figures['replay_loss_first10_mean']:.3f} -> "
           f"{figures['replay_loss_last10_mean']:.3f}" if replay else ""))

    if cfg.eval_examples > 0 and main:
        training.restore(setup, qdir)  # judged as the gate's reference computes it
        figures.update(_validation(model, tokenizer, splits["validation"], cfg, adapter.method))
    if not math.isfinite(losses[-1]):
        raise EdgepeftError("[train] loss became NaN/inf; lower lr")
    return figures


STAGE = Stage("train", run, sections=("train", "adapter", "tasks"), reads=("load", "quantize"),
              files=lambda recipe: task_files(recipe, "train", "data", "validation_data", "replay_text"),
              preflight=preflight,
              distributed=True, shared=True, description="train the adapter on the frozen 4-bit base")
