"""Targets beyond Android: the iOS and desktop bundles from recipes that extend the Android one, sharing its
finished stages; the mobile-readiness report; the bundle in onnxruntime-genai's generator API."""

import json
import os
import shutil

import numpy as np
import pytest

from edgepeft.bundle import readiness
from edgepeft.bundle.manifest import read_manifest
from edgepeft.bundle.runner import Runner, verify
from edgepeft.core.errors import EdgepeftError
from edgepeft.onnx.decoder import Decoder
from edgepeft.pipeline import recipe as recipe_mod
from edgepeft.pipeline.runner import run_stages
from edgepeft.stages.registry import STAGES


@pytest.fixture(scope="module")
def bundles(tiny_run):
    """The tiny Android run, then iOS and desktop runs beside it from recipes that only name their target."""
    root = tiny_run["out"].parent
    runs = {"android": {**tiny_run}}
    for name, target in (("ios", "ios-arm64"), ("cpu", "cpu-x86_64")):
        path = root / f"{name}.toml"
        path.write_text(f'extends = "{tiny_run["recipe"].name}"\nname = "{name}"\ntarget = "{target}"\n')
        recipe = recipe_mod.load(path)
        assert recipe.train.steps == recipe_mod.load(tiny_run["recipe"]).train.steps  # the tiny recipe's
        recs = run_stages(STAGES, recipe, root / name, echo=lambda s: None)
        runs[name] = {"out": root / name, "records": recs, "bundle": root / name / "bundle" / target}
    return runs


def _greedy(bundle, model_file, ids, n):
    dec = Decoder(bundle / model_file)
    logits, cache = dec.prefill(ids)
    tokens, total = [int(logits[-1].argmax())], len(ids)
    for _ in range(n - 1):
        total += 1
        logits, cache = dec.step(tokens[-1], cache, total)
        tokens.append(int(logits.argmax()))
    return tokens


@pytest.mark.parametrize("name", ["android", "ios", "cpu"])
def test_bundle_runs_unchanged_in_the_genai_generator_api(bundles, name):
    """Every target's bundle, as written, loads in onnxruntime-genai and its greedy answer is the one the raw
    graph computes; the bundle verifies."""
    import onnxruntime_genai as og

    b = bundles[name]["bundle"]
    problems, sample = verify(b)
    assert problems == [] and sample is not None
    manifest = read_manifest(b)
    model = og.Model(str(b))  # the folder as shipped: genai_config.json names the model file
    tok = og.Tokenizer(model)
    ids = Runner(b, manifest).prompt_ids([("user", "call mom")])
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 6, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    assert out == _greedy(b, manifest["model_file"], ids, len(out))
    assert len(out) == 6 or out[-1] in manifest["prompt"]["stop_token_ids"]
    assert tok.decode(out) is not None


def test_exports_differ_where_the_targets_differ(bundles):
    import onnx

    ios, cpu, android = bundles["ios"]["bundle"], bundles["cpu"]["bundle"], bundles["android"]["bundle"]
    # mobile: ORT format with the reduced-build config; desktop: plain ONNX for the full runtime
    assert (ios / "model.ort").is_file() and (ios / "model.required_operators.config").is_file()
    assert (cpu / "model.onnx").is_file() and not (cpu / "model.ort").exists()
    assert not (cpu / readiness.FOLDER).exists()
    genai = {n: json.loads((bundles[n]["bundle"] / "genai_config.json").read_text())["model"]["decoder"]
             for n in bundles}
    assert genai["cpu"]["filename"] == "model.onnx" and genai["ios"]["filename"] == "model.ort"
    assert genai["cpu"]["session_options"]["intra_op_num_threads"] == 4
    assert genai["ios"]["session_options"]["intra_op_num_threads"] == 2
    # desktop int4 keeps zero points, mobile int4 is symmetric
    zp = {n: sum(len(node.input) == 4 for node in onnx.load(str(bundles[n]["out"] / "requantize" / "model" /
                                                               "model.onnx")).graph.node
                 if node.op_type == "MatMulNBits") for n in ("cpu", "ios")}
    assert zp["ios"] == 0 and zp["cpu"] > 0
    m = {n: read_manifest(bundles[n]["bundle"]) for n in bundles}
    assert m["ios"]["target"]["providers"][0] == "coreml" and m["cpu"]["target"]["providers"] == ["cpu"]
    assert set(m["ios"]["readiness"]) >= {"coreml", "xnnpack"} and set(m["android"]["readiness"]) >= {"nnapi"}
    assert "readiness" not in m["cpu"]
    # the desktop profile ran on at most this machine's cores and says so when it had fewer than 4
    prof = m["cpu"]["profiles"]["profile"]
    assert prof is not None and (android / "profile").is_dir()


def test_heal_fits_the_desktop_graph_with_its_zero_points_on_x86_kernels(bundles):
    """The desktop bundle is healed too: on its zero-point weights (the mirror subtracts them as the kernel does:
    ONNX Runtime computes what the mirror computes) against MLAS's per-block int8 rounding; iOS, the same
    kernels as Android, takes Android's healed graph."""
    cpu, ios = bundles["cpu"]["records"]["heal"], bundles["ios"]["records"]["heal"]
    f = cpu["figures"]
    assert "reused_from" not in cpu and f["activation_rounding"] == "blockwise" and not f["bf16_scales"]
    assert f["mirror_vs_ort_max_logit_diff"] < 1e-3
    assert ios["reused_from"] == str(bundles["android"]["out"] / "heal")


def test_sibling_runs_share_the_stages_that_do_not_depend_on_the_target(bundles):
    android, ios, cpu = (bundles[n] for n in ("android", "ios", "cpu"))
    for stage in ("load", "quantize", "train", "merge", "export", "requantize"):
        rec = ios["records"][stage]
        assert rec["reused_from"] == str(android["out"] / stage), stage
        assert rec["fingerprint"] == android["records"][stage]["fingerprint"]
    a = android["out"] / "train" / "adapter" / "adapter_model.safetensors"
    assert os.path.samefile(a, ios["out"] / "train" / "adapter" / "adapter_model.safetensors")
    assert "reused_from" in cpu["records"]["export"]  # same opset: the fp32 graph is shared
    assert "reused_from" not in cpu["records"]["requantize"]  # zero points: quantized again
    for n in ("ios", "cpu"):
        assert "reused_from" not in bundles[n]["records"]["bundle"]


def test_readiness_report_reads_the_shipped_graph(bundles):
    """The report's operator table, read from the .ort flatbuffer, is the operator set ONNX Runtime's own tool
    wrote into the required-operators config; every node is either taken by a provider or falls back."""
    b = bundles["ios"]["bundle"]
    r = json.loads((b / readiness.FOLDER / "readiness.json").read_text())
    assert r["load"]["loads"] and r["load"]["same_argmax_as_onnx"] and r["load"]["max_abs_logit_diff_vs_onnx"] < 1e-3
    config = set()
    for line in (b / "model.required_operators.config").read_text().splitlines():
        if line and not line.startswith("#"):
            domain, _, ops = line.split(";")
            config |= {f"{domain}:{op}" for op in ops.split(",")}
    assert set(r["operators"]) == config
    for provider in ("coreml", "xnnpack"):
        for key in ("as_is", "if_shapes_fixed"):
            p = r["providers"][provider][key]
            assert p["taken"] + sum(p["cpu_fallback_ops"].values()) == p["nodes"] == r["nodes"]
            assert sum(p["taken_ops"].values()) == p["taken"]
        assert "com.microsoft:MatMulNBits" in r["providers"][provider]["as_is"]["cpu_fallback_ops"]
    assert r["providers"]["xnnpack"]["as_is"]["taken"] == 0  # no fp32 MatMul with constant weights is left
    text = (b / readiness.FOLDER / "report.md").read_text()
    assert "CoreML (ML Program)" in text and "XNNPACK" in text and "CPU execution provider" in text


def test_xnnpack_takes_a_constant_weight_matmul_and_not_an_activation_product():
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 8], np.ones(64, np.float32))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="const"),
             helper.make_node("MatMul", ["h", "x2"], ["y"], name="act")]
    g = helper.make_graph(nodes, "g", [x, helper.make_tensor_value_info("x2", TensorProto.FLOAT, [8, 8])], [y], [w],
                          value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 8])])
    row = readiness.partitioning(onnx.shape_inference.infer_shapes(helper.make_model(g)).graph, "xnnpack")
    assert row["as_is"]["taken"] == 1 and row["as_is"]["taken_ops"] == {"ai.onnx:MatMul": 1}


def test_an_ort_file_that_does_not_load_fails_the_check_and_the_bundle(bundles, tmp_path, monkeypatch):
    from edgepeft.stages import bundle as bundle_stage

    b = bundles["ios"]["bundle"]
    broken = tmp_path / "model.ort"
    # a well-formed flatbuffer naming an operator no kernel implements: converters have produced such files
    data = (b / "model.ort").read_bytes()
    assert b"MatMulNBits" in data
    broken.write_bytes(data.replace(b"MatMulNBits", b"MatMulNBitz"))
    with pytest.raises(EdgepeftError, match="does not load"):
        readiness.load_check(broken, b / "genai_config.json")
    with pytest.raises(EdgepeftError, match="does not load"):
        readiness.load_check(_truncated(b / "model.ort", tmp_path), b / "genai_config.json")
    # a conversion that would compute something else is refused too
    other = bundles["android"]["out"] / "export" / "model" / "model.onnx"  # the fp32 graph, not the int4 one
    with pytest.raises(EdgepeftError, match="other logits"):
        readiness.load_check(b / "model.ort", b / "genai_config.json", other)

    # the bundle stage refuses to ship it, and leaves no half bundle
    real = bundle_stage.to_ort

    def to_ort_then_break(onnx_file, ort_file, **kw):
        real(onnx_file, ort_file, **kw)
        ort_file.write_bytes(ort_file.read_bytes().replace(b"MatMulNBits", b"MatMulNBitz"))

    monkeypatch.setattr(bundle_stage, "to_ort", to_ort_then_break)
    out = tmp_path / "run"
    shutil.copytree(bundles["ios"]["out"], out, symlinks=False)
    shutil.rmtree(out / "bundle")
    with pytest.raises(EdgepeftError, match="does not load"):
        run_stages(STAGES, recipe_mod.load(bundles["ios"]["out"].parent / "ios.toml"), out, first="bundle",
                   last="bundle", echo=lambda s: None)
    assert not (out / "bundle").exists() and not (out / ".bundle.tmp").exists()


def _truncated(path, tmp_path):
    cut = tmp_path / "cut.ort"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return cut


def test_a_target_extends_another_and_changes_some_keys(tmp_path):
    from dataclasses import asdict

    from edgepeft.pipeline import target as target_mod

    base, large = target_mod.load("android-arm64"), target_mod.load("android-arm64-large")
    assert (large.name, large.head, large.context, large.max_bundle_mb) == ("android-arm64-large", "int8", 4096, 270)
    changed = {k for k, v in asdict(large).items() if asdict(base)[k] != v}
    assert changed == {"name", "head", "context", "max_bundle_mb"}
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "a.toml").write_text('extends = "b"\nthreads = 1\n')
    (tmp_path / "targets" / "b.toml").write_text('extends = "a"\n')
    with pytest.raises(EdgepeftError, match="extends 'a', which extends it back"):
        target_mod.load(str(tmp_path / "targets" / "a.toml"))


def test_a_targets_context_sizes_the_graphs_rotary_tables_and_the_kv_cache(tmp_path, tiny_model_dir):
    """The builder sizes both from max_position_embeddings (Gemma 3: 32k, 67 MB of cos/sin tables): a target's
    context below the model's caps them; one above it changes nothing; the model folder is left as it was."""
    import onnx

    from edgepeft.onnx.builder import MODEL, build_onnx

    config = (tiny_model_dir / "config.json").read_text()
    lengths = {}
    for context in (None, 128, 4096):
        out = tmp_path / str(context)
        build_onnx(tiny_model_dir, out, "fp32", cache_dir=tmp_path / f"cache-{context}", context=context)
        model = onnx.load(str(out / MODEL), load_external_data=False)
        rows = {i.dims[0] for i in model.graph.initializer if "cos_cache" in i.name}
        genai = json.loads((out / "genai_config.json").read_text())
        lengths[context] = (rows, genai["model"]["context_length"], genai["search"]["max_length"])
    assert lengths[None] == lengths[4096] == ({512}, 512, 512)
    assert lengths[128] == ({128}, 128, 128)
    assert (tiny_model_dir / "config.json").read_text() == config
