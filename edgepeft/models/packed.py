"""Attention over a packed training row, example by example.

A packed row (``calib.data.pack``) holds a shared prompt prefix, then each example's own tokens. Every token
may attend to the prefix and to the earlier tokens of its own example: as one masked row, attention over ``n``
tokens computes ``n x n`` scores of which ~90% are masked away, and PyTorch's CPU flash kernel does not skip
masked blocks (its backward took ~15% of a step on the phone task).

This implementation gathers the row into one small batch instead: the prefix attends to itself, and each
example's queries attend to ``[prefix; example]``, under a causal mask aligned to the bottom right. The scores
are computed in the model's dtype and the softmax in float32, as transformers' eager attention does; the
result is the masked row's, for the positions present. It is registered with transformers as
``"edgepeft_packed"``; without a ``segments`` argument (rehearsal windows, generation) it is plain SDPA, with
SDPA's masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NAME = "edgepeft_packed"
REPLACES = "sdpa"  # the implementation this one stands in for when it has no segments


@dataclass(frozen=True)
class Segments:
    """Where a packed row's pieces sit: ``rows`` pieces of at most ``width`` queries, each attending to
    ``span`` gathered keys."""

    queries: torch.Tensor   # (rows * width,) row positions gathered as queries (padding repeats position 0)
    keys: torch.Tensor      # (rows * span,) row positions gathered as keys and values
    allowed: torch.Tensor   # (rows, 1, 1, width, span) bool: which gathered keys each query sees
    back: torch.Tensor      # (length,) for each row position, its place among the gathered queries
    rows: int
    width: int
    span: int


def segments(prefix: int, spans: list[tuple[int, int]], length: int, multiple: int = 16) -> Segments:
    """The gather plan of a row holding ``prefix`` shared tokens, then examples at ``spans`` [start, end); the
    pieces' width is rounded up to ``multiple`` (fewer distinct matmul shapes from step to step)."""
    pieces = ([(0, prefix)] if prefix else []) + list(spans)
    width = max(e - s for s, e in pieces)
    width += -width % multiple
    span = prefix + width
    queries = torch.zeros(len(pieces), width, dtype=torch.long)
    keys = torch.zeros(len(pieces), span, dtype=torch.long)
    allowed = torch.zeros(len(pieces), width, span, dtype=torch.bool)
    back = torch.empty(length, dtype=torch.long)
    for r, (s, e) in enumerate(pieces):
        n = e - s
        queries[r, :n] = torch.arange(s, e)
        if prefix and r == 0:  # the prefix sees itself, causally
            keys[r, :n] = torch.arange(s, e)
            allowed[r, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        else:  # an example sees the whole prefix, then itself causally
            keys[r, :prefix] = torch.arange(prefix)
            keys[r, prefix:prefix + n] = torch.arange(s, e)
            allowed[r, :n, :prefix + n] = torch.ones(n, prefix + n, dtype=torch.bool).tril(prefix)
        allowed[r, n:, 0] = True  # padding queries see one key (no NaN); their outputs are dropped
        back[s:e] = r * width + torch.arange(n)
    return Segments(queries.reshape(-1), keys.reshape(-1), allowed[:, None, None], back, len(pieces), width, span)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              segments: Segments | None = None, **kwargs):
    """transformers' attention interface: (batch, heads, n, dim) queries, (batch, kv heads, n, dim) keys and
    values in; (batch, n, heads, dim) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if segments is None or query.shape[0] != 1 or (dropout and module.training):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    _, heads, _, dim = query.shape
    kv = key.shape[1]
    group = heads // kv
    sg = segments
    # queries grouped by the key head they share (grouped-query attention without copying keys per head)
    q = query[0].index_select(1, sg.queries).view(kv, group, sg.rows, sg.width, dim)
    q = q.permute(2, 0, 1, 3, 4).reshape(sg.rows, kv, group * sg.width, dim)
    k = key[0].index_select(1, sg.keys).view(kv, sg.rows, sg.span, dim).transpose(0, 1)
    v = value[0].index_select(1, sg.keys).view(kv, sg.rows, sg.span, dim).transpose(0, 1)
    scores = torch.matmul(q, k.transpose(-1, -2)).view(sg.rows, kv, group, sg.width, sg.span)
    scale = scaling if scaling is not None else dim ** -0.5
    scores = scores.to(torch.promote_types(query.dtype, torch.float32)).mul_(scale)
    scores = scores.masked_fill_(~sg.allowed, float("-inf"))
    weights = scores.softmax(-1).to(query.dtype).view(sg.rows, kv, group * sg.width, sg.span)
    out = torch.matmul(weights, v).view(sg.rows, kv, group, sg.width, dim)
    out = out.permute(0, 3, 1, 2, 4).reshape(sg.rows * sg.width, heads, dim).index_select(0, sg.back)
    return out[None], None


def register() -> None:
    """Make ``NAME`` an attention implementation transformers can dispatch to (masks as SDPA's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def _configs(model):
    seen = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) not in seen and hasattr(config, "_attn_implementation"):
            seen.add(id(config))
            yield config


def use(model, on: bool = True) -> bool:
    """Switch ``model`` to packed attention (``on``) or back to SDPA; whether it now uses packed attention. A
    model that does not run on SDPA (eager-only families, softcapped attention) is left as it is."""
    register()
    configs = list(_configs(model))
    if not configs or any(c._attn_implementation not in (REPLACES, NAME) for c in configs):
        return False
    for c in configs:
        c._attn_implementation = NAME if on else REPLACES
    return on


def active(model) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == NAME
