"""The model the user trained, (4-bit base + adapter) in PyTorch, and logits of PyTorch models: what the
merge, export and evaluate stages (and the arm64 check) measure their output against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepeft.adapters.api import is_adapter_dir
from edgepeft.core.errors import EdgepeftError
from edgepeft.core.files import sha256_tree, write_atomic
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

    def answers(self, model, tokenizer, samples, max_new_tokens: int, progress=None) -> tuple[list[str], bool]:
        """The reference's greedy answers to ``samples`` (``model``: this reference, loaded) and whether they
        came from edgepeft's cache. Generating them in PyTorch over a 4-bit base is the slow half of the gate,
        and every bundle of one trained model (Android, iOS, desktop; a re-run of the gate) asks the same
        question: the answers are kept under the hash of everything that decides them (the base's and the
        adapter's files, the prompts' token ids, the generation settings, the library versions)."""
        import json

        from edgepeft.quality.answers import BATCH, greedy_answers

        key = self._answers_key(tokenizer, samples, max_new_tokens)
        path = answers_cache() / f"{key}.json"
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == key and len(cached.get("answers", ())) == len(samples):
                if progress:
                    progress(len(samples))
                return [str(a) for a in cached["answers"]], True
        except (OSError, ValueError, AttributeError):
            pass
        answers = greedy_answers(model, tokenizer, samples, batch_size=BATCH, max_new_tokens=max_new_tokens,
                                 progress=progress)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps({"key": key, "answers": answers}))
        except OSError:
            pass  # a read-only cache costs time, not correctness
        return answers, False

    def _answers_key(self, tokenizer, samples, max_new_tokens: int) -> str:
        import hashlib
        import json
        from importlib.metadata import version

        from edgepeft.bundle.manifest import adapter_sha256
        from edgepeft.calib.data import prompt_ids
        from edgepeft.quality.answers import BATCH

        about = {"format": 1, "base": sha256_tree(self.base), "adapter": adapter_sha256(self.adapter),
                 "prompts": [prompt_ids(tokenizer, s) for s in samples], "max_new_tokens": max_new_tokens,
                 "batch_size": BATCH, **{p: version(p) for p in ("torch", "transformers", "bitsandbytes", "peft")}}
        return hashlib.sha256(json.dumps(about, sort_keys=True).encode()).hexdigest()


def answers_cache() -> Path:
    """Where the references' answers are kept (inside ``EDGEPEFT_CACHE``, else ``~/.cache/edgepeft``)."""
    from edgepeft.models.sources import cache_dir

    return cache_dir() / "reference-answers"


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
