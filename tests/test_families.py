"""Model families besides Llama: a tiny random-init model of each (conftest.FAMILIES) through every stage, IA3
with the family's default targets, the adapter methods that need more of the graph (Gemma 3's q/k norms put
q, k and v into attention apart), and one-line refusals for what a family cannot take."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgepeft.core.errors import EdgepeftError
from edgepeft.pipeline import recipe as recipe_mod
from edgepeft.pipeline.runner import run_stages
from edgepeft.stages.registry import STAGES
from tests.conftest import FAMILIES, family_model, greedy_decode, write_recipe


def _run(recipe, out, **kw):
    return run_stages(STAGES, recipe_mod.load(recipe), out, echo=lambda s: None, **kw)


# RMS norm weights each family's graph holds: per layer (input, post-attention[, pre/post feed-forward]) x hidden,
# q and k norms x head_dim, and the final norm
NORM_WEIGHTS = {"mistral": 2 * 2 * 64 + 64, "qwen2": 2 * 2 * 64 + 64, "qwen3": 2 * (2 * 64 + 2 * 16) + 64,
                "gemma3": 2 * (4 * 64 + 2 * 16) + 64, "phi3": 2 * 2 * 64 + 64}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_stage_runs_on_each_family(family, tmp_path, smollm_tokenizer_dir):
    """LoRA through every stage: export matches PyTorch, the heal mirror matches ONNX Runtime (every norm of the
    family fitted), the bundle verifies and onnxruntime-genai decodes what the raw graph decodes."""
    from transformers import AutoTokenizer

    from edgepeft.bundle.manifest import read_manifest
    from edgepeft.bundle.runner import Runner, verify
    from edgepeft.latency import costmodel
    from edgepeft.onnx.decoder import Decoder

    model = family_model(family, tmp_path / "model", smollm_tokenizer_dir)
    plain = family == "gemma3"  # a base model's layout (the tiny one has SmolLM2's tokenizer and its template)
    records = _run(write_recipe(tmp_path / "r.toml", model, model='chat_template = "plain"' if plain else ""),
                   tmp_path / "run")
    assert records["load"]["figures"]["chat_template"] == ("plain" if plain else "own")
    config = json.loads((model / "config.json").read_text())
    assert records["load"]["figures"]["model_type"] == config["model_type"]
    assert records["export"]["figures"]["max_logit_diff"] < 1e-4
    heal = records["heal"]["figures"]
    assert heal["mirror_vs_ort_max_logit_diff"] < 1e-4
    assert heal["norm_weights"] == NORM_WEIGHTS[family]
    bundle = tmp_path / "run" / "bundle" / "android-arm64"
    problems, _ = verify(bundle)
    assert problems == []
    runner = Runner(bundle)
    chat = [("system", read_manifest(bundle)["prompt"]["system"]), ("user", "call mom")]
    ids = runner.prompt_ids(chat)
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "load" / "model")  # what training and evaluation use
    text = tok.apply_chat_template([{"role": r, "content": c} for r, c in chat], tokenize=False,
                                   add_generation_prompt=True)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]  # the bundle lays out prompts as training did
    assert text.endswith("Assistant:") == plain
    # the cost model reads each layer's window from the graph: a sliding-window layer reads at most its window
    windows = costmodel.attention_windows(bundle / "model.ort")
    assert windows == [8, 8] if family == "gemma3" else windows == [0, 0]
    genai, full = bundle / "genai_config.json", costmodel.kv_bytes_per_position(bundle / "genai_config.json") * 100
    assert costmodel.kv_bytes_read(genai, windows, 100) == (full * 8 / 100 if windows[0] else full)
    tokens, _, _ = greedy_decode(Decoder(bundle / "model.ort"), ids, 5)
    assert runner.generate(ids, max_new_tokens=5).text == runner.tokenizer.decode(tokens)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ia3_takes_the_familys_default_targets_and_merges(family, tmp_path, smollm_tokenizer_dir):
    from transformers import AutoConfig

    from edgepeft.models.families import family_of

    model = family_model(family, tmp_path / "model", smollm_tokenizer_dir)
    records = _run(write_recipe(tmp_path / "r.toml", model, method="ia3"), tmp_path / "run", last="merge")
    saved = json.loads((tmp_path / "run" / "train" / "adapter" / "adapter_config.json").read_text())
    targets, _ = family_of(AutoConfig.from_pretrained(model)).ia3_targets()
    assert sorted(saved["target_modules"]) == sorted(targets)
    assert ("qkv_proj" in targets) == (family == "phi3")
    assert records["merge"]["figures"]["max_logit_diff"] < 1e-3


@pytest.mark.parametrize("method", ["prefix", "prompt", "unipelt"])
def test_positions_ahead_and_gated_prefix_export_on_unpacked_attention(method, tmp_path, smollm_tokenizer_dir):
    """Gemma 3 normalizes q and k, so attention takes them apart (not one packed input); its layers rotate by two
    bases and its token rows are scaled: a prefix, a soft prompt and UniPELT's gated prefix still export to what
    PyTorch computes."""
    model = family_model("gemma3", tmp_path / "model", smollm_tokenizer_dir)
    records = _run(write_recipe(tmp_path / "r.toml", model, method=method), tmp_path / "run", last="export")
    assert records["export"]["figures"]["adapter_nodes"] > 0
    assert records["export"]["figures"]["max_logit_diff"] < 1e-3


def test_gemma_embedding_scale_is_exact_in_the_graph(tmp_path, smollm_tokenizer_dir):
    """The builder writes sqrt(hidden) rounded to two decimals; the exported graph multiplies by the fp32 value
    transformers uses (hidden 96: 9.7979..., which two decimals round to 9.80)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = family_model("gemma3", tmp_path / "model", smollm_tokenizer_dir, hidden_size=96,
                         num_attention_heads=4, head_dim=16)
    records = _run(write_recipe(tmp_path / "r.toml", model, steps=2), tmp_path / "run", last="export")
    g = onnx.load(str(tmp_path / "run" / "export" / "model" / "model.onnx")).graph
    mul = next(n for n in g.node if n.name == "/model/embed_tokens/Mul")
    scale = numpy_helper.to_array(next(i for i in g.initializer if i.name == mul.input[1]))
    assert scale == np.float32(96 ** 0.5)
    assert records["export"]["figures"]["max_logit_diff"] < 1e-4


@pytest.mark.parametrize("method, says", [("lora-gated", "target_modules names 'q_proj'"),
                                          ("unipelt", "packs q, k and v into one qkv_proj")])
def test_packed_projections_refuse_what_needs_them_apart(method, says, tmp_path, smollm_tokenizer_dir):
    model = family_model("phi3", tmp_path / "model", smollm_tokenizer_dir)
    with pytest.raises(EdgepeftError, match=says):
        _run(write_recipe(tmp_path / "r.toml", model, method=method), tmp_path / "run")
    assert not (tmp_path / "run" / "load").exists()  # refused before the first stage


def _config_only(folder, config: dict):
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"w": np.zeros(2, np.float32)}, str(folder / "model.safetensors"))
    return folder


def test_a_family_the_exporter_does_not_know_is_one_line(tmp_path):
    folder = _config_only(tmp_path / "m", {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    recipe = write_recipe(tmp_path / "r.toml", folder)
    done = subprocess.run([sys.executable, "-m", "edgepeft", "run", str(recipe), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    line, = done.stderr.strip().splitlines()
    assert "model type 'gpt2' (GPT2LMHeadModel) is not supported: the ONNX exporter" in line
    assert "Gemma3" in line and "Qwen3" in line  # what it does know


def test_a_layout_the_stages_cannot_read_is_one_line(tmp_path):
    """Phi-2 (PhiForCausalLM) is one the exporter knows, but its MLP is fc1/fc2 and its norms LayerNorm."""
    from edgepeft.models.sources import load_config, resolve

    folder = _config_only(tmp_path / "m", {"model_type": "phi", "architectures": ["PhiForCausalLM"],
                                           "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                           "num_attention_heads": 4, "vocab_size": 512})
    with pytest.raises(EdgepeftError, match="not supported by edgepeft's stages: its attention projections are "
                                            "q_proj, k_proj, v_proj, dense"):
        load_config(resolve(str(folder)))


def test_a_width_the_block_size_does_not_divide_fails_in_preflight(tmp_path, smollm_tokenizer_dir):
    model = family_model("qwen3", tmp_path / "model", smollm_tokenizer_dir, intermediate_size=144)
    with pytest.raises(EdgepeftError, match="intermediate_size 144 is not a multiple of target android-arm64's "
                                            "block_size 32 .*use a target with block_size 16"):
        _run(write_recipe(tmp_path / "r.toml", model), tmp_path / "run")
    assert not (tmp_path / "run" / "load").exists()
