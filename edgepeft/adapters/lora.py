"""Gated LoRA (UniPELT, Mao et al. 2022): a LoRA update behind a per-token sigmoid gate, which cannot be merged
into the weight (the gate depends on the input), so it stays a side branch of the exported graph.

For a target linear ``y = x W^T`` the module adds ``(alpha / r) * B(A(dropout(x))) * sigmoid(x w_g + b_g)``,
``A`` [r x in], ``B`` [out x r] (zero at the start, so training starts from the base model), ``w_g`` [1 x in].
The gate reads the target's own input at the same position: per token, so training and decoding compute the
same thing. UniPELT applies it to the query and value projections; ``target_modules`` chooses.

In the graph (``edgepeft.onnx.adapters``) the rank is padded with zeros to a multiple of ``RANK_QUANTUM`` so
that ``B``'s input width is a whole number of quantization blocks (zeros quantize exactly); a target the
exporter packs with others (q, k, v into one ``qkv_proj`` MatMul) gets ``B`` padded with zero columns to the
packed width, its own columns at its offset.
"""

from __future__ import annotations

import torch
from torch import nn

from edgepeft.adapters.spec import LORA_TARGETS as TARGETS  # noqa: F401 (re-exported)
from edgepeft.adapters.spec import RANK_QUANTUM, padded_rank  # noqa: F401 (re-exported)

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
DEFAULT_TARGETS = ["q_proj", "v_proj"]  # UniPELT's choice


class GatedLoRA(nn.Module):
    def __init__(self, fan_in: int, fan_out: int, r: int, alpha: float, dropout: float):
        super().__init__()
        self.A = nn.Linear(fan_in, r, bias=False)
        self.B = nn.Linear(r, fan_out, bias=False)
        nn.init.kaiming_uniform_(self.A.weight, a=5 ** 0.5)
        nn.init.zeros_(self.B.weight)
        self.gate = nn.Linear(fan_in, 1, bias=False)
        self.gate_bias = nn.Parameter(torch.zeros(1))
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out_slice: tuple[int, int] | None = None  # the heal mirror's packed B: (offset, width) of this target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.B(self.A(self.dropout(x)))
        if self.out_slice is not None:
            d = d[..., self.out_slice[0]:self.out_slice[0] + self.out_slice[1]]
        if self.scale != 1.0:
            d = d * self.scale
        return d * torch.sigmoid(self.gate(x) + self.gate_bias)


def lora_hook(lora: GatedLoRA, enabled):
    """A forward hook on a target linear adding ``lora``'s gated update to its output while ``enabled()``."""

    def hook(module, args, output):
        return output + lora(args[0]) if enabled() else output
    return hook


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def target_shape(config, name: str) -> tuple[int, int]:
    """(in, out) features of target ``name`` in a Llama-family layer."""
    h, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * head_dim(config), config.num_key_value_heads * head_dim(config)
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, inter),
            "up_proj": (h, inter), "down_proj": (inter, h)}[name]


def packed_slice(config, name: str) -> tuple[int, int]:
    """(offset, width) of q, k or v in the exporter's packed ``qkv_proj`` output."""
    q, kv = target_shape(config, "q_proj")[1], target_shape(config, "k_proj")[1]
    return {"q_proj": (0, q), "k_proj": (q, kv), "v_proj": (q + kv, kv)}[name]
