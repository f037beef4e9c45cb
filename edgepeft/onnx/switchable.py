"""Adapters an app switches at run time over one quantized base graph (issue #17).

The base graph gets *slots*; each trained adapter becomes a small ``.onnx_adapter`` file (ONNX Runtime's
adapter format) holding values for some of them. onnxruntime-genai loads the files (``og.Adapters``) and feeds
the active one's tensors as graph inputs (``Generator.set_active_adapter``); a slot no active adapter feeds
takes its default, which leaves the base unchanged. A slot is a graph input with an initializer of the same
name (an *overridable initializer*: the initializer is used when the input is not fed), so the graph runs as
it is with no adapter, under onnxruntime-genai or plain ONNX Runtime.

- **LoRA** on a projection: ``out += (x A) B`` beside its MatMul, ``A`` [in, r] and ``B`` [r, out] inputs whose
  defaults are empty ([in, 0] and [0, out]: the branch adds exact zeros). The rank is a dynamic dimension, so
  adapters of any rank share one slot. q, k and v share the exporter's packed ``qkv_proj``: their A's are
  concatenated along the rank and their B's placed at their own output columns. The LoRA scale is folded
  into ``B``.
- **IA3** on a projection's output (k, v: the packed qkv output, ones over q) or on a feed-forward
  projection's input (``down_proj``): one ``Mul`` by a vector whose default is all ones.

Why not the int4 block scales, which would make IA3 free on k and v (a row's scales times its IA3 factor):
ONNX Runtime 1.32's CPU ``MatMulNBits`` prepacks its weights with the scales at session creation, and with the
scales as an overridable input it computed neither the base (logits off by up to 5.3 on a random model) nor
the fed scales (the same wrong logits with an adapter): measured, see docs/measurements.md.

Slot names follow the HF module names: ``model.layers.<i>.<attn|mlp>.<proj>.lora_A`` / ``.lora_B`` /
``.ia3``, where ``<proj>`` is the graph's projection (``qkv_proj`` for packed q, k, v).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepeft.core.errors import EdgepeftError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
PACKED = ("q_proj", "k_proj", "v_proj")
EXTENSION = ".onnx_adapter"


@dataclass(frozen=True)
class Site:
    """Where a HF module's update lands in the graph: the MatMul ``node`` of layer ``layer``'s projection
    ``proj`` (the graph's name), and the module's output columns there (``offset``, ``width``)."""

    layer: int
    proj: str
    part: str  # attn | mlp
    node: str
    offset: int
    width: int

    def slot(self, kind: str) -> str:
        return f"model.layers.{self.layer}.{self.part}.{self.proj}.{kind}"


def _attr(node, name: str):
    return next((a.i for a in node.attribute if a.name == name), None)


def _matmul_shape(graph, node) -> tuple[int, int]:
    """(in, out) features of a MatMul or MatMulNBits node."""
    if node.op_type == "MatMulNBits":
        return _attr(node, "K"), _attr(node, "N")
    dims = next((list(i.dims) for i in graph.initializer if i.name == node.input[1]), None)
    if dims is None or len(dims) != 2:
        raise EdgepeftError(f"[bundle] {node.name}: its weight is not a 2-D initializer; no adapter slot fits")
    return dims[0], dims[1]


def _projection(graph, layer: int, part: str, proj: str):
    """The MatMul (any precision: ``MatMul``, ``MatMul_Q4``, ``MatMul_Q8``) of ``proj`` in layer ``layer``."""
    prefix = f"/model/layers.{layer}/{part}/{proj}/MatMul"
    return next((n for n in graph.node if n.name == prefix or n.name.startswith(prefix + "_Q")), None)


def site(graph, config, layer: int, module: str) -> Site:
    """The graph site of HF module ``module`` (``q_proj``, ..., ``down_proj``) in layer ``layer``."""
    from edgepeft.adapters.lora import packed_slice

    part = "attn" if module in ATTENTION else "mlp"
    node = _projection(graph, layer, part, module)
    if node is not None:
        k, n = _matmul_shape(graph, node)
        return Site(layer, module, part, node.name, 0, n)
    if module in PACKED:
        node = _projection(graph, layer, "attn", "qkv_proj")
        if node is not None:
            offset, width = packed_slice(config, module)
            return Site(layer, "qkv_proj", "attn", node.name, offset, width)
    raise EdgepeftError(f"[bundle] the graph has no projection for layer {layer}'s {module}: a runtime adapter "
                        f"cannot target it (merge that adapter instead)")


@dataclass(frozen=True)
class Slots:
    """Which graph projections carry a LoRA slot, and which an IA3 slot on their output or input."""

    lora: frozenset[str] = frozenset()  # node names
    ia3_out: frozenset[str] = frozenset()
    ia3_in: frozenset[str] = frozenset()

    def __or__(self, other: Slots) -> Slots:
        return Slots(self.lora | other.lora, self.ia3_out | other.ia3_out, self.ia3_in | other.ia3_in)

    def count(self) -> int:
        return len(self.lora) + len(self.ia3_out) + len(self.ia3_in)


def _layer_and_module(key: str) -> tuple[int, str]:
    """(layer, module) of a peft state-dict key ``...layers.<i>.<self_attn|mlp>.<module>.<param>``."""
    parts = key.split(".")
    i = parts.index("layers")
    return int(parts[i + 1]), parts[i + 3]


def _peft_modules(state: dict[str, np.ndarray], suffix: str) -> list[tuple[int, str, str]]:
    """(layer, module, key prefix) of every module in a peft state dict with a tensor ending in ``suffix``."""
    out = []
    for key in sorted(state):
        if key.endswith(suffix) and ".layers." in key:
            layer, module = _layer_and_module(key)
            out.append((layer, module, key[: -len(suffix)]))
    return out


def lora_params(graph, config, state: dict[str, np.ndarray], scaling: float) -> dict[str, np.ndarray]:
    """A peft LoRA state dict (``lora_A.weight`` [r, in], ``lora_B.weight`` [out, r]) as slot values."""
    per_node: dict[str, list] = {}
    for layer, module, prefix in _peft_modules(state, "lora_A.weight"):
        s = site(graph, config, layer, module)
        a = state[prefix + "lora_A.weight"].astype(np.float32).T  # [in, r]
        b = state[prefix + "lora_B.weight"].astype(np.float32).T * np.float32(scaling)  # [r, out]
        per_node.setdefault(s.node, []).append((s, a, b))
    out = {}
    for parts in per_node.values():
        first = parts[0][0]
        node = next(n for n in graph.node if n.name == first.node)
        fan_in, fan_out = _matmul_shape(graph, node)
        a = np.concatenate([p[1] for p in parts], axis=1)
        b = np.zeros((a.shape[1], fan_out), np.float32)
        row = 0
        for s, _, part_b in parts:
            b[row:row + part_b.shape[0], s.offset:s.offset + s.width] = part_b
            row += part_b.shape[0]
        if a.shape[0] != fan_in:
            raise EdgepeftError(f"[bundle] LoRA on {first.node}: {a.shape[0]} inputs, the graph's MatMul takes "
                                f"{fan_in}")
        out[first.slot("lora_A")], out[first.slot("lora_B")] = np.ascontiguousarray(a), b
    return out


def ia3_params(graph, config, state: dict[str, np.ndarray], feedforward: list[str]) -> dict[str, np.ndarray]:
    """A peft IA3 state dict (``ia3_l``: [out, 1] on an output, [1, in] on a feed-forward input) as slot values."""
    outs: dict[str, tuple[Site, np.ndarray]] = {}
    out = {}
    for layer, module, prefix in _peft_modules(state, "ia3_l"):
        vec = state[prefix + "ia3_l"].astype(np.float32).reshape(-1)
        s = site(graph, config, layer, module)
        if module in feedforward:
            out[s.slot("ia3_in")] = vec
            continue
        node = next(n for n in graph.node if n.name == s.node)
        whole = outs.get(s.node, (s, np.ones(_matmul_shape(graph, node)[1], np.float32)))[1]
        whole[s.offset:s.offset + s.width] = vec
        outs[s.node] = (s, whole)
    for s, vec in outs.values():
        out[s.slot("ia3_out")] = vec
    return out


def slots_of(graph, params: dict[str, np.ndarray]) -> Slots:
    """The slots that the adapter values ``params`` need."""
    by_slot = {}
    for n in graph.node:
        if "/model/layers." in n.name and n.op_type in ("MatMul", "MatMulNBits") and "/MatMul" in n.name:
            parts = n.name.split("/")  # ['', 'model', 'layers.i', part, proj, 'MatMul...']
            if len(parts) == 6:
                base = f"model.{parts[2]}.{parts[3]}.{parts[4]}"
                for kind in ("lora_A", "ia3_out", "ia3_in"):
                    by_slot[f"{base}.{kind}"] = (kind, n.name)
    lora, ia3_out, ia3_in = set(), set(), set()
    for name in params:
        if name.endswith("lora_B"):
            continue
        kind, node = by_slot[name]
        {"lora_A": lora, "ia3_out": ia3_out, "ia3_in": ia3_in}[kind].add(node)
    return Slots(frozenset(lora), frozenset(ia3_out), frozenset(ia3_in))


def slots_for(graph, adapters) -> Slots:
    """The slots that every adapter's values in ``adapters`` (an iterable of ``params``) need together."""
    slots = Slots()
    for params in adapters:
        slots = slots | slots_of(graph, params)
    return slots


def _rename_consumers(graph, old: str, new: str, skip) -> None:
    for n in graph.node:
        if n is skip:
            continue
        for j, x in enumerate(n.input):
            if x == old:
                n.input[j] = new
    for o in graph.output:
        if o.name == old:
            raise EdgepeftError(f"[bundle] {old} is a graph output; no adapter slot can follow it")


def _overridable(graph, name: str, default: np.ndarray, shape: list) -> None:
    from onnx import TensorProto, helper, numpy_helper

    graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    graph.initializer.append(numpy_helper.from_array(default, name))


def insert_slots(model, slots: Slots) -> int:
    """Add ``slots`` to the graph of ``model`` in place (defaults: the base unchanged). Returns the nodes added."""
    from onnx import helper

    g = model.graph
    added = 0
    for node in [n for n in g.node if n.name in slots.lora | slots.ia3_out | slots.ia3_in]:
        parts = node.name.split("/")
        base = f"model.{parts[2]}.{parts[3]}.{parts[4]}"
        fan_in, fan_out = _matmul_shape(g, node)
        pre = "/".join(parts[:5])
        out = node.output[0]
        if node.name in slots.ia3_in:
            x, scaled = node.input[0], f"{pre}/ia3_in/output_0"
            _overridable(g, f"{base}.ia3_in", np.ones(fan_in, np.float32), [fan_in])
            mul = helper.make_node("Mul", [x, f"{base}.ia3_in"], [scaled], name=f"{pre}/ia3_in/Mul")
            node.input[0] = scaled
            g.node.insert(list(g.node).index(node), mul)
            added += 1
        tail = []
        current = out
        if node.name in slots.lora:
            raw = f"{pre}/MatMul/base_output_0"
            _overridable(g, f"{base}.lora_A", np.zeros((fan_in, 0), np.float32), [fan_in, "lora_r"])
            _overridable(g, f"{base}.lora_B", np.zeros((0, fan_out), np.float32), ["lora_r", fan_out])
            tail += [
                helper.make_node("MatMul", [node.input[0], f"{base}.lora_A"], [f"{pre}/lora_A/output_0"],
                                 name=f"{pre}/lora_A/MatMul"),
                helper.make_node("MatMul", [f"{pre}/lora_A/output_0", f"{base}.lora_B"], [f"{pre}/lora_B/output_0"],
                                 name=f"{pre}/lora_B/MatMul"),
                helper.make_node("Add", [raw, f"{pre}/lora_B/output_0"], [f"{pre}/lora/output_0"],
                                 name=f"{pre}/lora/Add"),
            ]
            node.output[0], current = raw, f"{pre}/lora/output_0"
        if node.name in slots.ia3_out:
            src = current if tail else f"{pre}/MatMul/base_output_0"
            if not tail:
                node.output[0] = src
            _overridable(g, f"{base}.ia3_out", np.ones(fan_out, np.float32), [fan_out])
            tail.append(helper.make_node("Mul", [src, f"{base}.ia3_out"], [f"{pre}/ia3_out/output_0"],
                                         name=f"{pre}/ia3_out/Mul"))
            current = f"{pre}/ia3_out/output_0"
        if tail:
            _rename_consumers(g, out, current, None)
            at = list(g.node).index(node) + 1
            for k, t in enumerate(tail):
                g.node.insert(at + k, t)
            added += len(tail)
    return added


def with_slots(model, params: dict):
    """A copy of ``model`` with the slots of every runtime adapter in ``params`` ({name: slot values}; their
    defaults: the base unchanged)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    insert_slots(copy, slots_for(copy.graph, params.values()))
    return copy


def write_adapter(params: dict[str, np.ndarray], path: Path, model_version: int = 1) -> None:
    """``params`` as an ONNX Runtime adapter file (written beside, then renamed into place)."""
    import onnxruntime as ort

    if not params:
        raise EdgepeftError(f"[bundle] {path.name}: the adapter has no tensors for any slot")
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(model_version)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in params.items()})
    tmp = path.with_name(path.name + ".tmp")
    fmt.export_adapter(str(tmp))
    tmp.replace(path)


def read_adapter(path: Path) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    fmt = ort.AdapterFormat.read_adapter(str(path))
    # copies: an OrtValue's numpy() is a view of memory the adapter object frees when it is collected (the
    # profile read NaN and crashed with SIGSEGV on such views)
    return {k: np.array(v.numpy(), copy=True) for k, v in fmt.get_parameters().items()}


def peft_tensors(adapter_dir) -> tuple[dict, dict]:
    """A peft adapter folder's config and its tensors as float32 numpy arrays."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    state = {k: v.float().numpy() for k, v in load_file(str(adapter_dir / "adapter_model.safetensors")).items()}
    return cfg, state


def adapter_params(graph, config, adapter_dir) -> tuple[str, dict]:
    """(method, slot values) of a trained peft LoRA or IA3 for the graph's slots."""
    import math

    cfg, state = peft_tensors(adapter_dir)
    if cfg.get("peft_type") == "LORA":
        scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            raise EdgepeftError(f"{adapter_dir}: LoRA with per-module ranks or alphas cannot be a runtime adapter yet")
        return "lora", lora_params(graph, config, state, scale)
    if cfg.get("peft_type") == "IA3":
        feedforward = cfg.get("feedforward_modules") or []
        return "ia3", ia3_params(graph, config, state, list(feedforward))
    raise EdgepeftError(f"{adapter_dir}: a {cfg.get('peft_type')} adapter cannot be a runtime adapter (LoRA or IA3)")
