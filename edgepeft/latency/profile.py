"""Latency profile of a bundle: load time, prefill and decode latency by length, memory, the physical floor,
an on-device estimate, and a report (Markdown + PNG plots) written into the bundle and its manifest.

    edgepeft profile BUNDLE [--target NAME] [--json FILE] [--compare MODEL_DIR ...]

How it measures:
- Each variant (the bundle's model, and optionally others side by side, e.g. the fp32 export) runs in its
  own fresh process, so its load time and peak resident memory are its own, not the caller's (the bundle
  stage has PyTorch loaded). Session settings come from the target: threads and execution providers in
  order of preference; a provider this onnxruntime build lacks falls back to the next (finally the CPU),
  with a warning kept in the results.
- A round prefills a random prompt of each length in ``lengths`` and then decodes ``decode_tokens``
  tokens after it through the KV cache, timing every step (batch 1, greedy). Rounds of all variants
  alternate, so a drift of the machine's speed hits them alike; the first ``warmup`` rounds are dropped.
  Prefill: median and p90 over rounds; decode: median and p90 over every timed step of every round.
- The floor of decode (``edgepeft.latency.costmodel``): weight bytes a step reads plus the KV cache, over this
  machine's read bandwidth measured at the same thread count; ``measured / floor`` says how much of the
  memory's speed the runtime uses. The target's device bandwidth turns the same model into an estimate.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgepeft.bundle.manifest import MANIFEST, add_section, open_for_update, read_manifest
from edgepeft.core.config import from_table
from edgepeft.core.console import progress
from edgepeft.core.errors import EdgepeftError, first_line
from edgepeft.core.files import write_atomic
from edgepeft.latency import costmodel
from edgepeft.onnx.decoder import Decoder, context_length, random_prompt, resolve_providers, timed_generation
from edgepeft.pipeline import target as target_mod

FORMAT = "edgepeft-profile/1"
FILES = ("report.md", "profile.json", "decode.png", "prefill.png")


@dataclass
class ProfileConfig:
    lengths: list[int] = field(default_factory=lambda: [128, 512, 1024])  # prompt lengths = decode contexts
    decode_tokens: int = 32  # decode steps timed after each prompt
    repeats: int = 3  # rounds measured
    warmup: int = 1  # rounds dropped first
    compare_fp32: bool = True  # in the pipeline: profile the fp32 export side by side with the bundle

    def check(self) -> str | None:
        if not self.lengths or any(n < 1 for n in self.lengths):
            return "lengths must be a non-empty list of positive token counts"
        if self.decode_tokens < 1 or self.repeats < 1 or self.warmup < 0:
            return "decode_tokens and repeats must be positive, warmup not negative"
        return None


@dataclass
class Variant:
    label: str
    model_file: Path
    genai_config: Path
    adapter: Path | None = None  # a runtime adapter file fed with every run (a multi-adapter bundle's task)


def adapter_variants(folder: Path, manifest: dict, label: str) -> list[Variant]:
    """One variant per runtime adapter of a multi-adapter bundle (none for a bundle without)."""
    from edgepeft.bundle.manifest import inside_path

    return [Variant(f"{label} + {name} ({entry.get('method', '?')})", folder / manifest["model_file"],
                    folder / "genai_config.json", inside_path(folder, entry["file"]))
            for name, entry in sorted(manifest.get("adapters", {}).items())]


# ---------------------------------------------------------------- the measuring process (one per variant)

def _status_mb(key: str) -> float | None:
    """A memory figure of this process from /proc/self/status (Linux), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_now() -> float | None:
    return _status_mb("VmRSS")


def _peak_rss() -> float | None:
    """Peak resident memory of this process. On Linux VmHWM: getrusage's ru_maxrss survives execve, so a
    spawned worker would report its parent's peak (the bundle stage's PyTorch) instead of its own."""
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource
        import sys
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _worker(conn, model_file: str, genai_config: str, threads: int, providers: list[str], lengths: list[int],
            decode_tokens: int, seed: int, adapter: str | None = None) -> None:
    try:
        import numpy as np
        import onnxruntime  # noqa: F401  (imported before the baseline: its libraries are not the model's)

        rss0 = _rss_now()
        chosen, warnings = resolve_providers(providers)
        t0 = time.perf_counter()
        dec = Decoder(Path(model_file), threads, Path(genai_config), chosen, adapter=adapter and Path(adapter))
        load_s = time.perf_counter() - t0
        conn.send({"load_seconds": load_s, "rss_before_load_mb": rss0, "providers": dec.session.get_providers(),
                   "warnings": warnings})
        rng = np.random.default_rng(seed)
        prompts = {n: random_prompt(dec, n, rng) for n in lengths}
        while conn.recv() == "round":
            prefill, steps = {}, {}
            for n in lengths:
                prefill[n], steps[n] = timed_generation(dec, prompts[n], decode_tokens)
            conn.send({"prefill": prefill, "steps": steps})
        conn.send({"peak_rss_mb": _peak_rss()})
    except Exception as e:  # reported by the parent as a one-line error
        conn.send({"error": first_line(e)})


class _Process:
    def __init__(self, variant: Variant, threads: int, providers: list[str], lengths: list[int], decode_tokens: int):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # a clean process: no PyTorch, no thread pools inherited
        self.variant = variant
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, daemon=True,
                                args=(child, str(variant.model_file), str(variant.genai_config), threads, providers,
                                      lengths, decode_tokens, 0, variant.adapter and str(variant.adapter)))
        self.proc.start()
        child.close()
        self.info = self.recv()

    def recv(self) -> dict:
        try:
            msg = self.conn.recv()
        except EOFError:
            raise EdgepeftError(f"profile: the process measuring {self.variant.label} died "
                                f"(exit code {self.proc.exitcode})") from None
        if "error" in msg:
            raise EdgepeftError(f"profile: {self.variant.label} ({self.variant.model_file}): {msg['error']}")
        return msg

    def ask(self, command: str) -> dict:
        self.conn.send(command)
        return self.recv()

    def close(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()


# ---------------------------------------------------------------- measuring, summarising

def machine() -> dict:
    """What the figures were measured on: CPU model, cores, platform, onnxruntime version."""
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "onnxruntime": ort.__version__}


def _pct(xs: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(xs, q))


def measure(variants: list[Variant], target, cfg: ProfileConfig, threads: int | None = None) -> dict:
    """Profile ``variants`` under ``target``'s session settings; the results as a JSON-able dict."""

    warnings: list[str] = []
    if not threads:
        threads = min(target.threads, os.cpu_count() or 1)
        if threads < target.threads:
            warnings.append(f"target {target.name} runs {target.threads} threads; this machine has {threads} cores, "
                            f"so the profile ran {threads}")
    limit = min((context_length(v.genai_config) or math.inf) for v in variants)
    lengths = [n for n in cfg.lengths if n + cfg.decode_tokens <= limit]
    if len(lengths) < len(cfg.lengths):
        warnings.append(f"lengths {[n for n in cfg.lengths if n not in lengths]} do not fit the model's context "
                        f"of {limit} tokens with {cfg.decode_tokens} decode steps; left out")
    if not lengths:
        raise EdgepeftError(f"profile: no length in {cfg.lengths} fits the model's context of {limit} tokens")
    bandwidth = costmodel.read_bandwidth_gbs(threads)
    procs: list[_Process] = []
    try:
        for v in variants:
            procs.append(_Process(v, threads, target.providers, lengths, cfg.decode_tokens))
        rounds = cfg.warmup + cfg.repeats
        samples = {p.variant.label: {"prefill": {n: [] for n in lengths}, "steps": {n: [] for n in lengths}}
                   for p in procs}
        with progress(rounds * len(procs), "profile", "run") as bar:
            for r in range(rounds):
                for p in procs:
                    res = p.ask("round")
                    if r >= cfg.warmup:
                        for n in lengths:
                            samples[p.variant.label]["prefill"][n].append(res["prefill"][n])
                            samples[p.variant.label]["steps"][n].extend(res["steps"][n])
                    bar.update(1)
                # the best read bandwidth seen across the run: a single measurement on a shared machine can
                # land in a neighbour's burst and put the floor above what the runtime itself achieves
                bandwidth = max(bandwidth, costmodel.read_bandwidth_gbs(threads, passes=3))
        peaks = {p.variant.label: p.ask("stop")["peak_rss_mb"] for p in procs}
    finally:
        for p in procs:
            p.close()
    for p in procs:
        warnings += [w for w in p.info["warnings"] if w not in warnings]

    kv = costmodel.kv_bytes_per_position(variants[0].genai_config)
    results = []
    for p in procs:
        v, s, info = p.variant, samples[p.variant.label], p.info
        weights = costmodel.weight_bytes(v.model_file)
        windows = costmodel.attention_windows(v.model_file)
        size = sum(f.stat().st_size for f in v.model_file.parent.glob(v.model_file.name + "*"))
        # what ships: every file of the folder (a bundle: model, tokenizer, configs, manifest), reports aside
        folder = sum(f.stat().st_size for f in v.model_file.parent.rglob("*")
                     if f.is_file() and not f.relative_to(v.model_file.parent).parts[0].startswith(("profile", ".")))
        decode, prefill = [], []
        for n in lengths:
            steps_ms = [1000 * x for x in s["steps"][n]]
            med = statistics.median(steps_ms)
            read = weights["read_per_token"] + costmodel.kv_bytes_read(v.genai_config, windows,
                                                                       n + cfg.decode_tokens / 2)
            floor = costmodel.floor_ms(read, bandwidth)
            row = {"context": n, "median_ms": med, "p90_ms": _pct(steps_ms, 90), "tokens_per_second": 1000 / med,
                   "bytes_read_per_token": int(read), "floor_ms": floor, "measured_over_floor": med / floor}
            est = costmodel.device_estimate(target, read, med / floor)
            if est:
                row["device_estimate"] = est
            decode.append(row)
            pre_ms = [1000 * x for x in s["prefill"][n]]
            prefill.append({"tokens": n, "median_ms": statistics.median(pre_ms), "p90_ms": _pct(pre_ms, 90),
                            "tokens_per_second": n / statistics.median(pre_ms) * 1000})
        rss0, peak = info["rss_before_load_mb"], peaks[v.label]
        results.append({
            "label": v.label, "model_file": v.model_file.name, "model_bytes": size, "folder_bytes": folder,
            "weight_bytes": weights["total"], "weight_bytes_read_per_token": weights["read_per_token"],
            "load_seconds": info["load_seconds"], "providers": info["providers"],
            "peak_rss_mb": peak, "rss_before_load_mb": rss0,
            "model_rss_mb": peak - rss0 if peak is not None and rss0 is not None else None,
            "prefill": prefill, "decode": decode})
    return {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "target": target.name,
            "providers_requested": target.providers,
            "machine": {**machine(), "threads": threads, "read_bandwidth_gbs": round(bandwidth, 2)},
            "settings": {**asdict(cfg), "lengths": lengths}, "kv_bytes_per_position": kv,
            "vocab_size": json.loads(variants[0].genai_config.read_text())["model"]["vocab_size"],
            "device": {k: getattr(target, k) for k in ("device", "device_memory_bandwidth_gbs",
                                                        "device_bandwidth_efficiency", "device_source")},
            "warnings": warnings, "variants": results}


# ---------------------------------------------------------------- the report

def _plots(result: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for kind, xlabel, ylabel in (("decode", "context length (tokens)", "decode latency (ms / token)"),
                                 ("prefill", "prompt length (tokens)", "prefill latency (ms)")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        for i, v in enumerate(result["variants"]):
            rows = v[kind]
            xs = [r["context" if kind == "decode" else "tokens"] for r in rows]
            med = [r["median_ms"] for r in rows]
            p90 = [r["p90_ms"] - r["median_ms"] for r in rows]
            ax.errorbar(xs, med, yerr=[[0] * len(xs), p90], marker="o", capsize=3, color=colors[i % len(colors)],
                        label=f"{v['label']} (median, bar to p90)")
            if kind == "decode":
                ax.plot(xs, [r["floor_ms"] for r in rows], ls="--", color=colors[i % len(colors)],
                        label=f"{v['label']}: memory floor")
        meds = [r["median_ms"] for v in result["variants"] for r in v[kind]]
        if max(meds) > 8 * min(meds):
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        m = result["machine"]
        ax.set_title(f"{kind}: {result['target']}, {m['threads']} threads, {m['cpu'][:40]}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / f"{kind}.png")
        plt.close(fig)


def _markdown(result: dict, title: str) -> str:
    m, s = result["machine"], result["settings"]
    lines = [f"# Latency profile: {title}", "",
             f"Target `{result['target']}`, {m['threads']} threads, providers requested "
             f"{', '.join(result['providers_requested'])}. Measured {result['created']} on {m['cpu']} "
             f"({m['cores']} cores), onnxruntime {m['onnxruntime']}. Batch 1, greedy; {s['repeats']} rounds after "
             f"{s['warmup']} warm-up, variants alternating round by round; decode timed over {s['decode_tokens']} "
             f"steps after each prompt.", ""]
    for w in result["warnings"]:
        lines.append(f"> **Warning:** {w}")
    if result["warnings"]:
        lines.append("")
    n0 = s["lengths"][0]
    lines += ["## Summary", "",
              f"| variant | model size | folder size | load | peak RSS (model) | providers | decode @{n0} ms/token "
              f"(p90) | tokens/s | measured / floor |", "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for v in result["variants"]:
        d = v["decode"][0]
        rss = f"{v['peak_rss_mb']:.0f} MB ({v['model_rss_mb']:.0f} MB)" if v["peak_rss_mb"] is not None else "n/a"
        lines.append(f"| {v['label']} | {v['model_bytes'] / 1e6:.1f} MB | {v['folder_bytes'] / 1e6:.1f} MB | "
                     f"{v['load_seconds']:.2f} s | {rss} | "
                     f"{', '.join(p.replace('ExecutionProvider', '') for p in v['providers'])} | "
                     f"{d['median_ms']:.2f} ({d['p90_ms']:.2f}) | {d['tokens_per_second']:.0f} | "
                     f"{d['measured_over_floor']:.2f} |")
    lines += ["", "## Decode, per token, by context length", "", "![decode latency](decode.png)", "",
              "| variant | context | median ms | p90 ms | tokens/s | bytes read / token | floor ms "
              "| measured / floor |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v in result["variants"]:
        for d in v["decode"]:
            lines.append(f"| {v['label']} | {d['context']} | {d['median_ms']:.2f} | {d['p90_ms']:.2f} | "
                         f"{d['tokens_per_second']:.0f} | {d['bytes_read_per_token'] / 1e6:.1f} MB | "
                         f"{d['floor_ms']:.2f} | {d['measured_over_floor']:.2f} |")
    lines += ["", "## Prefill, by prompt length", "", "![prefill latency](prefill.png)", "",
              "| variant | prompt tokens | median ms | p90 ms | tokens/s |", "|---|---:|---:|---:|---:|"]
    for v in result["variants"]:
        for p in v["prefill"]:
            lines.append(f"| {v['label']} | {p['tokens']} | {p['median_ms']:.1f} | {p['p90_ms']:.1f} | "
                         f"{p['tokens_per_second']:.0f} |")
    kv = result["kv_bytes_per_position"]
    longest, vocab = s["lengths"][-1], result.get("vocab_size")
    if vocab:
        logits_mb = longest * vocab * 4 / 1e6
        lines += ["", f"Peak RSS includes the logits of the longest prefill: the graph returns all {longest} x {vocab} "
                      f"of them in fp32 ({logits_mb:.0f} MB), though generation reads only the last row."]
    lines += ["", "## The physical floor", "",
              f"Batch-1 decode streams every weight matrix once per token, plus the KV cache ({kv / 1e3:.1f} kB "
              f"per position of context). This machine reads memory at {m['read_bandwidth_gbs']:.1f} GB/s with "
              f"{m['threads']} threads (the best of passes over 256 MiB between the rounds), so a step cannot take "
              f"less than bytes read / bandwidth: the floor. Measured / floor is how far the runtime is from that "
              f"limit (1.0 = streaming the weights at full memory speed)."]
    dev = result["device"]
    ests = [(v, d) for v in result["variants"] for d in v["decode"] if "device_estimate" in d]
    if ests:
        e0 = ests[0][1]["device_estimate"]
        lines += ["", f"## Estimate on the device: {dev['device']}", "",
                  f"Peak {e0['peak_gbs']:.1f} GB/s x efficiency {e0['efficiency']:.2f} = "
                  f"{e0['achievable_gbs']:.1f} GB/s; "
                  f"estimate = device floor x the measured/floor ratio found here. An estimate from a model of cost, "
                  f"not a measurement on a phone.", "", f"Source: {dev['device_source']}", "",
                  "| variant | context | device floor ms | estimate ms/token | estimate tokens/s |",
                  "|---|---:|---:|---:|---:|"]
        for v, d in ests:
            e = d["device_estimate"]
            lines.append(f"| {v['label']} | {d['context']} | {e['floor_ms']:.2f} | {e['estimate_ms']:.2f} | "
                         f"{e['estimate_tokens_per_second']:.0f} |")
    return "\n".join(lines) + "\n"


def write_report(result: dict, folder: Path, title: str) -> dict:
    """Write report.md, profile.json and the plots into ``folder``; returns the manifest's reference to them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "profile.json").write_text(json.dumps(result, indent=2) + "\n")
    _plots(result, folder)
    (folder / "report.md").write_text(_markdown(result, title))
    return report_entry(result, folder.name)


def report_entry(result: dict, name: str) -> dict:
    """The manifest's reference to a report written into the bundle's folder ``name``."""
    return {"target": result["target"], "report": f"{name}/report.md", "data": f"{name}/profile.json",
            "plots": [f"{name}/decode.png", f"{name}/prefill.png"]}


def headline(result: dict) -> dict:
    """The bundle's (first variant's) figures at the first length, for stage records and summaries."""
    v = result["variants"][0]
    d, p = v["decode"][0], v["prefill"][0]
    out = {"decode_ms_per_token": d["median_ms"], "decode_p90_ms": d["p90_ms"], "context_tokens": d["context"],
           "prefill_ms": p["median_ms"], "prompt_tokens": p["tokens"], "measured_over_floor": d["measured_over_floor"],
           "floor_ms": d["floor_ms"], "load_seconds": v["load_seconds"], "peak_rss_mb": v["peak_rss_mb"],
           "read_bandwidth_gbs": result["machine"]["read_bandwidth_gbs"], "threads": result["machine"]["threads"]}
    if "device_estimate" in d:
        out["device_estimate_ms_per_token"] = d["device_estimate"]["estimate_ms"]
    return out


# ---------------------------------------------------------------- `edgepeft profile BUNDLE`

def variant_of(path: Path, label: str | None = None) -> Variant:
    """A bundle folder, a folder with model.onnx + genai_config.json, or a model file next to its config."""
    path = Path(path)
    if path.is_dir():
        name = read_manifest(path)["model_file"] if (path / MANIFEST).is_file() else "model.onnx"
        model = path / name
    else:
        model = path
    cfg = model.parent / "genai_config.json"
    if not model.is_file() or not cfg.is_file():
        raise EdgepeftError(f"{path}: no model file with a genai_config.json next to it")
    return Variant(label or model.parent.name, model, cfg)


def profile_bundle(bundle: Path, cfg: ProfileConfig | None = None, target_spec: str | None = None,
                   compare: list[Path] = (), json_out: Path | None = None, write: bool = True) -> dict:

    bundle = Path(bundle)
    if json_out and not Path(json_out).parent.is_dir():  # said now, not after minutes of measuring
        raise EdgepeftError(f"--json {json_out}: folder {Path(json_out).parent} does not exist")
    manifest = open_for_update(bundle)
    if target_spec:
        target = target_mod.load(target_spec)
    else:
        target = target_mod.from_manifest(manifest["target"], f"{bundle}/manifest.json [target]")
    if cfg is None:  # the settings the bundle was profiled with when it was made
        cfg = from_table(ProfileConfig, manifest.get("recipe", {}).get("profile"), f"{bundle}/manifest.json [profile]")
    own = target.name == manifest["target"]["name"]
    label = f"bundle ({manifest['target'].get('weights', '?')}, {manifest['model_file']})"
    variants = [Variant(label, bundle / manifest["model_file"], bundle / "genai_config.json"),
                *adapter_variants(bundle, manifest, "bundle")]
    for p in compare:  # labels key the results: two folders of the same name are told apart by their path
        v = variant_of(p)
        variants.append(v if all(v.label != u.label for u in variants) else variant_of(p, str(p)))
    result = measure(variants, target, cfg)
    if json_out:
        write_atomic(Path(json_out), json.dumps(result, indent=2) + "\n")
    if write:
        folder = "profile" if own else f"profile-{target.name}"
        ref = report_entry(result, folder)
        written = add_section(bundle, manifest, folder, lambda tmp: write_report(result, tmp, manifest["name"]),
                              profiles={**manifest.get("profiles", {}), folder: ref})
        result["written_to"] = str(written)
    return result
