"""The pipeline's stages in order: base model -> 4-bit -> adapter -> merged -> ONNX -> int4 -> healed int4 ->
bundle -> gate.

Each stage module declares itself (``STAGE``, beside its ``run``); this list only orders them. The registry
and the CLI are the only modules that import a stage.
"""

from __future__ import annotations

from edgepeft.stages import bundle, evaluate, export, heal, load, merge, quantize, requantize, train

STAGES = [m.STAGE for m in (load, quantize, train, merge, export, requantize, heal, bundle, evaluate)]
STAGE_NAMES = [s.name for s in STAGES]
