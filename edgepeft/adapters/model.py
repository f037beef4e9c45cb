"""The adapter set of a whole model: edgepeft's own, unmergeable parts (bottleneck adapters, gated LoRA in every
decoder layer, a prefix ahead of them all), hung on the model as its submodule ``edgepeft_adapters`` (so a
distributed wrapper and the optimizer see the parameters) and run by forward hooks on the model's own modules.

A set is defined by a JSON-able spec, saved beside the weights::

    {"method": "adapter" | "lora", "layers": L, "hidden_size": H,
     "bottleneck": {"size", "placement", "mode", "gated", "scale"}       (bottleneck adapters; optional)
     "lora": {"r", "alpha", "dropout", "targets", "gated": true}          (gated LoRA; optional)
     "prefix": {"tokens", "hidden", "gated"}                             (prefix tuning; optional)
     "prompt": {"tokens"}}                                               (prompt tuning; optional)

Its state dict reads ``layers.<i>.<attn|mlp>.<down|up|gate>.weight`` (bottleneck) and
``layers.<i>.<target>.<A|B|gate>.weight`` (gated LoRA), plus each gate's ``gate_bias``, and ``prefix.kv``
(or, while the prefix is reparametrized, ``prefix.embedding`` and ``prefix.mlp.*``), and ``prompt.embeddings``.
"""

from __future__ import annotations

from torch import nn

from edgepeft.adapters.bottleneck import Bottleneck, bottleneck_hook
from edgepeft.adapters.lora import ATTENTION, GatedLoRA, head_dim, lora_hook, target_shape
from edgepeft.adapters.prefix import Prefix, PrefixGate, gated_prefix_hooks, prefix_pre_hook
from edgepeft.adapters.prompt import SoftPrompt, prompt_hooks


class AdapterSet(nn.Module):
    def __init__(self, spec: dict, config):
        super().__init__()
        self.spec = dict(spec)
        self.enabled = True
        b, lo = spec.get("bottleneck"), spec.get("lora")
        layers = []
        for _ in range(spec["layers"]):
            parts = {}
            if b:
                parts.update({p: Bottleneck(spec["hidden_size"], b["size"], b["gated"], b["scale"])
                              for p in b["placement"]})
            if lo:
                parts.update({t: GatedLoRA(*target_shape(config, t), lo["r"], lo["alpha"], lo["dropout"])
                              for t in lo["targets"]})
            layers.append(nn.ModuleDict(parts))
        self.layers = nn.ModuleList(layers)
        px = spec.get("prefix")
        self.heads = config.num_attention_heads
        if px and px.get("gated"):  # UniPELT's gated prefix: a gate per layer (see prefix.gated_prefix_hooks)
            for block in layers:
                block["prefix_gate"] = PrefixGate(spec["hidden_size"])
        self.prefix = Prefix(spec["layers"], config.num_key_value_heads, head_dim(config), px["tokens"], px["hidden"],
                             spec["hidden_size"]) if px else None
        pt = spec.get("prompt")
        self.prompt = SoftPrompt(pt["tokens"], spec["hidden_size"]) if pt else None
        if px and pt:
            raise ValueError("a prefix and a soft prompt in one set: choose one")

    def saved(self) -> tuple[dict, dict]:
        """(spec, tensors) to save: a reparametrized prefix as the keys and values it computes."""
        spec, tensors = dict(self.spec), {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if self.prefix is not None and self.prefix.kv is None:
            tensors = {k: v for k, v in tensors.items() if not k.startswith("prefix.")}
            tensors["prefix.kv"] = self.prefix.values().detach().cpu().contiguous()
            spec["prefix"] = {**spec["prefix"], "hidden": 0}
        return spec, tensors

    def attach(self, model) -> None:
        layers = decoder_layers(model)
        if len(layers) != len(self.layers):
            raise ValueError(f"adapter has {len(self.layers)} layers, the model {len(layers)}")
        b = self.spec.get("bottleneck") or {}
        parallel = b.get("mode") == "parallel"
        on = lambda: self.enabled  # noqa: E731
        for block, layer in zip(self.layers, layers, strict=True):
            for name, part in block.items():
                if isinstance(part, PrefixGate):
                    continue
                if isinstance(part, Bottleneck):
                    module = layer.self_attn if name == "attn" else layer.mlp
                    module.register_forward_hook(bottleneck_hook(part, parallel, on), with_kwargs=True)
                else:
                    module = getattr(layer.self_attn if name in ATTENTION else layer.mlp, name)
                    module.register_forward_hook(lora_hook(part, on))
        if self.prefix is not None and self.spec["prefix"].get("gated"):
            for i, (block, layer) in enumerate(zip(self.layers, layers, strict=True)):
                on_q, on_o = gated_prefix_hooks(self.prefix, i, block["prefix_gate"], self.heads, on)
                layer.self_attn.q_proj.register_forward_hook(on_q)
                layer.self_attn.o_proj.register_forward_pre_hook(on_o)
        elif self.prefix is not None:
            model.register_forward_pre_hook(prefix_pre_hook(self.prefix, on), with_kwargs=True)
        if self.prompt is not None:
            pre, post = prompt_hooks(self.prompt, on)
            model.register_forward_pre_hook(pre, with_kwargs=True)
            model.register_forward_hook(post, with_kwargs=True)


def decoder_layers(model):
    """The decoder layers of a causal LM (Llama, Mistral, Qwen2 layout: ``model.model.layers``)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers: edgepeft's adapters need a decoder "
                         "with self_attn and mlp in each layer")
    return layers


def spec_for(model, cfg) -> dict:
    """The set the recipe's [adapter] table asks for, on ``model``'s width and depth."""
    from edgepeft.adapters.lora import DEFAULT_TARGETS, TARGETS

    c = model.config
    spec = {"method": cfg.method, "layers": c.num_hidden_layers, "hidden_size": c.hidden_size}
    if cfg.method == "adapter":
        spec["bottleneck"] = {"size": cfg.bottleneck, "placement": list(cfg.placement), "mode": cfg.mode,
                              "gated": cfg.gated, "scale": cfg.scale}
    elif cfg.method == "prefix":
        spec["prefix"] = {"tokens": cfg.prefix_tokens, "hidden": cfg.prefix_hidden}
    elif cfg.method == "prompt":
        spec["prompt"] = {"tokens": cfg.prompt_tokens}
    elif cfg.method == "unipelt":  # UniPELT: gated LoRA (q, v), a gated adapter after each MLP, a gated prefix
        spec["bottleneck"] = {"size": cfg.bottleneck, "placement": list(cfg.placement), "mode": cfg.mode,
                              "gated": True, "scale": cfg.scale}
        spec["lora"] = {"r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout, "gated": True,
                        "targets": list(cfg.target_modules or DEFAULT_TARGETS)}
        spec["prefix"] = {"tokens": cfg.prefix_tokens, "hidden": cfg.prefix_hidden, "gated": True}
    else:  # gated LoRA
        spec["lora"] = {"r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout, "gated": True,
                        "targets": list(TARGETS if cfg.target_modules == "all-linear"
                                        else cfg.target_modules or DEFAULT_TARGETS)}
    return spec
