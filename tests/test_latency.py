"""Latency profiling and the CI latency gate, on the tiny model's bundle (from the shared pipeline run).

The figures themselves are machine-dependent; these tests check what must hold on any machine: the report
is sealed into the bundle, the arithmetic of the floor, the statistics of the gate, and that the gate
passes an unchanged bundle (with a busy neighbour) and fails one exported without weight quantization.
"""

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgepeft.bundle.manifest import read_manifest
from edgepeft.bundle.runner import verify
from edgepeft.cli import main as cli
from edgepeft.latency import costmodel
from edgepeft.latency.check import MIN_LAYERS, layer_bytes, median_ci, reference_for, verdict

PNG = b"\x89PNG\r\n\x1a\n"


def _copy(bundle, dst):
    shutil.copytree(bundle, dst)
    return dst


def test_bundle_carries_its_profile_report(tiny_run):
    b = tiny_run["bundle"]
    m = read_manifest(b)
    ref = m["profiles"]["profile"]
    assert ref["report"] == "profile/report.md" and ref["data"] == "profile/profile.json"
    for rel in [ref["report"], ref["data"], *ref["plots"]]:
        assert rel in m["files"]  # hashed and sealed like the model
    assert all((b / p).read_bytes().startswith(PNG) for p in ref["plots"])
    assert verify(b)[0] == []

    prof = json.loads((b / "profile" / "profile.json").read_text())
    assert prof["settings"]["lengths"] == [16, 64]
    bundle, fp32 = prof["variants"]
    assert bundle["label"].startswith("bundle (int4") and fp32["label"].startswith("fp32 export")
    # android-arm64 prefers XNNPACK, which the desktop onnxruntime wheel lacks: fallback, with a warning
    assert any("'xnnpack' is not in this onnxruntime build" in w for w in prof["warnings"])
    assert bundle["providers"] == ["CPUExecutionProvider"]
    assert bundle["weight_bytes_read_per_token"] < fp32["weight_bytes_read_per_token"] / 3
    bw = prof["machine"]["read_bandwidth_gbs"]
    for v in (bundle, fp32):
        assert v["peak_rss_mb"] > v["model_rss_mb"] > 0 and v["load_seconds"] > 0
        assert v["folder_bytes"] > v["model_bytes"] > 0
        for d in v["decode"]:
            assert d["p90_ms"] >= d["median_ms"] > 0
            assert d["floor_ms"] == pytest.approx(costmodel.floor_ms(d["bytes_read_per_token"], bw), rel=1e-3)
            assert d["measured_over_floor"] == pytest.approx(d["median_ms"] / d["floor_ms"])
            e = d["device_estimate"]
            assert e["estimate_ms"] == pytest.approx(e["floor_ms"] * d["measured_over_floor"])
        # a longer context means a larger KV cache to read: the floor grows with it
        assert v["decode"][1]["floor_ms"] > v["decode"][0]["floor_ms"]
    report = (b / "profile" / "report.md").read_text()
    assert "![decode latency](decode.png)" in report and "xnnpack" in report
    assert "Snapdragon 8 Gen 2" in report  # the device estimate names its device and source
    figures = m["figures"]["bundle"]
    assert figures["decode_ms_per_token"] == bundle["decode"][0]["median_ms"]


def test_profile_cli_rewrites_the_report_and_reseals(tiny_run, tmp_path, capsys):
    b = _copy(tiny_run["bundle"], tmp_path / "b")
    out = tmp_path / "p.json"
    assert cli(["profile", str(b), "--lengths", "8", "--repeats", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["lengths"] == [8]
    assert json.loads((b / "profile" / "profile.json").read_text())["settings"]["lengths"] == [8]
    assert verify(b)[0] == []  # the manifest was re-sealed over the new report
    assert "report:" in capsys.readouterr().out

    # another target's settings: its own report folder, the bundle's own report kept
    (tmp_path / "laptop.toml").write_text('name = "laptop"\nthreads = 1\nproviders = ["cpu"]\n')
    assert cli(["profile", str(b), "--target", str(tmp_path / "laptop.toml"), "--lengths", "8", "--repeats", "1"]) == 0
    m = read_manifest(b)
    assert set(m["profiles"]) == {"profile", "profile-laptop"}
    laptop = json.loads((b / "profile-laptop" / "profile.json").read_text())
    assert laptop["machine"]["threads"] == 1 and laptop["warnings"] == []
    assert verify(b)[0] == []

    # never re-seal a bundle that does not match its manifest
    with (b / "tokenizer_config.json").open("a") as f:
        f.write(" ")
    before = (b / "manifest.json").read_bytes()
    assert cli(["profile", str(b), "--lengths", "8", "--repeats", "1"]) == 2
    assert "does not match its manifest" in capsys.readouterr().err
    assert (b / "manifest.json").read_bytes() == before
    assert cli(["profile", str(tmp_path / "nothing")]) == 2
    assert cli(["profile", str(tiny_run["bundle"]), "--target", "no-such-phone", "--no-report"]) == 2


def test_weight_bytes_count_matrices_not_gather_tables(tmp_path, tiny_run):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.zeros((1000, 16), np.float32), "table")
    head = numpy_helper.from_array(np.zeros((16, 1000), np.float32), "head")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["x"]), helper.make_node("MatMul", ["x", "head"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1000])], [table, head])
    onnx.save(helper.make_model(graph), tmp_path / "untied.onnx", save_as_external_data=True)
    got = costmodel.weight_bytes(tmp_path / "untied.onnx")
    assert got == {"total": 2 * 64000, "read_per_token": 64000}  # one table row per token: not counted

    # the ORT-format bundle and the ONNX it was converted from stream the same weights
    ort_file = costmodel.weight_bytes(tiny_run["bundle"] / "model.ort")
    onnx_file = costmodel.weight_bytes(tiny_run["out"] / "requantize" / "model" / "model.onnx")
    assert ort_file["read_per_token"] == pytest.approx(onnx_file["read_per_token"], rel=1e-3)
    # tied head: the shared int4 table is read by the head's MatMulNBits, so it counts once
    assert onnx_file["read_per_token"] == pytest.approx(onnx_file["total"], rel=1e-3)

    genai = tiny_run["bundle"] / "genai_config.json"
    assert costmodel.kv_bytes_per_position(genai) == 2 * 2 * 2 * 16 * 4  # k+v, layers, kv heads, head size, fp32
    assert costmodel.floor_ms(1e9, 10.0) == pytest.approx(100.0)
    assert 0.5 < costmodel.read_bandwidth_gbs(1, megabytes=64, passes=2) < 5000


def test_median_confidence_interval_covers_as_promised():
    xs = list(range(1, 21))
    assert median_ci(xs, 0.95) == (6, 15)  # the textbook order statistics for n = 20
    rng = np.random.default_rng(1)
    true_median = math.exp(0.0)  # lognormal(0, 0.5): skewed, median 1
    hits = 0
    for _ in range(2000):
        lo, hi = median_ci(list(rng.lognormal(0.0, 0.5, 20)), 0.95)
        hits += lo <= true_median <= hi
    assert 0.95 <= hits / 2000 <= 0.985


def test_gate_verdicts():
    base = {"ratio": 1.0, "ci": [0.98, 1.02]}
    assert verdict({"ratio": 1.3, "ci": [1.25, 1.35]}, base, 0.10)[0] == "fail"
    assert verdict({"ratio": 1.09, "ci": [1.05, 1.13]}, base, 0.10)[0] == "ok"  # not surely past +10%
    assert verdict({"ratio": 1.03, "ci": [1.0, 1.06]}, base, 0.10)[0] == "ok"
    assert verdict({"ratio": 0.7, "ci": [0.68, 0.72]}, base, 0.10)[0] == "faster"


@pytest.fixture(scope="module")
def small_exports(tmp_path_factory, smollm_tokenizer_dir):
    """A random-init Llama big enough that its weights, not Python, set the decode time (4 layers of width
    256, ~16M parameters): the builder's fp32 export, and the same graph requantized to int4."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgepeft.onnx.builder import build_onnx
    from edgepeft.onnx.mixed import quantize
    from edgepeft.pipeline.target import Target

    root = tmp_path_factory.mktemp("small")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(root / "hf", safe_serialization=True)
    for f in smollm_tokenizer_dir.iterdir():
        shutil.copy(f, root / "hf" / f.name)
    build_onnx(root / "hf", root / "fp32", "fp32")
    (root / "int4").mkdir()
    shutil.copy(root / "fp32" / "genai_config.json", root / "int4" / "genai_config.json")
    quantize(root / "fp32" / "model.onnx", root / "int4" / "model.onnx", Target("t"))
    return root


def test_gate_passes_unchanged_model_with_a_busy_core_and_fails_without_weight_quantization(
        small_exports, tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    int4 = small_exports / "int4"
    assert cli(["latency-check", str(int4), "--baseline", str(baseline), "--update-baseline", "--rounds", "10"]) == 0
    data = json.loads(baseline.read_text())
    assert len(data["metrics"]["decode"]["samples"]) == 10 and data["settings"]["threads"] == 1
    read = costmodel.weight_bytes(int4 / "model.onnx")["read_per_token"]  # the reference streams as much
    layers = data["reference"]["layers"]
    one = layer_bytes()
    assert layers == MIN_LAYERS if read < MIN_LAYERS * one else abs(layers * one - read) <= one

    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # a neighbour keeps one core busy
    try:
        assert cli(["latency-check", str(int4), "--baseline", str(baseline), "--rounds", "10"]) == 0, \
            capsys.readouterr().out
    finally:
        hog.kill()
        hog.wait()
    assert "latency-check: passed" in capsys.readouterr().out

    # the same model exported without weight quantization (fp32 MatMuls): a real regression
    assert cli(["latency-check", str(small_exports / "fp32"), "--baseline", str(baseline), "--rounds", "10"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: slower" in out and "latency-check: FAILED: decode at least" in out


def test_gate_runs_on_a_bundle(tiny_run, tmp_path, capsys):
    baseline = tmp_path / "b.json"
    assert cli(["latency-check", str(tiny_run["bundle"]), "--baseline", str(baseline), "--update-baseline",
                "--rounds", "6"]) == 0
    data = json.loads(baseline.read_text())
    assert data["bundle"] == "tiny-android-arm64" and data["reference"]["layers"] == MIN_LAYERS
    # the check measures against the reference the baseline recorded, not one sized anew: ten times longer
    # here, so the same bundle's ratio falls far below the baseline's
    data["reference"]["layers"] = 10 * MIN_LAYERS
    baseline.write_text(json.dumps(data))
    capsys.readouterr()
    assert cli(["latency-check", str(tiny_run["bundle"]), "--baseline", str(baseline), "--rounds", "6"]) == 0
    out = capsys.readouterr().out
    assert "faster (consider --update-baseline)" in out and "FAIL" not in out


def test_reference_streams_the_bundles_bytes():
    for mb in (20, 94, 250, 1000):
        r = reference_for(int(mb * 1e6))
        assert abs(r["layers"] * layer_bytes(r) - mb * 1e6) <= layer_bytes(r) / 2
    assert reference_for(1000)["layers"] == MIN_LAYERS


def test_gate_user_errors_are_one_line(tiny_run, tmp_path, capsys):
    b = str(tiny_run["bundle"])
    assert cli(["latency-check", b, "--baseline", str(tmp_path / "none.json")]) == 2
    assert "no baseline there; record one with --update-baseline" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{")
    assert cli(["latency-check", b, "--baseline", str(tmp_path / "bad.json")]) == 2
    (tmp_path / "other.json").write_text(json.dumps(
        {"format": "edgepeft-latency-baseline/1", "reference": {"name": "other"}, "settings": {},
         "machine": {}, "metrics": {"decode": {}, "prefill": {}}}))
    assert cli(["latency-check", b, "--baseline", str(tmp_path / "other.json")]) == 2
    assert "record a new baseline" in capsys.readouterr().err
