"""``nox -s bench-train``: edgepeft's train stage against the standard QLoRA recipe, in one run.

The reference is what every QLoRA tutorial does, as a new user would run it: transformers loads the base with
``BitsAndBytesConfig`` (NF4, double quantization), ``peft.prepare_model_for_kbit_training``, a peft
``LoraConfig`` (or ``IA3Config``), and ``transformers.Trainer`` with AdamW and a linear schedule, right-padded
batches (``DataCollatorForSeq2Seq``) and the model's own loss over full logits. edgepeft's row runs the train
stage's own model set-up and step (``edgepeft.adapters.training``).

Both get the same examples in the same batches (the recipe's data, order and batch size), the same adapter
(method, rank, targets), learning rate, warm-up and compute dtype, each with and without gradient
checkpointing. Each variant trains in its own process, so its peak resident memory is its own; variants
alternate round after round, because these shared machines drift by ±15% over minutes.

Figures per variant: median seconds per step (the first step left out), tokens per second (the examples' own
tokens, not padding), peak RSS, the RSS once the model is loaded, and the loss of the last steps.

    python -m edgepeft.latency.bench_train export/android.toml [--steps 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {  # name -> (recipe, gradient checkpointing)
    "HF QLoRA, checkpointing": ("hf", True),
    "HF QLoRA, no checkpointing": ("hf", False),
    "edgepeft, checkpointing": ("edgepeft", True),
    "edgepeft": ("edgepeft", False),
}


def _rss_bytes() -> int:
    from edgepeft.models.pytorch import peak_memory_bytes

    return peak_memory_bytes()


def _examples(recipe, tokenizer, steps: int) -> list[list[tuple[list[int], list[int]]]]:
    """The examples of each of ``steps`` global batches, in the train stage's order."""
    from edgepeft.adapters.training import batch_indices, encoded
    from edgepeft.calib.data import recipe_splits

    cfg = recipe.train
    train = encoded(tokenizer, recipe_splits(recipe)["train"], cfg)
    return [[train[i] for i in batch_indices(len(train), cfg.batch_size, k, cfg.seed)] for k in range(steps)]


def _edgepeft(recipe, qdir: Path, batches, pad_id: int, checkpointing: bool, dtype_name: str) -> dict:
    """The train stage's own set-up and step (``edgepeft.adapters.training``) on the same batches."""
    import dataclasses

    import torch
    from accelerate import Accelerator

    from edgepeft.adapters.training import optimizer_for, step_inputs, train_step, trainable_model

    cfg = dataclasses.replace(recipe.train, gradient_checkpointing=checkpointing, compute_dtype=dtype_name)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(cfg.seed)
    setup = trainable_model(qdir, recipe.adapter, cfg, accelerator.device)
    model, packed = setup.model, setup.packed
    loaded = _rss_bytes()
    # the Trainer's linear schedule ends at its max_steps: the same horizon here, so the losses compare
    params, _, optimizer, scheduler = optimizer_for(model, recipe.adapter, cfg, len(batches))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    times, losses = [], []
    for k, examples in enumerate(batches):
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 1_000_003 + k)
        loss, _ = train_step(accelerator, model, step_inputs(examples, pad_id, packed, accelerator.device), [],
                             params, optimizer, scheduler, setup.mixed)
        losses.append(loss)
        times.append(time.perf_counter() - t0)
    return {"times": times, "losses": losses, "loaded_rss": loaded}


def _hf(recipe, qdir: Path, source: Path, batches, checkpointing: bool, dtype_name: str) -> dict:
    """The standard recipe, written as the transformers and peft documentation write it."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from torch.utils.data import SequentialSampler
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from edgepeft.adapters.api import peft_config
    from edgepeft.adapters.training import DEFAULT_LR

    cfg = recipe.train
    tokenizer = AutoTokenizer.from_pretrained(qdir)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=recipe.quantize.quant_type,
                             bnb_4bit_use_double_quant=recipe.quantize.double_quant,
                             bnb_4bit_compute_dtype=getattr(torch, dtype_name))
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=bnb, dtype=torch.float32,
                                                 device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    model = get_peft_model(model, peft_config(recipe.adapter, model.config))
    loaded = _rss_bytes()
    rows = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": lab}
            for examples in batches for ids, lab in examples]

    class InOrder(Trainer):  # the same batches as edgepeft's row (the Trainer would shuffle its own way)
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    times, losses = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    args = TrainingArguments(output_dir=os.environ.get("TMPDIR", "/tmp") + "/edgepeft-bench-train", use_cpu=True,
                             per_device_train_batch_size=cfg.batch_size, max_steps=len(batches),
                             learning_rate=cfg.lr or DEFAULT_LR[recipe.adapter.method], warmup_steps=cfg.warmup_steps,
                             lr_scheduler_type="linear", optim="adamw_torch", weight_decay=cfg.weight_decay,
                             max_grad_norm=1.0, gradient_checkpointing=checkpointing, logging_steps=1,
                             save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
                             seed=cfg.seed)
    trainer = InOrder(model=model, args=args, train_dataset=rows, callbacks=[Clock()],
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    trainer.train()
    return {"times": times, "losses": losses, "loaded_rss": loaded}


def _worker(args) -> int:
    import torch
    from transformers import AutoTokenizer

    from edgepeft.pipeline import recipe as recipes
    from edgepeft.pipeline.layout import RunDir

    torch.set_num_threads(args.threads)
    recipe = recipes.load(args.recipe)
    run = RunDir(args.out) if args.out else RunDir.default(recipe.name)
    qdir, source = run.artifact("quantize"), run.artifact("load")
    tokenizer = AutoTokenizer.from_pretrained(qdir)
    batches = _examples(recipe, tokenizer, args.steps)
    kind, checkpointing = VARIANTS[args.worker]
    if kind == "hf":
        out = _hf(recipe, qdir, source, batches, checkpointing, args.dtype)
    else:
        out = _edgepeft(recipe, qdir, batches, tokenizer.pad_token_id, checkpointing, args.dtype)
    out.update(peak_rss=_rss_bytes(), tokens=[sum(len(ids) for ids, _ in b) for b in batches])
    print("RESULT " + json.dumps(out))
    return 0


def _run_variant(name: str, args) -> dict:
    cmd = [sys.executable, "-m", "edgepeft.latency.bench_train", args.recipe, "--worker", name, "--steps",
           str(args.steps), "--threads", str(args.threads), "--dtype", args.dtype]
    if args.out:
        cmd += ["--out", args.out]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        tail = (done.stderr or done.stdout).strip().splitlines()
        raise SystemExit(f"edgepeft bench-train: error: {name} failed: {tail[-1] if tail else 'no output'}")
    return json.loads(line[len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgepeft.latency.bench_train", description=__doc__.splitlines()[0])
    p.add_argument("recipe", help="recipe TOML whose quantize stage has run, e.g. export/android.toml")
    p.add_argument("--out", help="its run folder (default: dist/<recipe name>)")
    p.add_argument("--steps", type=int, default=16, help="steps per variant and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--dtype", help="compute dtype of both recipes (default: the train stage's 'auto' choice)")
    p.add_argument("--only", action="append", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args)

    import torch

    from edgepeft.models.pytorch import compute_dtype
    from edgepeft.pipeline import recipe as recipes
    from edgepeft.pipeline.layout import RunDir

    recipe = recipes.load(args.recipe)
    run = RunDir(args.out) if args.out else RunDir.default(recipe.name)
    if not (run.artifact("quantize").is_dir() and run.artifact("load").is_dir()):
        print(f"edgepeft bench-train: error: {run} has no quantize stage; run `edgepeft run {args.recipe} --to "
              "quantize` first", file=sys.stderr)
        return 2
    args.dtype = args.dtype or str(compute_dtype(recipe.train.compute_dtype, torch.device("cpu"))).split(".")[-1]
    names = args.only or list(VARIANTS)
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names:
            results[name].append(_run_variant(name, args))
            print(f"  round {r + 1}/{args.rounds}: {name} done", flush=True)

    def fig(name):
        runs = results[name]
        steps = [t for x in runs for t in x["times"][1:]]
        per_token = [tok / t for x in runs for tok, t in zip(x["tokens"][1:], x["times"][1:], strict=False)]
        return {"s_per_step": statistics.median(steps), "tokens_per_s": statistics.median(per_token),
                "peak_rss": max(x["peak_rss"] for x in runs), "loaded_rss": max(x["loaded_rss"] for x in runs),
                "loss_last": statistics.fmean(runs[0]["losses"][-4:])}

    figs = {n: fig(n) for n in names}
    adapter = recipe.adapter
    print(f"\nbench-train: {recipe.name}, {adapter.method}"
          + (f" r{adapter.r}" if adapter.method == "lora" else "")
          + f", batch {recipe.train.batch_size}, {args.steps} steps x {args.rounds} rounds, {args.threads} threads, "
          f"{args.dtype} matmuls on the NF4 base")
    print(f"{'':30}{'s/step':>8}{'tokens/s':>10}{'peak RSS MB':>13}{'loaded MB':>11}{'loss (last 4)':>15}")
    for n, f in figs.items():
        print(f"{n:30}{f['s_per_step']:>8.2f}{f['tokens_per_s']:>10.0f}{f['peak_rss'] / 1e6:>13.0f}"
              f"{f['loaded_rss'] / 1e6:>11.0f}{f['loss_last']:>15.4f}")
    ours = "edgepeft"
    for ref in [n for n in names if n.startswith("HF")]:
        if ours in figs:
            print(f"edgepeft / {ref}: tokens/s {figs[ours]['tokens_per_s'] / figs[ref]['tokens_per_s']:.2f}x, "
                  f"peak RSS {figs[ours]['peak_rss'] / figs[ref]['peak_rss']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
