"""Training components shared by the train stage and ``nox -s bench-train``: the model set-up (the 4-bit base,
its compute dtype, a new trainable adapter), batches (packed or left-padded), the losses and one optimizer step.
The stage (``edgepeft.stages.train``) owns the loop around them: data order, checkpoints, resuming, figures.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
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
    # the fused kernel updates every tensor in one pass (~4% of a step on the phone task, CPU)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=fused or None)
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


PACK_MULTIPLE = 32  # packed rows are rounded up to this many tokens (a few shapes, not one per step)


def step_inputs(examples: list[tuple[list[int], list[int]]], pad_id: int, packed: bool, device) -> dict:
    """A step's examples as model inputs: one packed row (``calib.data.pack``, its length rounded up to
    ``PACK_MULTIPLE``) or left-padded rows."""
    rows = pack(examples, PACK_MULTIPLE, pad_id) if packed else collate(examples, pad_id)
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in rows.items()}


HEAD_CHUNK = 64  # rows of the output head's logits computed at a time (``head_loss``)


@functools.cache
def _head_loss_function():
    """The autograd function behind ``head_loss`` (built on first use: this module imports torch lazily)."""
    import torch

    class HeadLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets):
            n = hidden.shape[0]
            grad = torch.empty_like(hidden)
            wide = torch.promote_types(weight.dtype, torch.float32)  # the softmax's dtype
            total = torch.zeros((), dtype=wide, device=hidden.device)
            for s in range(0, n, HEAD_CHUNK):
                h = hidden[s:s + HEAD_CHUNK].to(weight.dtype)
                t = targets[s:s + HEAD_CHUNK]
                rows, pad = len(t), -len(t) % 16  # the last chunk in a few shapes, not one per step
                if pad:
                    h = torch.cat([h, h.new_zeros(pad, h.shape[1])])
                logits = (h @ weight.T).to(wide)
                lse = torch.logsumexp(logits, -1)
                total += (lse[:rows] - logits[:rows].gather(1, t[:, None])[:, 0]).sum()
                p = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                p[torch.arange(rows, device=p.device), t] -= 1
                grad[s:s + rows] = (p.div_(n).to(weight.dtype) @ weight)[:rows].to(hidden.dtype)
            ctx.save_for_backward(grad)
            return total / n

        @staticmethod
        def backward(ctx, g):
            (grad,) = ctx.saved_tensors
            return grad * g.to(grad.dtype), None, None

    return HeadLoss


def _base(model):
    """The transformers model inside a peft wrapper and a distributed one (DDP's ``module``)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _plain_head(model):
    """(decoder, head weight) where the output head is a frozen bias-free linear map over the decoder's last
    hidden states and nothing is applied to its logits (no softcapping or scale); else None. Also None under
    a distributed wrapper, whose own forward must run (it prepares the gradients' all-reduce)."""
    import torch

    if hasattr(model, "module"):
        return None
    base = _base(model)
    head, decoder = base.get_output_embeddings(), getattr(base, "model", None)
    config = base.config
    if (type(head) is not torch.nn.Linear or head.bias is not None or head.weight.requires_grad
            or decoder is None or getattr(config, "final_logit_softcapping", None)
            or getattr(config, "logit_scale", None) or getattr(config, "logits_scaling", None)):
        return None
    return decoder, head.weight


def head_loss(hidden, weight, targets):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, ``HEAD_CHUNK`` rows at a time.

    The full logits (rows x a 49k vocabulary, in float32) were the largest tensors of a step and its memory
    peak (softmax backward). Here each chunk's logits live only while its loss and its gradient are taken; the
    gradient with respect to ``hidden`` is computed in the forward pass (the loss is a scalar, so backward
    only scales it), which also spares recomputing the logits. ``weight`` is frozen: it gets no gradient.
    """
    return _head_loss_function().apply(hidden, weight, targets)


def task_loss(model, batch: dict):
    """Cross-entropy of a batch, computing logits only for the positions that predict a labelled token
    (the output head over a large vocabulary dominates a short step). A packed batch keeps exactly those
    positions, applies the head a chunk at a time (``head_loss``) and, where the model runs packed attention
    (``edgepeft.models.packed``), attends example by example; a left-padded batch keeps the last positions from
    the earliest labelled token on (``logits_to_keep``)."""
    import torch

    from edgepeft.models import packed

    if "targets" in batch:
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                  "attention_mask": batch["attention_mask"].to(dtype)}
        if packed.active(_base(model)):
            prefix, spans = batch["segments"]
            inputs["segments"] = packed.segments(prefix, spans, batch["input_ids"].shape[1])
        keep, targets = batch["keep"], batch["targets"][0, batch["keep"]]
        plain = _plain_head(model)
        if plain is not None:
            decoder, weight = plain
            hidden = decoder(**inputs).last_hidden_state[0, keep]
            return head_loss(hidden, weight, targets)
        logits = model(**inputs, logits_to_keep=keep).logits[0]
        return torch.nn.functional.cross_entropy(logits.float(), targets)
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
               scheduler, mixed: bool = False) -> tuple[float, float | None]:
    """One optimizer step on ``batch`` (and the rehearsed prose ``windows``, if any): the task loss and the
    prose loss. With ``mixed`` (``Trainable.mixed``) the forward pass runs under bfloat16 autocast. Memory the
    step freed is handed back to the system (``core.memory.trim``)."""
    import torch

    with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=mixed):
        loss = task_loss(model, batch)
        rloss = text_loss(model, windows, accelerator.device) if windows else None
    accelerator.backward(loss if rloss is None else loss + rloss)
    accelerator.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    trim()
    return loss.item(), None if rloss is None else rloss.item()


def mixed_precision(adapter: AdapterConfig, cfg: TrainConfig, device) -> bool:
    """Whether this training runs in bfloat16 mixed precision (PyTorch's autocast; not the accelerator's
    setting, which is fixed once per process): where the compute dtype is bfloat16 and the adapter is peft's
    (its layers keep float32 weights and follow autocast)."""
    import torch

    from edgepeft.models.pytorch import compute_dtype

    bf16 = compute_dtype(cfg.compute_dtype, device) == torch.bfloat16
    return bf16 and adapters.is_peft(adapter)


@dataclass
class Trainable:
    """The model ``trainable_model`` set up, and how: the dtype of its 4-bit matmuls, whether steps are
    packed, whether they run in bf16 mixed precision (``train_step(mixed=...)``), and which frozen weights it
    holds in another dtype than the quantize stage's (``restore``)."""

    model: object
    dtype: object
    packed: bool
    mixed: bool = False
    frozen: dict = field(default_factory=dict)  # name -> parameter held in another dtype


def trainable_model(qdir: Path, adapter: AdapterConfig, cfg: TrainConfig, device) -> Trainable:
    """The quantize stage's 4-bit base on ``device`` with a new trainable adapter, set up as the train stage
    trains it.

    Under bfloat16 mixed precision (``mixed_precision``: autocast in ``train_step``) the frozen floating
    weights (token table and tied head, norms) are held in bfloat16, so that activations between the 4-bit
    matmuls are bfloat16 too (half the memory saved for backward) and the head multiplies natively; the
    adapter's weights, gradients and optimizer state stay float32. Packed steps attend example by example
    (``edgepeft.models.packed``)."""
    import torch
    from peft import prepare_model_for_kbit_training

    from edgepeft.models import packed as packed_attention
    from edgepeft.models.pytorch import compute_dtype, hold_frozen, load_4bit, set_compute_dtype

    model = load_4bit(qdir, device)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    dtype = compute_dtype(cfg.compute_dtype, device)
    set_compute_dtype(model, dtype)
    mixed = mixed_precision(adapter, cfg, device)
    frozen = hold_frozen(model, torch.bfloat16 if mixed else torch.float32)
    model = adapters.wrap(model, adapter)
    packed = cfg.pack and packable(model.config, adapter, cfg)
    if packed:
        packed_attention.use(model)
    return Trainable(model, dtype, packed, mixed, frozen)


def restore(trainable: Trainable, qdir: Path) -> None:
    """Make the trained model compute as the quality gate's reference does: float32 4-bit matmuls and frozen
    weights, SDPA attention."""
    import torch

    from edgepeft.models import packed as packed_attention
    from edgepeft.models.pytorch import restore_frozen, set_compute_dtype

    set_compute_dtype(trainable.model, torch.float32)
    if trainable.frozen:
        restore_frozen(qdir, trainable.frozen)
    packed_attention.use(trainable.model, on=False)


def packable(config, adapter: AdapterConfig, cfg: TrainConfig) -> bool:
    """Whether packing computes what padded rows do: peft's LoRA and IA3 act on each token alone (edgepeft's
    own modules may pool over a row or add tokens), and the packed mask has no sliding window, so a model with
    one packs only when no example can be longer than its window."""
    window = getattr(config, "sliding_window", None)
    return adapters.is_peft(adapter) and (not window or window >= cfg.max_length)
