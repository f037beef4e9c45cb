"""The distillation loop of healing, written out (no trainer): the trained model's next-token
log-probabilities on the calibration windows are computed once; then each step takes one window, runs the
PyTorch mirror of the quantized graph on it, and moves the mirror's log-gains (and norm weights) by Adam
down the gradient of KL(trained || mirror), averaged over the window's positions.

The window of step ``k`` depends only on (seed, k), and checkpoints hold the parameters, the optimizer and
the losses, so a run resumed from a checkpoint takes exactly the steps an uninterrupted run would have.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from edgepeft.core.files import write_checkpoint

WEIGHTS = "params.safetensors"  # a checkpoint's fitted parameters
NORM_LR_RATIO = 0.5  # the norm weights (few, each read by a whole layer) move at half the scales' rate


def teacher_log_probs(model, windows: list[list[int]], progress: Callable[[int], None] | None = None):
    """The reference model's log-probabilities for every position of every window, in fp16 (a window of 256
    tokens over a 49K vocabulary is 25 MB)."""
    out = []
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=torch.tensor([w])).logits[0].float()
            out.append(torch.log_softmax(logits, -1).half())
            if progress:
                progress(1)
    return out


def kl_loss(teacher: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions of KL(teacher || softmax(logits)), in nats per token; with ``weights``, the mean
    weighted by position."""
    t = teacher.float()
    kl = (t.exp() * (t - torch.log_softmax(logits.float(), -1))).sum(-1)
    return kl.mean() if weights is None else (kl * weights).sum() / weights.sum()


def label_loss(window: list[int], logits: torch.Tensor, mask) -> torch.Tensor | None:
    """Mean cross-entropy of the window's own next tokens at the positions ``mask`` marks (a task window's
    answer positions: position t predicts token t + 1); None where it marks none inside the window."""
    at = torch.tensor([bool(m) for m in mask[:len(window) - 1]], dtype=torch.bool)
    if not at.any():
        return None
    targets = torch.tensor(window[1:])[at]
    return torch.nn.functional.cross_entropy(logits[:len(window) - 1][at].float(), targets)


def window_of(step: int, n: int, seed: int) -> int:
    """The calibration window step ``step`` trains on: every window once per epoch, in a shuffled order."""
    epoch, i = divmod(step, n)
    return int(np.random.default_rng([seed, epoch]).permutation(n)[i])


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then a cosine down to zero."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class Distiller:
    """The optimizer and schedule over a mirror's trainable parameters, and their checkpoints: the base's scales
    (and norm weights), or with ``values`` an adapter's own values only (``fit_adapter``)."""

    def __init__(self, mirror, lr: float, warmup: int, steps: int, norms: bool = False,
                 values: list[torch.Tensor] | None = None):
        self.mirror = mirror
        self.params = ({"gains": mirror.gains(), "norms": mirror.norm_weights() if norms else []} if values is None
                       else {"values": values})
        for group in self.params.values():
            for p in group:
                p.requires_grad_(True)
        groups = [{"params": self.params.get("gains", values), "lr": lr}]
        if self.params.get("norms"):
            groups.append({"params": self.params["norms"], "lr": lr * NORM_LR_RATIO})
        self.optimizer = torch.optim.Adam(groups)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, warmup, steps))
        self.losses: list[float] = []

    def step(self, window: list[int], teacher: torch.Tensor, weights: torch.Tensor | None = None,
             labels=None, label_weight: float = 0.0) -> float:
        """One step on one window: KL to the teacher, plus with ``label_weight`` that times the cross-entropy of
        the window's own tokens where ``labels`` (an answer mask) marks them. The loss recorded is the KL."""
        logits = self.mirror.model(input_ids=torch.tensor([window])).logits[0]
        kl = loss = kl_loss(teacher, logits, weights)
        ce = label_loss(window, logits, labels) if label_weight and labels is not None else None
        if ce is not None:
            loss = loss + label_weight * ce
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.losses.append(float(kl.detach()))
        return self.losses[-1]

    def save(self, work: Path, step: int, fingerprint: str) -> Path:
        tensors = {f"{k}.{i}": p.detach().contiguous() for k, group in self.params.items() for i, p in enumerate(group)}
        return write_checkpoint(work, step, {"fingerprint": fingerprint, "losses": self.losses}, tensors, WEIGHTS,
                                self.optimizer, self.scheduler)

    def load(self, saved: tuple[dict, dict, dict]) -> int:
        """Continue from what ``core.files.resume_checkpoint`` read; returns the step to go on from."""
        params, state, meta = saved
        with torch.no_grad():
            for k, group in self.params.items():
                for i, p in enumerate(group):
                    p.copy_(params[f"{k}.{i}"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.losses = meta["losses"]
        return meta["step"]


def fit_adapter(mirror, params: dict[str, np.ndarray], windows: list[list[int]], teacher: list, lr: float,
                steps: int, seed: int, progress: Callable[[float], None] | None = None,
                labels: list | None = None, label_weight: float = 0.0) -> tuple[dict[str, np.ndarray], list[float]]:
    """A runtime adapter's own values (``params``: its slot values, IA3 vectors or LoRA A and B) fitted by Adam,
    warmup then cosine, on the mirror of the shipped base with everything else fixed: each step one of
    ``windows`` (every one once per epoch), KL(teacher || mirror) over its positions. The adapter was trained on
    the 4-bit NF4 base; fitted here it absorbs what the int4 base computes differently, for its own task only.
    With ``label_weight``, the task windows' own answer tokens (``labels``: each window's answer mask, None for
    prose) are learnt beside the teacher, by cross-entropy: the training examples' answers, on the base that
    ships, with margins int4's rounding does not flip. Returns the fitted values (new arrays; ``params`` is left
    as it was) and the losses (the KL's)."""
    values = {k: torch.tensor(np.asarray(v, np.float32)) for k, v in params.items()}
    mirror.set_adapter(values)
    fit = Distiller(mirror, lr, min(4, steps // 4), steps, values=list(values.values()))
    try:
        for step in range(steps):
            i = window_of(step, len(windows), seed)
            loss = fit.step(windows[i], teacher[i], labels=labels[i] if labels else None, label_weight=label_weight)
            if progress:
                progress(loss)
    finally:
        mirror.set_adapter(None)
    return {k: v.detach().numpy().copy() for k, v in values.items()}, fit.losses
