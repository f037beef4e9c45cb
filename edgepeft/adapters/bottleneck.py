"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021; He et al. 2022), serial or parallel,
after attention and/or the MLP of every decoder layer, each optionally behind its own per-token gate.

One adapter is ``a = up(relu(down(h)))`` with ``down`` [bottleneck x hidden] and ``up`` [hidden x bottleneck]
(``up`` starts at zero, so training starts from the base model). It is added to its sublayer's output:

* ``serial``: ``h`` is the sublayer's output, ``out = sublayer(x) + a(sublayer(x))`` (Houlsby/Pfeiffer);
* ``parallel``: ``h`` is the sublayer's (normed) input, ``out = sublayer(x) + a(x)`` (He et al.).

With ``gated`` (UniPELT, Mao et al. 2022), ``a`` is scaled by ``sigmoid(x w_g + b_g)``, where ``x`` is the
sublayer's normed input *at the same position*. UniPELT's own gate (and AdapterHub's) averages over the
sequence, which a decoder cannot do: in training it would see future tokens, in decoding only the current
one. A per-token gate computes the same thing in both.

Why edgepeft's own modules and not AdapterHub's ``adapters``: export must insert exactly these operations
into the ONNX graph (``edgepeft.onnx.adapters``) and the int4 mirror must rebuild them
(``edgepeft.heal.mirror``). Each part here is one ``nn.Linear`` whose weight is one MatMul of the graph,
attached by forward hooks that leave the model's own modules, names and 4-bit weights untouched; the
``adapters`` library replaces the model's layer classes with its own, pins its own transformers versions,
and gates over the whole sequence.
"""

from __future__ import annotations

import torch
from torch import nn

PLACES = ("attn", "mlp")  # after self-attention, after the MLP
PARTS = ("down", "up", "gate")


class Bottleneck(nn.Module):
    def __init__(self, hidden: int, size: int, gated: bool, scale: float):
        super().__init__()
        self.down = nn.Linear(hidden, size, bias=False)
        self.up = nn.Linear(size, hidden, bias=False)
        nn.init.zeros_(self.up.weight)
        self.gate = nn.Linear(hidden, 1, bias=False) if gated else None
        self.gate_bias = nn.Parameter(torch.zeros(1)) if gated else None
        self.scale = scale

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The adapter's addition to the sublayer output; ``x`` is the sublayer's input, ``h`` the adapter's."""
        a = self.up(torch.relu(self.down(h)))
        if self.scale != 1.0:
            a = a * self.scale
        if self.gate is not None:
            a = a * torch.sigmoid(self.gate(x) + self.gate_bias)
        return a


class AdapterSet(nn.Module):
    """The bottleneck adapters of a whole model: ``layers[i][place]``. Attached as the model's submodule
    ``edgepeft_adapters`` (so a distributed wrapper sees its parameters) and run by forward hooks on each
    layer's ``self_attn`` / ``mlp``."""

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = dict(spec)
        self.enabled = True
        self.layers = nn.ModuleList(
            nn.ModuleDict({p: Bottleneck(spec["hidden_size"], spec["bottleneck"], spec["gated"], spec["scale"])
                           for p in spec["placement"]})
            for _ in range(spec["layers"]))
        self._hooks: list = []

    def attach(self, model) -> None:
        layers = decoder_layers(model)
        if len(layers) != len(self.layers):
            raise ValueError(f"adapter has {len(self.layers)} layers, the model {len(layers)}")
        for block, layer in zip(self.layers, layers, strict=True):
            for place, adapter in block.items():
                module = layer.self_attn if place == "attn" else layer.mlp
                self._hooks.append(module.register_forward_hook(self._hook(adapter), with_kwargs=True))

    def _hook(self, adapter: Bottleneck):
        parallel = self.spec["mode"] == "parallel"

        def hook(module, args, kwargs, output):
            if not self.enabled:
                return output
            x = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            out = out + adapter(x, x if parallel else out)
            return (out, *output[1:]) if isinstance(output, tuple) else out
        return hook


def decoder_layers(model):
    """The decoder layers of a causal LM (Llama, Mistral, Qwen2 layout: ``model.model.layers``)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers: bottleneck adapters need a decoder "
                         "with self_attn and mlp in each layer")
    return layers


def spec_for(model, cfg) -> dict:
    """What defines an adapter set: the recipe's [adapter] keys and the model's width and depth."""
    c = model.config
    return {"method": "adapter", "bottleneck": cfg.bottleneck, "placement": list(cfg.placement),
            "mode": cfg.mode, "gated": cfg.gated, "scale": cfg.scale, "hidden_size": c.hidden_size,
            "layers": c.num_hidden_layers}
