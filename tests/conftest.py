"""Shared fixtures: a tiny random-init Llama (real SmolLM2 tokenizer, 2 layers of width 64) saved as a
Hugging Face folder, and recipes that run the whole pipeline on it in seconds."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# edgepeft's cache (assembled built-in models, converted GGUF folders) is the session's own, not the user's
os.environ["EDGEPEFT_CACHE"] = tempfile.mkdtemp(prefix="edgepeft-cache-")
atexit.register(shutil.rmtree, os.environ["EDGEPEFT_CACHE"], True)


@pytest.fixture(scope="session")
def smollm_tokenizer_dir(tmp_path_factory) -> Path:
    """The built-in model's tokenizer (with chat template), saved once as plain HF files."""
    from edgepeft.models.sources import load_tokenizer, resolve

    tok = load_tokenizer(resolve("smollm2-135m-instruct"))
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_tokenizer_dir) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out, safe_serialization=True)
    for f in smollm_tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


# Tiny random-init models of each family the pipeline takes besides Llama (the tokenizer is SmolLM2's): every
# family's own layout at the same width, so the stage tests exercise what differs (q/k norms, Gemma's four norms,
# (1 + w) norms, scaled embeddings and sliding windows shorter than the test windows, Phi-3's packed projections).
FAMILIES = {
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "query_pre_attn_scalar": 16,
                                                         "sliding_window": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"original_max_position_embeddings": 512}),
}


def family_model(family: str, out: Path, tokenizer_dir: Path, **overrides) -> Path:
    """A tiny random-init model of ``family`` (a key of ``FAMILIES``) saved as a Hugging Face folder at ``out``."""
    import torch
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{
        "vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, **extra, **overrides})
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():  # biases (Qwen2's q/k/v) and norm weights start at constants: give them values
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


ADAPTERS = {"lora": 'method = "lora"\nr = 8\nalpha = 16',
            "ia3": 'method = "ia3"',  # with its defaults (k, v, down), as a user gets it by changing only `method`
            "adapter": 'method = "adapter"\nbottleneck = 32\nplacement = ["attn", "mlp"]',
            "adapter-parallel-gated": 'method = "adapter"\nbottleneck = 32\nmode = "parallel"\ngated = true',
            "lora-gated": 'method = "lora"\nr = 8\nalpha = 16\ngated = true\n'
                          'target_modules = ["q_proj", "v_proj", "down_proj"]',
            "prefix": 'method = "prefix"\nprefix_tokens = 4\nprefix_hidden = 32',
            "prompt": 'method = "prompt"\nprompt_tokens = 4',
            "unipelt": 'method = "unipelt"\nr = 8\nalpha = 16\nbottleneck = 32\nprefix_tokens = 4\nprefix_hidden = 32'}


def write_recipe(path: Path, model_dir: Path, method: str = "lora", steps: int = 6, extra: str = "",
                 tail: str = "", target: str | None = None, budgets: str = "", model: str = "") -> Path:
    """A fast recipe for the tiny model; ``method`` is a key of ``ADAPTERS``, ``extra`` goes into [train],
    ``budgets`` into [evaluate] (default: the random-init model's own figures pass), ``model`` into [model],
    ``tail`` after every table."""
    budgets = budgets or ("max_perplexity_increase = 1.0\nmax_kl = 1.0\nmin_next_token_agreement = 0.0\n"
                          "max_accuracy_drop = 1.0")
    head = f'target = "{target}"' if target else ""
    adapter = ADAPTERS[method]
    lr = "" if method == "ia3" else "lr = 0.02"
    path.write_text(f"""
name = "tiny"
{head}
[model]
source = "{model_dir.as_posix()}"
{model}
[adapter]
{adapter}
[train]
steps = {steps}
batch_size = 4
{lr}
warmup_steps = 1
checkpoint_every = 2
eval_examples = 4
eval_max_new_tokens = 8
{extra}
[merge]
eval_windows = 2
eval_window_tokens = 32
max_logit_diff = 0.001
[export]
eval_windows = 2
eval_window_tokens = 32
decode_check_tokens = 8
[requantize]
calib_windows = 2
calib_task_windows = 2
calib_window_tokens = 32
measure_windows = 4
sensitivity_windows = 1
[heal]
steps = 4
lr = 0.003
prose_windows = 2
task_windows = 2
window_tokens = 32
checkpoint_every = 2
adapter_steps = 12
adapter_examples = 6
[evaluate]
windows = 2
window_tokens = 32
test_examples = 4
max_new_tokens = 8
{budgets}
[profile]
lengths = [16, 64]
decode_tokens = 4
repeats = 1
warmup = 0
{tail}""")
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir):
    """One full pipeline run on the tiny model, shared by the bundle and latency tests (read-only: copy it
    before changing anything)."""
    from edgepeft.pipeline import recipe as recipe_mod
    from edgepeft.pipeline.runner import run_stages
    from edgepeft.stages.registry import STAGES

    root = tmp_path_factory.mktemp("e2e")
    recipe = write_recipe(root / "tiny.toml", tiny_model_dir)
    out = root / "run"
    records = run_stages(STAGES, recipe_mod.load(recipe), out, echo=lambda s: None)
    return {"recipe": recipe, "out": out, "records": records, "bundle": out / "bundle" / "android-arm64"}


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model_dir) -> Path:
    return write_recipe(tmp_path / "tiny.toml", tiny_model_dir)


def run_before_heal(tiny_run: dict, out: Path) -> Path:
    """A copy of the tiny run's folder at ``out`` without the heal stage and the stages after it."""
    shutil.copytree(tiny_run["out"], out, ignore=shutil.ignore_patterns("heal", "bundle", "evaluate", ".*"))
    return out


def interrupt_heal_at_first_checkpoint(recipe, out: Path, monkeypatch) -> None:
    """Run the heal stage in ``out`` until it has written its first checkpoint, then stop it as Ctrl-C would."""
    from edgepeft.heal import distill
    from edgepeft.pipeline.runner import run_stages
    from edgepeft.stages.registry import STAGES

    real_save = distill.Distiller.save

    def save_then_die(self, work, step, fp):
        real_save(self, work, step, fp)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(distill.Distiller, "save", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            run_stages(STAGES, recipe, out, first="heal", last="heal", echo=lambda s: None)


def greedy_decode(decoder, ids: list[int], new_tokens: int):
    """The raw graph's greedy continuation of ``ids`` through its KV cache: (tokens, last cache, total length)."""
    logits, cache = decoder.prefill(ids)
    tokens, total = [int(logits[-1].argmax())], len(ids)
    for _ in range(new_tokens - 1):
        total += 1
        logits, cache = decoder.step(tokens[-1], cache, total)
        tokens.append(int(logits.argmax()))
    return tokens, cache, total
