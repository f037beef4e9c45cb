"""Command line: ``edgepeft run RECIPE`` runs the pipeline; each stage is also a subcommand.

User mistakes (bad recipe, missing model, bad data) end with one ``edgepeft: error: ...`` line and exit
status 2; no traceback. ``EDGEPEFT_DEBUG=1`` shows the traceback of any error.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from edgepeft import __version__
from edgepeft.bundle.manifest import MANIFEST, check_files, gate_failure, read_manifest
from edgepeft.bundle.runner import Runner, verify
from edgepeft.core.console import mb, quiet
from edgepeft.core.errors import EdgepeftError
from edgepeft.latency import check as latency_check
from edgepeft.latency.profile import ProfileConfig, headline, profile_bundle
from edgepeft.pipeline import recipe as recipe_mod
from edgepeft.pipeline.layout import RunDir
from edgepeft.pipeline.runner import run_stages
from edgepeft.quality.gate import evaluate_bundle, failure
from edgepeft.quality.reference import Reference
from edgepeft.stages.registry import STAGES

# errors of the machine a user fixes there (disk space, permissions), reported in one line
USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


def _run_dir(args, recipe) -> RunDir:
    run = RunDir(args.out) if args.out else RunDir.default(recipe.name)
    if run.path.exists() and not run.path.is_dir():
        raise EdgepeftError(f"--out {run.path}: a file is there; the run folder must be a folder")
    return run


def _run(args, first=None, last=None) -> int:

    quiet()
    recipe = recipe_mod.load(args.recipe)
    run_dir = _run_dir(args, recipe)
    records = run_stages(STAGES, recipe, run_dir, first=first or args.__dict__.get("from_stage"),
                         last=last or args.__dict__.get("to_stage"), force=args.force,
                         options={"resume": getattr(args, "resume", False)})
    if records:  # under a distributed launcher only the main process reports
        summary(records)
        print(f"run folder: {run_dir}")
        if "bundle" in records:
            print(f"bundle: {run_dir.bundle(recipe.target.name)}")
    return 0


def _verify(args) -> int:

    quiet()
    problems, sample = verify(Path(args.bundle))
    gate = gate_failure(read_manifest(Path(args.bundle))) if not problems else None
    if gate and args.allow_failed_gate:
        print(f"edgepeft: warning: {gate}", file=sys.stderr)
    elif gate:
        problems = [f"{gate} (--allow-failed-gate accepts it)"]
    if problems:
        for p in problems:
            print(f"FAIL {p}", file=sys.stderr)
        print(f"edgepeft: verify: {args.bundle}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"OK {args.bundle}: every file matches its manifest; the model loads and generates ({sample!r})")
    return 0


def _generate(args) -> int:

    folder = Path(args.bundle)
    manifest = read_manifest(folder)
    if not args.no_check:
        problems = check_files(folder, manifest)
        if problems:
            raise EdgepeftError(f"{folder}: bundle does not match its manifest ({problems[0]}); "
                                f"run `edgepeft verify {folder}`")
    gate = gate_failure(manifest)
    if gate:
        print(f"edgepeft: warning: {gate}", file=sys.stderr)
    answer = Runner(folder, manifest, args.adapter).chat(args.prompt, system=args.system,
                                                         max_new_tokens=args.max_new_tokens)
    print(answer.text)
    return 0


def _profile(args) -> int:

    cfg = None
    if args.lengths is not None or args.repeats is not None:
        cfg = ProfileConfig(**{k: v for k, v in (("lengths", args.lengths), ("repeats", args.repeats))
                               if v is not None})
        problem = cfg.check()
        if problem:
            raise EdgepeftError(f"profile: {problem}")
    result = profile_bundle(Path(args.bundle), cfg, args.target, [Path(p) for p in args.compare],
                            Path(args.json) if args.json else None, write=not args.no_report)
    for w in result["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    for v in result["variants"]:
        rss = f", peak RSS {v['peak_rss_mb']:.0f} MB" if v["peak_rss_mb"] is not None else ""
        print(f"{v['label']}: model {v['model_bytes'] / 1e6:.1f} MB, folder {v['folder_bytes'] / 1e6:.1f} MB, "
              f"load {v['load_seconds']:.2f} s{rss}")
        for d, p in zip(v["decode"], v["prefill"], strict=True):
            est = (f", device estimate {d['device_estimate']['estimate_ms']:.2f} ms" if "device_estimate" in d else "")
            print(f"  {d['context']:>5} tokens: prefill {p['median_ms']:8.1f} ms (p90 {p['p90_ms']:.1f}); decode "
                  f"{d['median_ms']:6.2f} ms/token (p90 {d['p90_ms']:.2f}, {d['tokens_per_second']:.0f} tok/s), "
                  f"floor {d['floor_ms']:.2f} ms, measured/floor {d['measured_over_floor']:.2f}{est}")
    h = headline(result)
    print(f"memory read bandwidth {h['read_bandwidth_gbs']:.1f} GB/s at {result['machine']['threads']} threads")
    if "written_to" in result:
        print(f"report: {result['written_to']}/report.md (manifest re-sealed)")
    if args.json:
        print(f"json: {args.json}")
    return 0


def _evaluate(args) -> int:
    """``edgepeft evaluate RECIPE`` runs the stage; ``edgepeft evaluate BUNDLE`` judges a bundle folder."""

    bundle = Path(args.recipe)
    if not (bundle.is_dir() and (bundle / MANIFEST).is_file()):
        if args.run:
            raise EdgepeftError("--run goes with a bundle folder, not a recipe")
        return _run(args, "evaluate", "evaluate")

    quiet()
    recipe = recipe_mod.from_manifest(read_manifest(bundle), f"{bundle}/{MANIFEST}")
    run_dir = Path(args.run) if args.run else RunDir.of_bundle(bundle).path
    if recipe.tasks.names:  # each runtime adapter against its own reference
        failed = 0
        for name in recipe.tasks.names:
            task = recipe.task(name)
            result = evaluate_bundle(bundle, task, task.evaluate, Reference.of_run(run_dir, name), adapter=name)
            print(f"report: {bundle / ('quality-' + name) / 'report.md'} (manifest re-sealed)")
            if not result["passed"]:
                print(f"edgepeft: {failure(f'{recipe.name} (adapter {name})', result)}", file=sys.stderr)
                failed = 1
        return failed
    result = evaluate_bundle(bundle, recipe, recipe.evaluate, Reference.of_run(run_dir))
    print(f"report: {bundle / 'quality' / 'report.md'} (manifest re-sealed)")
    if not result["passed"]:
        print(f"edgepeft: {failure(recipe.name, result)}", file=sys.stderr)
        return 1
    return 0


def _latency_check(args) -> int:

    return latency_check.check(Path(args.bundle), Path(args.baseline), update=args.update_baseline, rounds=args.rounds,
                 tolerance=args.tolerance)


def summary(records: dict[str, dict]) -> None:
    """The figures a user asked for, one line each, from the stage records."""

    lines = []
    if "quantize" in records:
        f = records["quantize"]["figures"]
        lines.append(f"weights: {mb(f['weight_bytes_before'])} fp32 -> {mb(f['weight_bytes_after'])} "
                     f"{f['quant_type']} ({f['ratio']}x)")
    if "train" in records:
        figs = records["train"]["figures"]
        for task, f in (figs.get("tasks") or {None: figs}).items():
            who = f"[{task}] " if task else ""
            lines.append(f"{who}adapter: {f['method']}, {f['trainable_parameters']:,} trainable parameters, "
                         f"{f.get('step_seconds_median', float('nan')):.2f} s/step, "
                         f"peak memory {mb(f['peak_memory_bytes'])}")
            if "validation_exact_match_adapter" in f:
                lines.append(f"{who}validation exact match: 4-bit base {100 * f['validation_exact_match_base']:.1f}% "
                             f"-> 4-bit base + adapter {100 * f['validation_exact_match_adapter']:.1f}%")
    if "merge" in records:
        f = records["merge"]["figures"]
        lines.append(f"merge: max |logit diff| vs ({f['reference']}) {f['max_logit_diff']:.2e}, "
                     f"next-token agreement {100 * f['prose']['next_token_agreement']:.2f}%")
    if "export" in records:
        f = records["export"]["figures"]
        lines.append(f"export: fp32 ONNX ({f['exporter']}), max |logit diff| vs merged PyTorch "
                     f"{f['max_logit_diff']:.2e}")
    if "requantize" in records:
        f = records["requantize"]["figures"]
        c = f["calibration_scores"]["final"]
        lines.append(f"requantize: {f['weights']} block {f['block_size']} ({f['method']}, {f['int8_matmuls']} of "
                     f"{f['matmulnbits']} MatMuls kept at int8): {mb(f['fp32_bytes'])} -> {mb(f['quantized_bytes'])}; "
                     f"on calibration data vs fp32: perplexity {100 * c['perplexity_increase']:+.1f}%, "
                     f"agreement {100 * c['next_token_agreement']:.1f}%")
    if records.get("heal", {}).get("figures", {}).get("healed"):
        f = records["heal"]["figures"]
        b, a = f["calibration_before"], f["calibration_after"]
        lines.append(f"heal: {f['scales']:,} scales + {f['norm_weights']:,} norm weights fitted in {f['steps']} steps "
                     f"({f['fit_seconds']:.0f} s, {f['activation_rounding'] or 'float'} activations); on calibration "
                     f"data vs (4-bit base + adapter): KL {b['kl']:.3f} -> {a['kl']:.3f}, agreement "
                     f"{100 * b['next_token_agreement']:.1f}% -> {100 * a['next_token_agreement']:.1f}%")
    if "bundle" in records:
        f = records["bundle"]["figures"]
        lines.append(f"bundle size {mb(f['bundle_bytes'])}; decode {f['decode_ms_per_token']:.2f} ms/token "
                     f"({f['measured_over_floor']:.2f}x the memory floor), prefill {f['prompt_tokens']} tokens "
                     f"{f['prefill_ms']:.0f} ms at {f['threads']} threads")
        if "device_estimate_ms_per_token" in f:
            lines.append(f"on-device estimate ({f.get('device', 'target device')}): decode "
                         f"{f['device_estimate_ms_per_token']:.2f} ms/token")
    if "evaluate" in records:
        figs = records["evaluate"]["figures"]
        for task, f in (figs.get("tasks") or {None: figs}).items():
            em = (f"; exact match {100 * f['exact_match_bundle']:.1f}% vs {100 * f['exact_match_reference']:.1f}% on "
                  f"{f['task_examples']} {f['task_split']} prompts" if "exact_match_bundle" in f else "")
            lines.append(f"{f'[{task}] ' if task else ''}quality gate {'passed' if f['passed'] else 'FAILED'} vs "
                         f"(4-bit base + adapter): perplexity {100 * f['perplexity_increase']:+.1f}%, KL "
                         f"{f['kl']:.3f}, agreement {100 * f['next_token_agreement']:.1f}%{em}")
    if lines:
        print("summary:\n  " + "\n  ".join(lines))


def build_parser() -> argparse.ArgumentParser:

    p = argparse.ArgumentParser(prog="edgepeft",
                                description="Fine-tune a small LM QLoRA-style and ship it to the edge.")
    p.add_argument("--version", action="version", version=f"edgepeft {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("recipe", help="recipe TOML (e.g. export/android.toml)")
        sp.add_argument("--out", help="run folder (default: dist/<recipe name>)")
        sp.add_argument("--force", action="store_true", help="rerun stages even when unchanged")

    names = [s.name for s in STAGES]
    r = sub.add_parser("run", help="run the recipe's stages in order, skipping unchanged ones")
    common(r)
    r.add_argument("--from", dest="from_stage", metavar="STAGE", choices=names,
                   help="start at STAGE (earlier stages must have run)")
    r.add_argument("--to", dest="to_stage", metavar="STAGE", choices=names, help="stop after STAGE")
    r.add_argument("--resume", action="store_true", help="continue training from the last checkpoint")
    r.set_defaults(func=_run)
    for stage in STAGES:
        sp = sub.add_parser(stage.name, help=stage.description + " (one stage; earlier ones must have run)")
        common(sp)
        if stage.name == "train":
            sp.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
        sp.set_defaults(func=lambda a, n=stage.name: _run(a, n, n))
        if stage.name == "evaluate":  # `edgepeft evaluate BUNDLE` judges an existing bundle
            sp.add_argument("--run", metavar="DIR", help="with a bundle: the run folder holding its trained reference "
                                                         "(default: the bundle's own, two levels up)")
            sp.set_defaults(func=_evaluate)
    v = sub.add_parser("verify", help="re-hash every file of a bundle against its manifest, load it, generate")
    v.add_argument("bundle", help="bundle folder (dist/<recipe>/bundle/<target>)")
    v.add_argument("--allow-failed-gate", action="store_true",
                   help="pass a bundle whose manifest says its quality gate failed (with a warning)")
    v.set_defaults(func=_verify)
    pr = sub.add_parser("profile", help="latency profile of a bundle: load, prefill, decode by context, memory, "
                                        "floor, device estimate; report written into the bundle")
    pr.add_argument("bundle", help="bundle folder")
    pr.add_argument("--target", help="profile under another target's settings (default: the bundle's own)")
    pr.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    pr.add_argument("--compare", metavar="MODEL", action="append", default=[],
                    help="another model side by side: a bundle, or a folder with model.onnx + genai_config.json")
    pr.add_argument("--lengths", type=int, nargs="+", metavar="N", help="prompt/context lengths (default: recipe's)")
    pr.add_argument("--repeats", type=int, help="rounds measured (default: recipe's)")
    pr.add_argument("--no-report", action="store_true", help="do not write the report into the bundle")
    pr.set_defaults(func=_profile)
    lc = sub.add_parser("latency-check", help="CI gate: fail when a bundle decodes or prefills slower than its "
                                              "baseline (ratios to a reference workload, with confidence)")
    lc.add_argument("bundle", help="bundle folder (or any folder with model.onnx and genai_config.json)")
    lc.add_argument("--baseline", required=True, metavar="FILE", help="baseline JSON (e.g. export/baselines/...)")
    lc.add_argument("--update-baseline", action="store_true", help="measure and write FILE as the new baseline")
    lc.add_argument("--rounds", type=int, help="interleaved rounds (default: the baseline's, 20)")
    lc.add_argument("--tolerance", type=float, help="slowdown allowed, e.g. 0.1 = 10%% (default: the baseline's)")
    lc.set_defaults(func=_latency_check)
    cm = sub.add_parser("compare-methods", help="every adapter method of a list through the pipeline on one recipe, "
                                                "profiled interleaved; one table")
    cm.add_argument("methods", nargs="?", default="export/compare/methods.toml",
                    help="methods file (default: export/compare/methods.toml)")
    cm.add_argument("--out", default="dist/compare", help="folder of the runs and the table (default: dist/compare)")
    cm.add_argument("--only", metavar="NAME", action="append", help="run only this method (repeatable)")
    cm.set_defaults(func=_compare_methods)
    g = sub.add_parser("generate", help="answer a prompt with a bundle alone (onnxruntime-genai)")
    g.add_argument("bundle", help="bundle folder")
    g.add_argument("prompt", help="the user's message")
    g.add_argument("--system", help="system prompt (default: the one the adapter was trained with, if any)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--no-check", action="store_true", help="skip re-hashing the files first")
    g.add_argument("--adapter", metavar="NAME", help="a multi-adapter bundle's runtime adapter to answer with "
                                                     "(default: none, the shared base)")
    g.set_defaults(func=_generate)
    return p


def _compare_methods(args) -> int:
    from edgepeft.compare import compare_methods

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EdgepeftError(f"--out {out} is a file, not a folder")
    result = compare_methods(Path(args.methods), out, args.only)
    return 0 if all("error" not in r for r in result["rows"]) else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except EdgepeftError as e:
        if os.environ.get("EDGEPEFT_DEBUG"):
            raise
        print(f"edgepeft: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # the machine, not edgepeft: a full disk, a read-only or forbidden folder. Said in one line; every stage
        # and bundle section is written to a temporary path first, so nothing half-written is left behind.
        if os.environ.get("EDGEPEFT_DEBUG") or e.errno not in USER_OS_ERRORS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"edgepeft: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgepeft: interrupted (finished stages are kept; `--resume` continues training)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
