"""The pipeline's stages in order. Later issues append requantize, export, bundle."""

from __future__ import annotations

from edgepeft.pipeline import Stage
from edgepeft.stages import load, merge, quantize, train

STAGES = [
    Stage("load", ("model",), (), load.run, load.outside_inputs,
          "resolve the model source, write it as an fp32 Hugging Face folder", load.preflight),
    Stage("quantize", ("quantize",), ("load",), quantize.run, description="quantize the base to 4-bit (bitsandbytes)"),
    Stage("train", ("train", "adapter"), ("load", "quantize"), train.run, train.outside_inputs,
          "train the adapter on the frozen 4-bit base", train.preflight, distributed=True),
    Stage("merge", ("merge",), ("quantize", "train"), merge.run,
          description="merge the adapter into the dequantized base, check it against (4-bit base + adapter)"),
]
STAGE_NAMES = [s.name for s in STAGES]
