"""ONNX Runtime's own format (``.ort``), what mobile apps load, and the required-operators config that a
reduced-operator ONNX Runtime build is made from.

The conversion runs every graph optimization except constant folding: folding would materialize a reshaped
copy of the output head's weights for the shared embedding and undo the sharing. Whether the result loads
and computes what the ONNX graph computes is ``edgepeft.bundle.readiness.load_check``'s to say.
"""

from __future__ import annotations

from pathlib import Path

from edgepeft.onnx.decoder import options

ORT_CONFIG = "model.required_operators.config"


def to_ort(onnx_file: Path, ort_file: Path, constant_folding: bool = False) -> None:
    """Convert to ORT format (optimized; no constant folding unless asked, see the module doc) and write the
    required-operators config. Whether the result loads is ``edgepeft.bundle.readiness.load_check``'s to say."""
    import logging

    import onnxruntime as ort
    from onnxruntime.tools.ort_format_model import create_config_from_models

    ort.InferenceSession(str(onnx_file), options(save_ort=ort_file), providers=["CPUExecutionProvider"],
                         disabled_optimizers=[] if constant_folding else ["ConstantFolding"])
    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
    create_config_from_models([ort_file], ort_file.with_name(ORT_CONFIG), enable_type_reduction=False)
