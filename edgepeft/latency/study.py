"""How far the latency gate can be trusted on this machine: false alarms and detections, measured.

    python -m edgepeft.latency.study dist/android [--runs 10]      (``nox -s latency-study``)

Records a baseline for the run's bundle, then runs the gate ``--runs`` times on the unchanged bundle on a
quiet machine and ``--runs`` times while another process keeps one core busy (a pure-Python busy loop),
then once each (quiet and busy) on regressed copies of the bundle built from the same fp32 export:

- ``fp32 activations``: the same int4 weights computed with fp32 activations (MatMulNBits accuracy_level 1);
- ``int4 block 16``: twice the scales (a common "more accurate" setting);
- ``int8 weights``: weight-only int8 instead of int4;
- ``no weight quantization``: the fp32 export as it is;
- ``no graph optimizations``: the int4 graph converted to ORT format with optimizations off (the builder's
  graph is fused already, so this one is expected to change little: a check that the gate does not cry wolf).

Prints one line per condition: runs, passes, fails, and the median decode/prefill change it saw.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from edgepeft.bundle.manifest import read_manifest
from edgepeft.latency.check import check
from edgepeft.onnx.decoder import options
from edgepeft.onnx.mixed import quantize
from edgepeft.onnx.ortformat import to_ort
from edgepeft.pipeline.layout import RunDir
from edgepeft.pipeline.target import from_manifest


def _regressed(bundle: Path, run: RunDir, work: Path, target) -> dict[str, Path]:
    import onnxruntime as ort

    model_file = read_manifest(bundle)["model_file"]
    fp32 = run.artifact("export") / "model.onnx"
    out = {}
    variants = {"fp32 activations": {"activations": "fp32"}, "int4 block 16": {"block_size": 16},
                "int8 weights": {"weights": "int8"}, "no weight quantization": None}
    for label, change in variants.items():
        dst = work / label.replace(" ", "-")
        shutil.copytree(bundle, dst, ignore=shutil.ignore_patterns("model.*", "profile*"))
        src = fp32
        if change is not None:
            src = work / f"{dst.name}.onnx"
            quantize(fp32, src, dataclasses.replace(target, **change))
        # fp32 has no shared int4 table to protect: fold constants as ORT's own converter would
        to_ort(src, dst / model_file, constant_folding=change is None)
        out[label] = dst
    dst = work / "no-graph-optimizations"
    shutil.copytree(bundle, dst, ignore=shutil.ignore_patterns("model.*", "profile*"))
    ort.InferenceSession(str(run.artifact("heal") / "model.onnx"),
                         options(optimize=False, save_ort=dst / model_file), providers=["CPUExecutionProvider"])
    out["no graph optimizations"] = dst
    return out


def _gate(bundle: Path, baseline: Path) -> tuple[int, dict]:

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = check(bundle, baseline, echo=print)
    changes = {}
    for line in buf.getvalue().splitlines():
        parts = line.split()
        if parts and parts[0] in ("decode", "prefill"):
            changes[parts[0]] = float(parts[7].rstrip("%"))
    return code, changes


@contextlib.contextmanager
def busy_core(on: bool):
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if on else None
    try:
        yield
    finally:
        if proc:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:

    p = argparse.ArgumentParser(prog="python -m edgepeft.latency.study", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, help="a finished run folder, e.g. dist/android")
    p.add_argument("--runs", type=int, default=10, help="gate runs per condition on the unchanged bundle")
    args = p.parse_args(argv)
    run = RunDir(args.run_dir)
    bundles = run.bundles()
    if not bundles:
        print(f"gate_study: error: {args.run_dir} has no finished bundle", file=sys.stderr)
        return 2
    bundle = bundles[0]
    manifest = read_manifest(bundle)
    target = from_manifest(manifest["target"], "manifest [target]")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        baseline = work / "baseline.json"
        check(bundle, baseline, update=True)
        print("building regressed copies of the bundle ...", flush=True)
        regressed = _regressed(bundle, run, work, target)
        plan = [("unchanged, quiet", bundle, False, args.runs), ("unchanged, one core busy", bundle, True, args.runs)]
        for label, path in regressed.items():
            plan += [(f"{label}, quiet", path, False, 1), (f"{label}, one core busy", path, True, 1)]
        rows = []
        for label, path, busy, runs in plan:
            codes, dec, pre = [], [], []
            with busy_core(busy):
                for _ in range(runs):
                    code, changes = _gate(path, baseline)
                    codes.append(code)
                    dec.append(changes.get("decode", float("nan")))
                    pre.append(changes.get("prefill", float("nan")))
            rows.append((label, runs, codes.count(0), codes.count(1), statistics.median(dec), statistics.median(pre)))
            print(f"  {label}: {codes.count(0)}/{runs} passed; decode {statistics.median(dec):+.1f}%, "
                  f"prefill {statistics.median(pre):+.1f}%", flush=True)
    print(f"\n{'condition':<42}{'runs':>5}{'pass':>6}{'fail':>6}{'decode change':>15}{'prefill change':>16}")
    for label, runs, ok, bad, d, q in rows:
        print(f"{label:<42}{runs:>5}{ok:>6}{bad:>6}{d:>+14.1f}%{q:>+15.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
