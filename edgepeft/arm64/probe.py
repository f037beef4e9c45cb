"""Standalone logits probe, run unchanged on x86 and inside the emulated arm64 root: needs only numpy,
onnxruntime and the standard library (no edgepeft import), so it can be copied anywhere.

    python probe.py IN.json OUT.npz

IN.json (relative paths are relative to IN.json's folder)::

    {"model": "model.ort", "genai_config": "genai_config.json", "prompt": [ids...], "decode_steps": 8,
     "forced": [ids...] | null, "threads": 1, "session_config": {}}

or, for the quality check, ``"windows": [[ids...], ...]`` instead of the prompt: each window prefilled on an
empty cache, its logits saved as ``window0``, ``window1``...

It runs a prefill of ``prompt`` then ``decode_steps`` one-token steps on the KV cache, the way
``edgepeft.onnx.decoder.Decoder`` (and onnxruntime-genai) feed the graph. Step i feeds ``forced[i]`` when given,
else the greedy choice, so a second run can be handed the first run's tokens and see exactly its inputs.

OUT.npz holds ``prefill`` [prompt, vocab] (logits of every prompt position), ``decode`` [steps, vocab]
(logits after each fed token), ``fed`` (the tokens fed), ``greedy`` (argmax after the prompt and after each
step) and ``meta``: a JSON string with the onnxruntime and numpy versions, platform.machine(), the session's
providers and wall times (emulated times mean nothing for speed).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def run(spec: dict, base: Path) -> dict:
    t0 = time.perf_counter()
    if hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()
    cfg = json.loads((base / spec.get("genai_config", "genai_config.json")).read_text())["model"]
    kv_heads, head_size = cfg["decoder"]["num_key_value_heads"], cfg["decoder"]["head_size"]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads, so.inter_op_num_threads = int(spec.get("threads", 1)), 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    for key, value in spec.get("session_config", {}).items():  # e.g. {"mlas.disable_kleidiai": "1"}
        so.add_session_config_entry(key, str(value))
    sess = ort.InferenceSession(str(base / spec["model"]), so, providers=["CPUExecutionProvider"])
    past = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    outputs = [o.name for o in sess.get_outputs()]
    # a bundle whose head computes the last position only unless told (edgepeft.onnx.rewrite.prune_lm_head):
    # fed every position, as the quality gate feeds them
    pruned = any(i.name == "logits_positions" for i in sess.get_overridable_initializers())
    t1 = time.perf_counter()

    cache = {n: np.zeros((1, kv_heads, 0, head_size), np.float32) for n in past}

    def forward(ids: list[int], total: int) -> np.ndarray:
        feeds = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, total), np.int64), **cache}
        if pruned:
            feeds["logits_positions"] = np.arange(len(ids), dtype=np.int64)
        out = dict(zip(outputs, sess.run(None, feeds), strict=True))
        cache.update({n: out[n.replace("past_key_values.", "present.")] for n in past})
        return out["logits"][0].astype(np.float32)

    if "windows" in spec:  # held-out windows for the quality check: a fresh prefill each, every position's logits
        out = {}
        for i, w in enumerate(spec["windows"]):
            cache.update({n: np.zeros((1, kv_heads, 0, head_size), np.float32) for n in past})
            out[f"window{i}"] = forward([int(t) for t in w], len(w))
        meta = {"onnxruntime": ort.__version__, "machine": platform.machine(), "providers": sess.get_providers(),
                "wall_s": {"load": t1 - t0, "windows": time.perf_counter() - t1}}
        return {**out, "meta": json.dumps(meta)}

    prompt, forced = [int(t) for t in spec["prompt"]], spec.get("forced")
    prefill = forward(prompt, len(prompt))
    t2 = time.perf_counter()
    greedy, fed, rows = [int(prefill[-1].argmax())], [], []
    for i in range(int(spec["decode_steps"])):
        token = int(forced[i]) if forced else greedy[-1]
        fed.append(token)
        rows.append(forward([token], len(prompt) + i + 1)[-1])
        greedy.append(int(rows[-1].argmax()))
    t3 = time.perf_counter()
    meta = {"onnxruntime": ort.__version__, "numpy": np.__version__, "machine": platform.machine(),
            "python": platform.python_version(), "providers": sess.get_providers(),
            "threads": so.intra_op_num_threads, "session_config": spec.get("session_config", {}),
            "wall_s": {"load": t1 - t0, "prefill": t2 - t1, "decode": t3 - t2,
                       "note": "wall times; meaningless for speed under emulation"}}
    return {"prefill": prefill, "decode": np.stack(rows) if rows else np.zeros((0, prefill.shape[-1]), np.float32),
            "fed": np.asarray(fed, np.int64), "greedy": np.asarray(greedy, np.int64), "meta": json.dumps(meta)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python probe.py IN.json OUT.npz", file=sys.stderr)
        return 2
    spec_path = Path(argv[0])
    result = run(json.loads(spec_path.read_text()), spec_path.resolve().parent)
    tmp = Path(argv[1]).with_suffix(".tmp.npz")
    np.savez(tmp, **result)
    tmp.replace(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
