"""PyTorch helpers for the stages that run the model in PyTorch: device choice, memory figures, loading the
quantize stage's 4-bit folder, and the exact dequantized copy of it that the adapter is merged into."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch


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


def compute_dtype(name: str, on: torch.device) -> torch.dtype:
    """The dtype a ``[train] compute_dtype`` setting means on device ``on``: "auto" is bfloat16 where the
    hardware multiplies it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), else float32."""
    if name != "auto":
        return getattr(torch, name)
    if on.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if on.type == "cpu" and native else torch.float32


def set_compute_dtype(model, dtype: torch.dtype) -> int:
    """Make the 4-bit linear layers multiply in ``dtype`` (their inputs are cast to it, their outputs back);
    the number of layers changed."""
    n = 0
    for module in model.modules():
        if hasattr(module, "compute_dtype") and hasattr(module, "quant_state"):
            module.compute_dtype = dtype
            state = getattr(module.weight, "quant_state", None)
            if state is not None:  # the backward pass dequantizes to this dtype (else to fp32, then casts)
                state.dtype = dtype
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


def hold_frozen(model, dtype: torch.dtype) -> dict:
    """Hold the model's weights in memory of its own, the frozen floating ones (embedding, tied head, norms,
    biases) in ``dtype``; the weights whose dtype changed, by name (the parameters stay the same objects when
    an adapter wraps the model, which renames them).

    A loaded model's weights are views of the safetensors file, mapped: every page read stays resident while
    any weight still maps it, so a float32 embedding read once to make its bfloat16 copy would stay in memory
    beside the copy. Copying every weight out lets the mapping go. Trainable weights keep their dtype.
    """
    changed, seen = {}, set()

    def own(t):
        return None if t is None else t.clone()

    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        state = getattr(p, "quant_state", None)
        if state is not None:  # bitsandbytes 4-bit: the packed weight and its scales
            p.data = p.data.clone()
            state.absmax, state.code, state.offset = own(state.absmax), own(state.code), own(state.offset)
            if state.state2 is not None:
                state.state2.absmax, state.state2.code = own(state.state2.absmax), own(state.state2.code)
        elif p.is_floating_point() and not p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype, copy=True)
            changed[name] = p
        else:
            p.data = p.data.clone()
    for module in model.modules():
        for key, b in module._buffers.items():
            if b is not None:
                module._buffers[key] = b.clone()
    return changed


def restore_frozen(qdir: Path, changed: dict) -> None:
    """Put back the quantize stage's own values (read from ``qdir``) of the weights ``hold_frozen`` changed, so
    that the model computes as the quality gate's reference does."""
    fresh = dict(load_4bit(qdir, torch.device("cpu")).named_parameters(remove_duplicate=False))
    for name, p in changed.items():
        if name not in fresh:
            raise RuntimeError(f"restore_frozen: {name} is not in {qdir}")
        p.data = fresh[name].data.to(p.device)


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def dequantized_model(qdir):
    """A plain fp32 model holding the exact dequantized 4-bit weights of the quantize stage's output."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    q = load_4bit(qdir, torch.device("cpu"))
    q.dequantize()
    state = {k: v.detach().to(torch.float32) for k, v in q.state_dict().items()}
    config = AutoConfig.from_pretrained(qdir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"dequantized weights do not fit the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    return plain.eval()
