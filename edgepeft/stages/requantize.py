"""Stage ``requantize``: the exported fp32 graph's weights to the target's int4 (or int8), block-wise.

Every MatMul becomes ONNX Runtime's ``MatMulNBits`` (weight-only, ``block_size`` weights per scale,
symmetric unless the target says otherwise), the output head included. Round-to-nearest here; calibrated
methods come with the quality gate. The target's activation precision picks the kernels'
``accuracy_level``: int8 activations (level 4) use the integer dot-product kernels.

The token embedding: when the model ties it to the output head (SmolLM2 does), the exported graph reads the
table as a Transpose of the head's weight. After quantization the head's 4-bit blocks run along the hidden
axis, which is exactly what ``GatherBlockQuantized`` reads for a row lookup, so the embedding becomes a
GatherBlockQuantized over the head's own quantized weight: the table is stored once, in 4 bits (113 MB of
fp32 table -> 0, ~14 MB shared). An untied table is quantized on its own. The target can keep it fp32.

Then it measures what the rounding cost against the fp32 export, on held-out prose: next-token agreement
and perplexity of both.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from edgepeft.errors import EdgepeftError
from edgepeft.pipeline import StageContext

MODEL = "model.onnx"
EMBED = "/model/embed_tokens"


@dataclass
class RequantizeConfig:
    method: str = "rtn"  # round-to-nearest, block-wise
    eval_windows: int = 8  # held-out prose (the merge stage's eval_text) for agreement and perplexity
    eval_window_tokens: int = 256

    def check(self) -> str | None:
        if self.method != "rtn":
            return f"method {self.method!r} is not available (available: rtn)"
        if self.eval_windows <= 0 or self.eval_window_tokens <= 1:
            return "eval_windows and eval_window_tokens must be positive"
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


def quantize(fp32_file, out_file, target) -> dict:
    """Write the target's weight-only quantized version of ``fp32_file``; returns what was done."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    model = onnx.load(str(fp32_file))
    tied = any(n.op_type == "Transpose" and n.name.startswith(EMBED) for n in model.graph.node)
    ops = ("MatMul",) if tied or not target.quantize_embedding else ("MatMul", "Gather")
    config = DefaultWeightOnlyQuantConfig(block_size=target.block_size, is_symmetric=target.symmetric,
                                          accuracy_level=target.accuracy_level, bits=target.bits,
                                          op_types_to_quantize=ops, quant_axes=(("MatMul", 0), ("Gather", 1)))
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    model = quantizer.model.model
    shared = tied and target.quantize_embedding and tie_quantized_embedding(model, target.bits)
    ops_after = [n.op_type for n in model.graph.node]
    left = sum(1 for n in model.graph.node if n.op_type == "MatMul"
               and any(i.name == n.input[1] for i in model.graph.initializer))
    if left:
        raise EdgepeftError(f"[requantize] {left} MatMul weight(s) were left unquantized (block_size "
                            f"{target.block_size} must divide every input width)")
    large = model.ByteSize() > 1_800_000_000  # protobuf's 2 GB limit: keep big weights beside the graph
    onnx.save(model, str(out_file), save_as_external_data=large, location=f"{out_file.name}.data")
    return {"matmulnbits": ops_after.count("MatMulNBits"),
            "embedding": ("shared with the head, " + target.weights) if shared
            else (target.weights if "GatherBlockQuantized" in ops_after else "fp32")}


def run(ctx: StageContext) -> None:
    from transformers import AutoTokenizer

    from edgepeft.onnx_model import Decoder, compare, perplexity
    from edgepeft.runtime import mb
    from edgepeft.stages.merge import heldout_windows

    cfg: RequantizeConfig = ctx.config
    target = ctx.recipe.target
    src = ctx.input("export") / "model"
    out = ctx.out / "model"
    out.mkdir()
    for f in src.iterdir():  # genai_config.json, tokenizer files
        if not f.name.startswith("model.onnx"):
            shutil.copy2(f, out / f.name)
    done = quantize(src / MODEL, out / MODEL, target)
    fp32_bytes = sum(p.stat().st_size for p in src.glob("model.onnx*"))
    q_bytes = sum(p.stat().st_size for p in out.glob("model.onnx*"))

    tokenizer = AutoTokenizer.from_pretrained(src)
    windows = heldout_windows(ctx.recipe, tokenizer, cfg.eval_windows, cfg.eval_window_tokens, "requantize")
    ref = Decoder(src / MODEL)
    reference = [ref.prefill(w)[0] for w in windows]
    del ref
    cand = Decoder(out / MODEL)
    quantized = [cand.prefill(w)[0] for w in windows]
    agreement = compare(reference, quantized)
    ppl_ref, ppl_q = perplexity(reference, windows), perplexity(quantized, windows)
    ctx.figures.update(method=cfg.method, weights=target.weights, block_size=target.block_size,
                       symmetric=target.symmetric, activations=target.activations, **done,
                       fp32_bytes=fp32_bytes, quantized_bytes=q_bytes, ratio=round(fp32_bytes / q_bytes, 2),
                       next_token_agreement=agreement["next_token_agreement"], tokens=agreement["tokens"],
                       perplexity_fp32=ppl_ref, perplexity_quantized=ppl_q,
                       perplexity_change=ppl_q / ppl_ref - 1)
    print(f"  {target.weights} block {target.block_size} ({cfg.method}), embedding {done['embedding']}: "
          f"{mb(fp32_bytes)} -> {mb(q_bytes)}; vs fp32 on {agreement['tokens']} held-out tokens: next-token "
          f"agreement {100 * agreement['next_token_agreement']:.1f}%, perplexity {ppl_ref:.2f} -> {ppl_q:.2f} "
          f"({100 * (ppl_q / ppl_ref - 1):+.1f}%)")
