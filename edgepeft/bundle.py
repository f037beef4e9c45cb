"""A deployable bundle: a folder an app team can ship, described by its ``manifest.json``.

The manifest lists every other file of the bundle with its size and sha256, and says how it was made
(edgepeft version, base model and adapter hashes, recipe, target, measured figures). It hashes itself too:
``manifest_sha256`` covers its own canonical JSON without that key, and the file must be exactly that
canonical JSON, so a changed byte anywhere in the bundle, manifest included, fails ``verify``.

Reading a bundle never leaves it: manifest paths must be plain relative paths inside the folder, and
symbolic links are refused.

``Runner`` runs a bundle with onnxruntime-genai alone: the tokenizer, chat template and model files in the
folder, no PyTorch or transformers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from edgepeft.errors import EdgepeftError, first_line

MANIFEST = "manifest.json"
FORMAT = "edgepeft-bundle/1"


def canonical(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def seal(manifest: dict) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return canonical({**body, "manifest_sha256": hashlib.sha256(canonical(body)).hexdigest()})


def write_manifest(folder: Path, manifest: dict) -> None:
    from edgepeft.pipeline import file_table, write_atomic

    files = {k: v for k, v in file_table(folder).items() if k != MANIFEST}
    write_atomic(folder / MANIFEST, seal({**manifest, "format": FORMAT, "files": files}))


def adapter_sha256(adapter_dir: Path) -> str:
    """The adapter's hash a manifest records: over its files' names and sha256s, so the run folder a bundle
    was made in can be matched to it."""
    from edgepeft.pipeline import file_table

    h = hashlib.sha256()
    for rel, entry in sorted(file_table(adapter_dir).items()):
        h.update(f"adapter/{rel}\0{entry['sha256']}\n".encode())
    return h.hexdigest()


def open_for_update(folder: Path) -> dict:
    """The manifest of a bundle about to gain files; refuses a bundle that does not match its manifest, since
    re-sealing it would bless whatever changed."""
    manifest = read_manifest(folder)
    problems = check_files(folder, manifest)
    if problems:
        raise EdgepeftError(f"{folder}: does not match its manifest ({problems[0]}); run `edgepeft verify {folder}`")
    return manifest


def reseal(folder: Path, manifest: dict, **entries) -> None:
    """Re-hash the bundle's files and seal ``manifest`` with ``entries`` set (after files were added)."""
    body = {k: v for k, v in manifest.items() if k not in ("files", "format", "manifest_sha256")}
    write_manifest(folder, {**body, **entries})


def _safe(folder: Path, rel: str) -> Path:
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel:
        raise EdgepeftError(f"{folder}: manifest names a path outside the bundle: {rel!r}")
    return folder.joinpath(*p.parts)


def read_manifest(folder: Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise EdgepeftError(f"{folder}: not a bundle folder")
    path = folder / MANIFEST
    if not path.is_file() or path.is_symlink():
        raise EdgepeftError(f"{folder}: no {MANIFEST} (not an edgepeft bundle)")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgepeftError(f"{path}: not valid JSON ({e})") from None
    if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT
            and isinstance(manifest.get("files"), dict)):
        raise EdgepeftError(f"{path}: not an {FORMAT} manifest")
    for rel in manifest["files"]:
        _safe(folder, rel)
    manifest["_raw"] = raw
    return manifest


def check_files(folder: Path, manifest: dict) -> list[str]:
    """Every problem found by re-hashing the bundle against its manifest (empty: intact)."""
    from edgepeft.sources import sha256_file

    folder = Path(folder)
    problems = []
    raw = manifest.pop("_raw", None)
    if raw is not None and raw != seal(manifest):
        problems.append(f"{MANIFEST}: altered (its content does not match its own manifest_sha256)")
    listed = manifest["files"]
    for rel, entry in sorted(listed.items()):
        p = _safe(folder, rel)
        if p.is_symlink():
            problems.append(f"{rel}: is a symbolic link")
        elif not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != entry.get("bytes"):
            problems.append(f"{rel}: size {p.stat().st_size} bytes, manifest says {entry.get('bytes')}")
        elif sha256_file(p) != entry.get("sha256"):
            problems.append(f"{rel}: sha256 differs from the manifest")
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if (p.is_file() or p.is_symlink()) and rel != MANIFEST and rel not in listed:
            problems.append(f"{rel}: not listed in the manifest")
    return problems


@dataclass
class Answer:
    text: str
    tokens: int
    seconds: float


class Runner:
    """Generate from a bundle with onnxruntime-genai only."""

    def __init__(self, folder: Path, manifest: dict | None = None):
        import onnxruntime_genai as og

        self.folder = Path(folder)
        self.manifest = manifest if manifest is not None else read_manifest(self.folder)
        try:
            self.model = og.Model(str(self.folder))
        except Exception as e:  # the runtime's own message, on one line
            raise EdgepeftError(f"{folder}: onnxruntime-genai cannot load the bundle: {first_line(e)}") from None
        self.tokenizer = og.Tokenizer(self.model)
        self.og = og

    def prompt_ids(self, messages: list[tuple[str, str]] | None = None, text: str | None = None) -> list[int]:
        if messages is not None:
            chat = json.dumps([{"role": r, "content": c} for r, c in messages])
            text = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True)
        return [int(t) for t in self.tokenizer.encode(text)]

    def generate(self, ids: list[int], max_new_tokens: int = 48) -> Answer:
        import time

        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
        gen = self.og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        out = []
        while not gen.is_done():
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        seconds = time.perf_counter() - t0
        stops = set(self.manifest.get("prompt", {}).get("stop_token_ids", []))
        while out and out[-1] in stops:
            out.pop()
        return Answer(self.tokenizer.decode(out), len(out), seconds)

    def chat(self, user: str, system: str | None = None, max_new_tokens: int = 48) -> Answer:
        if system is None:
            system = self.manifest.get("prompt", {}).get("system")
        messages = ([("system", system)] if system else []) + [("user", user)]
        return self.generate(self.prompt_ids(messages), max_new_tokens)


def verify(folder: Path, generate_tokens: int = 8) -> tuple[list[str], str | None]:
    """(problems, sample output): re-hash every file, then load the model and generate a few tokens."""
    manifest = read_manifest(folder)
    problems = check_files(folder, manifest)
    if problems:
        return problems, None
    try:
        runner = Runner(folder, manifest)
        answer = runner.chat("Hello", max_new_tokens=generate_tokens)
    except EdgepeftError as e:
        return [str(e)], None
    if answer.tokens == 0:
        return ["the model generated no tokens"], None
    return [], answer.text
