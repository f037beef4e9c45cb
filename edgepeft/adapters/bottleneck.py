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
attached by forward hooks (``edgepeft.adapters.model``) that leave the model's own modules, names and 4-bit
weights untouched; the ``adapters`` library replaces the model's layer classes with its own, pins its own
transformers versions, and gates over the whole sequence.
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


def bottleneck_hook(adapter: Bottleneck, parallel: bool, enabled):
    """A forward hook on a sublayer (``self_attn`` or ``mlp``) adding ``adapter`` to its output while
    ``enabled()``."""

    def hook(module, args, kwargs, output):
        if not enabled():
            return output
        x = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, tuple) else output
        out = out + adapter(x, x if parallel else out)
        return (out, *output[1:]) if isinstance(output, tuple) else out
    return hook
