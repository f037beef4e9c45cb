"""Small shared helpers for the PyTorch stages: device choice, memory figures, 4-bit loading."""

from __future__ import annotations

import os
import resource
import sys
import warnings
from pathlib import Path

import torch

from edgepeft.ui import mb, progress  # noqa: F401  (re-exported for the stages)


def quiet() -> None:
    """Silence the noise heavy libraries print at import or load time; keep real errors."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*kernels.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*legacy.*")
    import logging

    for name in ("transformers", "bitsandbytes", "peft", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def peak_memory_bytes() -> int:
    """Peak device memory on CUDA, else the process's peak resident set size."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def exact_cpu_4bit(model) -> int:
    """Make bitsandbytes' CPU inference use the plain dequantize-then-matmul path.

    Without gradients, bitsandbytes on AVX512-BF16 CPUs repacks NF4 weights and multiplies in bf16, which
    moves logits by ~0.5 against the dequantized weights the adapter was trained on (training, with
    gradients, uses the exact path). Turning it off makes (4-bit base + adapter) the exact reference.
    Returns the number of 4-bit modules changed.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def device_map(dev: torch.device) -> dict:
    """A transformers ``device_map`` placing the whole model on ``dev`` (accelerate may say "cpu:0")."""
    return {"": "cpu"} if dev.type == "cpu" else {"": f"{dev.type}:{dev.index or 0}"}


def load_4bit(path: Path, on: torch.device | None = None):
    """Load a folder written by the quantize stage (bitsandbytes 4-bit safetensors) onto one device."""
    from transformers import AutoModelForCausalLM

    on = on or device()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True,
                                                 device_map=device_map(on))
    if on.type == "cpu":
        exact_cpu_4bit(model)
    return model


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())

