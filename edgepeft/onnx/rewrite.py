"""Graph rewrites on quantized decoders: the tied embedding read through the output head's quantized
weights (``GatherBlockQuantized``), and an untied embedding table quantized on its own.

When the model ties the token embedding to the output head (SmolLM2 does), the exported graph reads the
table as a Transpose of the head's weight. After quantization the head's blocks run along the hidden axis,
which is exactly what ``GatherBlockQuantized`` reads for a row lookup, so the embedding becomes a
GatherBlockQuantized over the head's own quantized weight: the table is stored once, at the head's
precision. An untied table is quantized on its own (round-to-nearest, ONNX Runtime's quantizer).
"""

from __future__ import annotations

import numpy as np

EMBED = "/model/embed_tokens"


def _attr(node, name):
    return next(a.i for a in node.attribute if a.name == name)


def tie_quantized_embedding(model, bits: int) -> bool:
    """Replace ``Gather(Transpose(head weight))`` by ``GatherBlockQuantized`` over the head's quantized
    weight. Returns False when the graph has no tied embedding of that shape."""
    from onnx import helper, numpy_helper

    g = model.graph
    transpose = next((n for n in g.node if n.op_type == "Transpose" and n.name.startswith(EMBED)), None)
    if transpose is None:
        return False
    gather = next(n for n in g.node if n.op_type == "Gather" and n.input[0] == transpose.output[0])
    head = next((n for n in g.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head")), None)
    if head is None or len(head.input) < 3:
        return False
    k, n, block = _attr(head, "K"), _attr(head, "N"), _attr(head, "block_size")
    if k % block:
        return False
    # MatMulNBits stores B as [N, K / block, block * bits / 8] bytes; a row lookup wants [N, K * bits / 8].
    shape = numpy_helper.from_array(np.array([n, k * bits // 8], np.int64), f"{EMBED}/packed_shape")
    packed = f"{EMBED}/packed_weight"
    reshape = helper.make_node("Reshape", [head.input[1], shape.name], [packed], name=f"{EMBED}/Reshape")
    inputs, extra = [packed, gather.input[1], head.input[2]], [shape]
    if len(head.input) > 3 and head.input[3]:  # asymmetric: the head's zero points, packed [N * blocks * bits / 8]
        zp_shape = numpy_helper.from_array(np.array([n, (k // block * bits + 7) // 8], np.int64), f"{EMBED}/zp_shape")
        zp = helper.make_node("Reshape", [head.input[3], zp_shape.name], [f"{EMBED}/zero_points"],
                              name=f"{EMBED}/ReshapeZeroPoints")
        inputs.append(zp.output[0])
        extra.append(zp_shape)
    lookup = helper.make_node("GatherBlockQuantized", inputs, list(gather.output),
                              name=f"{EMBED}/GatherBlockQuantized", domain="com.microsoft", bits=bits,
                              block_size=block, gather_axis=0, quantize_axis=1)
    at = list(g.node).index(transpose)
    g.node.remove(transpose)
    g.node.remove(gather)
    g.node.insert(at, lookup)
    if len(extra) > 1:
        g.node.insert(at, zp)
    g.node.insert(at, reshape)
    g.initializer.extend(extra)
    still_used = {i for node in g.node for i in node.input}
    for init in [i for i in g.initializer if i.name == transpose.input[0] and i.name not in still_used]:
        g.initializer.remove(init)
    return True


def quantize_gathers(model, target):
    """An untied embedding table, round-to-nearest block-wise (ONNX Runtime's quantizer)."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    config = DefaultWeightOnlyQuantConfig(block_size=target.block_size, is_symmetric=target.symmetric,
                                          accuracy_level=target.accuracy_level, bits=target.bits,
                                          op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),))
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    return quantizer.model.model




def exact_embed_scale(model, scale: float) -> bool:
    """Give the token rows' scale (Gemma: sqrt(hidden)) its exact fp32 value: the builder writes it rounded to
    two decimals (25.30 for 25.2982 on Gemma 3 270M, a 7e-5 relative error on every embedding), where
    transformers multiplies by the value itself. Returns False when the graph does not scale its embeddings."""
    from onnx import numpy_helper

    g = model.graph
    mul = next((n for n in g.node if n.op_type == "Mul" and n.name == f"{EMBED}/Mul"), None)
    if mul is None:
        return False
    name = f"{EMBED}/exact_scale"
    g.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), name))
    old = mul.input[1]
    mul.input[1] = name
    if not any(old in n.input for n in g.node):
        for init in [i for i in g.initializer if i.name == old]:
            g.initializer.remove(init)
        for node in [n for n in g.node if n.op_type == "Constant" and old in n.output]:
            g.node.remove(node)
    return True


LOGITS_POSITIONS = "logits_positions"  # the overridable initializer of ``prune_lm_head``


def prune_lm_head(model) -> bool:
    """Make the output head compute logits for the last position only, unless told otherwise.

    A generator needs only the last row of a prefill's logits; the head (hidden x vocabulary) computed for every
    prompt position is work thrown away, and so is writing [positions, vocabulary] floats. A ``Gather`` on the
    sequence axis now picks the rows the head sees. Its indices are an initializer (``[-1]``: the last position)
    that is also a graph input, so ONNX Runtime feeds it only when asked: onnxruntime-genai does not know the
    input and gets the last row; the quality gate feeds every position and reads every row, of the same graph.
    Returns False when the graph has no ``logits`` output reached from one MatMul over the hidden states, or is
    pruned already.
    """
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    if any(i.name == LOGITS_POSITIONS for i in g.input):
        return False
    producer = {o: n for n in g.node for o in n.output}
    node = producer.get("logits")
    # the head's MatMul, possibly followed by element-wise ops over the vocabulary (bias, scale, mask, softcap)
    while node is not None and node.op_type not in ("MatMul", "MatMulNBits"):
        node = producer.get(node.input[0])
    if node is None:
        return False
    hidden = node.input[0]
    picked = f"{hidden}/last_positions"
    g.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), LOGITS_POSITIONS))
    g.input.append(helper.make_tensor_value_info(LOGITS_POSITIONS, TensorProto.INT64, ["logits_length"]))
    index = next(i for i, n in enumerate(g.node) if n is node)
    g.node.insert(index, helper.make_node("Gather", [hidden, LOGITS_POSITIONS], [picked], axis=1,
                                          name="/lm_head/prune/Gather"))
    node.input[0] = picked
    # onnxruntime-genai sizes its logits buffer from this shape: a fixed 1 tells it the graph is pruned (as the
    # model builder's own ``prune_lm_head`` graphs say it); a run fed every position returns them all regardless
    out = next(o for o in g.output if o.name == "logits")
    out.type.tensor_type.shape.dim[1].ClearField("dim_param")
    out.type.tensor_type.shape.dim[1].dim_value = 1
    # shapes inferred between the head and the output are stale now
    stale = {o for n in g.node for o in n.output if _downstream_of(n, node, producer)}
    keep = [v for v in g.value_info if v.name not in stale]
    del g.value_info[:]
    g.value_info.extend(keep)
    return True


def _downstream_of(n, head, producer) -> bool:
    """Whether node ``n`` is ``head`` or computed from it (along first inputs: the head's element-wise tail)."""
    while n is not None:
        if n is head:
            return True
        n = producer.get(n.input[0]) if n.input else None
    return False

