"""Quality figures of a quantized model against its reference, and the budgets they must stay within.

The same three figures serve the re-quantization search (on calibration data, against the fp32 export)
and the quality gate (on held-out data, against the (4-bit base + adapter) model the user trained):

* ``perplexity_increase``: perplexity of the candidate over the reference's, minus 1;
* ``kl``: mean KL(reference || candidate) of the next-token distributions, per token (nats);
* ``next_token_agreement``: share of positions where both pick the same most likely next token.

Task accuracy is exact match of greedy answers on the task's test prompts; its budget is the drop in
points against the reference's accuracy on the same prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def _log_softmax(logits: np.ndarray):
    """Log-probabilities as a torch tensor, float32 (float64 for float64 input). PyTorch, not NumPy: over a 262k
    vocabulary a 256-token window is 67M logits, which NumPy's single-threaded float64 passes took ~5 s to
    score and PyTorch takes ~0.6 s (figures agree to ~1e-6, relative); the int8 search scores 4 windows per
    candidate, the gate 8."""
    import torch

    t = torch.as_tensor(logits)
    return torch.log_softmax(t if t.dtype == torch.float64 else t.float(), -1)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    return _log_softmax(logits).numpy()


def perplexity(logits_per_window: list[np.ndarray], windows: list[list[int]]) -> float:
    nll, n = 0.0, 0
    for logits, ids in zip(logits_per_window, windows, strict=True):
        lp = log_softmax(logits[:-1])
        nll -= lp[np.arange(len(ids) - 1), ids[1:]].astype(np.float64).sum()
        n += len(ids) - 1
    return float(np.exp(nll / max(n, 1)))


def compare(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, float]:
    """Largest absolute logit difference and next-token (argmax) agreement, over matching windows."""
    worst, agree, total = 0.0, 0, 0
    for a, b in zip(reference, candidate, strict=True):
        worst = max(worst, float(np.abs(a - b).max()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
    return {"max_logit_diff": worst, "next_token_agreement": agree / max(total, 1), "tokens": total}


@dataclass
class Budgets:
    max_perplexity_increase: float | None = 0.15  # 0.15: at most 15% above the reference's perplexity
    max_kl: float | None = 0.25  # nats per token
    min_next_token_agreement: float | None = 0.75
    max_accuracy_drop: float | None = 0.05  # exact match, absolute (0.05 = 5 points)

    def problems(self) -> str | None:
        for name in ("max_perplexity_increase", "max_kl", "max_accuracy_drop"):
            v = getattr(self, name)
            if v is not None and (math.isnan(v) or v < 0):
                return f"{name} must be a number, not negative"
        if self.min_next_token_agreement is not None and not 0 <= self.min_next_token_agreement <= 1:
            return "min_next_token_agreement must be in [0, 1]"
        return None


class Scores:
    """Running sums of the figures over windows of (reference logits, candidate logits, token ids)."""

    def __init__(self):
        self.nll_ref = self.nll_cand = self.kl = 0.0
        self.agree = self.tokens = self.scored = 0

    def add(self, ref: np.ndarray, cand: np.ndarray, ids: list[int]) -> None:
        import torch

        a, b = _log_softmax(ref), _log_softmax(cand)
        self.kl += float(torch.nn.functional.kl_div(b, a, log_target=True, reduction="none").sum(-1).double().sum())
        self.agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        self.tokens += ref.shape[0]
        nxt = torch.as_tensor(ids[1:], dtype=torch.long)
        rows = torch.arange(len(nxt))
        self.nll_ref -= float(a[rows, nxt].double().sum())
        self.nll_cand -= float(b[rows, nxt].double().sum())
        self.scored += len(nxt)

    def figures(self) -> dict[str, float]:
        n, m = max(self.scored, 1), max(self.tokens, 1)
        ppl_ref, ppl = math.exp(self.nll_ref / n), math.exp(self.nll_cand / n)
        return {"perplexity_reference": ppl_ref, "perplexity": ppl, "perplexity_increase": ppl / ppl_ref - 1,
                "kl": self.kl / m, "next_token_agreement": self.agree / m, "tokens": self.tokens}


def score(reference: list[np.ndarray], candidate: list[np.ndarray], windows: list[list[int]]) -> dict[str, float]:
    s = Scores()
    for a, b, ids in zip(reference, candidate, windows, strict=True):
        s.add(a, b, ids)
    return s.figures()


# (budget key, figure key, direction): "max" budgets are upper limits, "min" lower ones
CHECKS = (("max_perplexity_increase", "perplexity_increase", "max"), ("max_kl", "kl", "max"),
          ("min_next_token_agreement", "next_token_agreement", "min"), ("max_accuracy_drop", "accuracy_drop", "max"))


def verdict(figures: dict, budgets: Budgets, margin: float = 1.0) -> list[dict]:
    """One row per budget that applies: measured, allowed, excess and whether it passed. ``margin`` < 1
    tightens every budget (the re-quantization search aims inside the gate's limits)."""
    rows = []
    for key, fig, kind in CHECKS:
        limit = getattr(budgets, key)
        if limit is None or figures.get(fig) is None:
            continue
        allowed = limit * margin if kind == "max" else 1 - (1 - limit) * margin
        value = figures[fig]
        # a measured nan or inf is a broken model (or a broken measurement), never a pass
        ok = math.isfinite(value) and (value <= allowed if kind == "max" else value >= allowed)
        rows.append({"budget": key, "measured": value, "allowed": allowed, "passed": ok,
                     "by": value - allowed if kind == "max" else allowed - value})
    return rows


def passed(rows: list[dict]) -> bool:
    return all(r["passed"] for r in rows)


def fmt_value(budget: str, v: float) -> str:
    """A budget's figure as the tables show it: KL in nats, the others in percent."""
    return f"{100 * v:.1f}%" if budget != "max_kl" else f"{v:.3f}"


def table(rows: list[dict]) -> str:
    """A plain-text table of the budgets: measured, allowed, pass/FAIL and by how much."""
    lines = [f"  {'budget':<26} {'measured':>9} {'allowed':>9}  result"]
    for r in rows:
        how = "pass" if r["passed"] else f"FAIL by {fmt_value(r['budget'], r['by'])}"
        lines.append(f"  {r['budget']:<26} {fmt_value(r['budget'], r['measured']):>9} "
                     f"{fmt_value(r['budget'], r['allowed']):>9}  {how}")
    return "\n".join(lines)
