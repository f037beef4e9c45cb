"""What the merge could not fold into the weights, put into the exported decoder graph where the PyTorch model
has it (``edgepeft.adapters.model``): bottleneck adapters as extra MatMuls with their Relu, gated LoRA as a side
branch ``x A B`` beside its target's MatMul; every gate a per-token MatMul + Add + Sigmoid + Mul. The extra
MatMuls are quantized with the others by requantize and fitted with them by heal. A prefix becomes constant
rows ahead of the first prompt's keys and values (``insert_prefix``), a soft prompt constant rows ahead of its
token embeddings (``insert_prompt``).

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


def part_prefix(layer: int, part: str) -> str:
    """Where an adapter part lives in the graph: ``/model/layers.<i>/<attn|mlp>_adapter`` (bottleneck) or
    ``/model/layers.<i>/<target>_lora`` (gated LoRA). Its MatMuls are ``<prefix>/<down|up|A|B|gate>/MatMul``
    (requantize appends ``_Q4`` / ``_Q8``), its gate's bias ``<prefix>.gate.bias``."""
    return f"/model/layers.{layer}/{part}"


def insert_unmerged(model, spec: dict, tensors: dict[str, np.ndarray], config) -> int:
    """Add the adapter set ``spec`` with weights ``tensors`` (its state dict, as numpy) to the fp32 graph
    ``model`` of a model with HF ``config``, in place. Returns the number of nodes added. Bottlenecks go in first:
    a LoRA update of ``o_proj`` / ``down_proj`` then feeds the serial adapter after it, as in PyTorch."""
    added = 0
    if spec.get("bottleneck"):
        added += insert_bottlenecks(model, spec["layers"], spec["bottleneck"], tensors)
    if spec.get("lora"):
        added += insert_lora(model, spec["layers"], spec["lora"], tensors, config)
    if spec.get("prefix") and spec["prefix"].get("gated"):
        added += insert_gated_prefix(model, tensors, config)
    elif spec.get("prefix"):
        added += insert_prefix(model, tensors["prefix.kv"])
    if spec.get("prompt"):
        added += insert_prompt(model, tensors["prompt.embeddings"])
    return added


def _gate(x: str, pre: str, key: str, tensors, g) -> tuple[list, str]:
    """A per-token gate ``sigmoid(x w_g + b_g)`` on graph tensor ``x``: (its nodes, its output's name)."""
    from onnx import helper, numpy_helper

    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(tensors[f"{key}.gate.weight"].T, np.float32),
                                                 f"{pre}.gate.weight"))
    g.initializer.append(numpy_helper.from_array(tensors[f"{key}.gate_bias"].astype(np.float32).reshape(1),
                                                 f"{pre}.gate.bias"))
    nodes = [
        helper.make_node("MatMul", [x, f"{pre}.gate.weight"], [f"{pre}/gate/output_0"], name=f"{pre}/gate/MatMul"),
        helper.make_node("Add", [f"{pre}/gate/output_0", f"{pre}.gate.bias"], [f"{pre}/gate/Add/output_0"],
                         name=f"{pre}/gate/Add"),
        helper.make_node("Sigmoid", [f"{pre}/gate/Add/output_0"], [f"{pre}/gate/Sigmoid/output_0"],
                         name=f"{pre}/gate/Sigmoid"),
    ]
    return nodes, f"{pre}/gate/Sigmoid/output_0"


def _add_after(g, out: str, delta_nodes: list, delta: str, pre: str) -> None:
    """Insert ``delta_nodes`` and ``out + delta`` right after ``out``'s producer; ``out``'s consumers read the sum."""
    from onnx import helper

    total = f"{pre}/Add/output_0"
    for consumer in g.node:
        for k, name in enumerate(consumer.input):
            if name == out:
                consumer.input[k] = total
    nodes = [*delta_nodes, helper.make_node("Add", [out, delta], [total], name=f"{pre}/Add")]
    at = next(k for k, n in enumerate(g.node) if out in n.output) + 1
    for n in reversed(nodes):
        g.node.insert(at, n)


def insert_lora(model, layers: int, lora: dict, tensors: dict[str, np.ndarray], config) -> int:
    """Gated LoRA side branches: for each target, ``out += (x A_pad) B_pad * gate(x)`` with ``A_pad`` [in, R] and
    ``B_pad`` [R, graph width] zero-padded (``edgepeft.adapters.lora``) and the scale folded into ``B_pad``."""
    from onnx import helper, numpy_helper

    from edgepeft.adapters.lora import ATTENTION, packed_slice, padded_rank

    g = model.graph
    names = {n.name for n in g.node}
    rank = padded_rank(lora["r"])
    scale = np.float32(lora["alpha"] / lora["r"])
    added = 0
    for i in range(layers):
        for t in lora["targets"]:
            sub = "attn" if t in ATTENTION else "mlp"
            own = f"/model/layers.{i}/{sub}/{t}/MatMul"
            packed = f"/model/layers.{i}/attn/qkv_proj/MatMul"
            name = own if own in names or t not in ("q_proj", "k_proj", "v_proj") else packed
            node = next((n for n in g.node if n.name == name), None)
            if node is None:
                raise EdgepeftError(f"[export] the graph has no {name} for layer {i}'s gated LoRA on {t}")
            x, out = node.input[0], node.output[0]
            width = next(i.dims[1] for i in g.initializer if i.name == node.input[1])
            key, pre = f"layers.{i}.{t}", part_prefix(i, f"{t}_lora")
            a, b = tensors[f"{key}.A.weight"].T, tensors[f"{key}.B.weight"].T * scale  # [in, r], [r, out]
            a_pad = np.zeros((a.shape[0], rank), np.float32)
            a_pad[:, :a.shape[1]] = a
            off = packed_slice(config, t)[0] if name == packed else 0
            b_pad = np.zeros((rank, width), np.float32)
            b_pad[:b.shape[0], off:off + b.shape[1]] = b
            g.initializer.append(numpy_helper.from_array(a_pad, f"{pre}.A.weight"))
            g.initializer.append(numpy_helper.from_array(b_pad, f"{pre}.B.weight"))
            gate_nodes, gate = _gate(x, pre, key, tensors, g)
            nodes = [
                helper.make_node("MatMul", [x, f"{pre}.A.weight"], [f"{pre}/A/output_0"], name=f"{pre}/A/MatMul"),
                helper.make_node("MatMul", [f"{pre}/A/output_0", f"{pre}.B.weight"], [f"{pre}/B/output_0"],
                                 name=f"{pre}/B/MatMul"),
                *gate_nodes,
                helper.make_node("Mul", [f"{pre}/B/output_0", gate], [f"{pre}/output_0"], name=f"{pre}/gate/Mul"),
            ]
            current = _current(g, out)
            _add_after(g, current, nodes, f"{pre}/output_0", pre)
            added += len(nodes) + 1
    return added


def _current(g, out: str) -> str:
    """The tensor now standing for ``out``: the last sum a side branch already added to it (packed q, k, v)."""
    while True:
        nxt = next((n.output[0] for n in g.node if n.op_type == "Add" and n.input and n.input[0] == out
                    and n.name.endswith("_lora/Add")), None)
        if nxt is None:
            return out
        out = nxt


def insert_bottlenecks(model, layers: int, spec: dict, tensors: dict[str, np.ndarray]) -> int:
    """Bottleneck adapters after attention and/or the MLP of every layer (``spec``: the set's "bottleneck")."""
    from onnx import helper, numpy_helper

    g = model.graph
    by_name = {n.name: n for n in g.node}
    added = 0
    for i in range(layers):
        for place in spec["placement"]:
            first = next((by_name[f"/model/layers.{i}/{place}/{p}/MatMul"] for p in _INPUT[place]
                          if f"/model/layers.{i}/{place}/{p}/MatMul" in by_name), None)
            last = by_name.get(f"/model/layers.{i}/{place}/{_OUTPUT[place]}/MatMul")
            if first is None or last is None:
                raise EdgepeftError(f"[export] the graph has no layer {i} {place} projections where the adapter "
                                    "goes (the exporter's layout is not the Llama one)")
            x, out = first.input[0], last.output[0]
            h = x if spec["mode"] == "parallel" else out
            pre, key = part_prefix(i, f"{place}_adapter"), f"layers.{i}.{place}"
            for part, w in (("down", tensors[f"{key}.down.weight"].T),
                            ("up", tensors[f"{key}.up.weight"].T * np.float32(spec["scale"]))):
                g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w, np.float32),
                                                             f"{pre}.{part}.weight"))
            up = f"{pre}/up/output_0" if spec["gated"] else f"{pre}/output_0"
            nodes = [
                helper.make_node("MatMul", [h, f"{pre}.down.weight"], [f"{pre}/down/output_0"],
                                 name=f"{pre}/down/MatMul"),
                helper.make_node("Relu", [f"{pre}/down/output_0"], [f"{pre}/Relu/output_0"], name=f"{pre}/Relu"),
                helper.make_node("MatMul", [f"{pre}/Relu/output_0", f"{pre}.up.weight"], [up],
                                 name=f"{pre}/up/MatMul"),
            ]
            if spec["gated"]:
                gate_nodes, gate = _gate(x, pre, key, tensors, g)
                nodes += [*gate_nodes,
                          helper.make_node("Mul", [up, gate], [f"{pre}/output_0"], name=f"{pre}/gate/Mul")]
            _add_after(g, out, nodes, f"{pre}/output_0", pre)
            added += len(nodes) + 1
    return added


PREFIX, PROMPT = "/model/prefix", "/model/prompt"


class _Ahead:
    """What a prefix and a soft prompt share in the graph: ``tokens`` positions ahead of the sequence, put in on the
    first forward of a sequence (total length = input length; onnxruntime-genai 0.15 cannot seed the KV cache) and
    counted in every ``GroupQueryAttention``'s ``seqlens_k`` and ``total_sequence_length`` from then on. The cache
    then holds ``tokens`` more positions than the generator counts: the bundle's context is shorter by ``tokens``
    (``shorten_context``) and its manifest says how many to reserve."""

    def __init__(self, model, tokens: int, space: str):
        from onnx import TensorProto, helper

        self.g, self.space, self.helper = model.graph, space, helper
        g = self.g
        self.gqa = [n for n in g.node if n.op_type == "GroupQueryAttention"]
        if not self.gqa:
            raise EdgepeftError("[export] positions ahead of the sequence need GroupQueryAttention")
        seqlens, total = self.gqa[0].input[5], self.gqa[0].input[6]
        t = self.t = f"{space}/"
        nodes = [
            helper.make_node("Add", [seqlens, self.const("tokens_i32", np.array([tokens], np.int32))],
                             [t + "seqlens_k"], name=t + "seqlens_k/Add"),
            helper.make_node("Add", [total, self.const("tokens_i32_scalar", np.array(tokens, np.int32))],
                             [t + "total"], name=t + "total/Add"),
            helper.make_node("Shape", ["input_ids"], [t + "batch"], start=0, end=1, name=t + "batch/Shape"),
            helper.make_node("Shape", ["input_ids"], [t + "length"], start=1, end=2, name=t + "length/Shape"),
            helper.make_node("Cast", [total], [t + "total_i64"], to=TensorProto.INT64, name=t + "total/Cast"),
            helper.make_node("Reshape", [t + "total_i64", self.const("one", np.array([1], np.int64))],
                             [t + "total_1"], name=t + "total/Reshape"),
            helper.make_node("Equal", [t + "total_1", t + "length"], [t + "first"], name=t + "first/Equal"),
            helper.make_node("Cast", [t + "first"], [t + "first_i64"], to=TensorProto.INT64, name=t + "first/Cast"),
            helper.make_node("Mul", [t + "first_i64", self.const("tokens", np.array([tokens], np.int64))],
                             [t + "rows"], name=t + "rows/Mul"),
        ]
        at = max(k for k, n in enumerate(g.node) if seqlens in n.output or total in n.output) + 1
        for n in reversed(nodes):
            g.node.insert(at, n)
        self.added = len(nodes)
        self.zero = self.const("zero", np.array([0], np.int64))
        self.end = self.const("end", np.array([np.iinfo(np.int64).max], np.int64))
        self.axis1 = self.const("axis1", np.array([1], np.int64))
        for node in self.gqa:
            node.input[5], node.input[6] = t + "seqlens_k", t + "total"

    def const(self, name: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        self.g.initializer.append(numpy_helper.from_array(arr, f"{self.space}/{name}"))
        return f"{self.space}/{name}"

    def rows_before(self, x: str, rows: np.ndarray, name: str) -> tuple[list, str]:
        """Nodes putting constant ``rows`` [tokens, width] ahead of ``x`` [batch, n, width] on the first forward."""
        h, p = self.helper, f"{self.space}/{name}/"
        width = self.const(f"{name}.width", np.array([rows.shape[-1]], np.int64))
        nodes = [
            h.make_node("Concat", [self.t + "batch", self.t + "rows", width], [p + "rows_shape"], axis=0,
                        name=p + "rows_shape/Concat"),
            h.make_node("Slice", [self.const(f"{name}.rows", rows[None].astype(np.float32)), self.zero, self.t + "rows",
                                  self.axis1], [p + "rows"], name=p + "rows/Slice"),
            h.make_node("Expand", [p + "rows", p + "rows_shape"], [p + "rows_b"], name=p + "rows/Expand"),
            h.make_node("Concat", [p + "rows_b", x], [p + "out"], axis=1, name=p + "Concat"),
        ]
        return nodes, p + "out"

    def drop_rows(self, x: str, out: str, name: str):
        """A node dropping the rows ``rows_before`` added from ``x`` into ``out``."""
        return self.helper.make_node("Slice", [x, self.t + "rows", self.end, self.axis1], [out],
                                     name=f"{self.space}/{name}/drop/Slice")


def insert_prefix(model, kv: np.ndarray) -> int:
    """The prefix ``kv`` [layers, 2, kv_heads, tokens, head_dim] in the graph (see ``_Ahead``): on the first forward,
    ``tokens`` rows ahead of each layer's packed q/k/v: zero queries (their outputs are dropped), the keys rotated
    back by their positions (``GroupQueryAttention`` rotates every new key; a cache holds the prefix keys as they
    are) and the values; the real tokens sit at positions ``tokens``, ``tokens + 1``, ... and attend to the prefix
    through the cache afterwards."""
    from onnx import helper, numpy_helper

    layers, _, kv_heads, tokens, dim = kv.shape
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    attrs = {a.name: helper.get_attribute_value(a) for a in gqa[0].attribute} if gqa else {}
    if len(gqa) != layers or attrs.get("kv_num_heads") != kv_heads:
        raise EdgepeftError(f"[export] a prefix needs {layers} GroupQueryAttention nodes over {kv_heads} key/value "
                            f"heads; the graph has {len(gqa)}")
    inits = {i.name: i for i in model.graph.initializer}
    if attrs.get("rotary_interleaved", 0):
        raise EdgepeftError("[export] a prefix needs non-interleaved rotary embeddings")
    heads = attrs["num_heads"]
    ahead = _Ahead(model, tokens, PREFIX)
    g = model.graph
    added = ahead.added
    for i, node in enumerate(gqa):
        # this layer's rotary tables (Gemma 3: local and global layers rotate by different bases)
        cos, sin = (numpy_helper.to_array(inits[node.input[k]])[:tokens] for k in (7, 8))
        if cos.shape[1] * 2 != dim:
            raise EdgepeftError(f"[export] a prefix needs full rotary embeddings over heads of {dim}")

        def unrotated(k, cos=cos, sin=sin):  # R(-p) k for each position p: what GQA's rotation turns back into k
            x1, x2 = k[..., :dim // 2], k[..., dim // 2:]
            return np.concatenate([x1 * cos + x2 * sin, x2 * cos - x1 * sin], -1)

        parts = [np.zeros((tokens, heads * dim), np.float32),
                 unrotated(kv[i, 0]).transpose(1, 0, 2).reshape(tokens, kv_heads * dim),
                 kv[i, 1].transpose(1, 0, 2).reshape(tokens, kv_heads * dim)]
        packed = not (node.input[1] or node.input[2])  # one q/k/v input, or three (after Qwen3's, Gemma's q/k norms)
        inputs = [(0, np.concatenate(parts, -1), "")] if packed else [
            (k, parts[k], f"/{'qkv'[k]}") for k in range(3)]
        at = list(g.node).index(node)
        for k, rows, part in inputs:
            before, x = ahead.rows_before(node.input[k], rows, f"layers.{i}{part}")
            node.input[k] = x
            for n in reversed(before):
                g.node.insert(at, n)
            at += len(before)
            added += len(before)
        out = node.output[0]
        node.output[0] = f"{PREFIX}/layers.{i}/attention"
        g.node.insert(at + 1, ahead.drop_rows(node.output[0], out, f"layers.{i}"))
        added += 1
    return added


def insert_gated_prefix(model, tensors: dict[str, np.ndarray], config) -> int:
    """UniPELT's gated prefix as the PyTorch model computes it (``edgepeft.adapters.prefix.gated_prefix_hooks``):
    per layer, the queries before rotation (the q columns of the packed q/k/v, LoRA updates included) attend over
    the prefix's keys and values (constants, per query head), and the result, scaled by the per-token gate, is
    added to the attention's output before o_proj."""
    from onnx import helper, numpy_helper

    kv = tensors["prefix.kv"]
    layers, _, kv_heads, tokens, dim = kv.shape
    heads = config.num_attention_heads
    g = model.graph
    gqa = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    if len(gqa) != layers:
        raise EdgepeftError(f"[export] a gated prefix needs {layers} GroupQueryAttention nodes")
    names = {n.name: n for n in g.node}
    added = 0
    for i, node in enumerate(gqa):
        pre, key = part_prefix(i, "prefix_gate"), f"layers.{i}.prefix_gate"
        qkv_matmul = names[f"/model/layers.{i}/attn/qkv_proj/MatMul"]
        # the packed q/k/v before any q/k norm: attention's first input, or what the builder splits ahead of the norms
        split = names.get(f"/model/layers.{i}/attn/qkv_proj/Split")
        if not (node.input[1] or node.input[2]):
            qkv = node.input[0]
        elif split is not None:
            qkv = split.input[0]
        else:
            raise EdgepeftError(f"[export] a gated prefix needs layer {i}'s packed q/k/v (qkv_proj/MatMul)")
        x, out = qkv_matmul.input[0], node.output[0]
        k = np.repeat(kv[i, 0], heads // kv_heads, 0)  # [heads, tokens, dim]
        v = np.repeat(kv[i, 1], heads // kv_heads, 0)

        def c(name, arr, pre=pre):
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr), f"{pre}.{name}"))
            return f"{pre}.{name}"

        h = helper.make_node
        nodes = [
            h("Slice", [qkv, c("q_start", np.array([0], np.int64)), c("q_end", np.array([heads * dim], np.int64)),
                        c("axis2", np.array([2], np.int64))], [f"{pre}/q"], name=f"{pre}/q/Slice"),
            # [b, n, heads, 1, dim] x [heads, dim, tokens] -> [b, n, heads, 1, tokens]: no Transpose needed
            h("Reshape", [f"{pre}/q", c("heads_shape", np.array([0, 0, heads, 1, dim], np.int64))], [f"{pre}/qh"],
              name=f"{pre}/q/Reshape"),
            h("MatMul", [f"{pre}/qh", c("keys", (k.transpose(0, 2, 1) / np.float32(dim ** 0.5)).astype(np.float32))],
              [f"{pre}/scores"], name=f"{pre}/scores/MatMul"),
            h("Softmax", [f"{pre}/scores"], [f"{pre}/probs"], axis=-1, name=f"{pre}/Softmax"),
            h("MatMul", [f"{pre}/probs", c("values", v.astype(np.float32))], [f"{pre}/oh"], name=f"{pre}/out/MatMul"),
            h("Reshape", [f"{pre}/oh", c("flat_shape", np.array([0, 0, heads * dim], np.int64))], [f"{pre}/o"],
              name=f"{pre}/out/Reshape"),
        ]
        gate_nodes, gate = _gate(x, pre, key, tensors, g)
        nodes += [*gate_nodes, h("Mul", [f"{pre}/o", gate], [f"{pre}/output_0"], name=f"{pre}/gate/Mul")]
        _add_after(g, out, nodes, f"{pre}/output_0", pre)
        added += len(nodes) + 1
    return added


def insert_prompt(model, embeddings: np.ndarray) -> int:
    """The soft prompt ``embeddings`` [tokens, hidden] in the graph (see ``_Ahead``): on the first forward, its rows
    go ahead of the token embeddings, every layer computes them like tokens, and their rows are dropped before the
    output head."""
    tokens, width = embeddings.shape
    g = model.graph
    embed = next((n for n in g.node if n.name == "/model/embed_tokens/Gather"), None)
    head = next((n for n in g.node if n.name == "/lm_head/MatMul"), None)
    if embed is None or head is None:
        raise EdgepeftError("[export] a soft prompt needs the graph's /model/embed_tokens/Gather and /lm_head/MatMul")
    ahead = _Ahead(model, tokens, PROMPT)
    # after the embedding's scale where the model has one (Gemma): the soft prompt's rows are not scaled
    scaled = next((n for n in g.node if n.op_type == "Mul" and n.name == "/model/embed_tokens/Mul"), None)
    emb = (scaled or embed).output[0]
    before, rows = ahead.rows_before(emb, embeddings, "embeddings")
    for node in g.node:
        for k, name in enumerate(node.input):
            if name == emb:
                node.input[k] = rows
    at = list(g.node).index(scaled or embed) + 1
    for n in reversed(before):
        g.node.insert(at, n)
    dropped = f"{PROMPT}/head_input"
    at = list(g.node).index(head)
    g.node.insert(at, ahead.drop_rows(head.input[0], dropped, "head_input"))
    head.input[0] = dropped
    # every tensor between the embeddings and the head now has sequence_length + rows positions: the exporter's
    # shape annotations say sequence_length, and ONNX Runtime would plan its buffers by them
    del g.value_info[:]
    return ahead.added + len(before) + 1


def shorten_context(genai_config, tokens: int) -> int:
    """Take ``tokens`` (the prefix's cache positions) off the context onnxruntime-genai allows: its KV buffer
    holds ``max_length`` positions and the prefix needs ``tokens`` of them. Returns the new context length."""
    import json

    cfg = json.loads(genai_config.read_text())
    model, search = cfg.setdefault("model", {}), cfg.setdefault("search", {})
    context = int(model.get("context_length") or search.get("max_length")) - tokens
    model["context_length"] = context
    if "max_length" in search:
        search["max_length"] = min(int(search["max_length"]), context)
    genai_config.write_text(json.dumps(cfg, indent=4) + "\n")
    return context


def prefix_tokens_of(model_file) -> int:
    """How many cache positions the graph's prefix takes (0: no prefix)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_file), load_external_data=False)
    init = next((i for i in model.graph.initializer if i.name in (f"{PREFIX}/tokens", f"{PROMPT}/tokens")), None)
    return int(numpy_helper.to_array(init)[0]) if init is not None else 0
