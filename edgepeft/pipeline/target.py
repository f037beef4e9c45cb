"""A deployment target: one TOML file in ``targets/`` saying what the device runs and how weights ship.

A recipe names its target (``target = "android-arm64"``); the stages read it: ``export`` checks the opset,
``requantize`` takes the weight and activation precision, ``bundle`` writes the formats and measures at
the target's thread count. Data, not code: a new device is a new TOML file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edgepeft.core.config import from_table, load_toml, plain_name
from edgepeft.core.errors import EdgepeftError

FORMATS = ("onnx", "ort")
# MatMulNBits' accuracy_level: the precision its kernels compute in. 4 = int8 activations (fast integer
# dot products), 1 = fp32 (exact dequantize-then-multiply).
ACCURACY_LEVEL = {"int8": 4, "fp32": 1}
# Execution providers a target may ask for, by short name, in order of preference; the profiler falls back
# to the next (finally the CPU) when this onnxruntime build lacks one, and says so in its results.
PROVIDERS = {"cpu": "CPUExecutionProvider", "xnnpack": "XnnpackExecutionProvider",
             "nnapi": "NnapiExecutionProvider", "coreml": "CoreMLExecutionProvider", "qnn": "QNNExecutionProvider",
             "cuda": "CUDAExecutionProvider", "dml": "DmlExecutionProvider", "webgpu": "WebGpuExecutionProvider"}
# Mobile execution providers whose share of a graph the readiness report can assess (edgepeft.bundle.readiness)
READINESS = ("nnapi", "coreml", "xnnpack")


@dataclass
class Graph:
    """The keys of a target the export stage reads (its fingerprint), so every target with the same opset and
    context shares the fp32 graph."""

    opset: int
    context: int | None


@dataclass
class Precision:
    """The keys of a target that decide the quantized weights: what the requantize stage fingerprints (the
    opset reaches it through the export it reads), so targets that differ only in runtime, providers, threads
    or budgets share it."""

    weights: str
    block_size: int
    symmetric: bool
    activations: str
    quantize_embedding: bool
    head: str


# What MatMulNBits computes at accuracy_level 4 (int8 activations), which healing simulates
# (``edgepeft.heal.mirror``): on arm64, ONNX Runtime runs symmetric int4 on KleidiAI's kernels, which round
# each row (token) of the activations to int8 with its own scale and zero point, and keep only the upper 16
# bits of each fp32 block scale (bf16, truncated) when they pack the weights; everything else (x86-64 MLAS,
# and arm64 for int4 with zero points or int8 weights) rounds symmetric int8 per block of block_size inputs
# and keeps fp32 scales. (onnxruntime 1.32, mlas/lib/kleidiai/qnbitgemm_kleidiai.cpp.)


@dataclass
class Kernels:
    """The keys of a target that decide what its MatMulNBits kernels compute: what the heal stage fits to."""

    architecture: str
    weights: str
    symmetric: bool
    activations: str

    @property
    def activation_rounding(self) -> str | None:
        """``rowwise`` (KleidiAI), ``blockwise`` (MLAS) or None (fp32 activations: no rounding)."""
        if self.activations == "fp32":
            return None
        if self.architecture == "arm64" and self.weights == "int4" and self.symmetric:
            return "rowwise"
        return "blockwise"

    @property
    def bf16_scales(self) -> bool:
        """Whether the kernels read the block scales as bf16 (KleidiAI's symmetric int4 path)."""
        return self.activation_rounding == "rowwise"


@dataclass
class Target:
    name: str
    runtime: Literal["onnxruntime-genai"] = "onnxruntime-genai"
    architecture: Literal["arm64", "x86_64"] = "arm64"  # the device's CPU: which int8 kernels run (Kernels)
    formats: list[str] = field(default_factory=lambda: ["onnx"])
    threads: int = 2
    opset: int = 21
    weights: Literal["int4", "int8"] = "int4"
    block_size: int = 32
    symmetric: bool = True
    activations: Literal["int8", "fp32"] = "int8"
    quantize_embedding: bool = True
    # The output head's weights (and the token table, when the two are tied): "int8" keeps them at 8 bits while
    # the rest are int4 ("same": the target's weights). llama.cpp's Q4_K_M does as much for Gemma 3, whose
    # 262k-token table is 168M of its 268M parameters: there it is Q8_0.
    head: Literal["same", "int8"] = "same"
    max_bundle_mb: float | None = None
    # The longest sequence (prompt and answer, in tokens) the app runs; None: the model's own maximum. The
    # graph's rotary tables and onnxruntime-genai's KV cache are sized for it, so a model made for 32k tokens
    # (Gemma 3: 67 MB of cos/sin tables, 1.2 GB of fp32 KV cache) ships at what the phone needs.
    context: int | None = None
    providers: list[str] = field(default_factory=lambda: ["cpu"])  # execution providers, preferred first
    # Mobile execution providers the readiness report assesses (edgepeft.bundle.readiness): which nodes each
    # would take. Non-empty makes the target a mobile one; such a bundle must ship the ORT format.
    readiness: list[str] = field(default_factory=list)
    # The device the estimate of on-device decode speed is made for (see edgepeft.latency.costmodel):
    device: str = ""
    device_memory_bandwidth_gbs: float | None = None  # DRAM peak, GB/s
    device_bandwidth_efficiency: float = 0.5  # share of the peak that CPU decoding reaches
    device_source: str = ""  # where the two figures above come from
    description: str = ""

    def check(self) -> str | None:
        if not plain_name(self.name):  # the bundle's folder is dist/<recipe>/bundle/<name>
            return f"name must be a plain folder name (no '/', not empty, not starting with '.'), got {self.name!r}"
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            return f"formats must be a non-empty list of {', '.join(FORMATS)} (got {self.formats})"
        if self.context is not None and self.context < 64:
            return f"context must be at least 64 tokens (got {self.context})"
        if self.threads < 1:
            return "threads must be at least 1"
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            return f"block_size must be a power of two, at least 16 (got {self.block_size})"
        unknown = [p for p in self.providers if p not in PROVIDERS]
        if unknown or not self.providers:
            return f"providers must be a non-empty list of {', '.join(PROVIDERS)} (got {self.providers})"
        odd = [p for p in self.readiness if p not in READINESS]
        if odd:
            return f"readiness must list execution providers among {', '.join(READINESS)} (got {self.readiness})"
        if self.readiness and "ort" not in self.formats:
            return "a target with readiness checks is a mobile one and must ship the ORT format (formats = [\"ort\"])"
        if not 0 < self.device_bandwidth_efficiency <= 1:
            return "device_bandwidth_efficiency must be in (0, 1]"
        if self.device_memory_bandwidth_gbs is not None and not self.device_source:
            return "device_memory_bandwidth_gbs needs device_source (where the figure comes from)"
        return None

    @property
    def graph_keys(self) -> Graph:
        return Graph(self.opset, self.context)

    @property
    def precision(self) -> Precision:
        return Precision(**{k: getattr(self, k) for k in Precision.__dataclass_fields__})

    @property
    def kernels(self) -> Kernels:
        return Kernels(**{k: getattr(self, k) for k in Kernels.__dataclass_fields__})

    @property
    def bits(self) -> int:
        return 4 if self.weights == "int4" else 8

    @property
    def accuracy_level(self) -> int:
        return ACCURACY_LEVEL[self.activations]


def from_manifest(table: dict, where: str) -> Target:
    """The target a bundle was made for, from its manifest (keys newer than that edgepeft are left out)."""
    return from_table(Target, {k: v for k, v in table.items() if k in Target.__dataclass_fields__}, where)


def search_dirs(base_dir: Path | None) -> list[Path]:
    dirs = [Path.cwd() / "targets", Path(__file__).resolve().parents[2] / "targets"]  # last: the source tree
    if base_dir is not None:
        dirs.insert(0, base_dir.parent / "targets")  # export/android.toml -> targets/
        dirs.insert(0, base_dir / "targets")
    return dirs


def _path(spec: str, base_dir: Path | None) -> Path:
    if spec.endswith(".toml"):
        path = Path(spec)
        if base_dir is not None and not path.is_absolute() and not path.exists():
            path = base_dir / path
        return path
    found = [d / f"{spec}.toml" for d in search_dirs(base_dir) if (d / f"{spec}.toml").is_file()]
    if not found:
        known = sorted({p.stem for d in search_dirs(base_dir) if d.is_dir() for p in d.glob("*.toml")})
        raise EdgepeftError(f"unknown target {spec!r} (known: {', '.join(known) or 'none found'})")
    return found[0]


def _table(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A target file's keys over those of the target it ``extends`` (a name, or a path next to it)."""
    table = load_toml(path)
    parent = table.pop("extends", None)
    if parent is None:
        return table
    if not isinstance(parent, str) or not parent:
        raise EdgepeftError(f"{path}: extends must be a target name or a .toml path, got {parent!r}")
    base = _path(parent, path.parent) if parent.endswith(".toml") else _path(parent, path.parent.parent)
    if base.resolve() in seen or base.resolve() == path.resolve():
        raise EdgepeftError(f"{path}: extends {parent!r}, which extends it back")
    inherited = {k: v for k, v in _table(base, (*seen, path.resolve())).items() if k != "name"}
    return {**inherited, **table}


def load(spec: str, base_dir: Path | None = None) -> Target:
    """A target by name (``targets/<name>.toml``, searched next to the recipe and in the working folder)
    or by path to a TOML file; a target may ``extends = "<name>"`` another and change some of its keys."""
    path = _path(spec, base_dir)
    table = _table(path)
    table.setdefault("name", path.stem)  # its own name, never the one it extends
    return from_table(Target, table, str(path))
