"""onnxruntime-genai's model builder, the exporter: a Hugging Face folder to an ONNX decoder with a KV
cache and the ``genai_config.json`` onnxruntime-genai runs it from. It writes attention as one
``GroupQueryAttention`` op with the rotary embedding and the cache update inside, packs q/k/v into one MatMul
and fuses the residual adds into the norms; why it was chosen over the other exporters is in
docs/measurements.md. Run in a subprocess: it prints a lot and holds its memory until it exits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from edgepeft.core.errors import EdgepeftError

EXPORTER = "onnxruntime-genai model builder"
MODEL = "model.onnx"  # the graph of a model folder; genai_config.json and the tokenizer files lie beside it


def copy_beside_graph(src, out) -> None:
    """Every file of model folder ``src`` but the graph (genai_config.json, tokenizer files) into ``out``."""
    import shutil

    for f in src.iterdir():
        if not f.name.startswith(MODEL):
            shutil.copy2(f, out / f.name)


def save_graph(model, out) -> None:
    """``model`` as ``out/model.onnx``; its weights beside it (``model.onnx.data``) past protobuf's 2 GB limit."""
    import onnx

    large = model.ByteSize() > 1_800_000_000
    onnx.save(model, str(out / MODEL), save_as_external_data=large, location=f"{MODEL}.data")


def build_onnx(model_dir, out_dir, precision: str = "fp32", cache_dir=None, extra: dict | None = None,
               context: int | None = None) -> float:
    """Run the model builder on a Hugging Face folder; returns its seconds. Fails with the builder's last
    line if it fails. ``context``: the most tokens the graph's rotary tables and the runtime's KV cache are
    sized for, when below the model's own maximum (the builder reads it from ``max_position_embeddings``)."""
    cache_dir = cache_dir or (out_dir.parent / ".builder-cache")
    if context:
        model_dir = _with_context(model_dir, cache_dir / "source", context)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out_dir),
           "-p", precision, "-e", "cpu", "-c", str(cache_dir)]
    if extra:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra.items())]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or done.stdout).strip().splitlines() if ln.strip()]
        raise EdgepeftError(f"[export] the ONNX model builder failed: {lines[-1] if lines else 'no output'}")
    return time.time() - t0


def _with_context(model_dir, staging, context: int):
    """``model_dir`` as the builder should see it for a ``context``-token target: the same files (linked) with
    ``max_position_embeddings`` capped in config.json; ``model_dir`` itself when the model's own is smaller."""
    import json
    import shutil
    from pathlib import Path

    config = json.loads((Path(model_dir) / "config.json").read_text())
    if config.get("max_position_embeddings", context + 1) <= context:
        return model_dir
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for f in Path(model_dir).iterdir():
        if f.name != "config.json":
            (staging / f.name).symlink_to(f.resolve())
    (staging / "config.json").write_text(json.dumps({**config, "max_position_embeddings": context}, indent=2))
    return staging


def opset_of(model_file) -> int:
    import onnx

    model = onnx.load(str(model_file), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


