"""Quantizing a decoder's weight MatMuls for a target, with the most sensitive ones kept at int8 when the
all-int4 model misses its budgets: chosen by measurement, not by rule.

``Candidates`` holds the fp32 graph and each weight MatMul quantized at the target's bits and at int8 (GPTQ,
activation-aware ranges or round-to-nearest, see ``edgepeft.onnx.quant``) and assembles the graph for any
choice of MatMuls at int8. ``Scorer`` scores a graph against the fp32 export's logits on fixed calibration
windows (prose and task apart). ``search`` promotes each MatMul to int8 alone, measures the KL it saves,
orders them by KL saved per extra byte and finds the smallest prefix of that order whose model meets the
budgets (doubling, then bisection).
"""

from __future__ import annotations

import numpy as np

from edgepeft.core.console import progress
from edgepeft.core.errors import EdgepeftError
from edgepeft.onnx import quant
from edgepeft.onnx.decoder import Decoder
from edgepeft.onnx.rewrite import EMBED, quantize_gathers, tie_quantized_embedding
from edgepeft.quality.scores import passed, score, verdict

# The block of an int8 head kept so by the target (``head = "int8"``): 8-bit codes lose little to a 128-wide
# range, and each 32-wide block's fp32 scale costs a bit per weight (Gemma 3's table: 189 MB -> 173 MB).
HEAD_INT8_BLOCK = 128


class Candidates:
    """The fp32 graph and each weight MatMul quantized at the target's bits and at int8 (made on demand,
    kept); ``build`` assembles the graph for any choice of MatMuls at int8."""

    def __init__(self, fp32_model, target, method: str, stats: dict, damp: float, act_order: bool = False,
                 keep_int8: list[str] | tuple = ()):
        import onnx
        from onnx import numpy_helper

        self.target, self.method, self.stats, self.damp, self.act_order = target, method, stats, damp, act_order
        inits = {i.name: i for i in fp32_model.graph.initializer}
        matmuls = quant.weight_matmuls(fp32_model)
        self.nodes = [n.name for n in matmuls]
        self.inputs = {n.name: n.input[0] for n in matmuls}
        self.weights = {n.name: numpy_helper.to_array(inits[n.input[1]]) for n in matmuls}
        bad = sorted({w.shape[0] for w in self.weights.values() if w.shape[0] % target.block_size})
        if bad:
            raise EdgepeftError(f"[requantize] block_size {target.block_size} must divide every MatMul's input "
                                f"width (found {', '.join(map(str, bad))})")
        self.tied = any(n.op_type == "Transpose" and n.name.startswith(EMBED) for n in fp32_model.graph.node)
        self.head = next((n for n in self.nodes if n.startswith("/lm_head")), None)
        # at int8 whatever is chosen (the target's head precision); the rest is what a search may promote
        self.always = {self.head} if self.head and target.head == "int8" else set()
        # ``keep_int8``: parts of node names ("down_proj", "layers.29/") whose MatMuls stay at int8 whatever is chosen
        for part in keep_int8:
            hits = {n for n in self.nodes if part in n}
            if not hits:
                raise EdgepeftError(f"[requantize] keep_int8 {part!r} names no weight MatMul of the graph (they are "
                                    f"named like {self.nodes[0]!r})")
            self.always |= hits
        self.searchable = [n for n in self.nodes if n not in self.always]
        self._cache: dict[tuple[str, int], object] = {}
        # the graph without the weights every build replaces (a build copies this, not 0.5 GB of fp32)
        self.skeleton = onnx.ModelProto()
        self.skeleton.CopyFrom(fp32_model)
        replaced = {n.input[1] for n in matmuls}
        other_uses = {i for n in fp32_model.graph.node if n.op_type != "MatMul" for i in n.input}
        quant.keep_initializers(self.skeleton, lambda name: name not in replaced - other_uses)

    def quantized(self, name: str, bits: int):

        key = (name, bits)
        if key not in self._cache:
            w, t = self.weights[name], self.target
            h = self.stats.get(self.inputs[name], (None, 0))[0] if self.method != "rtn" else None
            if self.method == "gptq" and bits < 8:  # int8 is near lossless: activation-aware ranges suffice
                self._cache[key] = quant.quantize_gptq(w, h, bits, t.block_size, t.symmetric, self.damp,
                                                       act_order=self.act_order)
            else:
                imp = None if h is None else (np.diag(h).copy() if h.ndim == 2 else h)
                block = t.block_size
                if name == self.head and name in self.always and w.shape[0] % HEAD_INT8_BLOCK == 0:
                    block = max(block, HEAD_INT8_BLOCK)
                self._cache[key] = quant.quantize_rtn(w, bits, block, t.symmetric, imp)
        return self._cache[key]

    def build(self, high: set[str] = frozenset()):
        """The graph with every weight MatMul quantized: those in ``high`` at int8, the rest at the target's bits.
        Returns (model, description of the embedding)."""
        import onnx

        t, high = self.target, set(high) | self.always
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


class Scorer:
    """Scores a candidate graph against the fp32 export's logits on fixed calibration windows, prose and task
    apart: a budget must hold on each (the task's windows are easy text and would hide a loss on prose)."""

    def __init__(self, fp32_file, genai_config, parts: dict[str, list[list[int]]]):

        self.genai = genai_config
        self.parts = {k: v for k, v in parts.items() if v}
        ref = Decoder(fp32_file, genai_config=genai_config)
        self.reference = {k: [ref.prefill(w)[0] for w in v] for k, v in self.parts.items()}
        # a few windows of each part, alternating, for the quick scores of the sensitivity pass
        self.quick = [(k, i) for i in range(max(map(len, self.parts.values()))) for k in self.parts
                      if i < len(self.parts[k])]

    def __call__(self, model, windows: int | None = None) -> dict:
        """Worst figures over the parts (all windows), or KL etc. on the first ``windows`` quick windows."""

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


def search(cands: Candidates, scorer: Scorer, budgets, cfg, echo=print) -> dict:
    """Mixed precision by measurement: the smallest prefix of the MatMuls ranked by KL saved per byte whose
    model meets the budgets (tightened by the margin) on the calibration windows."""

    base = scorer(cands.build()[0], cfg.sensitivity_windows)
    gains = {}
    with progress(len(cands.searchable), "sensitivity (each MatMul at int8 alone)", "matmul") as bar:
        for name in cands.searchable:
            s = scorer(cands.build({name})[0], cfg.sensitivity_windows)
            extra = max(s["bytes"] - base["bytes"], 1)
            gains[name] = {"kl_saved": base["kl"] - s["kl"], "extra_bytes": extra}
            bar.update(1)
    order = sorted(cands.searchable, key=lambda n: -gains[n]["kl_saved"] / gains[n]["extra_bytes"])
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


def quantize(fp32_file, out_file, target, high: set[str] = frozenset()) -> dict:
    """Round-to-nearest quantization of ``fp32_file`` for ``target`` without calibration (MatMuls named in
    ``high`` at int8), written to ``out_file``; returns what was done. For studies and tests."""
    import onnx

    model, embedding = Candidates(onnx.load(str(fp32_file)), target, "rtn", {}, 0.01).build(set(high))
    onnx.save(model, str(out_file))
    return {"matmulnbits": sum(n.op_type == "MatMulNBits" for n in model.graph.node), "embedding": embedding}
