"""What the merge could not fold into the weights, put into the exported decoder graph: bottleneck adapters
as extra MatMuls (quantized with the others by requantize), each with its Relu and, when gated, its per-token
Sigmoid gate, where the PyTorch model has them (``edgepeft.adapters.bottleneck``).

The builder's graph names each layer's projections ``/model/layers.{i}/attn/{qkv_proj|q_proj|o_proj}/MatMul``
and ``/model/layers.{i}/mlp/{gate_proj|down_proj}/MatMul``. A sublayer's input is the input of its first
projection (the normed hidden state); its output is the output of ``o_proj`` / ``down_proj``, which the
next (Skip)SimplifiedLayerNormalization adds to the residual. The adapter's sum replaces that output for its
consumers; nothing else in the graph changes, so onnxruntime-genai runs it as before.
"""

from __future__ import annotations

import numpy as np

from edgepeft.core.errors import EdgepeftError

_INPUT = {"attn": ("qkv_proj", "q_proj"), "mlp": ("gate_proj", "up_proj")}
_OUTPUT = {"attn": "o_proj", "mlp": "down_proj"}


def node_name(layer: int, place: str, part: str) -> str:
    """The graph name of an adapter part's MatMul (requantize appends ``_Q4`` / ``_Q8``)."""
    return f"/model/layers.{layer}/{place}_adapter/{part}/MatMul"


def gate_bias_name(layer: int, place: str) -> str:
    return f"model.layers.{layer}.{place}_adapter.gate.bias"


def insert_bottlenecks(model, spec: dict, tensors: dict[str, np.ndarray]) -> int:
    """Add the adapter set ``spec`` with weights ``tensors`` (its state dict, as numpy) to the fp32 graph
    ``model``, in place. Returns the number of nodes added."""
    from onnx import helper, numpy_helper

    g = model.graph
    by_name = {n.name: n for n in g.node}
    added = 0
    for i in range(spec["layers"]):
        for place in spec["placement"]:
            first = next((by_name[f"/model/layers.{i}/{place}/{p}/MatMul"] for p in _INPUT[place]
                          if f"/model/layers.{i}/{place}/{p}/MatMul" in by_name), None)
            last = by_name.get(f"/model/layers.{i}/{place}/{_OUTPUT[place]}/MatMul")
            if first is None or last is None:
                raise EdgepeftError(f"[export] the graph has no layer {i} {place} projections where the adapter "
                                    "goes (the exporter's layout is not the Llama one)")
            x, out = first.input[0], last.output[0]
            h = x if spec["mode"] == "parallel" else out
            pre = f"/model/layers.{i}/{place}_adapter"
            key = f"layers.{i}.{place}"
            weights = {"down": tensors[f"{key}.down.weight"].T,
                       "up": tensors[f"{key}.up.weight"].T * np.float32(spec["scale"])}
            nodes = [
                helper.make_node("MatMul", [h, f"{pre}.down.weight"], [f"{pre}/down/output_0"],
                                 name=node_name(i, place, "down")),
                helper.make_node("Relu", [f"{pre}/down/output_0"], [f"{pre}/Relu/output_0"], name=f"{pre}/Relu"),
                helper.make_node("MatMul", [f"{pre}/Relu/output_0"], [f"{pre}/up/output_0"] if spec["gated"]
                                 else [f"{pre}/output_0"], name=node_name(i, place, "up")),
            ]
            nodes[2].input.append(f"{pre}.up.weight")
            if spec["gated"]:
                weights["gate"] = tensors[f"{key}.gate.weight"].T
                bias = gate_bias_name(i, place)
                g.initializer.append(numpy_helper.from_array(
                    tensors[f"{key}.gate_bias"].astype(np.float32).reshape(1), bias))
                nodes += [
                    helper.make_node("MatMul", [x, f"{pre}.gate.weight"], [f"{pre}/gate/output_0"],
                                     name=node_name(i, place, "gate")),
                    helper.make_node("Add", [f"{pre}/gate/output_0", bias], [f"{pre}/gate/Add/output_0"],
                                     name=f"{pre}/gate/Add"),
                    helper.make_node("Sigmoid", [f"{pre}/gate/Add/output_0"], [f"{pre}/gate/Sigmoid/output_0"],
                                     name=f"{pre}/gate/Sigmoid"),
                    helper.make_node("Mul", [f"{pre}/up/output_0", f"{pre}/gate/Sigmoid/output_0"],
                                     [f"{pre}/output_0"], name=f"{pre}/gate/Mul"),
                ]
            total = f"{pre}/Add/output_0"
            for consumer in g.node:
                for k, name in enumerate(consumer.input):
                    if name == out:
                        consumer.input[k] = total
            nodes.append(helper.make_node("Add", [out, f"{pre}/output_0"], [total], name=f"{pre}/Add"))
            for part, w in weights.items():
                g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w, np.float32),
                                                             f"{pre}.{part}.weight"))
            at = list(g.node).index(last) + 1
            for n in reversed(nodes):
                g.node.insert(at, n)
            added += len(nodes)
    return added
