"""Running a bundle with onnxruntime-genai alone: the tokenizer, chat template and model files in the
folder, no PyTorch or transformers. ``verify`` re-hashes a bundle and generates from it."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edgepeft.bundle.manifest import check_files, inside_path, read_manifest
from edgepeft.core.errors import EdgepeftError, first_line
from edgepeft.onnx.decoder import context_length


@dataclass
class Answer:
    text: str
    tokens: int
    seconds: float


def with_large_stack(fn, size: int = 256 << 20):
    """``fn()`` run on a thread with a ``size``-byte stack. onnxruntime-genai 0.15's ``Model()`` uses nearly all
    of the main thread's 8 MB stack, which the process's command line and environment share: a prompt of ~30 KB
    on the command line crashed it (SIGSEGV) in ``edgepeft generate``."""
    out: list = []

    def target():
        try:
            out.append((True, fn()))
        except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
            out.append((False, e))

    old = threading.stack_size(size)
    try:
        t = threading.Thread(target=target, name="edgepeft-large-stack")
        t.start()
    finally:
        threading.stack_size(old)
    t.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value


class Runner:
    """Generate from a bundle with onnxruntime-genai only."""

    def __init__(self, folder: Path, manifest: dict | None = None, adapter: str | None = None):
        """``adapter``: one of the bundle's runtime adapters (its manifest's ``adapters``), active in every
        generation; None runs the base."""
        import onnxruntime_genai as og

        self.folder = Path(folder)
        self.manifest = manifest if manifest is not None else read_manifest(self.folder)
        known = self.manifest.get("adapters", {})
        if adapter is not None and adapter not in known:
            raise EdgepeftError(f"{folder}: no adapter {adapter!r} in the bundle (it has: "
                                f"{', '.join(known) or 'none'})")
        self.adapter, self.adapters = adapter, None
        try:
            self.model = with_large_stack(lambda: og.Model(str(self.folder)))
            if known:
                self.adapters = og.Adapters(self.model)
                for name, entry in known.items():
                    self.adapters.load(str(inside_path(self.folder, entry["file"])), name)
        except Exception as e:  # the runtime's own message, on one line
            raise EdgepeftError(f"{folder}: onnxruntime-genai cannot load the bundle: {first_line(e)}") from None
        self.tokenizer = og.Tokenizer(self.model)
        self.og = og
        self.context_length = context_length(self.folder / "genai_config.json")  # the config og.Model just read

    def prompt_ids(self, messages: list[tuple[str, str]] | None = None, text: str | None = None) -> list[int]:
        """As the fine-tune saw them (``calib.data.prompt_ids``): a chat template writes its own special tokens
        (Gemma's plain one starts with <bos>, which the tokenizer would add again), plain text gets the tokenizer's."""
        if messages is not None:
            chat = json.dumps([{"role": r, "content": c} for r, c in messages])
            text = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True)
        self.tokenizer.update_options(add_special_tokens="false" if messages is not None else "true")
        return [int(t) for t in self.tokenizer.encode(text)]

    def generate(self, ids: list[int], max_new_tokens: int = 48) -> Answer:
        context = self.context_length
        if max_new_tokens <= 0:
            raise EdgepeftError(f"max_new_tokens {max_new_tokens}: must be at least 1")
        if not ids:
            raise EdgepeftError("the prompt is empty")
        if context and len(ids) >= context:
            raise EdgepeftError(f"the prompt is {len(ids)} tokens; the model's context holds {context} (prompt and "
                                "answer together)")
        if context:
            max_new_tokens = min(max_new_tokens, context - len(ids))  # a huge request stops at the context's end
        # a prefix in the graph takes cache positions the generator does not count (manifest's reserve)
        reserve = int(self.manifest.get("kv_cache_reserve_tokens", 0))
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + max_new_tokens + reserve, do_sample=False)
        gen = self.og.Generator(self.model, params)
        if self.adapter is not None:
            gen.set_active_adapter(self.adapters, self.adapter)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        out = []
        while not gen.is_done() and len(out) < max_new_tokens:
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        seconds = time.perf_counter() - t0
        stops = set(self.manifest.get("prompt", {}).get("stop_token_ids", []))
        while out and out[-1] in stops:
            out.pop()
        return Answer(self.tokenizer.decode(out), len(out), seconds)

    def chat(self, user: str, system: str | None = None, max_new_tokens: int = 48) -> Answer:
        if system is None:
            prompt = self.manifest.get("adapters", {}).get(self.adapter, {}).get("prompt") if self.adapter else None
            system = (prompt or self.manifest.get("prompt", {})).get("system")
        messages = ([("system", system)] if system else []) + [("user", user)]
        return self.generate(self.prompt_ids(messages), max_new_tokens)


def verify(folder: Path, generate_tokens: int = 8) -> tuple[list[str], str | None]:
    """(problems, sample output): re-hash every file, then load the model and generate a few tokens (with each
    runtime adapter in turn, in a bundle that has them)."""
    manifest = read_manifest(folder)
    problems = check_files(folder, manifest)
    if problems:
        return problems, None
    samples = []
    for adapter in list(manifest.get("adapters", {})) or [None]:
        try:
            answer = Runner(folder, manifest, adapter).chat("Hello", max_new_tokens=generate_tokens)
        except EdgepeftError as e:
            return [str(e)], None
        if answer.tokens == 0:
            return [f"the model generated no tokens{f' with adapter {adapter}' if adapter else ''}"], None
        samples.append(f"[{adapter}] {answer.text}" if adapter else answer.text)
    return [], " / ".join(samples)
