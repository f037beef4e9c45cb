"""Mobile readiness of a bundle's ORT-format model: what an app team learns before it tries a provider.

For every execution provider the target names under ``readiness`` (NNAPI, CoreML, XNNPACK) the report says
which nodes that provider would take, in how many partitions, and which operators fall back to the CPU
provider; the operators the model needs (``model.required_operators.config``, the input of a
reduced-operator ONNX Runtime build); and whether the ``.ort`` file really loads: the way a mobile app
loads it (from bytes, no graph optimizer, as in a minimal build) with the same logits as the ONNX graph it
was converted from.

The graph checked is the one that ships: nodes, edges and shapes are read from the ``.ort`` flatbuffer
itself, after the optimizer's fusions (``MatMulNBits``, ``GroupQueryAttention``, ``SkipSimplifiedLayer-
Normalization``...), which is what a provider gets offered on the phone. Partitioning follows ONNX Runtime's
own estimate (``onnxruntime.tools.mobile_helpers.usability_checker``: the supported-operator tables shipped
with the wheel for NNAPI and CoreML ML Program); XNNPACK has no such table, so ``XNNPACK_OPS`` below lists
the kernels its provider registers (onnxruntime/core/providers/xnnpack) with the conditions it checks. Like
ORT's tool, this is an estimate by operator type and shape: the provider on the device decides.

A provider is worth trying when it takes most nodes in one or two partitions (ORT's rule: one partition and
>75% of the nodes: yes; >50%: maybe; two partitions and >75%: maybe; otherwise every partition boundary
costs a copy and a sync, and the CPU provider alone is faster).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from edgepeft.core.errors import EdgepeftError, first_line
from edgepeft.onnx.decoder import Decoder, options
from edgepeft.onnx.ortformat import ORT_CONFIG
from edgepeft.pipeline.target import READINESS

FORMAT = "edgepeft-readiness/1"
FOLDER = "readiness"

# The ops the XNNPACK execution provider registers kernels for (ORT 1.2x), with the caveats it checks.
XNNPACK_OPS = {
    "ai.onnx:Conv": "2-D, constant weights", "ai.onnx:ConvTranspose": "2-D, constant weights",
    "ai.onnx:MaxPool": "2-D", "ai.onnx:AveragePool": "2-D", "ai.onnx:Resize": "2-D, bilinear or nearest",
    "ai.onnx:Softmax": "last axis", "ai.onnx:Gemm": "fp32, B a constant initializer",
    "ai.onnx:MatMul": "fp32, A of rank <= 2 with fixed sizes, B a constant 2-D initializer",
    "ai.onnx:QLinearConv": "constant scales", "com.microsoft:QLinearAveragePool": "constant scales",
    "com.microsoft:QLinearSoftmax": "constant scales",
}


def op_key(node) -> str:
    """``domain:op`` as ORT's supported-operator tables and configs name an operator."""
    return f"{node.domain or 'ai.onnx'}:{node.op_type}"


class _XnnpackChecker:
    """Duck-types ORT's _SupportedOpsChecker: op type first, then the shape conditions of MatMul/Gemm."""

    def __init__(self, initializers: set[str], value_info: dict):
        self.initializers, self.value_info, self.seen = initializers, value_info, set()

    def is_op_supported(self, node) -> bool:
        key = op_key(node)
        if key not in XNNPACK_OPS:
            return False
        if node.op_type in ("MatMul", "Gemm"):
            if len(node.input) < 2 or node.input[1] not in self.initializers:
                return False
            a = self.value_info.get(node.input[0])
            if node.op_type == "MatMul" and (a is None or len(a.type.tensor_type.shape.dim) > 2):
                return False
        self.seen.add(key)
        return True

    def get_caveats(self) -> list[str]:
        return [f"{k}: {XNNPACK_OPS[k]}" for k in sorted(self.seen)]


def _ort_table(name: str):
    def make(initializers, value_info):
        import onnxruntime.tools.mobile_helpers as helpers
        from onnxruntime.tools.mobile_helpers.usability_checker import _SupportedOpsChecker

        return _SupportedOpsChecker(Path(helpers.__file__).parent / name)
    return make


# provider short name -> (display name, checker factory, max tensor rank the provider handles)
CHECKERS = {
    "nnapi": ("NNAPI", _ort_table("nnapi_supported_ops.md"), 999),
    "coreml": ("CoreML (ML Program)", _ort_table("coreml_supported_mlprogram_ops.md"), 5),
    "xnnpack": ("XNNPACK", _XnnpackChecker, 999),
}
assert tuple(CHECKERS) == READINESS, "a target may name exactly the providers this module can assess"


def ort_graph(ort_file: Path):
    """The graph inside an ORT-format file as an ``onnx.GraphProto`` with nodes, edges, shapes and initializer
    names (no weights), and the file's header: the ORT version that wrote it and the opsets."""
    import onnx
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import (
        DimensionValueType,
        InferenceSession,
        TensorTypeAndShape,
        TypeInfoValue,
    )

    buf = Path(ort_file).read_bytes()
    if not InferenceSession.InferenceSession.InferenceSessionBufferHasIdentifier(buf, 0):
        raise EdgepeftError(f"{ort_file}: not an ORT-format model")
    sess = InferenceSession.InferenceSession.GetRootAs(buf, 0)
    model = sess.Model()
    g = model.Graph()
    s = lambda b: b.decode() if b else ""  # noqa: E731
    graph = onnx.GraphProto(name="ort")
    for j in range(g.InitializersLength()):
        graph.initializer.add(name=s(g.Initializers(j).Name()))
    for j in range(g.NodeArgsLength()):
        arg = g.NodeArgs(j)
        vi = graph.value_info.add(name=s(arg.Name()))
        t = arg.Type()
        if t is None or t.ValueType() != TypeInfoValue.TypeInfoValue.tensor_type:
            continue
        tt = TensorTypeAndShape.TensorTypeAndShape()
        tt.Init(t.Value().Bytes, t.Value().Pos)
        vi.type.tensor_type.elem_type = tt.ElemType()
        shape = tt.Shape()
        if shape is None:
            continue
        dims = vi.type.tensor_type.shape
        for d in range(shape.DimLength()):
            v = shape.Dim(d).Value()
            if v is not None and v.DimType() == DimensionValueType.DimensionValueType.VALUE:
                dims.dim.add(dim_value=v.DimValue())
            else:
                dims.dim.add(dim_param=s(v.DimParam()) if v is not None else "?")
    nodes = [onnx.helper.make_node(s(n.OpType()), [s(n.Inputs(k)) for k in range(n.InputsLength())],
                                   [s(n.Outputs(k)) for k in range(n.OutputsLength())], name=s(n.Name()),
                                   domain=s(n.Domain()))
             for n in (g.Nodes(j) for j in range(g.NodesLength())) if n is not None]
    graph.node.extend(_topological(nodes))
    infos = {vi.name: vi for vi in graph.value_info}
    for j in range(g.InputsLength()):
        graph.input.append(infos.get(s(g.Inputs(j))) or onnx.ValueInfoProto(name=s(g.Inputs(j))))
    for j in range(g.OutputsLength()):
        graph.output.append(infos.get(s(g.Outputs(j))) or onnx.ValueInfoProto(name=s(g.Outputs(j))))
    used = {n.domain or "ai.onnx" for n in graph.node}
    opsets = {s(model.OpsetImport(j).Domain()) or "ai.onnx": model.OpsetImport(j).Version()
              for j in range(model.OpsetImportLength())}
    header = {"ort_format_version": s(sess.OrtVersion()), "opsets": {d: v for d, v in opsets.items() if d in used}}
    return graph, header


def _topological(nodes: list) -> list:
    """The file keeps nodes in index order, which fusions leave unsorted; ORT's partitioner walks them in order."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = [{producer[x] for x in n.input if x in producer} for n in nodes]
    users: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(i)
    left = [len(d) for d in deps]
    ready = [i for i, k in enumerate(left) if k == 0]
    order = []
    while ready:
        i = ready.pop(0)
        order.append(i)
        for u in users.get(i, []):
            left[u] -= 1
            if left[u] == 0:
                ready.append(u)
    if len(order) != len(nodes):
        raise EdgepeftError("readiness: the ORT-format graph has a cycle")
    return [nodes[i] for i in order]


def partitioning(graph, provider: str) -> dict:
    """Which nodes ``provider`` would take: as the graph is (dynamic sequence length) and if its shapes were
    fixed."""
    from onnxruntime.tools.mobile_helpers.usability_checker import check_partitioning

    label, make, max_rank = CHECKERS[provider]
    initializers = {i.name for i in graph.initializer}
    value_info = {v.name: v for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    every = Counter(op_key(n) for n in graph.node)
    row = {"provider": label}
    for key, fixed in (("as_is", True), ("if_shapes_fixed", False)):
        checker = make(initializers, value_info)
        info = check_partitioning(graph, checker, require_fixed_input_sizes=fixed, max_rank=max_rank)
        taken = Counter(op_key(n) for group in info.supported_groups for n in group)
        row[key] = {
            "nodes": info.num_nodes, "taken": info.num_supported_nodes,
            "share": round(info.num_supported_nodes / max(info.num_nodes, 1), 4),
            "partitions": info.num_partitions, "largest_partition": max(map(len, info.supported_groups), default=0),
            "taken_ops": dict(sorted(taken.items())),
            "cpu_fallback_ops": dict(sorted((every - taken).items(), key=lambda kv: -kv[1])),
            "verdict": info.suitability().name.lower(), "caveats": checker.get_caveats()}
    # nodes a provider supports by operator but refuses for their dynamic input shapes (the sequence length)
    row["as_is"]["dynamic_shape_nodes"] = row["if_shapes_fixed"]["taken"] - row["as_is"]["taken"]
    return row


def load_check(ort_file: Path, genai_config: Path, onnx_file: Path | None = None, tokens: int = 8) -> dict:
    """Load the ``.ort`` as a mobile app does (from bytes, graph optimizations off, as in a minimal build),
    run a short prompt, and compare its logits with ``onnx_file`` (the graph it was converted from).
    Raises EdgepeftError when it does not load or computes something else."""
    import numpy as np
    import onnxruntime as ort

    so = options(optimize=False, from_ort_bytes=True)
    data = Path(ort_file).read_bytes()
    t0 = time.perf_counter()
    try:
        sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise EdgepeftError(f"{ort_file.name}: the ORT-format model does not load: {first_line(e)}") from None
    result = {"loads": True, "load_seconds": round(time.perf_counter() - t0, 3), "onnxruntime": ort.__version__,
              "how": "from bytes, graph optimizations disabled (as a minimal build loads it)"}
    ids = [100 + (i * 7919 + 11) % 1000 for i in range(tokens)]  # any fixed prompt
    try:
        logits = Decoder(ort_file, genai_config=genai_config, ort_session=sess).prefill(ids)[0]
    except Exception as e:
        raise EdgepeftError(f"{ort_file.name}: the ORT-format model loads but does not run: {first_line(e)}") from None
    if onnx_file is not None:
        ref = Decoder(onnx_file, genai_config=genai_config).prefill(ids)[0]
        diff = float(np.abs(ref - logits).max())
        same = bool((ref.argmax(-1) == logits.argmax(-1)).all())
        result.update(max_abs_logit_diff_vs_onnx=diff, same_argmax_as_onnx=same, prompt_tokens=tokens)
        # the same kernels on the same graph: only the order of float operations may differ
        if not same or diff > 1e-2 * max(1.0, float(np.abs(ref).max())):
            raise EdgepeftError(f"{ort_file.name}: the ORT-format model computes other logits than the ONNX graph "
                                f"it was converted from (max |diff| {diff:.3g})")
    return result


def check(bundle: Path, model_file: str, providers: list[str], load: dict | None = None) -> dict:
    """The readiness report of a bundle's ``.ort`` model (``load``: a ``load_check`` result already measured);
    writes ``readiness/`` into the bundle."""
    ort_file = bundle / model_file
    load = load or load_check(ort_file, bundle / "genai_config.json")
    result = {"format": FORMAT, "model_file": model_file, "load": load}
    graph, header = ort_graph(ort_file)

    ops = Counter(op_key(n) for n in graph.node)
    config = bundle / ORT_CONFIG
    result.update(
        ort_format_version=header["ort_format_version"], opsets=header["opsets"], nodes=len(graph.node),
        operators=dict(sorted(ops.items())),
        required_operators_config=config.name if config.is_file() else None,
        providers={p: partitioning(graph, p) for p in providers})
    result["recommendation"] = recommendation(result)
    out = bundle / FOLDER
    out.mkdir(exist_ok=True)
    (out / "readiness.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(report(result, bundle.name))
    return result


def recommendation(result: dict) -> str:
    good = [r["provider"] for r in result["providers"].values() if r["as_is"]["verdict"] != "no"]
    if good:
        return (f"try {', '.join(good)} first (see the partitions below); measure against the CPU provider "
                f"before shipping")
    return ("run on the CPU execution provider alone: no mobile provider takes enough of this graph to pay for "
            "the copies at its partition boundaries")


def report(r: dict, name: str) -> str:
    load = r["load"]
    lines = [f"# Mobile readiness: {name}", "",
             f"**{r['recommendation'][0].upper() + r['recommendation'][1:]}.**", "",
             "## The ORT-format file", "",
             f"- `{r['model_file']}`: ORT format version {r['ort_format_version']}, converted with onnxruntime "
             f"{load['onnxruntime']}; the app's runtime must read that format version and these opsets: "
             f"{', '.join(f'{d} {v}' for d, v in r['opsets'].items())}.",
             f"- Loads {load['how']}: yes, in {load['load_seconds']:.2f} s (onnxruntime {load['onnxruntime']})."]
    if "max_abs_logit_diff_vs_onnx" in load:
        lines.append(f"- Logits on a {load['prompt_tokens']}-token prompt vs the ONNX graph it was converted from: "
                     f"max |diff| {load['max_abs_logit_diff_vs_onnx']:.2g}, same next token everywhere: "
                     f"{'yes' if load['same_argmax_as_onnx'] else 'NO'}.")
    if r["required_operators_config"]:
        lines.append(f"- `{r['required_operators_config']}`: the {len(r['operators'])} operators below, the input "
                     "of a reduced-operator build (`build.sh --include_ops_by_config`).")
    lines += ["", "## Execution providers", "",
              "| provider | nodes taken | partitions | largest | if shapes were fixed | worth trying |",
              "|---|---|---|---|---|---|"]
    for p in r["providers"].values():
        a, f = p["as_is"], p["if_shapes_fixed"]
        lines.append(f"| {p['provider']} | {a['taken']}/{a['nodes']} ({100 * a['share']:.1f}%) | {a['partitions']} | "
                     f"{a['largest_partition']} | {f['taken']} in {f['partitions']} partitions | {a['verdict']} |")
    for p in r["providers"].values():
        a = p["as_is"]
        fallback = ", ".join(f"{op} x{n}" for op, n in a["cpu_fallback_ops"].items()) or "nothing"
        lines += ["", f"### {p['provider']}", "", f"Falls back to the CPU provider: {fallback}."]
        if a["dynamic_shape_nodes"]:
            lines.append(f"{a['dynamic_shape_nodes']} nodes of supported operators are refused for their dynamic "
                         "input shapes (the sequence length varies).")
        if a["caveats"]:
            caveats = "; ".join(c.rstrip(". ") for c in a["caveats"])
            lines.append(f"Unchecked conditions of the nodes it takes: {caveats}.")
    lines += ["", "## Operators", "", "| operator | nodes |", "|---|---|"]
    lines += [f"| {op} | {n} |" for op, n in r["operators"].items()]
    return "\n".join(lines) + "\n"


def summary(r: dict) -> dict:
    """The figures the manifest keeps."""
    return {"loads": r["load"]["loads"], "recommendation": r["recommendation"],
            **{k: {"taken": v["as_is"]["taken"], "nodes": v["as_is"]["nodes"], "partitions": v["as_is"]["partitions"],
                   "verdict": v["as_is"]["verdict"]} for k, v in r["providers"].items()}}
