"""Prompt tuning (Lester et al. 2021): ``tokens`` learned input embeddings ahead of every sequence, a soft prompt
the model reads as if they were tokens before the prompt (positions 0 .. tokens - 1; the real tokens follow).

A forward pre-hook on the causal LM prepends them to the token embeddings at the first forward of a sequence
(an empty or absent cache) and drops their logits; later forwards count them in positions, mask and cache, as
the exported graph does (``edgepeft.onnx.adapters.insert_prompt``). Training starts from the embeddings of
randomly drawn vocabulary tokens (``init_from_vocabulary``), which trains more stably than random vectors.
"""

from __future__ import annotations

import torch
from torch import nn


class SoftPrompt(nn.Module):
    def __init__(self, tokens: int, width: int):
        super().__init__()
        self.tokens = tokens
        self.embeddings = nn.Parameter(torch.zeros(tokens, width))

    def init_from_vocabulary(self, table: torch.Tensor, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, table.shape[0], (self.tokens,), generator=g)
        with torch.no_grad():
            self.embeddings.copy_(table[ids.to(table.device)].float())


def prompt_hooks(prompt: SoftPrompt, enabled):
    """(forward pre-hook, forward hook), both with kwargs, for a causal LM."""
    first = {"rows": None}  # the real rows of this forward when it prepended the prompt, else None

    def pre(module, args, kwargs):
        first["rows"] = None
        if not enabled():
            return None
        from transformers import DynamicCache

        ids = kwargs.pop("input_ids", None)
        if ids is None and args:
            ids, args = args[0], args[1:]
        if ids is None:
            raise ValueError("a soft prompt needs input_ids")
        b, n = ids.shape
        p = prompt.tokens
        cache = kwargs.get("past_key_values")
        if cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length()
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(b, max(past - p, 0) + n, dtype=torch.long, device=ids.device)
        full = torch.cat([torch.ones(b, p, dtype=mask.dtype, device=mask.device), mask], -1)
        positions = (full.long().cumsum(-1) - 1).clamp(min=0)
        if past == 0:
            embeds = module.get_input_embeddings()(ids)
            virtual = prompt.embeddings.to(embeds.dtype).unsqueeze(0).expand(b, -1, -1)
            kwargs.update(inputs_embeds=torch.cat([virtual, embeds], 1), cache_position=torch.arange(p + n,
                          device=ids.device), position_ids=positions)
            first["rows"] = n
        else:
            kwargs.update(input_ids=ids, cache_position=torch.arange(past, past + n, device=ids.device),
                          position_ids=positions[:, -n:])
        kwargs.update(past_key_values=cache, use_cache=True, attention_mask=full)
        return args, kwargs

    def post(module, args, kwargs, output):
        n = first["rows"]
        if n is not None and output.logits.shape[1] == n + prompt.tokens:  # every position kept: drop the prompt's
            output.logits = output.logits[:, prompt.tokens:]
        return output

    return pre, post
