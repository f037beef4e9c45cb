"""edgepeft's own adapters, bottleneck (``method = "adapter"``) and gated LoRA (``gated = true``): causal gates,
the graph computing what PyTorch computes, and the whole pipeline on the tiny model."""

import json

import numpy as np
import pytest
import torch

from edgepeft.adapters import api as adapters
from edgepeft.pipeline import recipe as recipe_mod
from edgepeft.pipeline.runner import run_stages
from edgepeft.stages.registry import STAGES
from tests.conftest import greedy_decode, write_recipe

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPECS = {
    "serial-attn-mlp": {"bottleneck": {"size": 32, "mode": "serial", "placement": ["attn", "mlp"], "gated": False,
                                       "scale": 1.0}},
    "parallel-gated-scaled": {"bottleneck": {"size": 32, "mode": "parallel", "placement": ["mlp"], "gated": True,
                                             "scale": 2.0}},
    "gated-lora-qv": {"lora": {"r": 8, "alpha": 16, "dropout": 0.0, "gated": True, "targets": ["q_proj", "v_proj"]}},
    "gated-lora-all-and-serial-attn": {
        "bottleneck": {"size": 32, "mode": "serial", "placement": ["attn"], "gated": True, "scale": 1.0},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "gated": True, "targets": ALL}},
    "prefix": {"prefix": {"tokens": 5, "hidden": 0}},
    "prefix-and-parallel-adapter": {
        "prefix": {"tokens": 3, "hidden": 0},
        "bottleneck": {"size": 32, "mode": "parallel", "placement": ["attn", "mlp"], "gated": False, "scale": 1.0}},
    "prompt": {"prompt": {"tokens": 5}},
    "gated-prefix": {"prefix": {"tokens": 4, "hidden": 0, "gated": True}},
    "unipelt": {"bottleneck": {"size": 32, "mode": "serial", "placement": ["mlp"], "gated": True, "scale": 1.0},
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "gated": True, "targets": ["q_proj", "v_proj"]},
                "prefix": {"tokens": 3, "hidden": 0, "gated": True}},
    "prompt-and-gated-lora": {"prompt": {"tokens": 3},
                              "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "gated": True, "targets": ["q_proj"]}},
}
# the tiny model: width 64, MLP 128, q 64, k and v 32 each
SHAPES = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64), "gate_proj": (64, 128),
          "up_proj": (64, 128), "down_proj": (128, 64)}


def _expected(spec: dict) -> dict:
    """For the 2-layer tiny model: trainable parameters, nodes export adds, MatMuls the int4 graph gains."""
    out = {k: 2 * v for k, v in _per_layer(spec).items()}
    px = spec.get("prefix")
    if px:
        kv = 2 * 2 * 2 * 16  # layers x (k, v) x kv heads x head dim, per prefix position
        out["trainable"] += px["tokens"] * kv if not px["hidden"] else (
            px["tokens"] * 64 + 64 * px["hidden"] + px["hidden"] + px["hidden"] * kv + kv)
        if px.get("gated"):  # a gate per layer; q slice and heads, scores, softmax, values, back, gate, add
            out["trainable"] += 2 * 65
            out["nodes"] += 2 * 11
            out["matmuls"] += 2
        else:
            out["nodes"] += 9 + 5 * 2  # the first-forward test and shifted lengths, then rows in/out per layer
    if spec.get("prompt"):
        out["trainable"] += spec["prompt"]["tokens"] * 64
        out["nodes"] += 9 + 4 + 1  # the same, then rows ahead of the embeddings and dropped before the head
    return out


def _per_layer(spec: dict) -> dict:
    b, lo = spec.get("bottleneck"), spec.get("lora")
    out = {"trainable": 0, "nodes": 0, "matmuls": 0}
    if b:
        n = len(b["placement"])
        out["trainable"] += n * (2 * 64 * b["size"] + (64 + 1 if b["gated"] else 0))
        out["nodes"] += n * (8 if b["gated"] else 4)
        out["matmuls"] += n * (3 if b["gated"] else 2)
    if lo:
        for t in lo["targets"]:
            fan_in, fan_out = SHAPES[t]
            out["trainable"] += lo["r"] * (fan_in + fan_out) + fan_in + 1
        out["nodes"] += 7 * len(lo["targets"])  # A, B, gate MatMul + Add + Sigmoid, Mul, Add
        out["matmuls"] += 3 * len(lo["targets"])
    return out


def _plain(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _with_random_adapters(model, spec: dict):
    """``model`` with an adapter set of ``spec`` whose weights (the zero-initialized up-projection and the gate
    included) are random and large enough to change the output."""
    c = model.config
    full = {"method": "lora" if "lora" in spec else "adapter", "hidden_size": c.hidden_size,
            "layers": c.num_hidden_layers, **spec}
    adapters.attach_spec(model, full)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in getattr(model, adapters.ATTR).parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("name", SPECS)
def test_adapter_outputs_are_causal(tiny_model_dir, name):
    """Changing a later token changes nothing before it: the gates (and the adapters) are per token."""
    model = _with_random_adapters(_plain(tiny_model_dir), SPECS[name])
    ids = list(range(200, 232))
    other = ids[:20] + [ids[20] + 1000] + ids[21:]
    a, b = _logits(model, ids), _logits(model, other)
    torch.testing.assert_close(a[:20], b[:20], rtol=0, atol=1e-5)
    assert (a[20:] - b[20:]).abs().max() > 1e-3
    with adapters.disabled(model):
        base = _logits(model, ids)
    assert (a - base).abs().max() > 0.05  # the adapters really act


@pytest.mark.parametrize("name", SPECS)
def test_exported_graph_computes_the_unmerged_adapters(tiny_model_dir, tmp_path, name):
    """The fp32 graph with the adapters inserted equals PyTorch (merged base + adapters, prefill and KV-cache
    decode); the graph without them does not, so the check can fail."""
    from transformers import AutoTokenizer

    from edgepeft.onnx.builder import build_onnx
    from edgepeft.onnx.decoder import Decoder, decode_logits
    from edgepeft.stages.export import _rewrite

    trained = _with_random_adapters(_plain(tiny_model_dir), SPECS[name])
    adapters.save(trained, tmp_path / "adapter")
    merged_dir = tmp_path / "merged"
    adapters.merge_into(_plain(tiny_model_dir), tmp_path / "adapter", merged_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(merged_dir)  # as the merge stage does
    assert {k: v for k, v in adapters.unmerged_spec(merged_dir).items() if k in SPECS[name]} == SPECS[name]
    model = adapters.load_merged(merged_dir)
    ids = list(range(300, 340))
    reference = _logits(model, ids).numpy()
    torch.testing.assert_close(torch.from_numpy(reference), _logits(trained, ids), rtol=0, atol=1e-5)

    out = tmp_path / "onnx"
    build_onnx(merged_dir, out, "fp32", cache_dir=tmp_path / "cache")
    without = Decoder(out / "model.onnx").prefill(ids)[0]
    added = _rewrite(merged_dir, out)
    assert added == _expected(SPECS[name])["nodes"]
    decoder = Decoder(out / "model.onnx")
    assert np.abs(decoder.prefill(ids)[0] - reference).max() < 1e-4
    assert np.abs(decode_logits(decoder, ids, 30) - reference[30:]).max() < 1e-4
    assert np.abs(without - reference).max() > 0.05


@pytest.fixture(scope="module", params=["adapter", "adapter-parallel-gated", "lora-gated", "prefix", "prompt",
                                        "unipelt"])
def adapter_run(request, tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp(request.param)
    recipe = write_recipe(root / "tiny.toml", tiny_model_dir, method=request.param)
    out = root / "run"
    records = run_stages(STAGES, recipe_mod.load(recipe), out, echo=lambda s: None)
    return {"method": request.param, "out": out, "records": records, "bundle": out / "bundle" / "android-arm64"}


def test_adapter_pipeline_builds_a_verified_bundle(adapter_run):
    from edgepeft.bundle.runner import verify
    from edgepeft.quality.reference import Reference

    recs, out = adapter_run["records"], adapter_run["out"]
    spec = json.loads((out / "train" / "adapter" / adapters.CONFIG).read_text())
    trained = spec
    if spec.get("prefix"):  # trained through its MLP (prefix_hidden = 32), saved as the keys and values it made
        assert spec["prefix"]["hidden"] == 0
        trained = {**spec, "prefix": {**spec["prefix"], "hidden": 32}}
    expected = _expected(trained)
    assert recs["train"]["figures"]["trainable_parameters"] == expected["trainable"]
    assert recs["export"]["figures"]["adapter_nodes"] == expected["nodes"]
    assert recs["merge"]["figures"]["unmerged"] == spec
    assert recs["merge"]["figures"]["max_logit_diff"] < 1e-3
    assert recs["export"]["figures"]["adapter_nodes"] == expected["nodes"]
    assert recs["export"]["figures"]["max_logit_diff"] < 1e-3
    # every adapter MatMul is int4 in the shipped graph: 2 layers x 5 projections, the head, the adapters
    assert recs["requantize"]["figures"]["matmulnbits"] == 2 * 5 + 1 + expected["matmuls"]
    assert recs["heal"]["figures"]["mirror_vs_ort_max_logit_diff"] < 1e-3
    assert recs["evaluate"]["figures"]["passed"]
    problems, sample = verify(adapter_run["bundle"])
    assert problems == [] and sample
    # the reference (4-bit base + adapter) is the trained one: the adapters changed the model
    model = Reference.of_run(out).load()
    ids = list(range(100, 140))
    with_adapter = _logits(model, ids)
    with adapters.disabled(model):
        assert (with_adapter - _logits(model, ids)).abs().max() > 1e-4


def test_adapter_training_resumes_exactly(tmp_path, tiny_model_dir, monkeypatch):
    from safetensors.torch import load_file

    from edgepeft.stages import train

    r = write_recipe(tmp_path / "r.toml", tiny_model_dir, method="adapter-parallel-gated", steps=6)
    straight, interrupted = tmp_path / "a" / "run", tmp_path / "b" / "run"
    run_stages(STAGES, recipe_mod.load(r), straight, last="train", echo=lambda s: None)
    real_save = train._save_checkpoint

    def save_then_die(work, step, *a, **k):
        real_save(work, step, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_stages(STAGES, recipe_mod.load(r), interrupted, last="train", echo=lambda s: None)
    monkeypatch.setattr(train, "_save_checkpoint", real_save)
    rec = run_stages(STAGES, recipe_mod.load(r), interrupted, last="train", echo=lambda s: None,
                     options={"resume": True})["train"]
    assert rec["figures"]["resumed_from_step"] == 2
    a = load_file(straight / "train" / "adapter" / adapters.WEIGHTS)
    b = load_file(interrupted / "train" / "adapter" / adapters.WEIGHTS)
    assert a.keys() == b.keys() and any("gate" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("adapter, words", [
    ('method = "adapter"\nbottleneck = 48', "bottleneck 48 must be a multiple of target android-arm64's block_size 32"),
    ('method = "adapter"\nplacement = []', "placement must name"),
    ('method = "adapter"\nplacement = ["ffn"]', "placement"),
    ('method = "adapter"\nmode = "sideways"', "mode"),
    ('method = "adapter"\ntarget_modules = ["q_proj"]', "bottleneck adapters take placement"),
    ('method = "adapter"\nscale = 0.0', "scale must be positive"),
    ('method = "ia3"\ngated = true', "gated applies to LoRA and bottleneck adapters"),
    ('method = "lora"\ngated = true\ntarget_modules = ["lm_head"]', "not 'lm_head'"),
    ('method = "lora"\ngated = true\nr = 8\nBLOCK64', "block_size 64 must divide it (r = 8): use r = 64"),
])
def test_bad_adapter_settings_are_one_line(tmp_path, tiny_model_dir, adapter, words):
    from tests.test_cli import edgepeft

    target = None
    if "BLOCK64" in adapter:  # a target with blocks of 64
        from pathlib import Path

        text = (Path(__file__).parents[1] / "targets" / "android-arm64.toml").read_text()
        (tmp_path / "b64.toml").write_text(text.replace("block_size = 32", "block_size = 64")
                                           .replace('name = "android-arm64"', 'name = "b64"'))
        adapter, target = adapter.replace("\nBLOCK64", ""), (tmp_path / "b64.toml").as_posix()
    body = write_recipe(tmp_path / "r.toml", tiny_model_dir, target=target).read_text()
    start = body.index("[adapter]")
    body = body[:start] + "[adapter]\n" + adapter + "\n" + body[body.index("[train]"):]
    (tmp_path / "r.toml").write_text(body)
    r = edgepeft("run", str(tmp_path / "r.toml"), "--out", str(tmp_path / "out"))
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr
    assert not (tmp_path / "out" / "load").exists()


def test_merge_folder_keeps_the_adapters_out_of_the_weights(adapter_run):
    """The merged folder's weights are the base's alone (transformers loads it without unknown keys), and the
    unmerged adapters beside it are what the train stage saved."""
    from safetensors.torch import load_file

    merge = adapter_run["out"] / "merge" / "model"
    keys = load_file(merge / "model.safetensors").keys()
    assert not any(adapters.ATTR in k for k in keys)
    saved = load_file(adapter_run["out"] / "train" / "adapter" / adapters.WEIGHTS)
    kept = load_file(merge / adapters.UNMERGED / adapters.WEIGHTS)
    assert saved.keys() == kept.keys() and all(torch.equal(saved[k], kept[k]) for k in saved)


def test_compare_methods_table(tmp_path, tiny_model_dir):
    """Two methods on one recipe: both rows, the latency ratio against the first, shared early stages."""
    from edgepeft.compare import compare_methods

    write_recipe(tmp_path / "tiny.toml", tiny_model_dir)
    methods = tmp_path / "methods.toml"
    methods.write_text('recipe = "tiny.toml"\n[methods.lora]\nmethod = "lora"\n'
                       '[methods.adapter]\nmethod = "adapter"\nbottleneck = 32\ngated = true\n')
    out = tmp_path / "compare"
    result = compare_methods(methods, out, echo=lambda s: None)
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["lora", "adapter"] and all("error" not in r for r in rows.values())
    assert rows["lora"]["decode_vs_first"] == 1.0 and rows["adapter"]["decode_ms"] > 0
    assert rows["adapter"]["trainable_parameters"] == 2 * (2 * 64 * 32 + 64 + 1)
    assert rows["lora"]["adapter"] == "lora" and rows["adapter"]["adapter"] == "adapter"
    assert all(r["gate_passed"] is True and r["bundle_bytes"] > 0 for r in rows.values())
    table = (out / "methods.md").read_text()
    assert "| lora (lora) |" in table and "| adapter (adapter) |" in table
    assert json.loads((out / "methods.json").read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    # load and quantize are made once: the second run links the first one's files
    q = "quantize/model/model.safetensors"
    assert (out / "lora" / q).stat().st_ino == (out / "adapter" / q).stat().st_ino


@pytest.mark.parametrize("body, only, words", [
    ('recipe = "tiny.toml"\n', None, "at least one [methods.<name>]"),
    ('recipe = "tiny.toml"\n[methods.x]\nmethod = "prefix-of-doom"\n', None, "[adapter]"),
    ('recipe = "tiny.toml"\n[methods.x]\nmethod = "lora"\n', ["y"], "no [methods.y]"),
    ('recipe = "tiny.toml"\nplot = true\n[methods.x]\nmethod = "lora"\n', None, "unknown key 'plot'"),
])
def test_compare_methods_bad_input_before_any_run(tmp_path, tiny_model_dir, body, only, words):
    from edgepeft.compare import compare_methods
    from edgepeft.core.errors import EdgepeftError

    write_recipe(tmp_path / "tiny.toml", tiny_model_dir)
    (tmp_path / "m.toml").write_text(body)
    with pytest.raises(EdgepeftError, match=None) as e:
        compare_methods(tmp_path / "m.toml", tmp_path / "out", only, echo=lambda s: None)
    assert words in str(e.value)
    assert not (tmp_path / "out").exists()


def test_adapter_bundle_answers_as_the_graph_decodes(adapter_run):
    """onnxruntime-genai runs every adapter bundle unchanged: its greedy answer is the raw graph's. A prefix bundle
    says how many cache positions its prefix takes, its context is shorter by them, and a generator that does not
    reserve them fails loudly rather than computing something else."""
    from edgepeft.bundle.manifest import read_manifest
    from edgepeft.bundle.runner import Runner
    from edgepeft.onnx.decoder import Decoder, context_length

    b = adapter_run["bundle"]
    manifest = read_manifest(b)
    runner = Runner(b)
    ids = runner.prompt_ids([("user", "call mom")])
    answer = runner.generate(ids, max_new_tokens=6)
    dec = Decoder(b / "model.ort")
    tokens, cache, total = greedy_decode(dec, ids, 6)
    assert answer.tokens == 6 and answer.text == runner.tokenizer.decode(tokens)
    reserve = manifest.get("kv_cache_reserve_tokens", 0)
    assert (reserve > 0) == (adapter_run["method"] in ("prefix", "prompt"))
    assert context_length(b / "genai_config.json") == 512 - reserve  # the tiny model's 512 positions
    if reserve:
        assert reserve == 4 and cache[next(iter(cache))].shape[2] == total + reserve
        params = runner.og.GeneratorParams(runner.model)
        params.set_search_options(max_length=len(ids) + 6, do_sample=False)  # no room for the prefix
        gen = runner.og.Generator(runner.model, params)
        with pytest.raises(Exception, match="present"):
            gen.append_tokens(ids)
            while not gen.is_done():
                gen.generate_next_token()


def test_compare_methods_cli_bad_file_is_one_line(tmp_path):
    from tests.test_cli import edgepeft

    r = edgepeft("compare-methods", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "out"))
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "missing.toml" in lines[0], r.stderr
    assert not (tmp_path / "out").exists()
