"""Prefix tuning (Li & Liang 2021): ``tokens`` learned keys and values ahead of every layer's attention, which
every position attends to as if they were cached tokens before the prompt.

While training, the prefix is reparametrized (``hidden`` > 0): an embedding [tokens x width] through an MLP
(Linear, Tanh, Linear) gives every layer's keys and values, which trains more stably than the raw tensor; the
saved adapter holds the raw keys and values it computes (``saved``), so evaluation and export read one tensor.

The prefix is put into the model's KV cache by a forward pre-hook on the causal LM, at the first forward of a
sequence (an empty or absent cache): the keys as they are (not rotated: a cache holds keys after RoPE), the
real tokens at positions ``tokens``, ``tokens + 1``, ... counted over the attention mask (left padding does not
shift them), as the exported graph computes them (``edgepeft.onnx.adapters.insert_prefix``).
"""

from __future__ import annotations

import torch
from torch import nn


class Prefix(nn.Module):
    def __init__(self, layers: int, kv_heads: int, head_dim: int, tokens: int, hidden: int, width: int):
        super().__init__()
        self.shape = (layers, 2, kv_heads, tokens, head_dim)
        self.tokens = tokens
        if hidden:
            self.embedding = nn.Parameter(torch.randn(tokens, width) * 0.02)
            self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(),
                                     nn.Linear(hidden, layers * 2 * kv_heads * head_dim))
            self.kv = None
        else:
            self.kv = nn.Parameter(torch.randn(self.shape) * 0.02)

    def values(self) -> torch.Tensor:
        """Every layer's prefix keys and values, [layers, 2, kv_heads, tokens, head_dim]."""
        if self.kv is not None:
            return self.kv
        layers, two, heads, tokens, dim = self.shape
        out = self.mlp(self.embedding).view(tokens, layers, two, heads, dim)
        return out.permute(1, 2, 3, 0, 4)


def prefix_pre_hook(prefix: Prefix, enabled):
    """A forward pre-hook (with kwargs) on a causal LM that puts ``prefix`` ahead of the sequence."""

    def hook(module, args, kwargs):
        if not enabled():
            return None
        from transformers import DynamicCache

        ids = kwargs.get("input_ids", args[0] if args else None)
        b, n = ids.shape if ids is not None else kwargs["inputs_embeds"].shape[:2]
        cache = kwargs.get("past_key_values")
        if cache is None:
            cache = DynamicCache()
        p = prefix.tokens
        if cache.get_seq_length() == 0:
            kv = prefix.values()
            for layer in range(kv.shape[0]):
                cache.update(kv[layer, 0].unsqueeze(0).expand(b, -1, -1, -1),
                             kv[layer, 1].unsqueeze(0).expand(b, -1, -1, -1), layer)
        past = cache.get_seq_length()
        dev = ids.device if ids is not None else kwargs["inputs_embeds"].device
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(b, past - p + n, dtype=torch.long, device=dev)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -n:] + p
        kwargs.update(past_key_values=cache, use_cache=True, position_ids=positions,
                      attention_mask=torch.cat([torch.ones(b, p, dtype=mask.dtype, device=dev), mask], -1),
                      cache_position=torch.arange(past, past + n, device=dev))
        return args, kwargs
    return hook


class PrefixGate(nn.Module):
    """UniPELT's gate on a layer's prefix: ``sigmoid(x w + b)`` of the attention's input at the same position."""

    def __init__(self, width: int):
        super().__init__()
        self.gate = nn.Linear(width, 1, bias=False)
        self.gate_bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate(x) + self.gate_bias)


def prefix_attention(q: torch.Tensor, kv: torch.Tensor, heads: int) -> torch.Tensor:
    """Attention of the queries ``q`` [batch, n, heads * dim] (before rotation) over one layer's prefix ``kv``
    [2, kv_heads, tokens, dim]; [batch, n, heads * dim]."""
    b, n, _ = q.shape
    k, v = kv[0], kv[1]
    group = heads // k.shape[0]
    dim = k.shape[-1]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)  # [heads, tokens, dim]
    qh = q.view(b, n, heads, dim).transpose(1, 2)  # [b, heads, n, dim]
    probs = torch.softmax(qh @ k.transpose(-1, -2) / dim ** 0.5, -1)
    return (probs @ v).transpose(1, 2).reshape(b, n, heads * dim)


def gated_prefix_hooks(prefix: Prefix, layer: int, gate: PrefixGate, heads: int, enabled):
    """(forward hook on the layer's q_proj, forward pre-hook on its o_proj): the gated prefix as a parallel
    attention (He et al. 2022's view of prefix tuning), added to the attention's output before o_proj.

    UniPELT gates the prefix itself; inside one softmax that needs the attention's normalizer, which the exported
    graph's fused attention does not give. So the prefix here is attended apart, by the queries before their
    rotation (the prefix has no position), and its output is scaled by the per-token gate: a prefix as a gated,
    position-free memory every token reads."""
    slot: dict[str, torch.Tensor | None] = {"add": None}

    def on_q(module, args, output):
        slot["add"] = None
        if enabled():
            slot["add"] = gate(args[0]) * prefix_attention(output, prefix.values()[layer], heads)
        return output

    def on_o(module, args):
        add, slot["add"] = slot["add"], None
        return None if add is None else (args[0] + add, *args[1:])
    return on_q, on_o
