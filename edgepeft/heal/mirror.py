"""A PyTorch model that computes what the quantized ONNX graph computes, with the graph's continuous
parameters trainable: the PyTorch mirror the healing step fits.

Every ``MatMulNBits`` of the graph becomes a ``QuantLinear``: its integer codes (and zero points) are
fixed buffers, exactly as the graph stores them; its block scales are a ``Parameter``; the weight it
multiplies by is ``(code - zero_point) * scale``, block by block, the kernel's dequantization. The token
embedding (``GatherBlockQuantized`` over the head's codes) reads the same codes and scales as the head, so
a scale fitted for one is fitted for both. The RMSNorm weights are the graph's float initializers.

Where the target's kernels multiply with int8 activations (``accuracy_level`` 4), the mirror rounds each
MatMul's input the way the kernel does, and passes gradients straight through the rounding (STE):
``blockwise`` (x86-64 MLAS: symmetric int8 per block of ``block_size`` inputs) or ``rowwise`` (arm64
KleidiAI: asymmetric int8 per row, i.e. per token). ``None`` leaves activations in float. KleidiAI also
reads each block scale as bf16 (truncated); with ``bf16_scales`` the mirror multiplies by that and writes it
back, so the graph then holds scales every kernel reads alike.

The rest of the network (attention with rotary positions, SiLU MLP, residuals) is transformers' own Llama
implementation, built from the merged model's config: the graph's ``GroupQueryAttention`` and
``SkipSimplifiedLayerNormalization`` compute the same functions. Bottleneck adapters the merge left in the
graph and gated LoRA side branches (``edgepeft.onnx.adapters``) are ``edgepeft.adapters.model``'s modules on the
same hooks, shaped as the graph stores them (scales folded in, LoRA's rank padded, a packed q/k/v target's
update cut from the packed width), their MatMuls quantized like the others and their scales fitted with them.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from edgepeft.models.families import PACKED, family_of
from edgepeft.onnx.quant import Quantized

ACTIVATION_SCHEMES = ("blockwise", "rowwise")
_NODE = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(qkv_proj|o_proj|gate_proj|up_proj|down_proj)/MatMul_Q\d+$")
_ADAPTER_NODE = re.compile(r"^/model/layers\.(\d+)/(?:(\w+?)_(?:adapter|lora)|(prefix_gate))/"
                           r"(down|up|gate|A|B)/MatMul_Q\d+$")


def graph_spec(unmerged: dict) -> dict:
    """An adapter set's spec as its graph computes it: output scales 1 (folded into the weights), LoRA's rank
    padded (``edgepeft.adapters.lora.padded_rank``), no dropout."""
    from edgepeft.adapters.lora import padded_rank

    spec = dict(unmerged)
    if spec.get("bottleneck"):
        spec["bottleneck"] = {**spec["bottleneck"], "scale": 1.0}
    if spec.get("lora"):
        r = padded_rank(spec["lora"]["r"])
        spec["lora"] = {**spec["lora"], "r": r, "alpha": r, "dropout": 0.0}
    return spec


def fake_int8(x: torch.Tensor, scheme: str | None, block: int) -> torch.Tensor:
    """``x`` rounded to int8 as the kernel's activation quantization does, gradients straight through."""
    if scheme is None:
        return x
    if scheme == "blockwise":
        xs = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
        scale = xs.abs().amax(-1, keepdim=True) / 127.0
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = (torch.round(xs / scale).clamp(-127, 127) * scale).reshape(x.shape)
    elif scheme == "rowwise":
        lo = x.amin(-1, keepdim=True).clamp(max=0)
        hi = x.amax(-1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / 255.0
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zp = torch.round(-128.0 - lo / scale).clamp(-128, 127)
        q = (torch.round(x / scale) + zp).clamp(-128, 127)
        q = (q - zp) * scale
    else:
        raise ValueError(f"unknown activation scheme {scheme!r} (one of {ACTIVATION_SCHEMES})")
    return x + (q - x).detach()


def bf16_truncated(x: torch.Tensor) -> torch.Tensor:
    """The upper 16 bits of each fp32 value (bf16, rounded toward zero): what KleidiAI's packing keeps of a
    block scale."""
    return (x.contiguous().view(torch.int32) & -65536).view(torch.float32)


class QuantLinear(nn.Module):
    """``y = x W^T`` with ``W = (codes - zero_points) * scales`` per block; only the scales train.

    A scale is trained as its logarithm's change, ``scales = initial * exp(log_gain)``: one learning rate then
    moves every block by the same relative amount, whatever its magnitude, and no scale can change sign. With
    ``bf16`` the kernel's view of each scale (bf16, truncated) is what multiplies, gradients passing
    straight through, and what is written back."""

    def __init__(self, centered: torch.Tensor, scales: torch.Tensor, activations: str | None, bf16: bool = False,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("centered", centered, persistent=False)  # (code - zero point), [N, nb, block]
        self.register_buffer("bias", bias, persistent=False)  # the graph's Add after the MatMul (Qwen2's q/k/v), fixed
        self.register_buffer("initial", scales.clone(), persistent=False)  # [N, nb]
        self.log_gain = nn.Parameter(torch.zeros_like(scales))
        self.activations = activations
        self.bf16 = bf16

    @property
    def block(self) -> int:
        return self.centered.shape[-1]

    @property
    def scales(self) -> torch.Tensor:
        """The scales the kernel multiplies by."""
        s = self.initial * torch.exp(self.log_gain)
        return s + (bf16_truncated(s) - s).detach() if self.bf16 else s

    def weight(self) -> torch.Tensor:
        n, nb, block = self.centered.shape
        return (self.centered * self.scales[..., None]).reshape(n, nb * block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(fake_int8(x, self.activations, self.block), self.weight(), self.bias)


class QuantEmbedding(nn.Module):
    """The token table read from the head's quantized weight (the graph's ``GatherBlockQuantized``)."""

    def __init__(self, head: QuantLinear, scale: float | None = None):
        super().__init__()
        self.head = [head]  # not a submodule: its scales are registered once, under lm_head
        self.scale = scale  # Gemma multiplies the token rows by sqrt(hidden)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        rows = head.centered[ids] * head.scales[ids][..., None]
        rows = rows.reshape(*ids.shape, -1)
        return rows if self.scale is None else rows * self.scale


class GraphWeights:
    """The quantized weights and norm weights of an exported int4/int8 decoder graph, by node."""

    def __init__(self, model):
        from onnx import numpy_helper

        self.model = model
        self.init = {i.name: i for i in model.graph.initializer}
        self.matmuls = {}  # node name -> (node, its weight as quant.Quantized)
        self.biases = {}  # node name -> the bias an Add right after it adds (a constant of the MatMul's width)
        for node in model.graph.node:
            if node.op_type == "Add":
                const = [i for i in node.input if i in self.init and len(self.init[i].dims) == 1]
                if len(const) == 1:
                    self.biases[next(i for i in node.input if i != const[0])] = const[0]
            if node.op_type != "MatMulNBits":
                continue
            attrs = {a.name: a.i for a in node.attribute}
            b, scales = (numpy_helper.to_array(self.init[node.input[k]]) for k in (1, 2))
            zp = numpy_helper.to_array(self.init[node.input[3]]) if len(node.input) > 3 and node.input[3] else None
            self.matmuls[node.name] = (node, Quantized.from_packed(b, scales, zp, attrs["bits"], attrs["block_size"]))

    def bias(self, node_name: str) -> np.ndarray | None:
        node = self.matmuls[node_name][0]
        name = self.biases.get(node.output[0])
        b = self.array(name) if name else None
        return b if b is not None and b.shape == (self.matmuls[node_name][1].scales.shape[0],) else None

    def array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.init[name])

    def replace(self, name: str, value: np.ndarray) -> None:
        """Overwrite an initializer's values (same name, shape and dtype)."""
        from onnx import numpy_helper

        old = self.init[name]
        new = numpy_helper.from_array(value.astype(numpy_helper.to_array(old).dtype).reshape(tuple(old.dims)), name)
        old.CopyFrom(new)


def _norm_names(family, layers: int) -> dict[str, str]:
    """HF module name of each RMSNorm -> the graph's initializer name (onnxruntime-genai builder layout)."""
    names = {}
    for i in range(layers):
        for norm in family.norms:
            names[f"model.layers.{i}.{norm}"] = f"model.layers.{i}.{norm}.weight"
        if family.qk_norm:
            for n in ("q_norm", "k_norm"):
                names[f"model.layers.{i}.self_attn.{n}"] = f"model.layers.{i}.attn.{n}.layernorm.weight"
    names["model.norm"] = f"model.layers.{layers}.final_norm_layernorm.weight"
    return names


class RowConcat(nn.Module):
    """A packed projection of the model (Phi-3's ``gate_up_proj``) the graph stores as separate MatMuls: their
    outputs side by side."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


class Mirror:
    """The PyTorch mirror of a quantized graph, and the way back: ``write_back`` puts the fitted scales and
    norm weights into the graph's initializers."""

    def __init__(self, graph: GraphWeights, config, activations: str | None, bf16_scales: bool = False,
                 unmerged: dict | None = None, tensors: dict | None = None):
        from transformers import AutoModelForCausalLM

        from edgepeft.adapters import api as adapters
        from edgepeft.adapters.bottleneck import Bottleneck
        from edgepeft.adapters.lora import head_dim, packed_slice
        from edgepeft.adapters.prefix import PrefixGate
        from edgepeft.onnx.adapters import part_prefix

        if not config.tie_word_embeddings:
            raise ValueError("healing needs the token table tied to the head (as the graph's "
                             "GatherBlockQuantized reads it)")
        self.graph = graph
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
        layers = config.num_hidden_layers
        if unmerged is not None:  # hooked in once the linears it hooks into are the quantized ones
            adapters.attach_spec(model, graph_spec(unmerged), hooks=False)
        family = family_of(config)
        packed = {name: getattr(model.get_submodule(f"model.layers.0.{sub}"), name).out_features
                  for sub, names in (("self_attn", family.attention), ("mlp", family.mlp))
                  for name in names if name in PACKED}
        hd = head_dim(config)
        q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
        self.linears: dict[str, list[tuple[QuantLinear, int, int]]] = {}  # node -> (module, first row, rows)
        pieces: dict[str, list[tuple[int, QuantLinear, str]]] = {}  # a packed module -> (its first row, piece, node)
        for name, (_node, weight) in graph.matmuls.items():
            centered = torch.from_numpy(weight.centered())
            sc = torch.from_numpy(weight.scales.astype(np.float32))
            m = _NODE.match(name)
            a = _ADAPTER_NODE.match(name)
            if name.startswith("/lm_head/"):
                parts = [("lm_head", 0, sc.shape[0])]
            elif m and m.group(3) == "qkv_proj" and "qkv_proj" not in packed:
                pre = f"model.layers.{m.group(1)}.self_attn"
                parts = [(f"{pre}.q_proj", 0, q), (f"{pre}.k_proj", q, kv), (f"{pre}.v_proj", q + kv, kv)]
            elif m and m.group(3) in ("gate_proj", "up_proj") and "gate_up_proj" in packed:
                at = 0 if m.group(3) == "gate_proj" else packed["gate_up_proj"] // 2
                ql = QuantLinear(centered, sc, activations, bf16_scales)
                pieces.setdefault(f"model.layers.{m.group(1)}.mlp.gate_up_proj", []).append((at, ql, name))
                self.linears[name] = [(ql, 0, sc.shape[0])]
                continue
            elif m:
                sub = "self_attn" if m.group(2) == "attn" else "mlp"
                parts = [(f"model.layers.{m.group(1)}.{sub}.{m.group(3)}", 0, sc.shape[0])]
            elif a and unmerged is not None:
                parts = [(f"{adapters.ATTR}.layers.{a.group(1)}.{a.group(2) or a.group(3)}.{a.group(4)}", 0,
                          sc.shape[0])]
            else:
                raise ValueError(f"MatMulNBits node {name!r} is not one the mirror knows (Llama-family layout)")
            self.linears[name] = []
            bias = graph.bias(name)
            for module_name, start, rows in parts:
                parent, _, attr = module_name.rpartition(".")
                old = model.get_submodule(module_name)
                own = None  # the module's bias, as the graph adds it (the builder drops an all-zero bias)
                if getattr(old, "bias", None) is not None:
                    own = torch.zeros(rows) if bias is None else torch.from_numpy(bias[start:start + rows].copy())
                ql = QuantLinear(centered[start:start + rows].contiguous(), sc[start:start + rows], activations,
                                 bf16_scales, own)
                if a and a.group(4) == "B" and ql.weight().shape[0] != old.out_features:  # B over packed q, k, v
                    model.get_submodule(parent).out_slice = packed_slice(config, a.group(2))
                    old = nn.Linear(old.in_features, ql.weight().shape[0])
                if (old.out_features, old.in_features) != tuple(ql.weight().shape):
                    raise ValueError(f"{name}: graph weight {tuple(ql.weight().shape)} does not fit {module_name}")
                setattr(model.get_submodule(parent) if parent else model, attr, ql)
                self.linears[name].append((ql, start, rows))
        for module_name, found in pieces.items():
            found.sort(key=lambda p: p[0])
            old = model.get_submodule(module_name)
            rows = [p[1].centered.shape[0] for p in found]
            if [p[0] for p in found] != [sum(rows[:i]) for i in range(len(found))] or sum(rows) != old.out_features:
                raise ValueError(f"{module_name}: the graph's {', '.join(p[2] for p in found)} do not make it up")
            parent, _, attr = module_name.rpartition(".")
            setattr(model.get_submodule(parent), attr, RowConcat([p[1] for p in found]))
        missing = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
        if missing:
            raise ValueError(f"the graph has no quantized weight for {missing[:3]}")
        scale = getattr(model.model.embed_tokens, "embed_scale", None)
        model.model.embed_tokens = QuantEmbedding(model.lm_head, None if scale is None else float(scale))
        aset = getattr(model, adapters.ATTR, None)
        if aset is not None:
            aset.attach(model)
            with torch.no_grad():  # constant rows of the graph: the trained values
                if aset.prefix is not None:
                    aset.prefix.kv.copy_(tensors["prefix.kv"])
                if aset.prompt is not None:
                    aset.prompt.embeddings.copy_(tensors["prompt.embeddings"])
        for i, block in enumerate(aset.layers if aset is not None else ()):
            for name, part in block.items():
                if part.gate is not None:
                    where = name if isinstance(part, PrefixGate) else (
                        f"{name}_adapter" if isinstance(part, Bottleneck) else f"{name}_lora")
                    bias = graph.array(f"{part_prefix(i, where)}.gate.bias")
                    with torch.no_grad():
                        part.gate_bias.copy_(torch.from_numpy(bias.copy()))
        self.norms = {}
        self.norm_offset = family.norm_offset  # the graph stores offset + weight (Gemma's norms: 1 + w)
        for module_name, init_name in _norm_names(family, layers).items():
            mod = model.get_submodule(module_name)
            with torch.no_grad():
                mod.weight.copy_(torch.from_numpy(graph.array(init_name).copy()) - self.norm_offset)
            self.norms[init_name] = mod
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model.eval()

    def set_adapter(self, params: dict[str, np.ndarray] | None) -> None:
        """Compute as the graph with adapter slots computes when a runtime adapter's values ``params`` are fed
        (``edgepeft.onnx.switchable``: LoRA's ``(x A) B`` beside a MatMul, IA3's Mul on its input or on its output
        before the bias); ``None``: the base. Numpy values stay fixed (healing fits the shared base under them);
        torch tensors are used as they are, so an adapter's own fit (``distill.fit_adapter``) can train them."""
        if not hasattr(self, "_slots"):  # hooks on every projection, once; they read the active values
            self._slots = set()
            for name, parts in self.linears.items():
                m = _NODE.match(name)
                if not m:
                    continue
                base = f"model.layers.{m.group(1)}.{m.group(2)}.{m.group(3)}"
                self._slots |= {f"{base}.{kind}" for kind in ("lora_A", "lora_B", "ia3_in", "ia3_out")}
                for ql, start, rows in parts:
                    ql.register_forward_pre_hook(self._scaled_input(base))
                    ql.register_forward_hook(self._side_output(base, start, rows))
        unknown = sorted(set(params or ()) - self._slots)
        if unknown:
            raise ValueError(f"adapter tensor {unknown[0]!r} is no slot of the mirrored graph")
        self._active = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v, np.float32))
                        for k, v in (params or {}).items()}

    def _scaled_input(self, base: str):
        def hook(_module, args):
            vec = self._active.get(f"{base}.ia3_in")
            return None if vec is None else (args[0] * vec,)
        return hook

    def _side_output(self, base: str, start: int, rows: int):
        def hook(module, args, out):
            a, b = self._active.get(f"{base}.lora_A"), self._active.get(f"{base}.lora_B")
            vec = self._active.get(f"{base}.ia3_out")
            if a is None and vec is None:
                return None
            bias = module.bias
            raw = out if bias is None else out - bias
            if a is not None:
                raw = raw + (args[0] @ a) @ b[:, start:start + rows]
            if vec is not None:
                raw = raw * vec[start:start + rows]
            return raw if bias is None else raw + bias
        return hook

    def gains(self) -> list[nn.Parameter]:
        """The scales' trainable log-gains, one tensor per MatMul (a fused qkv counts three)."""
        return [ql.log_gain for parts in self.linears.values() for ql, _, _ in parts]

    def norm_weights(self) -> list[nn.Parameter]:
        return [mod.weight for mod in self.norms.values()]

    def set_activations(self, scheme: str | None) -> None:
        for parts in self.linears.values():
            for ql, _, _ in parts:
                ql.activations = scheme

    def write_back(self) -> None:
        """The fitted scales and norm weights into the graph's initializers, in place."""
        for name, parts in self.linears.items():
            node = self.graph.matmuls[name][0]
            scales = torch.cat([ql.scales.detach() for ql, _, _ in parts]).numpy()
            self.graph.replace(node.input[2], scales)
        for init_name, mod in self.norms.items():
            self.graph.replace(init_name, mod.weight.detach().numpy() + self.norm_offset)
