"""The latency regression gate: ``edgepeft latency-check BUNDLE --baseline FILE [--update-baseline]``.

A shared machine's speed drifts by ±15% over minutes and halves when a neighbour takes a core, so the
gate never compares absolute times across runs. It compares ratios:

- A reference workload is generated in the same process: a seeded chain of block-quantized int4
  MatMulNBits pairs ([1024 -> 3072 -> 1024], 3.9 MB each) with RMS norms, run through the same onnxruntime
  with the same session settings. It stresses what a decode step stresses (int4 GEMV kernels streaming
  weights from memory through one thread pool), so whatever slows the machine slows both.
- The chain is as long as the bundle's weights read per token make it (one pair per 3.9 MB; at least 4),
  so both stream the same bytes from the same level of memory: a 94 MB reference beside
  a 250 MB bundle could sit in a large last-level cache (server parts carry 256 MB) while the bundle reads
  DRAM, and a neighbour thrashing that cache would move the two apart. The length is fixed when the
  baseline is recorded and read back from it: a bundle that grows is measured against the same reference.
- Each round measures the bundle and the reference back to back, alternating which goes first: decode
  (median ms of ``decode_tokens`` cached steps after a ``context``-token prompt, vs the reference with
  one row) and prefill (the ``context``-token prompt, vs the reference with ``context`` rows; the faster
  of two runs each). The round's figure is bundle / reference.
- Over ``rounds`` rounds: the median ratio with a distribution-free confidence interval (order statistics
  of the binomial distribution, no normality assumed).
- Verdict per metric: **fail** when even the lower confidence bound of (current / baseline) is above
  1 + tolerance, comparing the current interval with the baseline's (lower current / upper baseline).
  An unchanged bundle passes unless noise moves the whole interval past the tolerance; a real
  slowdown larger than the tolerance fails.
- One intra-op thread by default: on a 2-core machine with a busy neighbour, two threads measure the
  scheduler (a parallel section waits for its slower half), one thread measures the model.

What it cancels and what it does not: machine speed, load and thermal drift cancel; a change of the
bundle (export, quantization, graph, kernels it selects) shows. A new onnxruntime version or another CPU
model moves both workloads but not necessarily alike: the baseline records both, and the gate warns when
they differ. Record baselines with ``--update-baseline`` on the kind of machine the gate runs on.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgepeft.bundle.manifest import MANIFEST, read_manifest
from edgepeft.core.console import progress
from edgepeft.core.errors import EdgepeftError
from edgepeft.core.files import sha256_file, write_atomic
from edgepeft.latency.profile import machine, variant_of
from edgepeft.onnx.decoder import Decoder, random_prompt, session, timed_generation

FORMAT = "edgepeft-latency-baseline/1"
REFERENCE = {"name": "int4-matmulnbits-chain/1", "layers": 24, "hidden": 1024, "ffn": 3072, "block_size": 32,
             "accuracy_level": 4, "seed": 0}
MIN_LAYERS, MAX_LAYERS = 4, 1024


def layer_bytes(spec: dict = REFERENCE) -> int:
    """Weight bytes of one reference pair: two int4 matrices with a float32 scale per block."""
    blocks = spec["hidden"] * spec["ffn"] // spec["block_size"]
    return 2 * (spec["hidden"] * spec["ffn"] // 2 + 4 * blocks)


def reference_for(read_per_token: int) -> dict:
    """The reference workload sized to stream as many weight bytes as the bundle's decode step."""
    layers = round(read_per_token / layer_bytes())
    return {**REFERENCE, "layers": min(MAX_LAYERS, max(MIN_LAYERS, layers))}
METRICS = ("decode", "prefill")


@dataclass
class GateSettings:
    threads: int = 1
    context: int = 128  # prompt tokens before decoding; prefill is timed on the same prompt
    decode_tokens: int = 16
    rounds: int = 20
    warmup: int = 2
    tolerance: float = 0.10  # fail when at least this much slower, with confidence
    confidence: float = 0.95


def reference_model(spec: dict = REFERENCE) -> bytes:
    """The reference workload as ONNX bytes (identical on every machine and run for one spec: seeded PCG64)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    r = spec
    rng = np.random.default_rng(r["seed"])
    nodes, inits, x = [], [], "x"
    for i in range(r["layers"]):
        for j, (k, n) in enumerate(((r["hidden"], r["ffn"]), (r["ffn"], r["hidden"]))):
            blocks = k // r["block_size"]
            w = rng.integers(0, 256, size=(n, blocks, r["block_size"] // 2), dtype=np.uint8)
            s = (0.01 + 0.02 * rng.random(n * blocks, dtype=np.float32)).astype(np.float32)
            inits += [numpy_helper.from_array(w, f"w{i}_{j}"), numpy_helper.from_array(s, f"s{i}_{j}")]
            nodes.append(helper.make_node("MatMulNBits", [x, f"w{i}_{j}", f"s{i}_{j}"], [f"h{i}_{j}"],
                                          domain="com.microsoft", K=k, N=n, bits=4, block_size=r["block_size"],
                                          accuracy_level=r["accuracy_level"]))
            x = f"h{i}_{j}"
        inits.append(numpy_helper.from_array(np.ones(r["hidden"], np.float32), f"g{i}"))
        nodes.append(helper.make_node("SimplifiedLayerNormalization", [x, f"g{i}"], [f"n{i}"], axis=-1, epsilon=1e-5))
        x = f"n{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(nodes, "reference",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", r["hidden"]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", r["hidden"]])], inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def median_ci(xs: list[float], confidence: float) -> tuple[float, float]:
    """A distribution-free confidence interval for the median: order statistics (k, n - k + 1), with k the
    largest index whose binomial tail keeps the coverage at least ``confidence``."""
    xs, n = sorted(xs), len(xs)
    if n < 6:
        return xs[0], xs[-1]
    alpha = 1 - confidence

    def tail(k):  # P(Binomial(n, 1/2) < k)
        return sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= n // 2 and 2 * tail(k + 1) <= alpha:
        k += 1
    return xs[k - 1], xs[n - k]


def summarize(ratios: list[float], confidence: float) -> dict:
    lo, hi = median_ci(ratios, confidence)
    return {"ratio": statistics.median(ratios), "ci": [lo, hi], "samples": ratios}


def verdict(current: dict, baseline: dict, tolerance: float) -> tuple[str, float, float, float]:
    """(``fail`` | ``faster`` | ``ok``, change, change lower bound, change upper bound); change is
    current / baseline - 1."""
    change = current["ratio"] / baseline["ratio"] - 1
    lo = current["ci"][0] / baseline["ci"][1] - 1
    hi = current["ci"][1] / baseline["ci"][0] - 1
    if lo > tolerance:
        return "fail", change, lo, hi
    if hi < -tolerance:
        return "faster", change, lo, hi
    return "ok", change, lo, hi


def measure(model_file: Path, genai_config: Path, settings: GateSettings, progress_bar: bool = True,
            reference: dict = REFERENCE) -> dict:
    """Interleaved rounds of the bundle and the ``reference`` workload; per-metric ratio samples and absolute
    medians."""
    import numpy as np

    s = settings
    dec = Decoder(model_file, s.threads, genai_config)
    if dec.context_length and s.context + s.decode_tokens > dec.context_length:
        raise EdgepeftError(f"latency-check: context {s.context} + {s.decode_tokens} decode tokens exceed the "
                            f"model's {dec.context_length}")
    ref = session(reference_model(reference), s.threads)
    rng = np.random.default_rng(0)
    prompt = random_prompt(dec, s.context, rng)
    x1 = rng.standard_normal((1, reference["hidden"]), dtype=np.float32)
    xp = rng.standard_normal((s.context, reference["hidden"]), dtype=np.float32)

    def bundle():
        first, steps = timed_generation(dec, prompt, s.decode_tokens)
        t = time.perf_counter()
        dec.prefill(prompt, last=True)
        return statistics.median(steps), min(first, time.perf_counter() - t)

    def run_reference():
        steps = []
        for _ in range(s.decode_tokens):
            t = time.perf_counter()
            ref.run(None, {"x": x1})
            steps.append(time.perf_counter() - t)
        pre = []
        for _ in range(2):
            t = time.perf_counter()
            ref.run(None, {"x": xp})
            pre.append(time.perf_counter() - t)
        return statistics.median(steps), min(pre)

    raw = {m: {"bundle": [], "reference": []} for m in METRICS}
    bar = progress(s.warmup + s.rounds, "latency-check", "round", disable=not progress_bar)
    with bar:
        for r in range(s.warmup + s.rounds):
            if r % 2:
                b, q = bundle(), run_reference()
            else:
                q, b = run_reference(), bundle()
            if r >= s.warmup:
                for i, m in enumerate(METRICS):
                    raw[m]["bundle"].append(b[i])
                    raw[m]["reference"].append(q[i])
            bar.update(1)
    out = {}
    for m in METRICS:
        ratios = [b / q for b, q in zip(raw[m]["bundle"], raw[m]["reference"], strict=True)]
        out[m] = {**summarize(ratios, s.confidence), "bundle_ms": 1000 * statistics.median(raw[m]["bundle"]),
                  "reference_ms": 1000 * statistics.median(raw[m]["reference"])}
    return out


def read_baseline(path: Path) -> dict:
    if not path.is_file():
        raise EdgepeftError(f"{path}: no baseline there; record one with --update-baseline")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgepeftError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not all(m in data.get("metrics", {})
                                                                            for m in METRICS):
        raise EdgepeftError(f"{path}: not an {FORMAT} file")
    return data


def _model_of(folder: Path) -> tuple[Path, Path, str]:
    """A bundle (its manifest names the model), or any folder with a model and its genai_config.json."""

    if (Path(folder) / MANIFEST).is_file():
        manifest = read_manifest(folder)
        return folder / manifest["model_file"], folder / "genai_config.json", manifest["name"]
    v = variant_of(folder)
    return v.model_file, v.genai_config, Path(folder).name


def check(bundle: Path, baseline_path: Path, update: bool = False, rounds: int | None = None,
          tolerance: float | None = None, echo=print) -> int:
    """Run the gate; returns the exit status (0 pass, 1 regression). ``update`` records a new baseline."""

    bundle, baseline_path = Path(bundle), Path(baseline_path)
    base = None if update else read_baseline(baseline_path)
    settings = GateSettings(**base["settings"]) if base else GateSettings()
    settings.rounds = GateSettings.rounds if rounds is None else rounds  # the baseline's own count does not carry
    if tolerance is not None:
        settings.tolerance = tolerance
    if settings.rounds < 6:
        raise EdgepeftError(f"latency-check: --rounds {settings.rounds}: at least 6 rounds are needed for a "
                            "confidence interval")
    if not (math.isfinite(settings.tolerance) and 0 <= settings.tolerance < 10):
        raise EdgepeftError(f"latency-check: tolerance {settings.tolerance}: the slowdown allowed must be a "
                            "fraction between 0 and 10 (0.1 = 10%)")
    model_file, genai_config, name = _model_of(bundle)
    if base:
        reference = base.get("reference")
        layers = reference.get("layers") if isinstance(reference, dict) else None
        known = isinstance(layers, int) and MIN_LAYERS <= layers <= MAX_LAYERS and \
            reference == {**REFERENCE, "layers": layers}
        if not known:
            raise EdgepeftError(f"{baseline_path}: recorded against reference workload {reference}, this "
                                f"edgepeft uses {REFERENCE['name']}; record a new baseline with --update-baseline")
    else:
        from edgepeft.latency.costmodel import weight_bytes

        reference = reference_for(weight_bytes(model_file)["read_per_token"])
    result = measure(model_file, genai_config, settings, reference=reference)
    here = machine()
    if update:
        data = {"format": FORMAT, "bundle": name, "model_file": model_file.name,
                "model_sha256": sha256_file(model_file), "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "machine": here, "reference": reference,
                "settings": asdict(settings), "metrics": result}
        baseline_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(baseline_path, json.dumps(data, indent=2) + "\n")
        echo(f"latency-check: baseline recorded in {baseline_path} ({settings.rounds} rounds, {settings.threads} "
             f"thread(s), reference {reference['layers']} int4 pairs = {reference['layers'] * layer_bytes() / 1e6:.0f} "
             f"MB): decode {result['decode']['ratio']:.3f} x reference "
             f"[{result['decode']['ci'][0]:.3f}, {result['decode']['ci'][1]:.3f}], prefill "
             f"{result['prefill']['ratio']:.3f} x [{result['prefill']['ci'][0]:.3f}, {result['prefill']['ci'][1]:.3f}]")
        return 0
    for key, label in (("cpu", "CPU"), ("onnxruntime", "onnxruntime")):
        if base["machine"].get(key) != here[key]:
            echo(f"warning: baseline recorded with {label} {base['machine'].get(key)!r}, this run has {here[key]!r}: "
                 f"ratios cancel speed, not every difference between them")
    pct = int(round(100 * settings.confidence))
    echo(f"latency-check: {name} ({model_file.name}) vs {baseline_path}: {settings.rounds} interleaved rounds, "
         f"{settings.threads} thread(s), context {settings.context}, tolerance +{100 * settings.tolerance:.0f}%, "
         f"{pct}% confidence")
    head = (f"{'metric':<9}{'bundle ms':>11}{'ref ms':>9}{'ratio [' + str(pct) + '% CI]':>26}{'baseline':>10}"
            f"{'change [' + str(pct) + '% CI]':>28}  verdict")
    echo(head)
    failed = []
    for m in METRICS:
        cur, old = result[m], base["metrics"][m]
        v, change, lo, hi = verdict(cur, old, settings.tolerance)
        ci = f"{cur['ratio']:.3f} [{cur['ci'][0]:.3f}, {cur['ci'][1]:.3f}]"
        ch = f"{100 * change:+.1f}% [{100 * lo:+.1f}%, {100 * hi:+.1f}%]"
        word = {"fail": "FAIL: slower", "faster": "faster (consider --update-baseline)", "ok": "ok"}[v]
        echo(f"{m:<9}{cur['bundle_ms']:>11.2f}{cur['reference_ms']:>9.2f}{ci:>26}{old['ratio']:>10.3f}{ch:>28}  {word}")
        if v == "fail":
            failed.append(f"{m} at least {100 * lo:+.1f}% slower")
    if failed:
        echo(f"latency-check: FAILED: {'; '.join(failed)} than the baseline ({pct}% confidence, tolerance "
             f"+{100 * settings.tolerance:.0f}%). If the change is intended, accept it with --update-baseline.")
        return 1
    echo("latency-check: passed")
    return 0
