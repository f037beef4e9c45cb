"""The model the user trained, (4-bit base + adapter) in PyTorch, and logits of PyTorch models: what the
merge, export and evaluate stages (and the arm64 check) measure their output against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepeft.adapters.api import is_adapter_dir
from edgepeft.core.errors import EdgepeftError
from edgepeft.pipeline.layout import RunDir
from edgepeft.quality.scores import compare


@dataclass
class Reference:
    """Where the (4-bit base + adapter) model lives: the quantize and train stages of a run."""

    base: Path
    adapter: Path

    @classmethod
    def of_run(cls, run_dir: Path, task: str | None = None) -> Reference:
        """The run's reference; ``task``: that task's adapter in a multi-adapter run."""
        run = RunDir(run_dir)
        base, adapter = run.quantized_base, run.adapter / task if task else run.adapter
        if not (base / "config.json").is_file() or not is_adapter_dir(adapter):
            raise EdgepeftError(f"{run_dir}: no trained reference there (needs quantize/model and train/adapter; "
                                "pass the run folder the bundle was made in with --run)")
        return cls(base, adapter)

    def load(self):
        import torch

        from edgepeft.adapters.api import load
        from edgepeft.models.pytorch import load_4bit  # imports PyTorch: only when the model is needed

        return load(load_4bit(self.base, torch.device("cpu")), self.adapter).eval()


def logits(model, windows: list[list[int]], progress=None) -> list[np.ndarray]:
    """A PyTorch causal LM's fp32 logits for each window (rows: positions), without gradients."""
    import torch

    dev = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for w in windows:
            out.append(model(input_ids=torch.tensor([w], device=dev)).logits[0].float().cpu().numpy())
            if progress:
                progress(1)
    return out


def compare_logits(reference, candidate, windows: list[list[int]]) -> dict[str, float]:
    """Largest absolute logit difference and next-token (argmax) agreement of candidate vs reference."""

    reference.eval()
    candidate.eval()
    return compare(logits(reference, windows), logits(candidate, windows))
