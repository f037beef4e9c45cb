"""The run folder's layout, spelled here and nowhere else.

    dist/<recipe name>/             a run (``--out`` elsewhere)
        <stage>/record.json         what the stage read, measured and wrote (edgepeft.pipeline.stage)
        <stage>/<artifact>/         its artifact: load, quantize, merge, export, requantize, heal: model/;
                                    train: adapter/
        bundle/<target name>/       the deployable bundle (edgepeft.bundle)
        .<stage>.tmp/               a stage being written; renamed to <stage>/ when it finishes
        .<stage>.work/              what survives a failed attempt (training checkpoints)
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_ROOT = Path("dist")
ARTIFACTS = {"load": "model", "quantize": "model", "train": "adapter", "merge": "model", "export": "model",
             "requantize": "model", "heal": "model"}
BUNDLES = "bundle"


def bundle_in(stage_folder: Path, target_name: str) -> Path:
    """The bundle folder inside the bundle stage's folder (finished, or being written)."""
    return stage_folder / target_name


class RunDir:
    """One run folder; every path inside it comes from here."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    @classmethod
    def default(cls, recipe_name: str) -> RunDir:
        return cls(DEFAULT_ROOT / recipe_name)

    @classmethod
    def of_bundle(cls, bundle: Path) -> RunDir:
        """The run a bundle folder (``<run>/bundle/<target>``) was written in; for a bundle moved elsewhere,
        the folder holding it."""
        bundle = Path(bundle)
        return cls(bundle.parent.parent if bundle.parent.name == BUNDLES else bundle.parent)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    def stage(self, name: str) -> Path:
        return self.path / name

    def tmp(self, name: str) -> Path:
        return self.path / f".{name}.tmp"

    def work(self, name: str) -> Path:
        return self.path / f".{name}.work"

    def artifact(self, stage: str) -> Path:
        return self.stage(stage) / ARTIFACTS[stage]

    def bundle(self, target_name: str) -> Path:
        return bundle_in(self.stage(BUNDLES), target_name)

    def bundles(self) -> list[Path]:
        """Every finished bundle folder of the run."""
        return sorted(p.parent for p in self.stage(BUNDLES).glob("*/manifest.json"))

    def scratch(self, name: str) -> Path:
        """A folder of the run's for tools outside the pipeline (``.bench``, ``.latency-study``)."""
        return self.path / f".{name}"

    @property
    def quantized_base(self) -> Path:
        return self.artifact("quantize")

    @property
    def adapter(self) -> Path:
        return self.artifact("train")

    def siblings(self, stage: str) -> list[Path]:
        """The folders of ``stage`` in the other runs beside this one (``dist/*/<stage>``)."""
        return [p for p in sorted(self.path.parent.glob(f"*/{stage}")) if p.parent != self.path]
