"""Model families: what the stages need to know of a decoder, learned from its config and its module tree
rather than from a list of model types.

A causal LM is taken when two capability checks pass:

1. the exporter has a path for its architecture: the installed onnxruntime-genai model builder is read for
   the ``*ForCausalLM`` architectures it dispatches on (so a newer builder widens the set by itself);
2. its decoder layers have the layout every stage reads, found by building the model on the meta device
   (no weights, no memory): ``model.model.layers[i]`` with ``self_attn`` holding q/k/v/o projections (or one
   packed ``qkv_proj``, Phi-3) and ``mlp`` holding gate/up/down (or a packed ``gate_up_proj``), RMS norms,
   rotary positions and a token table the output head can share.

What differs between the families that pass (Llama/SmolLM, Mistral, Qwen2/2.5, Qwen3, Gemma 3 text, Phi-3) is
recorded in a ``Family``: the projection names, the per-layer norms (Gemma 3 has four, and q/k norms like
Qwen3), whether norm weights are applied as ``1 + w`` (Gemma), the embedding scale (Gemma multiplies the
token rows by sqrt(hidden)). Which layers attend through a sliding window is read from the exported graph where
it matters (``edgepeft.latency.costmodel.attention_windows``). Anything else fails in preflight with one line
that says what is missing.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

from edgepeft.core.errors import EdgepeftError

# The per-layer projections edgepeft knows, by sublayer; a packed name stands for the ones after it.
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


@dataclass(frozen=True)
class Family:
    model_type: str
    attention: tuple[str, ...]  # linear layers of self_attn, as the model names them (packed or not)
    mlp: tuple[str, ...]  # linear layers of mlp
    norms: tuple[str, ...]  # RMS norms of each decoder layer, in order
    qk_norm: bool  # RMS norms on each head's queries and keys (Qwen3, Gemma 3)
    norm_offset: float  # a norm multiplies by (offset + weight): 1 for Gemma, 0 for the rest
    embed_scale: float | None  # token rows are multiplied by this (Gemma: sqrt(hidden)), None: not scaled

    @property
    def packed(self) -> bool:
        return any(n in PACKED for n in self.attention + self.mlp)

    @property
    def linears(self) -> tuple[str, ...]:
        """Every adaptable projection name (LoRA's ``all-linear`` as names)."""
        return self.attention + self.mlp

    def ia3_targets(self) -> tuple[list[str], list[str]]:
        """IA3's default (target_modules, feedforward_modules): peft's for the model type where it has one,
        else the value projection (or the packed q/k/v) and the MLP's output projection."""
        from peft.utils.constants import (
            TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
        )
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS

        if self.model_type in TARGETS:
            return list(TARGETS[self.model_type]), list(FEEDFORWARD[self.model_type])
        value = "qkv_proj" if "qkv_proj" in self.attention else "v_proj"
        return [value, "down_proj"], ["down_proj"]


@functools.lru_cache(maxsize=1)
def exporter_architectures() -> frozenset[str]:
    """The text decoders (``*ForCausalLM``) the installed onnxruntime-genai model builder has a path for."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime_genai.models.builder")
    if spec is None or spec.origin is None:
        return frozenset()
    with open(spec.origin, encoding="utf-8") as f:
        source = f.read()
    found = re.findall(r'config\.architectures\[0\]\s*==\s*"(\w+ForCausalLM)"', source)
    return frozenset(found)


def _meta_model(config):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _names(module, kind) -> tuple[str, ...]:
    return tuple(n for n, m in module.named_children() if isinstance(m, kind))


def family_of(config) -> Family:
    """The family of a causal LM config, or an ``EdgepeftError`` that says which capability is missing."""
    from torch import nn

    model_type = getattr(config, "model_type", None)
    archs = getattr(config, "architectures", None) or []
    if not archs:  # a GGUF file's config names none: the model type's causal LM, as transformers builds it
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        archs = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)]
    arch = archs[0]
    known = exporter_architectures()
    if arch is None:
        raise EdgepeftError(f"model type {model_type!r} is not a causal LM transformers knows")
    if arch not in known:
        raise EdgepeftError(f"model type {model_type!r} ({arch}) is not supported: the ONNX exporter "
                            f"(onnxruntime-genai's model builder) has no path for it; it knows "
                            f"{', '.join(sorted(a.removesuffix('ForCausalLM') for a in known))}")
    try:
        model = _meta_model(config)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise EdgepeftError(f"model type {model_type!r}: transformers cannot build it from its config: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    why = f"model type {model_type!r} ({arch}) is not supported by edgepeft's stages"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise EdgepeftError(f"{why}: no decoder layers at model.layers")
    layer = layers[0]
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        raise EdgepeftError(f"{why}: a decoder layer needs self_attn and mlp (has "
                            f"{', '.join(n for n, _ in layer.named_children())})")
    attention, ffn = _names(attn, nn.Linear), _names(mlp, nn.Linear)
    if set(attention) not in ({*ATTENTION}, {"qkv_proj", "o_proj"}):
        raise EdgepeftError(f"{why}: its attention projections are {', '.join(attention) or 'none'} "
                            f"(edgepeft reads {', '.join(ATTENTION)} or a packed qkv_proj with o_proj)")
    if set(ffn) not in ({*MLP}, {"gate_up_proj", "down_proj"}):
        raise EdgepeftError(f"{why}: its MLP is {', '.join(ffn) or 'not linear layers'} (edgepeft reads a gated "
                            f"MLP: {', '.join(MLP)} or a packed gate_up_proj with down_proj)")
    norms = tuple(n for n in NORMS if hasattr(layer, n))
    if norms[:2] != NORMS[:2] or not all("RMSNorm" in type(getattr(layer, n)).__name__ for n in norms):
        raise EdgepeftError(f"{why}: its layers need RMS norms named input_layernorm and "
                            "post_attention_layernorm")
    qk = [hasattr(attn, n) for n in ("q_norm", "k_norm")]
    if any(qk) and not all(qk):
        raise EdgepeftError(f"{why}: it normalizes only one of queries and keys")
    if getattr(inner, "embed_tokens", None) is None:
        raise EdgepeftError(f"{why}: no token table at model.embed_tokens")
    gemma = "Gemma" in type(layer.input_layernorm).__name__
    return Family(model_type=model_type, attention=attention, mlp=ffn, norms=norms, qk_norm=all(qk),
                  norm_offset=1.0 if gemma else 0.0, embed_scale=math.sqrt(config.hidden_size) if gemma else None)


def check(config, spec: str) -> Family:
    """``family_of`` with the model source named in the error line."""
    try:
        return family_of(config)
    except EdgepeftError as e:
        raise EdgepeftError(f"{spec}: {e}") from None


def adapter_problem(adapter, family: Family) -> str | None:
    """Why the recipe's ``[adapter]`` table cannot be trained on this family, in one line, or None."""
    names = set(family.linears)
    if isinstance(adapter.target_modules, list):
        bad = [t for t in adapter.target_modules if t.rsplit(".", 1)[-1] not in names]
        if bad:
            return (f"target_modules names {bad[0]!r}, which {family.model_type} does not have (its projections: "
                    f"{', '.join(family.linears)})")
    gated_lora = adapter.method == "unipelt" or (adapter.method == "lora" and adapter.gated)
    if gated_lora and family.packed:
        from edgepeft.adapters.lora import DEFAULT_TARGETS

        targets = adapter.target_modules if isinstance(adapter.target_modules, list) else DEFAULT_TARGETS
        packed = [t for t in targets if t not in names]
        if adapter.method == "unipelt" and "q_proj" not in names:
            return (f"UniPELT's gated prefix reads the queries of q_proj; {family.model_type} packs q, k and v into "
                    "one qkv_proj (use method = \"lora\", \"adapter\" or \"prefix\")")
        if packed:
            return (f"gated LoRA targets {', '.join(packed)}, which {family.model_type} packs into one "
                    f"{next(k for k, v in PACKED.items() if packed[0] in v)} (set target_modules among "
                    f"{', '.join(sorted(names - set(PACKED)))}, or gated = false to merge LoRA)")
    return None
