"""``edgepeft compare-methods`` (``nox -s compare-methods``): every adapter method of a list trained on the same
recipe (model, task, data, step budget, target, gate), taken to a bundle and gated, then all bundles profiled
interleaved with the first (LoRA); one table.

The list is data (``export/compare/methods.toml``): a ``recipe`` and one ``[methods.<name>]`` table per
method, which replaces that recipe's ``[adapter]`` keys. Each method runs in ``<out>/<name>``, siblings, so the
stages before training (load, quantize) are made once and shared, and in a process of its own, so its peak
memory is its own (a process's peak resident set never goes down). A method whose bundle fails the quality gate
still gets its row (the gate's figures are in the bundle); one that fails otherwise gets its error. The table
goes to ``<out>/methods.md`` and ``<out>/methods.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgepeft.core.config import load_toml, plain_name
from edgepeft.core.errors import EdgepeftError
from edgepeft.core.files import write_atomic
from edgepeft.pipeline import recipe as recipe_mod

FORMAT = "edgepeft-methods/1"


def load_methods(path: Path) -> tuple[Path, dict[str, dict]]:
    """(the base recipe's path, {name: [adapter] keys}) of a methods file, checked."""
    data = load_toml(path)
    unknown = set(data) - {"recipe", "methods"}
    if unknown:
        raise EdgepeftError(f"{path}: unknown key {sorted(unknown)[0]!r} (known: recipe, [methods.<name>])")
    if not isinstance(data.get("recipe"), str) or not isinstance(data.get("methods"), dict) or not data["methods"]:
        raise EdgepeftError(f"{path}: needs recipe = \"<recipe>.toml\" and at least one [methods.<name>] table")
    base = (path.parent / data["recipe"]).resolve()
    methods = {}
    for name, table in data["methods"].items():
        if not plain_name(name) or not isinstance(table, dict):
            raise EdgepeftError(f"{path}: [methods.{name}] must be a table with a plain folder name")
        methods[name] = table
    return base, methods


def method_recipe(base: Path, name: str, adapter: dict):
    """The base recipe with ``adapter`` over its [adapter] table, named ``name`` (checked like any recipe)."""
    data = recipe_mod.resolve_extends(load_toml(base), base)
    data = {**data, "name": name, "adapter": {**data.get("adapter", {}), **adapter}}
    return recipe_mod.parse(data, f"{base} with [methods.{name}]", base)


def _quality(bundle: Path) -> dict | None:
    f = bundle / "quality" / "quality.json"
    return json.loads(f.read_text()) if f.is_file() else None


def row(name: str, records: dict, bundle: Path) -> dict:
    """One method's figures from its run's records and its bundle."""
    train = records.get("train", {}).get("figures", {})
    out = {"method": name, "adapter": train.get("method"), "trainable_parameters": train.get("trainable_parameters"),
           "train_seconds_per_step": train.get("step_seconds_median"),
           "tokens_per_second": train.get("tokens_per_second"),
           "peak_memory_bytes": train.get("peak_memory_bytes"),
           "validation_exact_match": train.get("validation_exact_match_adapter"),
           "bundle_bytes": sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()) if bundle.is_dir() else None}
    quality = _quality(bundle)
    if quality:
        f = quality["figures"]
        out.update(gate_passed=quality["passed"], perplexity_increase=f.get("perplexity_increase"), kl=f.get("kl"),
                   next_token_agreement=f.get("next_token_agreement"), exact_match_bundle=f.get("exact_match_bundle"),
                   exact_match_reference=f.get("exact_match_reference"), accuracy_drop=f.get("accuracy_drop"))
    return out


def _latency(rows: list[dict], bundles: dict[str, Path], target, cfg) -> None:
    """Decode and prefill of every bundle, measured interleaved; ratios against the first row's."""
    from edgepeft.latency.profile import measure, variant_of

    have = [r["method"] for r in rows if bundles[r["method"]].is_dir() and "gate_passed" in r]
    if not have:
        return
    result = measure([variant_of(bundles[m], m) for m in have], target, cfg)
    by = {v["label"]: v for v in result["variants"]}
    ref = by[have[0]]
    for r in rows:
        v = by.get(r["method"])
        if v is None:
            continue
        d, p = v["decode"][0], v["prefill"][0]
        r.update(decode_ms=d["median_ms"], decode_context=d["context"], decode_over_floor=d["measured_over_floor"],
                 prefill_ms=p["median_ms"], prefill_tokens=p["tokens"],
                 decode_vs_first=d["median_ms"] / ref["decode"][0]["median_ms"],
                 prefill_vs_first=p["median_ms"] / ref["prefill"][0]["median_ms"])


def _pct(x, signed=False):
    return "-" if x is None else (f"{100 * x:+.1f}%" if signed else f"{100 * x:.1f}%")


def markdown(rows: list[dict], base: Path) -> str:
    first = rows[0]["method"] if rows else "?"
    lines = [f"# Adapter methods on {base.name}", "",
             f"Same recipe, data and step budget for each; latency measured interleaved, ratios against {first}. "
             "Gate figures: the bundle vs its own (4-bit base + adapter) on held-out data.", "",
             "| method | trainable | train s/step | peak MB | val. exact match | bundle MB | decode ms/token "
             f"(x {first}) | prefill ms (x {first}) | perplexity | KL | agreement | exact match (drop) | gate |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} |" + " |" * 11)
            continue
        dec = f"{r['decode_ms']:.2f} ({r['decode_vs_first']:.2f}x)" if "decode_ms" in r else "-"
        pre = f"{r['prefill_ms']:.0f} ({r['prefill_vs_first']:.2f}x)" if "prefill_ms" in r else "-"
        em = (f"{_pct(r['exact_match_bundle'])} ({100 * r['accuracy_drop']:+.1f})"
              if r.get("exact_match_bundle") is not None else "-")
        kl = f"{r['kl']:.3f}" if r.get("kl") is not None else "-"
        gate = {True: "pass", False: "FAIL", None: "-"}[r.get("gate_passed")]
        lines.append(
            f"| {r['method']} ({r['adapter']}) | {r['trainable_parameters']:,} | {r['train_seconds_per_step']:.2f} | "
            f"{r['peak_memory_bytes'] / 1e6:.0f} | {_pct(r['validation_exact_match'])} | "
            f"{r['bundle_bytes'] / 1e6:.1f} | {dec} | {pre} | {_pct(r.get('perplexity_increase'), True)} | {kl} | "
            f"{_pct(r.get('next_token_agreement'))} | {em} | {gate} |")
    return "\n".join(lines) + "\n"


def _toml_value(v) -> str:
    return json.dumps(v)  # strings, numbers, booleans and lists of them read the same in TOML


def recipe_file(base: Path, name: str, adapter: dict, path: Path) -> Path:
    """The method's recipe as a file (``extends`` the base, its own name and [adapter] keys)."""
    lines = [f"# written by edgepeft compare-methods: {base.name} with [methods.{name}]",
             f"extends = {_toml_value(base.as_posix())}", f"name = {_toml_value(name)}", "[adapter]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in adapter.items()]
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def _run_apart(recipe: Path, run_dir: Path) -> str | None:
    """``edgepeft run`` in a process of its own (its output passed through); its error line, or None."""
    import subprocess
    import sys
    import threading

    proc = subprocess.Popen([sys.executable, "-m", "edgepeft", "run", str(recipe), "--out", str(run_dir)],
                            stderr=subprocess.PIPE, text=True, bufsize=1)
    error: list[str] = []

    def relay():
        for line in proc.stderr:
            sys.stderr.write(line)
            if line.startswith("edgepeft: error: "):
                error.append(line[len("edgepeft: error: "):].strip())

    t = threading.Thread(target=relay, daemon=True)
    t.start()
    code = proc.wait()
    t.join()
    if code == 0:
        return None
    return error[0] if error else f"edgepeft run ended with exit code {code}"


def compare_methods(methods_file: Path, out: Path, only: list[str] | None = None, echo=print) -> dict:
    """Run every method of ``methods_file`` (or those in ``only``) through the pipeline into ``out/<name>``; the
    table as a dict (also written to ``out/methods.json`` and ``out/methods.md``)."""
    base, methods = load_methods(Path(methods_file))
    if only:
        missing = [m for m in only if m not in methods]
        if missing:
            raise EdgepeftError(f"{methods_file}: no [methods.{missing[0]}] (has {', '.join(methods)})")
        methods = {k: v for k, v in methods.items() if k in only}
    recipes = {name: method_recipe(base, name, table) for name, table in methods.items()}  # all checked first
    out.mkdir(parents=True, exist_ok=True)
    rows, bundles = [], {}
    for name, recipe in recipes.items():
        echo(f"== {name}: [adapter] {json.dumps(methods[name])}")
        bundles[name] = out / name / "bundle" / recipe.target.name
        path = recipe_file(base, name, methods[name], out / f"{name}.toml")
        error = _run_apart(path, out / name)
        if error and not (error.startswith("[evaluate]") and _quality(bundles[name])):  # a gate failure has a row
            rows.append({"method": name, "error": error})
            echo(f"  {name} failed: {error}")
            continue
        records = {s: json.loads((out / name / s / "record.json").read_text())
                   for s in ("train",) if (out / name / s / "record.json").is_file()}
        rows.append(row(name, records, bundles[name]))
    first = next(iter(recipes.values()))
    _latency(rows, bundles, first.target, first.profile)
    result = {"format": FORMAT, "recipe": str(base), "methods": methods, "rows": rows}
    write_atomic(out / "methods.json", json.dumps(result, indent=1, default=str) + "\n")
    table = markdown(rows, base)
    write_atomic(out / "methods.md", table)
    echo(table)
    return result
