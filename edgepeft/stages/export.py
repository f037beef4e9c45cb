"""Stage ``export``: the merged model as an fp32 ONNX decoder with a KV cache, checked against PyTorch.

Exporter: onnxruntime-genai's model builder (``onnxruntime_genai.models.builder``, fp32, CPU). Measured on
SmolLM2-135M, 2-core CPU, against the two other exporters that work offline (see ``../shared`` notes and
``nox -s bench``):

* optimum-onnx ``main_export`` (text-generation-with-past, TorchScript exporter): 25 s; after the same
  int4 weight-only quantization its graph decodes at ~14.5 ms/token and weighs 185 MB: attention stays a
  chain of small ops, and the tied output head is a Transpose the 4-bit quantizer leaves in fp32.
* ``torch.onnx.export(dynamo=True)``: 70 s, and the same unfused attention unless one targets opset 23.
* the model builder: 4-9 s; it writes attention as one ``GroupQueryAttention`` op with rotary embedding
  and the KV-cache update inside, packs q/k/v into one MatMul, fuses the residual adds into
  ``SkipSimplifiedLayerNormalization``, and writes the ``genai_config.json`` onnxruntime-genai runs from.
  The same int4 quantization then decodes at ~4-7 ms/token in 86 MB.

All three match PyTorch to ~1e-5 in fp32, so the choice is the graph's speed. This stage exports fp32 only;
``requantize`` turns the weights into int4/int8 for the target, so the fp32 graph is the reference the
quantized one is measured against. The stage checks its output: prefill logits on held-out prose and
logits of token-by-token decoding through the KV cache must both match the merged PyTorch model within
``max_logit_diff``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from edgepeft.errors import EdgepeftError
from edgepeft.pipeline import StageContext

EXPORTER = "onnxruntime-genai model builder"


@dataclass
class ExportConfig:
    eval_windows: int = 4  # held-out prose windows for the prefill check (the merge stage's eval_text)
    eval_window_tokens: int = 128
    decode_check_tokens: int = 32  # tokens decoded one by one through the KV cache and checked
    max_logit_diff: float = 1e-3

    def check(self) -> str | None:
        if self.eval_windows <= 0 or self.eval_window_tokens <= 1 or self.decode_check_tokens < 0:
            return "eval_windows, eval_window_tokens must be positive and decode_check_tokens not negative"
        if self.decode_check_tokens >= self.eval_window_tokens:
            return "decode_check_tokens must be smaller than eval_window_tokens"
        return None


def build_onnx(model_dir, out_dir, precision: str = "fp32", cache_dir=None, extra: dict | None = None) -> float:
    """Run the model builder on a Hugging Face folder; returns its seconds. Fails with the builder's last
    line if it fails."""
    import time

    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out_dir),
           "-p", precision, "-e", "cpu", "-c", str(cache_dir or (out_dir.parent / ".builder-cache"))]
    if extra:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra.items())]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or done.stdout).strip().splitlines() if ln.strip()]
        raise EdgepeftError(f"[export] the ONNX model builder failed: {lines[-1] if lines else 'no output'}")
    return time.time() - t0


def opset_of(model_file) -> int:
    import onnx

    model = onnx.load(str(model_file), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def run(ctx: StageContext) -> None:
    import shutil

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgepeft.onnx_model import Decoder, compare, decode_logits
    from edgepeft.stages.merge import heldout_windows

    cfg: ExportConfig = ctx.config
    target = ctx.recipe.target
    merged_dir = ctx.input("merge") / "model"
    out = ctx.out / "model"
    seconds = build_onnx(merged_dir, out, "fp32", cache_dir=ctx.out / ".cache")
    shutil.rmtree(ctx.out / ".cache", ignore_errors=True)
    model_file = out / "model.onnx"
    opset = opset_of(model_file)
    if opset > target.opset:
        raise EdgepeftError(f"[export] the graph needs ai.onnx opset {opset}, target {target.name} supports up to "
                            f"{target.opset}")

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    windows = heldout_windows(ctx.recipe, tokenizer, cfg.eval_windows, cfg.eval_window_tokens, "export")
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = [model(input_ids=torch.tensor([w])).logits[0].float().numpy() for w in windows]
    decoder = Decoder(model_file)
    prefill = compare(reference, [decoder.prefill(w)[0] for w in windows])
    figures = {"exporter": EXPORTER, "export_seconds": round(seconds, 2), "opset": opset,
               "onnx_bytes": sum(p.stat().st_size for p in out.glob("model.onnx*")), "prefill": prefill}
    worst = prefill["max_logit_diff"]
    if cfg.decode_check_tokens:
        w = windows[0]
        start = len(w) - cfg.decode_check_tokens
        stepped = decode_logits(decoder, w, start)
        decode = compare([reference[0][start:]], [stepped])
        figures["decode"] = decode
        worst = max(worst, decode["max_logit_diff"])
    figures.update(max_logit_diff=worst, max_logit_diff_allowed=cfg.max_logit_diff)
    ctx.figures.update(figures)
    print(f"  {EXPORTER}: fp32 ONNX, opset {opset}, {seconds:.1f} s; vs merged PyTorch: max |logit diff| "
          f"{worst:.2e} (allowed {cfg.max_logit_diff:g}; prefill {prefill['tokens']} tokens"
          + (f", KV-cache decode {cfg.decode_check_tokens} tokens)" if cfg.decode_check_tokens else ")"))
    if not np.isfinite(worst) or worst > cfg.max_logit_diff:
        raise EdgepeftError(f"[export] the ONNX graph differs from the merged PyTorch model by {worst:.3g} in logits, "
                            f"more than max_logit_diff = {cfg.max_logit_diff:g}")
