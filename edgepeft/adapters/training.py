"""Training components shared by the train stage and ``nox -s bench-train``: the model set-up (the 4-bit base,
its compute dtype, a new trainable adapter), batches (packed or left-padded), the losses and one optimizer step.
The stage (``edgepeft.stages.train``) owns the loop around them: data order, checkpoints, resuming, figures.
"""

from __future__ import annotations

import random
from pathlib import Path

from edgepeft.adapters import api as adapters
from edgepeft.calib.data import IGNORE, collate, encode, pack
from edgepeft.core.errors import EdgepeftError
from edgepeft.core.memory import trim
from edgepeft.pipeline.tables import AdapterConfig, TrainConfig

DEFAULT_LR = {"lora": 1e-3, "ia3": 1e-2, "adapter": 1e-3, "prefix": 1e-3, "prompt": 3e-2, "unipelt": 1e-3}


def batch_indices(n: int, batch: int, step: int, seed: int) -> list[int]:
    """The example indices of global batch ``step``: epoch-wise shuffles that depend on (seed, epoch) only."""
    per_epoch = max(1, n // batch)
    epoch, k = divmod(step, per_epoch)
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[k * batch:(k + 1) * batch]


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def optimizer_for(model, adapter: AdapterConfig, cfg: TrainConfig, total_steps: int):
    """The trainable parameters, the learning rate, AdamW over them and its warm-up then linear decay over
    ``total_steps``: (params, lr, optimizer, scheduler)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr or DEFAULT_LR[adapter.method]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, total_steps))
    return params, lr, optimizer, scheduler


def encoded(tokenizer, samples, cfg: TrainConfig) -> list[tuple[list[int], list[int]]]:
    """The training samples as (ids, labels), keeping those with a token to learn from."""
    train = [encode(tokenizer, s, cfg.max_length) for s in samples]
    train = [(ids, lab) for ids, lab in train if any(t != IGNORE for t in lab[1:])]
    if not train:
        raise EdgepeftError(f"[train] {cfg.data}: no example has tokens to learn from after tokenization")
    if len(train) < cfg.batch_size:
        raise EdgepeftError(f"[train] {cfg.data}: {len(train)} examples, fewer than batch_size {cfg.batch_size}")
    return train


def step_inputs(examples: list[tuple[list[int], list[int]]], pad_id: int, packed: bool, device) -> dict:
    """A step's examples as model inputs: one packed row (``calib.data.pack``) or left-padded rows."""
    rows = pack(examples) if packed else collate(examples, pad_id)
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in rows.items()}


def task_loss(model, batch: dict):
    """Cross-entropy of a batch, computing logits only for the positions that predict a labelled token
    (``logits_to_keep``: the output head over a large vocabulary dominates a short step). A packed batch keeps
    exactly those positions; a left-padded one the last positions from the earliest labelled token on."""
    import torch

    if "targets" in batch:
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=batch["attention_mask"].to(dtype), logits_to_keep=batch["keep"]).logits[0]
        return torch.nn.functional.cross_entropy(logits.float(), batch["targets"][0, batch["keep"]])
    labels = batch.pop("labels")
    n = labels.shape[1]
    has = (labels != IGNORE).any(0).nonzero()
    keep = n - int(has[0]) + 1 if len(has) else 2  # positions whose logits predict a labelled token
    keep = min(keep, n)
    logits = model(**batch, logits_to_keep=keep).logits[:, :-1].float()
    target = labels[:, n - keep + 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=IGNORE)


def text_loss(model, windows: list[list[int]], device):
    """Next-token cross-entropy over every position of equal-length prose windows (rehearsal)."""
    import torch

    ids = torch.tensor(windows, dtype=torch.long, device=device)
    logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train_step(accelerator, model, batch: dict, windows: list[list[int]], params, optimizer,
               scheduler) -> tuple[float, float | None]:
    """One optimizer step on ``batch`` (and the rehearsed prose ``windows``, if any): the task loss and the
    prose loss. Memory the step freed is handed back to the system (``core.memory.trim``)."""
    loss = task_loss(model, batch)
    rloss = text_loss(model, windows, accelerator.device) if windows else None
    accelerator.backward(loss if rloss is None else loss + rloss)
    accelerator.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    trim()
    return loss.item(), None if rloss is None else rloss.item()


def trainable_model(qdir: Path, adapter: AdapterConfig, cfg: TrainConfig, device):
    """The quantize stage's 4-bit base on ``device`` with a new trainable adapter, set up as the train stage
    trains it: (model, the dtype its 4-bit matmuls run in, whether steps are packed)."""
    from peft import prepare_model_for_kbit_training

    from edgepeft.models.pytorch import compute_dtype, load_4bit, set_compute_dtype

    model = load_4bit(qdir, device)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    dtype = compute_dtype(cfg.compute_dtype, device)
    set_compute_dtype(model, dtype)
    model = adapters.wrap(model, adapter)
    return model, dtype, cfg.pack and packable(model.config, adapter, cfg)


def packable(config, adapter: AdapterConfig, cfg: TrainConfig) -> bool:
    """Whether packing computes what padded rows do: peft's LoRA and IA3 act on each token alone (edgepeft's
    own modules may pool over a row or add tokens), and the packed mask has no sliding window, so a model with
    one packs only when no example can be longer than its window."""
    window = getattr(config, "sliding_window", None)
    return adapters.is_peft(adapter) and (not window or window >= cfg.max_length)
