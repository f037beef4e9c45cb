"""The Android bundle on the official aarch64 build of ONNX Runtime, under user-mode emulation, against the
x86 run: the same prompt and continuation through both, logits compared.

    python -m edgepeft.arm64.emulate dist/android/bundle/android-arm64 [--root DIR] [--prompt-tokens N]
        [--decode-steps N] [--cpu MODEL ...] [--out FILE]          (``nox -s emulate-android``)

**The arm64 side.** An arm64 Debian bookworm root (``--root``, default ``$EDGEPEFT_ARM64_ROOT`` or
``~/.cache/edgepeft/arm64-bookworm``; built once, ~25 s and ~330 MB) holds Debian's own aarch64 ``python3``
and the official aarch64 wheels of onnxruntime and numpy at the host's versions. It is built with
``debootstrap --foreign --arch=arm64 --variant=minbase --include=python3``, the first stage only (it
downloads everything and unpacks the essential packages, on any architecture); the packages it only
downloads (python3 and its libraries, listed in ``debootstrap/base``) are unpacked with ``dpkg-deb
--fsys-tarfile | tar -x --keep-directory-symlink`` (plain ``dpkg-deb -x`` would turn the merged-/usr link
``lib -> usr/lib`` into a folder, and the dynamic loader with it). No maintainer script runs; nothing here
needs one. The wheels are fetched on the host by pip (``--platform manylinux_2_X_aarch64 --abi cp311
--only-binary=:all:``) into ``/opt/edgepeft/site-…`` in the root. The probe then runs as::

    chroot ROOT /usr/bin/qemu-aarch64-static -cpu MODEL /usr/bin/python3 /tmp/edgepeft-…/probe.py IN.json OUT.npz

with a clean environment (qemu passes it to the guest; ``PYTHONPATH`` points at the wheels). Why this way: the
usual route, debootstrap's second stage or a ``chroot ROOT python3``, needs a binfmt_misc handler for aarch64
ELF files, i.e. mounting binfmt_misc and registering qemu in the kernel: a change to the whole machine,
refused in most containers and CI runners (and not made here even where it would be allowed). Calling the
static qemu explicitly needs neither; its one limit is that the emulated program cannot exec another aarch64
program, and the probe (python, numpy, onnxruntime) never does. ``chroot`` rather than ``qemu -L ROOT``: with
``-L`` a file missing in the root silently falls back to the host's x86 file. Building and running need root
(debootstrap, chroot); debootstrap and qemu-user-static are installed with apt-get when missing. The root has
no /proc or /sys, so onnxruntime's cpuinfo prints that it failed to initialize and falls back to the kernel's
HWCAP bits, which qemu sets from ``-cpu``: the kernels onnxruntime picks are those of the emulated CPU.

**CPU models** (``--cpu``, default both): ``max,sve-default-vector-length=16`` has every feature qemu 7.2
emulates (i8mm, bf16, SVE2 at the 128-bit width of phone cores, SME) and takes the i8mm kernels of recent phones
(the Snapdragon 8 Gen 2 class); ``cortex-a76`` has dot-product but no i8mm, the kernels of 2019-2022 mid-range
phones. (``cortex-a53``, without dot-product, computes int4 MatMulNBits in fp32 and is much slower to emulate.)

**The comparison.** The x86 run picks the continuation greedily; every other run is fed the same tokens, so
each row of logits has identical inputs on both sides: all prompt positions of the prefill, then each decode
step on the KV cache. Figures over all rows: max and mean |Δlogit|, max |Δlogit| / max |x86 logit| ("rel
max"), argmax agreement, KL(x86 || arm64) (max and mean over rows) and the flip gap: where the argmax differs,
how far below its own top logit x86 put arm64's choice (a flip between tokens x86 nearly tied is noise; one
x86 ranked far lower is not). Each CPU model runs two checks, each against its own tolerance:

- ``shipped``: default session options, what an app gets;
- ``no-kleidiai``: ``mlas.disable_kleidiai=1`` (on both sides), onnxruntime's own MLAS kernels: a tight check
  of everything but KleidiAI's activation quantization.

**Why two, and the tolerances.** The model is int4 (and some int8) MatMulNBits with accuracy_level 4:
activations are quantized to int8 at run time, so bit-exactness is not on the cards, and x86 and arm64 do
it differently. x86 (AVX2/AVX512-VNNI) quantizes each block of 32 activations with its own scale. On arm64 with
dot-product or i8mm, onnxruntime sends MatMulNBits to KleidiAI, which quantizes each activation row as a
whole (one asymmetric scale per row: coarser) and reads each block scale as bf16 (truncated), so only the
check without KleidiAI can hold arm64 close to x86. The tolerances (``CHECKS``) allow about three times the
worst figures measured on the default bundle; the loose ``shipped`` check catches broken kernels, and the tight
``no-kleidiai`` one fails even a different int4 quantization of the same weights. Whether KleidiAI's coarser
activations cost the fine-tune is the quality check's question:

**Quality on the arm64 kernels** (``--quality-windows``, default 4). The first windows of the recipe's held-out
prose go through the bundle on x86 and under emulation (the last ``--cpu``), each scored against
(4-bit base + adapter) in PyTorch and judged by the recipe's perplexity, KL and agreement budgets, the gate's
prose half on the kernels a phone runs.

The figures measured with all of this, and broken runs for scale, are in docs/measurements.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgepeft.bundle.manifest import MANIFEST, read_manifest
from edgepeft.core.errors import EdgepeftError
from edgepeft.core.files import write_atomic
from edgepeft.latency.profile import machine
from edgepeft.pipeline import recipe as recipe_mod
from edgepeft.pipeline.layout import RunDir
from edgepeft.quality import reference as torch_reference
from edgepeft.quality.gate import heldout
from edgepeft.quality.reference import Reference
from edgepeft.quality.scores import Budgets, log_softmax, score, verdict
from edgepeft.quality.scores import table as budget_table

SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"
GLIBC_MINOR = 36  # bookworm's glibc 2.36: the newest manylinux tag its root can take
QEMU = "qemu-aarch64-static"
CPUS = ("max,sve-default-vector-length=16", "cortex-a76")
DEFAULT_ROOT = Path(os.environ.get("EDGEPEFT_ARM64_ROOT")
                    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgepeft" / "arm64-bookworm")
PROBE = Path(__file__).with_name("probe.py")
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
REQUEST = ("Remind me to call my sister Anna tomorrow at 6:30 pm about the birthday dinner, and if she does not "
           "answer, send her a text saying that the table at the Italian place on Main Street is booked for "
           "eight people on Saturday at 7 pm, that she should bring the cake, and that I will pick up the "
           "flowers on my way home from work. Also set my phone to silent from 11 pm until 7 am every night, "
           "turn off the living room lights at midnight, and add milk, eggs, bread, coffee and two lemons to "
           "my shopping list for the weekend.")
WALL_NOTE = "wall-clock seconds; the arm64 ones are under emulation and mean nothing for speed"


@dataclass(frozen=True)
class Tolerance:
    """Limits on the arm64 logits against x86's (see the module doc for the measurements behind them)."""

    max_kl: float
    max_rel_diff: float
    min_argmax_agreement: float
    max_flip_gap: float


# check name: (onnxruntime session config entries on both sides, tolerance)
CHECKS = {
    "shipped": ({}, Tolerance(max_kl=1.0, max_rel_diff=0.3, min_argmax_agreement=0.7, max_flip_gap=3.0)),
    "no-kleidiai": ({"mlas.disable_kleidiai": "1"},
                    Tolerance(max_kl=0.08, max_rel_diff=0.08, min_argmax_agreement=0.85, max_flip_gap=1.5)),
}
TOLERANCE = CHECKS["shipped"][1]


def echo(msg: str) -> None:
    print(msg, flush=True)


def compare(x86: np.ndarray, arm: np.ndarray, tol: Tolerance = TOLERANCE) -> dict:
    """Figures and verdict for two [rows, vocab] logit arrays computed from identical inputs."""

    if x86.shape != arm.shape:
        return {"failures": [f"logits shapes differ: x86 {x86.shape}, arm64 {arm.shape}"], "passed": False}
    if not np.isfinite(arm).all():
        return {"failures": ["arm64 logits are not all finite"], "passed": False}
    x, a = x86.astype(np.float64), arm.astype(np.float64)
    diff = np.abs(x - a)
    lp, lq = log_softmax(x), log_softmax(a)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    top_x, top_a = x.argmax(-1), a.argmax(-1)
    gaps = (x.max(-1) - x[np.arange(len(x)), top_a])[top_x != top_a]
    fig = {"rows": len(x), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
           "rel_max_diff": float(diff.max() / np.abs(x).max()), "argmax_agreement": float((top_x == top_a).mean()),
           "max_kl": float(kl.max()), "mean_kl": float(kl.mean()),
           "max_flip_gap": float(gaps.max()) if gaps.size else 0.0}
    limits = [("max_kl", ">", tol.max_kl), ("rel_max_diff", ">", tol.max_rel_diff),
              ("argmax_agreement", "<", tol.min_argmax_agreement), ("max_flip_gap", ">", tol.max_flip_gap)]
    failures = [f"{k} {fig[k]:.4g} {op} {lim:g}" for k, op, lim in limits
                if (fig[k] > lim if op == ">" else fig[k] < lim)]
    return {**fig, "failures": failures, "passed": not failures}


def prompt_ids(bundle: Path, tokens: int) -> tuple[list[int], str]:
    """A chat prompt of exactly ``tokens`` ids: the bundle's system prompt (from its manifest) and a phone
    request cut to fit, through its chat template and tokenizer."""
    from tokenizers import Tokenizer

    if not (bundle / "tokenizer.json").is_file():
        raise EdgepeftError(f"{bundle}: no tokenizer.json")
    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    manifest = bundle / "manifest.json"
    system = (json.loads(manifest.read_text()).get("prompt") or {}).get("system") if manifest.is_file() else None
    messages = [{"role": "system", "content": system or SYSTEM}, {"role": "user", "content": "\x00"}]
    template = bundle / "chat_template.jinja"
    if template.is_file():
        import jinja2

        text = jinja2.Environment().from_string(template.read_text()).render(
            messages=messages, add_generation_prompt=True, bos_token="", eos_token="")
    else:  # ChatML, SmolLM2's format
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        text += "<|im_start|>assistant\n"
    head, tail = (tok.encode(part, add_special_tokens=False).ids for part in text.split("\x00"))
    request = tok.encode(REQUEST, add_special_tokens=False).ids
    room = tokens - len(head) - len(tail)
    if not 1 <= room <= len(request):
        raise EdgepeftError(f"--prompt-tokens must be between {len(head) + len(tail) + 1} and "
                            f"{len(head) + len(request) + len(tail)} with this tokenizer")
    ids = head + request[:room] + tail
    return ids, tok.decode(ids, skip_special_tokens=False)


def _which(exe: str) -> str | None:
    return shutil.which(exe, path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin:/sbin:/bin")


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode:
        lines = (r.stderr.strip() or r.stdout.strip()).splitlines()
        raise EdgepeftError(f"{what} failed: {lines[-1] if lines else f'exit status {r.returncode}'}")
    return r


def ensure_tools() -> None:
    """Root, and debootstrap + qemu-user-static (installed with apt-get when missing)."""
    if os.geteuid() != 0:
        raise EdgepeftError("the arm64 root needs root privileges (debootstrap, chroot); run as root")
    missing = [pkg for exe, pkg in (("debootstrap", "debootstrap"), (QEMU, "qemu-user-static"), ("chroot", "coreutils"),
                                    ("dpkg-deb", "dpkg"), ("tar", "tar")) if not _which(exe)]
    if not missing:
        return
    if not _which("apt-get"):
        raise EdgepeftError(f"{', '.join(missing)} missing and no apt-get to install them (needs a Debian host)")
    echo(f"installing {' '.join(missing)} with apt-get ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
    if subprocess.run(cmd, capture_output=True, env=env).returncode:
        _run(["apt-get", "update", "-qq"], "apt-get update", env=env)
        _run(cmd, f"apt-get install {' '.join(missing)}", env=env)


def _unpack(deb: Path, dest: Path) -> None:
    # --keep-directory-symlink: the root is merged-/usr; `dpkg-deb -x` would turn lib -> usr/lib into a folder
    dpkg = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    tar = subprocess.run(["tar", "-x", "-C", str(dest), "--keep-directory-symlink"], stdin=dpkg.stdout,
                         capture_output=True, text=True)
    dpkg.stdout.close()
    if dpkg.wait() or tar.returncode:
        raise EdgepeftError(f"unpacking {deb.name} failed: {(tar.stderr.strip().splitlines() or ['dpkg-deb'])[-1]}")


ROOT_MARK = ".edgepeft-root.json"


def build_root(root: Path, mirror: str = MIRROR) -> dict:
    """The arm64 Debian root (built once; its marker file says it is finished) and what it holds."""
    if (root / ROOT_MARK).is_file():
        return json.loads((root / ROOT_MARK).read_text())
    if root.exists() and any(root.iterdir()):
        raise EdgepeftError(f"{root} exists but is not a finished arm64 root (no {ROOT_MARK}); remove it first")
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    echo(f"building an arm64 Debian {SUITE} root in {root} (debootstrap first stage from {mirror}; about 40 MB "
         "of packages, a minute or more) ...")
    t0 = time.time()
    _run(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase", "--include=python3", SUITE, str(partial),
          mirror], "debootstrap")
    meta = partial / "debootstrap"
    debs = dict(line.split() for line in (meta / "debpaths").read_text().splitlines() if line.strip())
    base = (meta / "base").read_text().split()
    echo(f"unpacking the {len(base)} packages the first stage left packed (python3 and its libraries) ...")
    for pkg in base:
        _unpack(partial / debs[pkg].lstrip("/"), partial)
    for f in [*(partial / "var/cache/apt/archives").glob("*.deb"), *(partial / "var/lib/apt/lists").glob("*_*")]:
        f.unlink()  # the packages and the mirror's index: 90 MB nothing here reads again
    python = partial / "usr/bin/python3"
    if not python.exists():
        raise EdgepeftError(f"{python} missing after unpacking: the arm64 root is incomplete")
    release = (partial / "etc/os-release").read_text().splitlines()
    os_release = dict(line.split("=", 1) for line in release if "=" in line)
    info = {"suite": SUITE, "mirror": mirror, "debian_version": (partial / "etc/debian_version").read_text().strip(),
            "os_release": os_release.get("PRETTY_NAME", "").strip('"'),
            "python": os.readlink(python).removeprefix("python"), "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": round(time.time() - t0, 1),
            "method": "debootstrap --foreign --variant=minbase --include=python3 (first stage) + dpkg-deb|tar "
                      "of debootstrap/base; run as chroot ROOT qemu-aarch64-static -cpu MODEL python3"}
    (partial / ROOT_MARK).write_text(json.dumps(info, indent=1) + "\n")
    os.replace(partial, root)
    echo(f"arm64 root ready ({info['os_release']}, {info['build_seconds']:.0f} s)")
    return info


def install_wheels(root: Path, python: str) -> tuple[str, dict]:
    """The official aarch64 onnxruntime and numpy wheels at the host's versions, in the root (cached): their
    folder as seen inside the root, and the wheels' tags."""
    ort_v, np_v = importlib.metadata.version("onnxruntime"), importlib.metadata.version("numpy")
    abi = "cp" + python.replace(".", "")
    rel = f"opt/edgepeft/site-{abi}-onnxruntime-{ort_v}-numpy-{np_v}"
    site = root / rel
    if not (site / ".complete").is_file():
        echo(f"fetching the official aarch64 wheels onnxruntime=={ort_v} numpy=={np_v} ({abi}) with pip ...")
        tmp = site.with_name(site.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tags = [f"manylinux_2_{m}_aarch64" for m in range(17, GLIBC_MINOR + 1)] + ["manylinux2014_aarch64"]
        _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target", str(tmp),
              "--only-binary=:all:", "--implementation", "cp", "--python-version", python, "--abi", abi,
              *(a for t in tags for a in ("--platform", t)), f"onnxruntime=={ort_v}", f"numpy=={np_v}"],
             "pip install of the aarch64 wheels")
        (tmp / ".complete").write_text("")
        os.replace(tmp, site)
    wheels = {}
    for dist in ("onnxruntime", "numpy"):
        wheel = next(site.glob(f"{dist}-*.dist-info")) / "WHEEL"
        wheels[dist] = [line.split(": ", 1)[1] for line in wheel.read_text().splitlines() if line.startswith("Tag:")]
    return "/" + rel, wheels


def sync_qemu(root: Path) -> tuple[str, str]:
    """The host's static qemu copied into the root (the chroot must reach it), and its version line."""
    import filecmp

    host, inside = Path(_which(QEMU)), root / "usr/bin" / QEMU
    if not inside.is_file() or not filecmp.cmp(host, inside, shallow=False):
        shutil.copy2(host, inside)
    return "/usr/bin/" + QEMU, _run([str(host), "--version"], "qemu --version").stdout.splitlines()[0]


def guest_env(site: str) -> dict[str, str]:
    """The clean environment an emulated python runs with (qemu passes it to the guest): the wheels on its path."""
    return {"PATH": "/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8", "PYTHONPATH": site,
            "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def guest_python(root: Path, qemu: str, cpu: str) -> list[str]:
    """The command that runs the root's aarch64 python3 on the emulated CPU model ``cpu`` (append its arguments,
    paths as seen inside the root)."""
    return [_which("chroot"), str(root), qemu, "-cpu", cpu, "/usr/bin/python3"]


def _noise(line: str) -> bool:
    return "cpuinfo" in line or not line.strip()


def _probe(cmd: list[str], work: Path, out: str, env: dict | None, timeout: int) -> dict:
    """One probe run: its arrays and meta, or the reason it failed."""
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result after {timeout} s"}
    wall = time.perf_counter() - t0
    stderr = list(dict.fromkeys(line for line in r.stderr.splitlines() if line.strip()))[:12]
    if r.returncode or not (work / out).is_file():
        tail = [line for line in stderr if not _noise(line)] or stderr or [f"exit status {r.returncode}"]
        return {"error": f"exit status {r.returncode}: {tail[-1]}", "stderr": stderr}
    with np.load(work / out) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("meta")))
    meta["wall_s"]["process"] = wall
    return {**meta, "stderr": stderr, "arrays": arrays}


def host_cpu() -> str:
    """The host CPU's model name (as the profiler records it) and the SIMD extensions that pick onnxruntime's
    x86 int8 kernels."""

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{machine()['cpu']} ({' '.join(simd)})"


def default_out(bundle: Path) -> Path:
    """``<run>/emulate/arm64.json`` for a bundle at ``<run>/bundle/<target>``."""
    return RunDir.of_bundle(bundle).stage("emulate") / "arm64.json"


def emulate(bundle_dir: Path, root: Path = DEFAULT_ROOT, prompt_tokens: int = 48, decode_steps: int = 8,
            threads: int = 1, cpus: tuple[str, ...] = CPUS, out: Path | None = None, checks: dict = CHECKS,
            mirror: str = MIRROR, timeout: int = 3600, quality_windows: int = 4) -> dict:
    """Run the bundle on x86 and, under emulation, on arm64 with each of ``cpus`` and each of ``checks``
    (session config, tolerance); compare; write the JSON result (``out``, default ``default_out``) and
    return it."""

    bundle_dir, root = Path(bundle_dir), Path(root).expanduser().absolute()
    cfg = bundle_dir / "genai_config.json"
    if not cfg.is_file():
        raise EdgepeftError(f"{bundle_dir}: not a bundle folder (no genai_config.json)")
    model = bundle_dir / json.loads(cfg.read_text())["model"]["decoder"]["filename"]
    if not model.is_file():
        raise EdgepeftError(f"{model}: missing")
    if decode_steps < 1 or threads < 1:
        raise EdgepeftError("--decode-steps and --threads must be at least 1")
    ids, text = prompt_ids(bundle_dir, prompt_tokens)
    ensure_tools()
    info = build_root(root, mirror)
    site, wheels = install_wheels(root, info["python"])
    qemu, qemu_version = sync_qemu(root)

    (root / "tmp").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="edgepeft-", dir=root / "tmp"))
    inside = "/" + work.relative_to(root).as_posix()
    env = guest_env(site)

    def probe(name: str, spec: dict, arm_cpu: str | None = None) -> dict:
        (work / f"{name}.json").write_text(json.dumps(spec))
        files = [f"{name}.json", f"{name}.npz"]
        if arm_cpu:
            cmd = [*guest_python(root, qemu, arm_cpu), *(f"{inside}/{f}" for f in ["probe.py", *files])]
        else:
            cmd = [sys.executable, *(str(work / f) for f in ["probe.py", *files])]
        return _probe(cmd, work, f"{name}.npz", env if arm_cpu else None, timeout)

    try:
        try:
            os.link(model, work / model.name)
        except OSError:
            shutil.copy2(model, work / model.name)
        shutil.copy2(cfg, work / "genai_config.json")
        shutil.copy2(PROBE, work / "probe.py")
        spec = {"model": model.name, "genai_config": "genai_config.json", "prompt": ids,
                "decode_steps": decode_steps, "forced": None, "threads": threads}
        echo(f"x86: prefill of {len(ids)} tokens and {decode_steps} greedy decode steps ...")
        x86 = probe("x86", spec)
        if "error" in x86:
            raise EdgepeftError(f"the x86 run failed: {x86['error']}")
        # from here on every run is fed x86's continuation: identical inputs, even where an argmax differs
        spec["forced"] = x86["arrays"]["fed"].tolist()
        x86_logits = {}
        for check, (config, _) in checks.items():
            xc = probe(f"x86-{check}", {**spec, "session_config": config}) if config else x86
            if "error" in xc:
                raise EdgepeftError(f"the x86 run ({check}) failed: {xc['error']}")
            x86_logits[check] = np.concatenate([xc["arrays"]["prefill"], xc["arrays"]["decode"]])
        runs = []
        for i, (cpu, check) in enumerate((cpu, check) for cpu in cpus for check in checks):
            config, tol = checks[check]
            echo(f"arm64 under qemu, -cpu {cpu}, {check} ({', '.join(config) or 'default session options'}): "
                 f"the same {len(ids)} + {decode_steps} tokens (10-60 s) ...")
            arm = probe(f"arm64-{i}", {**spec, "session_config": config}, arm_cpu=cpu)
            row = {"label": f"{cpu} {check}", "cpu": cpu, "check": check, "session_config": config}
            runs.append({**row, **judge(arm, x86, x86_logits[check], tol)})
        gate = None
        if quality_windows:
            def held_out(spec: dict, arm_cpu: str | None) -> list[np.ndarray]:
                r = probe(f"windows-{arm_cpu or 'x86'}".replace(",", "_").replace("=", "_"), spec, arm_cpu)
                if "error" in r:
                    raise EdgepeftError(f"the held-out run ({arm_cpu or 'x86'}) failed: {r['error']}")
                return [r["arrays"][f"window{i}"] for i in range(len(spec["windows"]))]
            gate = quality(bundle_dir, quality_windows, cpus[-1], held_out,
                           {"model": model.name, "genai_config": "genai_config.json", "threads": threads})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    x86.pop("arrays")
    result = {
        "bundle": str(bundle_dir), "model_file": model.name, "model_bytes": model.stat().st_size,
        "prompt": {"tokens": len(ids), "text": text, "ids": ids, "decode_steps": decode_steps,
                   "continuation": spec["forced"]},
        "threads": threads, "x86": {**x86, "cpu": host_cpu()},
        "arm64_root": {"path": str(root), **info, "site": site, "wheels": wheels},
        "qemu": {"version": qemu_version, "binary": _which(QEMU)},
        "arm64": runs, "wall_s_note": WALL_NOTE,
        "tolerances": {check: {"session_config": c, **asdict(t)} for check, (c, t) in checks.items()},
        "quality": gate,
        "passed": bool(runs) and all(r["passed"] for r in runs) and (gate is None or gate["passed"]),
    }
    out = Path(out) if out else default_out(bundle_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(result, indent=1) + "\n")
    result["out"] = str(out)
    return result


def judge(arm: dict, x86: dict, x86_logits: np.ndarray, tol: Tolerance) -> dict:
    """One arm64 probe's result against the x86 run's: its figures, what failed, and whether it passed."""
    if "error" in arm:
        return {**arm, "failures": [f"arm64 run failed: {arm['error']}"], "passed": False}
    arm = dict(arm)
    aa = arm.pop("arrays")
    fig = compare(x86_logits, np.concatenate([aa["prefill"], aa["decode"]]), tol)
    failures = fig.pop("failures")
    if arm["machine"] != "aarch64":
        failures.append(f"platform.machine() is {arm['machine']!r} under emulation, not 'aarch64'")
    if arm["onnxruntime"] != x86["onnxruntime"]:
        failures.append(f"onnxruntime {arm['onnxruntime']} on arm64, {x86['onnxruntime']} on x86")
    fig.pop("passed")
    return {**arm, "greedy_matches_x86": bool((aa["greedy"] == x86["arrays"]["greedy"]).all()),
            "figures": fig, "failures": failures, "passed": not failures}


def quality(bundle: Path, n: int, cpu: str, held_out, spec: dict) -> dict:
    """The quality gate's prose figures on the arm64 kernels: the first ``n`` of the recipe's held-out windows
    through the bundle on x86 and under emulation, each scored against (4-bit base + adapter) in PyTorch
    and judged by the recipe's budgets (exact match would take hours emulated; it is left to ``evaluate``)."""
    from transformers import AutoTokenizer

    recipe = recipe_mod.from_manifest(read_manifest(bundle), f"{bundle}/{MANIFEST}")
    reference = Reference.of_run(RunDir.of_bundle(bundle).path)
    windows, about = heldout(recipe, recipe.evaluate, AutoTokenizer.from_pretrained(reference.adapter))
    windows = windows[:n]
    echo(f"quality on arm64 kernels: {len(windows)} held-out windows of {len(windows[0])} tokens, "
         "(4-bit base + adapter) in PyTorch ...")
    model = reference.load()
    ref = torch_reference.logits(model, windows)
    del model
    echo(f"quality on arm64 kernels: the same windows on x86 and under qemu -cpu {cpu} (a few minutes) ...")
    x86 = score(ref, held_out({**spec, "windows": windows}, None), windows)
    arm = score(ref, held_out({**spec, "windows": windows}, cpu), windows)
    b = recipe.evaluate.budgets()
    budgets = Budgets(b.max_perplexity_increase, b.max_kl, b.min_next_token_agreement, None)
    rows = verdict(arm, budgets)
    return {"windows": len(windows), "tokens": sum(len(w) for w in windows), "cpu": cpu,
            "reference": "4-bit base + adapter (PyTorch)", "x86": x86, "arm64": arm, "rows": rows,
            "passed": all(r["passed"] for r in rows)}


def table(result: dict) -> str:
    cols = [("max|Δ|", "max_abs_diff", None), ("mean|Δ|", "mean_abs_diff", None),
            ("rel max", "rel_max_diff", "max_rel_diff"),
            ("argmax", "argmax_agreement", "min_argmax_agreement"), ("max KL", "max_kl", "max_kl"),
            ("mean KL", "mean_kl", None), ("flip gap", "max_flip_gap", "max_flip_gap")]
    tols = [(f"tolerance {check}", t) for check, t in result["tolerances"].items()]
    width = max(len(label) for label in [r["label"] for r in result["arm64"]] + [label for label, _ in tols])
    lines = [f"{'arm64 vs x86':<{width}}  " + "  ".join(f"{c:>8}" for c, _, _ in cols) + "  verdict"]
    for r in result["arm64"]:
        f = r.get("figures") or {}
        cells = "  ".join(f"{f[k]:>8.4g}" if k in f else f"{'-':>8}" for _, k, _ in cols)
        verdict = "pass" if r["passed"] else "FAIL: " + "; ".join(r["failures"])
        lines.append(f"{r['label']:<{width}}  {cells}  {verdict}")
    for label, t in tols:
        lines.append(f"{label:<{width}}  " + "  ".join(f"{t[k] if k else '':>8}" for _, _, k in cols))
    arm = ", ".join(sorted({r["onnxruntime"] for r in result["arm64"] if "onnxruntime" in r})) or "-"
    walls = ", ".join(f"{r['wall_s']['process']:.0f}" for r in result["arm64"] if "wall_s" in r) or "-"
    lines.append(f"{result['prompt']['tokens']} prompt tokens + {result['prompt']['decode_steps']} decode steps; "
                 f"onnxruntime {arm} (official aarch64 wheel under qemu) vs {result['x86']['onnxruntime']} (x86); "
                 f"wall s: x86 {result['x86']['wall_s']['process']:.1f}, arm64 {walls} (emulated: not a speed figure)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgepeft.arm64.emulate", description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path, help="a bundle folder, e.g. dist/android/bundle/android-arm64")
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"the arm64 Debian root (default {DEFAULT_ROOT})")
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads, the same on both sides")
    p.add_argument("--cpu", action="append", help=f"qemu CPU model, repeatable (default: {' and '.join(CPUS)})")
    p.add_argument("--out", type=Path, help="result JSON (default <run>/emulate/arm64.json)")
    p.add_argument("--mirror", default=MIRROR, help="Debian mirror for debootstrap")
    p.add_argument("--quality-windows", type=int, default=4,
                   help="held-out windows scored against the trained model on the arm64 kernels (0: skip)")
    args = p.parse_args(argv)
    try:
        result = emulate(args.bundle, args.root, args.prompt_tokens, args.decode_steps, args.threads,
                         tuple(args.cpu or CPUS), args.out, mirror=args.mirror,
                         quality_windows=args.quality_windows)
    except EdgepeftError as e:
        if os.environ.get("EDGEPEFT_DEBUG"):
            raise
        print(f"emulate: error: {e}", file=sys.stderr)
        return 2
    print(table(result))
    q = result["quality"]
    if q:

        print(f"quality gate (prose) on {q['tokens']} held-out tokens vs {q['reference']}:")
        for side in ("x86", "arm64"):
            f = q[side]
            print(f"  {side:<6} kernels: perplexity {f['perplexity_reference']:.2f} -> {f['perplexity']:.2f} "
                  f"({100 * f['perplexity_increase']:+.1f}%), KL {f['kl']:.3f}, agreement "
                  f"{100 * f['next_token_agreement']:.1f}%")
        print(f"  budgets on the arm64 kernels (qemu -cpu {q['cpu']}):")
        print(budget_table(q["rows"]))
    print(f"{'passed' if result['passed'] else 'FAILED'}; written to {result['out']}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
