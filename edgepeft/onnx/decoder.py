"""Running an exported decoder with ONNX Runtime: prefill, one-token decode steps with the KV cache,
logit comparisons, perplexity and latency. Shared by the export, requantize and bundle stages and by the
benchmark.

The graphs follow onnxruntime-genai's decoder layout (the model builder writes it, ``genai_config.json``
describes it): inputs ``input_ids``, ``attention_mask`` and ``past_key_values.N.key|value`` shaped
(batch, kv_heads, past_length, head_size); outputs ``logits`` and ``present.N.key|value``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from edgepeft.onnx.rewrite import LOGITS_POSITIONS
from edgepeft.pipeline.target import PROVIDERS


def resolve_providers(names: list[str]) -> tuple[list[str], list[str]]:
    """onnxruntime provider names for a target's preference list, and a warning for each one this
    onnxruntime build lacks. The CPU provider always ends the list (it runs whatever the others do not)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen, warnings = [], []
    for name in names:
        if PROVIDERS[name] in available:
            chosen.append(PROVIDERS[name])
        else:
            short = [k for k, v in PROVIDERS.items() if v in available]
            warnings.append(f"execution provider {name!r} is not in this onnxruntime build "
                            f"(available: {', '.join(short)}); its share ran on the next provider in the list")
    if PROVIDERS["cpu"] not in chosen:
        chosen.append(PROVIDERS["cpu"])
    return chosen, warnings


def options(threads: int | None = None, optimize: bool = True, save_ort: Path | None = None,
            from_ort_bytes: bool = False):
    """ONNX Runtime session options, the one place they are made: quiet, sequential, ``threads`` intra-op
    threads (one inter-op); ``optimize=False`` turns the graph optimizer off; ``save_ort`` writes the
    optimized graph in ORT format there; ``from_ort_bytes`` loads an ORT-format model from bytes as a
    minimal (mobile) build does."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if save_ort is not None:
        so.optimized_model_filepath = str(save_ort)
        so.add_session_config_entry("session.save_model_format", "ORT")
    if from_ort_bytes:
        so.add_session_config_entry("session.load_model_format", "ORT")
        so.add_session_config_entry("session.use_ort_model_bytes_directly", "1")
    return so


def session(path: Path | bytes, threads: int | None = None, providers: list[str] | None = None):
    """An ONNX Runtime session on the CPU (or ``providers``) from a model file or serialized model bytes."""
    import onnxruntime as ort

    so = options(threads)
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, so, providers=providers or ["CPUExecutionProvider"])


def context_length(genai_config: Path) -> int | None:
    """The tokens a model holds, prompt and answer together, as its onnxruntime-genai config states (None: not
    stated)."""
    return json.loads(Path(genai_config).read_text())["model"].get("context_length")


class Decoder:
    """One decoder graph: ``prefill`` a prompt, then ``step`` one token at a time on the returned cache."""

    def __init__(self, model_file: Path, threads: int | None = None, genai_config: Path | None = None,
                 providers: list[str] | None = None, ort_session=None, adapter: Path | None = None):
        cfg = json.loads((genai_config or Path(model_file).parent / "genai_config.json").read_text())["model"]
        dec = cfg["decoder"]
        self.kv_heads, self.head_size = dec["num_key_value_heads"], dec["head_size"]
        self.vocab_size = cfg["vocab_size"]
        self.context_length = cfg.get("context_length")
        # ``ort_session``: one already made with other options (the readiness check's minimal-build load)
        self.session = ort_session or session(model_file, threads, providers)
        self.past = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.outputs = [o.name for o in self.session.get_outputs()]
        # a graph whose head computes the last position only unless fed the positions (``prune_lm_head``)
        self.pruned = any(i.name == LOGITS_POSITIONS for i in self.session.get_overridable_initializers())
        # ``adapter``: a runtime adapter file (edgepeft.onnx.switchable) fed with every run, as onnxruntime-genai
        # feeds the active adapter's tensors
        self.extra = {}
        if adapter is not None:
            from edgepeft.onnx.switchable import read_adapter

            self.extra = read_adapter(Path(adapter))
            known = {i.name for i in (*self.session.get_inputs(), *self.session.get_overridable_initializers())}
            unknown = sorted(set(self.extra) - known)
            if unknown:
                from edgepeft.core.errors import EdgepeftError

                raise EdgepeftError(f"{adapter}: tensor {unknown[0]!r} is not an input of {Path(model_file).name}")

    def run_all(self, ids: np.ndarray, cache: dict[str, np.ndarray] | None, total: int,
                every: bool = False) -> dict[str, np.ndarray]:
        """Every output of the graph by name, for ``ids`` after ``cache`` (None: an empty cache); ``every``: the
        logits of every position of ``ids``, also from a pruned head."""
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64), **self.extra}
        if every and self.pruned:
            feeds[LOGITS_POSITIONS] = np.arange(ids.shape[1], dtype=np.int64)
        for name in self.past:
            feeds[name] = cache[name] if cache else np.zeros((1, self.kv_heads, 0, self.head_size), np.float32)
        return dict(zip(self.outputs, self.session.run(None, feeds), strict=True))

    def _run(self, ids: np.ndarray, cache: dict[str, np.ndarray] | None, total: int, every: bool = False):
        out = self.run_all(ids, cache, total, every)
        nxt = {name: out[name.replace("past_key_values.", "present.")] for name in self.past}
        return out["logits"][0], nxt

    def prefill(self, ids: list[int], last: bool = False):
        """Logits for every position of ``ids`` (shape [len, vocab]) and the KV cache after them; ``last``:
        as a generator runs it, the last position's row at least (a pruned head computes only that one)."""
        return self._run(np.asarray([ids], np.int64), None, len(ids), every=not last)

    def step(self, token: int, cache, total: int):
        """Logits for one more token (the cache holds ``total - 1`` tokens) and the grown cache."""
        logits, cache = self._run(np.asarray([[token]], np.int64), cache, total)
        return logits[-1], cache


def decode_logits(decoder: Decoder, ids: list[int], prompt: int) -> np.ndarray:
    """Logits of ``ids[prompt:]`` computed the way generation does: a prefill of ``ids[:prompt]``, then one
    cached step per token. Row i predicts the token after ``ids[prompt + i]``."""
    _, cache = decoder.prefill(ids[:prompt], last=True)
    rows = []
    for i in range(prompt, len(ids)):
        logits, cache = decoder.step(ids[i], cache, i + 1)
        rows.append(logits)
    return np.stack(rows)


def random_prompt(decoder: Decoder, tokens: int, rng) -> list[int]:
    return [int(t) for t in rng.integers(100, decoder.vocab_size - 1, size=tokens)]


def timed_generation(decoder: Decoder, prompt: list[int], decode_tokens: int) -> tuple[float, list[float]]:
    """Seconds to prefill ``prompt``, and seconds of each of ``decode_tokens`` greedy cached steps after it."""
    t = time.perf_counter()
    logits, cache = decoder.prefill(prompt, last=True)
    prefill = time.perf_counter() - t
    token, total, steps = int(logits[-1].argmax()), len(prompt), []
    for _ in range(decode_tokens):
        total += 1
        t = time.perf_counter()
        logits, cache = decoder.step(token, cache, total)
        steps.append(time.perf_counter() - t)
        token = int(logits.argmax())
    return prefill, steps


def latency(decoder: Decoder, prompt_tokens: int = 128, decode_tokens: int = 32, repeats: int = 3,
            seed: int = 0) -> dict[str, float]:
    """Prefill time for a ``prompt_tokens`` prompt and decode time per token (greedy, batch 1), medians
    over ``repeats`` runs after one warm-up run."""
    prompt = random_prompt(decoder, prompt_tokens, np.random.default_rng(seed))
    prefill_s, step_s = [], []
    for r in range(repeats + 1):
        prefill, steps = timed_generation(decoder, prompt, decode_tokens)
        if r:  # the first run warms caches and the thread pool
            prefill_s.append(prefill)
            step_s.append(statistics.median(steps))
    return {"prefill_ms": 1000 * statistics.median(prefill_s), "decode_ms_per_token": 1000 * statistics.median(step_s),
            "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens, "repeats": repeats}
