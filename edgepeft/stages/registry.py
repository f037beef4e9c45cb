"""The pipeline's stages in order: base model -> 4-bit -> adapter -> merged -> ONNX -> int4 -> bundle -> gate."""

from __future__ import annotations

from edgepeft.pipeline import Stage
from edgepeft.stages import bundle, evaluate, export, load, merge, quantize, requantize, train

STAGES = [
    Stage("load", ("model",), (), load.run, load.outside_inputs,
          "resolve the model source, write it as an fp32 Hugging Face folder", load.preflight, shared=True),
    Stage("quantize", ("quantize",), ("load",), quantize.run, description="quantize the base to 4-bit (bitsandbytes)",
          shared=True),
    Stage("train", ("train", "adapter"), ("load", "quantize"), train.run, train.outside_inputs,
          "train the adapter on the frozen 4-bit base", train.preflight, distributed=True, shared=True),
    Stage("merge", ("merge",), ("quantize", "train"), merge.run,
          description="merge the adapter into the dequantized base, check it against (4-bit base + adapter)",
          shared=True),
    Stage("export", ("export", "target_opset"), ("merge",), export.run,
          description="export the merged model to fp32 ONNX with a KV cache, check it against PyTorch", shared=True),
    Stage("requantize", ("requantize", "precision", "evaluate"), ("export", "train"), requantize.run,
          description="quantize the ONNX weights for the target on calibration data (GPTQ; int8 where needed)",
          shared=True),
    Stage("bundle", ("bundle", "target", "profile"), ("requantize", "export", "load", "quantize", "train"), bundle.run,
          description="write the deployable bundle, profile its latency, seal its manifest"),
    Stage("evaluate", ("evaluate", "requantize"), ("bundle", "quantize", "train"), evaluate.run,
          description="quality gate: the bundle vs (4-bit base + adapter) on held-out data, against the budgets"),
]
STAGE_NAMES = [s.name for s in STAGES]
