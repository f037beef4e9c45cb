"""Stage ``requantize``: the exported fp32 graph's weights to the target's int4 (or int8), block-wise,
fitted on calibration data, with the most sensitive MatMuls kept at int8 when int4 misses the budget.

Every MatMul becomes ONNX Runtime's ``MatMulNBits`` (weight-only, ``block_size`` weights per scale,
symmetric unless the target says otherwise), the output head included; the target's activation precision
picks the kernels' ``accuracy_level`` (int8 activations, level 4, use the integer dot-product kernels).

Method (``edgepeft.quant``): ``gptq`` (default), ``clip`` (activation-aware range search) or ``rtn``
(round-to-nearest). Both calibrated methods read the inputs of every MatMul on the calibration set
(``calib/sets.py``: windows of the calibration part of the prose and of the task's training examples).
Measured on SmolLM2 + its phone-command LoRA, int4 symmetric, block 32, against (4-bit base + adapter) on
held-out data: rtn perplexity +104%, agreement 65%, task exact match -6.2 points; clip +11%, 73%, -7.0;
gptq +12.7%, 81%, -1.6 (same size and speed; see the closing note of issue #5).

Mixed precision, chosen by measurement: the all-int4 model is scored against the fp32 export on the
calibration windows (perplexity increase, KL, next-token agreement). If it misses the recipe's
``[evaluate]`` budgets, tightened by ``margin``, each MatMul is promoted to int8 alone and the KL it
saves is measured; MatMuls are then promoted in order of KL saved per extra byte, and the smallest prefix
of that order whose model meets the budgets is found by measuring (doubling, then bisection). The quality
gate (stage ``evaluate``) then judges the bundle on held-out data the search never saw.

The token embedding: when the model ties it to the output head (SmolLM2 does), the exported graph reads the
table as a Transpose of the head's weight. After quantization the head's blocks run along the hidden
axis, which is exactly what ``GatherBlockQuantized`` reads for a row lookup, so the embedding becomes a
GatherBlockQuantized over the head's own quantized weight: the table is stored once, at the head's
precision (113 MB of fp32 table -> 0 extra). An untied table is quantized on its own (round-to-nearest).
The target can keep it fp32.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from typing import Literal

import numpy as np

from edgepeft.errors import EdgepeftError
from edgepeft.pipeline import StageContext

MODEL = "model.onnx"
EMBED = "/model/embed_tokens"


@dataclass
class RequantizeConfig:
    method: Literal["gptq", "clip", "rtn"] = "gptq"
    calib_text: str = "builtin:python-docs"  # prose to calibrate on (its calibration part, see calib/sets.py)
    calib_windows: int = 16  # windows of prose
    calib_task_windows: int = 8  # windows of the task's training examples
    calib_window_tokens: int = 256
    mixed_precision: bool = True  # promote the most sensitive MatMuls to int8 when int4 misses the budget
    # The search aims at this share of each [evaluate] budget on calibration data. Held-out text scores
    # worse than calibration text (SmolLM2, GPTQ int4: perplexity +6.9% on calibration prose, +12.7% held
    # out), so 0.6 buys headroom (32 MatMuls at int8, +11 MB); 0.8 keeps the smallest model that passes.
    margin: float = 0.8
    measure_windows: int = 8  # calibration windows of prose, and of the task, each candidate is scored on
    sensitivity_windows: int = 4  # calibration windows each single-MatMul promotion is scored on
    gptq_damp: float = 0.01  # GPTQ's dampening of the Hessian, as a share of its mean diagonal

    def check(self) -> str | None:
        if min(self.calib_windows, self.calib_window_tokens - 1, self.measure_windows,
               self.sensitivity_windows) <= 0 or self.calib_task_windows < 0:
            return "calib_windows, calib_window_tokens, measure_windows, sensitivity_windows must be positive"
        if not 0 < self.margin <= 1:
            return "margin must be in (0, 1]"
        if not 0 < self.gptq_damp < 1:
            return "gptq_damp must be in (0, 1)"
        return None


def _attr(node, name):
    return next(a.i for a in node.attribute if a.name == name)


def tie_quantized_embedding(model, bits: int) -> bool:
    """Replace ``Gather(Transpose(head weight))`` by ``GatherBlockQuantized`` over the head's quantized
    weight. Returns False when the graph has no tied embedding of that shape."""
    import numpy as np
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


class Candidates:
    """The fp32 graph and each weight MatMul quantized at the target's bits and at int8 (made on demand,
    kept); ``build`` assembles the graph for any choice of MatMuls at int8."""

    def __init__(self, fp32_model, target, method: str, stats: dict, damp: float):
        import onnx
        from onnx import numpy_helper

        from edgepeft import quant
        from edgepeft.quant import weight_matmuls

        self.target, self.method, self.stats, self.damp = target, method, stats, damp
        inits = {i.name: i for i in fp32_model.graph.initializer}
        matmuls = weight_matmuls(fp32_model)
        self.nodes = [n.name for n in matmuls]
        self.inputs = {n.name: n.input[0] for n in matmuls}
        self.weights = {n.name: numpy_helper.to_array(inits[n.input[1]]) for n in matmuls}
        bad = sorted({w.shape[0] for w in self.weights.values() if w.shape[0] % target.block_size})
        if bad:
            raise EdgepeftError(f"[requantize] block_size {target.block_size} must divide every MatMul's input "
                                f"width (found {', '.join(map(str, bad))})")
        self.tied = any(n.op_type == "Transpose" and n.name.startswith(EMBED) for n in fp32_model.graph.node)
        self.head = next((n for n in self.nodes if n.startswith("/lm_head")), None)
        self._cache: dict[tuple[str, int], object] = {}
        # the graph without the weights every build replaces (a build copies this, not 0.5 GB of fp32)
        self.skeleton = onnx.ModelProto()
        self.skeleton.CopyFrom(fp32_model)
        replaced = {n.input[1] for n in matmuls}
        other_uses = {i for n in fp32_model.graph.node if n.op_type != "MatMul" for i in n.input}
        quant.keep_initializers(self.skeleton, lambda name: name not in replaced - other_uses)

    def quantized(self, name: str, bits: int):
        from edgepeft import quant

        key = (name, bits)
        if key not in self._cache:
            w, t = self.weights[name], self.target
            h = self.stats.get(self.inputs[name], (None, 0))[0] if self.method != "rtn" else None
            if self.method == "gptq" and bits < 8:  # int8 is near lossless: activation-aware ranges suffice
                self._cache[key] = quant.quantize_gptq(w, h, bits, t.block_size, t.symmetric, self.damp)
            else:
                imp = None if h is None else (np.diag(h).copy() if h.ndim == 2 else h)
                self._cache[key] = quant.quantize_rtn(w, bits, t.block_size, t.symmetric, imp)
        return self._cache[key]

    def build(self, high: set[str] = frozenset()):
        """The graph with every weight MatMul quantized: those in ``high`` at int8, the rest at the target's bits.
        Returns (model, description of the embedding)."""
        import onnx

        from edgepeft import quant

        t = self.target
        m = onnx.ModelProto()
        m.CopyFrom(self.skeleton)
        quant.to_matmulnbits(m, {n: self.quantized(n, 8 if n in high else t.bits) for n in self.nodes},
                             t.accuracy_level)
        head_bits = 8 if self.head in high else t.bits
        if self.tied and t.quantize_embedding and tie_quantized_embedding(m, head_bits):
            return m, f"shared with the head, int{head_bits}"
        if t.quantize_embedding and not self.tied and any(n.op_type == "Gather" for n in m.graph.node):
            return quantize_gathers(m, t), t.weights
        return m, "fp32"


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


class Scorer:
    """Scores a candidate graph against the fp32 export's logits on fixed calibration windows, prose and task
    apart: a budget must hold on each (the task's windows are easy text and would hide a loss on prose)."""

    def __init__(self, fp32_file, genai_config, parts: dict[str, list[list[int]]]):
        from edgepeft.onnx_model import Decoder

        self.genai = genai_config
        self.parts = {k: v for k, v in parts.items() if v}
        ref = Decoder(fp32_file, genai_config=genai_config)
        self.reference = {k: [ref.prefill(w)[0] for w in v] for k, v in self.parts.items()}
        # a few windows of each part, alternating, for the quick scores of the sensitivity pass
        self.quick = [(k, i) for i in range(max(map(len, self.parts.values()))) for k in self.parts
                      if i < len(self.parts[k])]

    def __call__(self, model, windows: int | None = None) -> dict:
        """Worst figures over the parts (all windows), or KL etc. on the first ``windows`` quick windows."""
        from edgepeft.onnx_model import Decoder
        from edgepeft.quality import score

        data = model.SerializeToString()
        dec = Decoder(data, genai_config=self.genai)
        if windows:
            picked = self.quick[:windows]
            ws = [self.parts[k][i] for k, i in picked]
            return {**score([self.reference[k][i] for k, i in picked], [dec.prefill(w)[0] for w in ws], ws),
                    "bytes": len(data)}
        parts = {k: score(self.reference[k], [dec.prefill(w)[0] for w in ws], ws) for k, ws in self.parts.items()}
        return {"perplexity_increase": max(p["perplexity_increase"] for p in parts.values()),
                "kl": max(p["kl"] for p in parts.values()),
                "next_token_agreement": min(p["next_token_agreement"] for p in parts.values()),
                "tokens": sum(p["tokens"] for p in parts.values()), "bytes": len(data), "parts": parts}


def search(cands: Candidates, scorer: Scorer, budgets, cfg: RequantizeConfig, echo=print) -> dict:
    """Mixed precision by measurement: the smallest prefix of the MatMuls ranked by KL saved per byte whose
    model meets the budgets (tightened by the margin) on the calibration windows."""
    from edgepeft.quality import passed, verdict
    from edgepeft.runtime import progress

    base = scorer(cands.build()[0], cfg.sensitivity_windows)
    gains = {}
    with progress(len(cands.nodes), "sensitivity (each MatMul at int8 alone)", "matmul") as bar:
        for name in cands.nodes:
            s = scorer(cands.build({name})[0], cfg.sensitivity_windows)
            extra = max(s["bytes"] - base["bytes"], 1)
            gains[name] = {"kl_saved": base["kl"] - s["kl"], "extra_bytes": extra}
            bar.update(1)
    order = sorted(cands.nodes, key=lambda n: -gains[n]["kl_saved"] / gains[n]["extra_bytes"])
    steps: dict[int, dict] = {}

    def meets(k: int) -> bool:
        if k not in steps:
            figures = scorer(cands.build(set(order[:k]))[0])
            steps[k] = {"int8_matmuls": k, **figures, "passed": passed(verdict(figures, budgets, cfg.margin))}
            echo(f"    {k:>3} MatMuls at int8: {figures['bytes'] / 1e6:.1f} MB, perplexity "
                 f"{100 * figures['perplexity_increase']:+.1f}%, KL {figures['kl']:.3f}, agreement "
                 f"{100 * figures['next_token_agreement']:.1f}% -> {'meets' if steps[k]['passed'] else 'misses'}")
        return steps[k]["passed"]

    lo, hi = 0, 1
    while hi < len(order) and not meets(hi):
        lo, hi = hi, min(2 * hi, len(order))
    met = meets(hi)
    while met and hi - lo > 1:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return {"int8": order[:hi], "met": met, "order": order, "gains": gains,
            "steps": [steps[k] for k in sorted(steps)]}


def run(ctx: StageContext) -> None:
    import time

    import onnx
    from transformers import AutoTokenizer

    from edgepeft import quant
    from edgepeft.calib.sets import calibration_windows
    from edgepeft.onnx_model import Decoder
    from edgepeft.pipeline import write_atomic
    from edgepeft.quality import passed, table, verdict
    from edgepeft.runtime import mb, progress

    cfg: RequantizeConfig = ctx.config
    target, budgets = ctx.recipe.target, ctx.recipe.evaluate.budgets()
    src = ctx.input("export") / "model"
    out = ctx.out / "model"
    out.mkdir()
    for f in src.iterdir():  # genai_config.json, tokenizer files
        if not f.name.startswith("model.onnx"):
            shutil.copy2(f, out / f.name)
    genai = src / "genai_config.json"
    tokenizer = AutoTokenizer.from_pretrained(src)
    windows, about = calibration_windows(ctx.recipe, tokenizer, cfg.calib_windows, cfg.calib_task_windows,
                                         cfg.calib_window_tokens, cfg.calib_text)
    if not windows:
        raise EdgepeftError(f"[requantize] calib_text {cfg.calib_text!r} is shorter than one window of "
                            f"{cfg.calib_window_tokens} tokens")
    fp32 = onnx.load(str(src / MODEL))
    t0 = time.time()
    stats = {}
    if cfg.method != "rtn":
        with progress(len(windows), "calibration statistics", "window") as bar:
            stats = quant.input_statistics(fp32, windows, lambda data: Decoder(data, genai_config=genai),
                                           full=cfg.method == "gptq", progress=bar.update)
    cands = Candidates(fp32, target, cfg.method, stats, cfg.gptq_damp)
    with progress(len(cands.nodes), f"quantize ({cfg.method}, int{target.bits})", "matmul") as bar:
        for name in cands.nodes:
            cands.quantized(name, target.bits)
            bar.update(1)
    quantize_seconds = time.time() - t0

    scorer = Scorer(src / MODEL, genai, {"prose": windows[:about["prose_windows"]][:cfg.measure_windows],
                                         "task": windows[about["prose_windows"]:][:cfg.measure_windows]})
    model, embedding = cands.build()
    first = scorer(model)
    rows = verdict(first, budgets, cfg.margin)
    print(f"  {cfg.method} int{target.bits} block {target.block_size}: {mb(first['bytes'])}; on {first['tokens']} "
          f"calibration tokens vs fp32 (worst of prose and task): perplexity "
          f"{100 * first['perplexity_increase']:+.1f}%, KL {first['kl']:.3f}, "
          f"agreement {100 * first['next_token_agreement']:.1f}%")
    found, final = None, first
    if not passed(rows) and cfg.mixed_precision and target.bits < 8:
        print(f"  misses the budgets (x{cfg.margin:g} margin) on calibration data:\n{table(rows)}\n"
              "  searching for the fewest MatMuls to keep at int8:")
        found = search(cands, scorer, budgets, cfg)
        model, embedding = cands.build(set(found["int8"]))
        final = found["steps"][[s["int8_matmuls"] for s in found["steps"]].index(len(found["int8"]))]
        if not found["met"]:
            print("  even with every MatMul at int8 the calibration budgets are missed; the quality gate decides")
    fp32_bytes = sum(p.stat().st_size for p in src.glob("model.onnx*"))
    large = model.ByteSize() > 1_800_000_000  # protobuf's 2 GB limit: keep big weights beside the graph
    onnx.save(model, str(out / MODEL), save_as_external_data=large, location=f"{MODEL}.data")
    q_bytes = sum(p.stat().st_size for p in out.glob("model.onnx*"))
    int8 = found["int8"] if found else []
    detail = {"method": cfg.method, "calibration": about, "bits": {n: 8 if n in int8 else target.bits
                                                                    for n in cands.nodes}}
    if found:
        detail.update(search_order=found["order"], sensitivity=found["gains"], steps=found["steps"])
    write_atomic(ctx.out / "quantization.json", json.dumps(detail, indent=1) + "\n")
    ops = [n.op_type for n in model.graph.node]
    ctx.figures.update(
        method=cfg.method, weights=target.weights, block_size=target.block_size, symmetric=target.symmetric,
        activations=target.activations, matmulnbits=ops.count("MatMulNBits"), int8_matmuls=len(int8),
        int8_matmul_names=int8, embedding=embedding, fp32_bytes=fp32_bytes, quantized_bytes=q_bytes,
        ratio=round(fp32_bytes / q_bytes, 2), calibration=about, quantize_seconds=round(quantize_seconds, 1),
        calibration_scores={"uniform": first, "final": final}, budgets_met_on_calibration=passed(
            verdict(final, budgets, cfg.margin)), search_steps=found["steps"] if found else [])
    print(f"  {mb(fp32_bytes)} -> {mb(q_bytes)} ({len(int8)} of {len(cands.nodes)} MatMuls at int8, embedding "
          f"{embedding}); calibration vs fp32: perplexity {100 * final['perplexity_increase']:+.1f}%, "
          f"KL {final['kl']:.3f}, agreement {100 * final['next_token_agreement']:.1f}%")


def quantize(fp32_file, out_file, target, high: set[str] = frozenset()) -> dict:
    """Round-to-nearest quantization of ``fp32_file`` for ``target`` without calibration (MatMuls named in
    ``high`` at int8), written to ``out_file``; returns what was done. For studies and tests."""
    import onnx

    model, embedding = Candidates(onnx.load(str(fp32_file)), target, "rtn", {}, 0.01).build(set(high))
    onnx.save(model, str(out_file))
    return {"matmulnbits": sum(n.op_type == "MatMulNBits" for n in model.graph.node), "embedding": embedding}
