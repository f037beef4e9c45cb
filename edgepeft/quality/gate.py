"""The quality gate: never ship a bundle that lost the fine-tune.

The bundle is measured as shipped (its model file in ONNX Runtime, its answers through onnxruntime-genai)
against the model the user actually trained, (4-bit base + adapter) in PyTorch:

* on held-out prose (``text``: by default the evaluation part of Python's help topics, or any text file or
  JSONL): perplexity of both, KL divergence and next-token agreement with the reference;
* on the task's test split (or validation examples): exact match of greedy answers, bundle and reference.

The budgets (the recipe's ``[evaluate]`` table; ``inf`` disables one) are checked, and the figures, the
budgets and the verdict are written into the bundle either way (``quality/report.md``,
``quality/quality.json``, ``manifest["quality"]``, re-sealed), so a failed bundle says why it failed. The
evaluate stage and ``edgepeft evaluate BUNDLE`` both run ``evaluate_bundle``.

Evaluation data never overlaps calibration or training data (``edgepeft.calib.sets``): held-out lines seen
in calibration or training and test prompts seen in training are dropped, and the figures count them.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from edgepeft.bundle.manifest import adapter_sha256, add_section, inside_path, open_for_update
from edgepeft.bundle.runner import Runner
from edgepeft.calib.data import recipe_splits
from edgepeft.calib.sets import disjoint_samples, evaluation_text
from edgepeft.calib.text import token_windows
from edgepeft.core.config import as_dict
from edgepeft.core.console import progress
from edgepeft.core.errors import EdgepeftError
from edgepeft.onnx.decoder import Decoder
from edgepeft.pipeline.target import from_manifest
from edgepeft.quality import reference as torch_reference
from edgepeft.quality.answers import matcher, share_matched
from edgepeft.quality.reference import Reference
from edgepeft.quality.scores import Budgets, fmt_value, passed, score, table, verdict

FOLDER = "quality"


@dataclass
class EvaluateConfig:
    text: str = "builtin:python-docs"  # held-out prose (its evaluation part), a text file, or JSONL
    windows: int = 8
    window_tokens: int = 256
    test_examples: int = 512  # task prompts answered (0: skip); built-in tasks' test split (512: see calib)
    max_new_tokens: int = 48
    # Budgets against (4-bit base + adapter); `inf` (or 0 for the minimum) switches one off.
    max_perplexity_increase: float = 0.15  # 0.15: perplexity at most 15% above the reference's
    max_kl: float = 0.25  # mean KL(reference || bundle) per token, nats
    min_next_token_agreement: float = 0.75
    max_accuracy_drop: float = 0.05  # exact match, in absolute terms: 0.05 = 5 points below the reference

    def check(self) -> str | None:
        if self.windows <= 0 or self.window_tokens <= 1 or self.test_examples < 0 or self.max_new_tokens <= 0:
            return "windows, window_tokens, max_new_tokens must be positive and test_examples not negative"
        return self.budgets().problems()

    def budgets(self) -> Budgets:
        def on(v):
            return None if math.isinf(v) else v

        return Budgets(on(self.max_perplexity_increase), on(self.max_kl),
                       self.min_next_token_agreement or None, on(self.max_accuracy_drop))


def heldout(recipe, cfg: EvaluateConfig, tokenizer) -> tuple[list[list[int]], dict]:

    text, about = evaluation_text(recipe, cfg.text, recipe.requantize.calib_text)
    windows = token_windows(tokenizer, text, cfg.windows, cfg.window_tokens, spread=True)
    if not windows:
        raise EdgepeftError(f"[evaluate] text {cfg.text!r} has no window of {cfg.window_tokens} tokens left once "
                            f"the lines seen in calibration or training are removed "
                            f"({about['lines_dropped_as_seen_in_calibration_or_training']} dropped)")
    return windows, {**about, "windows": len(windows), "window_tokens": cfg.window_tokens}


def test_prompts(recipe, cfg: EvaluateConfig):

    if not cfg.test_examples:
        return [], None, 0
    splits = recipe_splits(recipe)
    split = "test" if "test" in splits else "validation"
    samples = [s for s in splits[split] if s.reference is not None]
    samples, dropped = disjoint_samples(samples, splits["train"])
    return samples[:cfg.test_examples], split, dropped


def bundle_exact_match(runner, samples, match, max_new_tokens: int) -> tuple[float, list[str], float]:

    hits, answers, tokens, seconds = 0, [], 0, 0.0
    with progress(len(samples), "exact match (bundle)", "example") as bar:
        for s in samples:
            ids = runner.prompt_ids(messages=list(s.messages[:-1])) if s.messages else runner.prompt_ids(text=s.prompt)
            a = runner.generate(ids, max_new_tokens)
            answers.append(a.text)
            hits += match(a.text, s.reference)
            tokens += a.tokens
            seconds += a.seconds
            bar.update(1)
    return hits / len(samples), answers, tokens / seconds if seconds else float("nan")


def measure(bundle: Path, manifest: dict, recipe, cfg: EvaluateConfig, reference: Reference,
            adapter: str | None = None) -> dict:
    """Every quality figure of the bundle (with runtime adapter ``adapter`` active) against the reference
    (no verdict)."""
    from transformers import AutoTokenizer

    target = from_manifest(manifest["target"], f"{bundle}/manifest.json [target]")
    tokenizer = AutoTokenizer.from_pretrained(reference.adapter)
    windows, about = heldout(recipe, cfg, tokenizer)
    ref_model = reference.load()
    with progress(len(windows), "held-out text (4-bit base + adapter)", "window") as bar:
        ref_logits = torch_reference.logits(ref_model, windows, bar.update)
    feeds = inside_path(bundle, manifest["adapters"][adapter]["file"]) if adapter else None
    dec = Decoder(bundle / manifest["model_file"], target.threads, bundle / "genai_config.json", adapter=feeds)
    with progress(len(windows), "held-out text (bundle)", "window") as bar:
        logits = []
        for w in windows:
            logits.append(dec.prefill(w)[0])
            bar.update(1)
    del dec
    figures = {"reference": "4-bit base + adapter (PyTorch)", "held_out_text": about,
               **score(ref_logits, logits, windows)}
    samples, split, dropped = test_prompts(recipe, cfg)
    if samples:
        match = matcher(recipe.train.data)
        runner = Runner(bundle, manifest, adapter)
        acc, answers, tps = bundle_exact_match(runner, samples, match, cfg.max_new_tokens)
        del runner
        with progress(len(samples), "exact match (4-bit base + adapter)", "example") as bar:
            ref_answers, cached = reference.answers(ref_model, tokenizer, samples, cfg.max_new_tokens, bar.update)
        ref_acc = share_matched(ref_answers, samples, match)
        shown = [{"prompt": s.messages[-2][1] if s.messages else s.prompt, "bundle": a, "reference_model": r,
                  "expected": s.reference}
                 for s, a, r in zip(samples, answers, ref_answers, strict=True) if a.strip() != r.strip()][:8]
        figures.update(task_split=split, task_examples=len(samples), task_examples_dropped_as_seen_in_training=dropped,
                       exact_match_bundle=acc, exact_match_reference=ref_acc, accuracy_drop=ref_acc - acc,
                       generate_tokens_per_second=tps, reference_answers_cached=cached, answers_that_differ=shown)
    return figures


def report(name: str, result: dict) -> str:

    f, rows = result["figures"], result["rows"]
    lines = [f"# Quality gate: {name}", "", f"**{'PASSED' if result['passed'] else 'FAILED'}**: the bundle "
             "(ONNX Runtime) against the model that was trained, (4-bit base + adapter) in PyTorch.", "",
             "| budget | measured | allowed | result |", "|---|---|---|---|"]
    for r in rows:
        b = r["budget"]
        lines.append(f"| {b} | {fmt_value(b, r['measured'])} | {fmt_value(b, r['allowed'])} | "
                     f"{'pass' if r['passed'] else 'FAIL by ' + fmt_value(b, r['by'])} |")
    h = f["held_out_text"]
    lines += ["", "## Held-out text", "",
              f"{f['tokens']} tokens of `{h['text']}` ({h['windows']} windows of {h['window_tokens']}); "
              f"{h['lines_dropped_as_seen_in_calibration_or_training']} lines dropped because calibration or "
              "training saw them.", "",
              f"- perplexity: reference {f['perplexity_reference']:.3f}, bundle {f['perplexity']:.3f} "
              f"({100 * f['perplexity_increase']:+.1f}%)",
              f"- KL(reference || bundle): {f['kl']:.4f} nats/token",
              f"- next-token agreement: {100 * f['next_token_agreement']:.1f}%"]
    if "exact_match_bundle" in f:
        lines += ["", "## Task", "",
                  f"Exact match on {f['task_examples']} {f['task_split']} prompts "
                  f"({f['task_examples_dropped_as_seen_in_training']} dropped because training saw them): "
                  f"reference {100 * f['exact_match_reference']:.1f}%, bundle {100 * f['exact_match_bundle']:.1f}% "
                  f"({-100 * f['accuracy_drop']:+.1f} points)."
                  + (" The reference's answers came from edgepeft's cache (same base and adapter files, prompts, "
                     "settings and library versions)." if f.get("reference_answers_cached") else "")]
        if f["answers_that_differ"]:
            lines += ["", "| prompt | bundle | reference model | expected |", "|---|---|---|---|"]
            for a in f["answers_that_differ"]:
                cells = [str(a[k]).replace("|", "\\|").replace("\n", " ") for k in
                         ("prompt", "bundle", "reference_model", "expected")]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate_bundle(bundle: Path, recipe, cfg: EvaluateConfig, reference: Reference, echo=print,
                    adapter: str | None = None) -> dict:
    """Measure, judge, write the verdict into the bundle and re-seal it; returns the result (no raise).
    ``adapter``: judge that runtime adapter of a multi-adapter bundle (``recipe`` is its task's, ``reference``
    the 4-bit base with that task's adapter); its verdict goes into ``quality-<adapter>/`` and the manifest's
    ``adapters.<adapter>.quality``."""

    bundle = Path(bundle)
    manifest = open_for_update(bundle)
    entry = manifest.get("adapters", {}).get(adapter) if adapter else None
    if adapter and entry is None:
        raise EdgepeftError(f"{bundle}: no runtime adapter {adapter!r} in the bundle")
    want = entry["adapter_sha256"] if entry else manifest.get("adapter_sha256")
    if want and adapter_sha256(reference.adapter) != want:
        raise EdgepeftError(f"{reference.adapter}: not the adapter this bundle was made from (its hash differs "
                            "from the manifest's adapter_sha256)")

    figures = measure(bundle, manifest, recipe, cfg, reference, adapter)
    rows = verdict(figures, cfg.budgets())
    result = {"format": "edgepeft-quality/1", "passed": passed(rows), "rows": rows, "figures": figures,
              "budgets": as_dict(cfg.budgets()), "settings": as_dict(cfg),
              "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    def fill(folder: Path) -> None:
        (folder / "quality.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        (folder / "report.md").write_text(report(manifest["name"], result))

    folder = f"{FOLDER}-{adapter}" if adapter else FOLDER
    summary = {"passed": result["passed"], "report": f"{folder}/report.md", "rows": rows,
               **{k: figures[k] for k in ("perplexity_reference", "perplexity", "perplexity_increase", "kl",
                                          "next_token_agreement", "exact_match_bundle", "exact_match_reference",
                                          "accuracy_drop") if k in figures}}
    if adapter:
        entries = {"adapters": {**manifest["adapters"], adapter: {**entry, "quality": summary}}}
    else:
        entries = {"quality": summary}
    add_section(bundle, manifest, folder, fill, **entries)
    em = (f"; exact match {100 * figures['exact_match_bundle']:.1f}% vs {100 * figures['exact_match_reference']:.1f}%"
          f" on {figures['task_examples']} {figures['task_split']} prompts" if "exact_match_bundle" in figures else "")
    who = f"[{adapter}] " if adapter else ""
    echo(f"  {who}vs (4-bit base + adapter) on {figures['tokens']} held-out tokens: perplexity "
         f"{figures['perplexity_reference']:.2f} -> {figures['perplexity']:.2f} "
         f"({100 * figures['perplexity_increase']:+.1f}%), KL {figures['kl']:.3f}, agreement "
         f"{100 * figures['next_token_agreement']:.1f}%{em}")
    echo(table(rows))
    return result


def failure(name: str, result: dict) -> str:

    broken = [r for r in result["rows"] if not r["passed"]]
    return (f"[evaluate] {name} broke {len(broken)} quality budget(s) against (4-bit base + adapter):\n"
            f"{table(result['rows'])}\n(the figures are in the bundle's quality/report.md; loosen the budgets "
            "in the recipe's [evaluate] table, or keep more precision: [requantize] method, the target's "
            "block_size/bits)")
