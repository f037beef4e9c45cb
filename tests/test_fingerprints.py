"""What a stage's fingerprint covers: every outside file its config names (edited, the stage and all after it
rerun), and nothing else (an unchanged rerun skips every stage)."""

from __future__ import annotations

import shutil

from edgepeft.calib.text import python_docs

from edgepeft.core.files import sha256_files
from edgepeft.pipeline import recipe as recipe_mod
from edgepeft.pipeline.runner import run_stages
from edgepeft.pipeline.stage import read_record
from edgepeft.stages.registry import STAGE_NAMES, STAGES
from tests.conftest import write_recipe


def _run(recipe_path, out) -> dict[str, set[str]]:
    lines: list[str] = []
    run_stages(STAGES, recipe_mod.load(recipe_path), out, echo=lines.append)
    stage = {ln[1:ln.index("]")] for ln in lines if ln.startswith("[")}
    return {"skipped": {s for s in stage if any(ln.startswith(f"[{s}] unchanged") for ln in lines)},
            "ran": {s for s in stage if any(ln.startswith(f"[{s}] done in") for ln in lines)}}


def test_an_unchanged_rerun_skips_every_stage(tiny_run, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    shutil.copytree(tiny_run["out"], out)
    path = write_recipe(tmp_path / "tiny.toml", tiny_model_dir)  # the same recipe, written anew elsewhere
    result = _run(path, out)
    assert result == {"skipped": set(STAGE_NAMES), "ran": set()}


def test_an_edited_calibration_text_reruns_requantize_and_what_follows(tiny_run, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    shutil.copytree(tiny_run["out"], out)
    calib = tmp_path / "calib.txt"
    calib.write_text(python_docs("calibration")[:20000])
    path = write_recipe(tmp_path / "tiny.toml", tiny_model_dir)
    path.write_text(path.read_text().replace("[requantize]\n", '[requantize]\ncalib_text = "calib.txt"\n'))
    after = {"requantize", "heal", "bundle", "evaluate"}
    before = set(STAGE_NAMES) - after

    first = _run(path, out)  # a new key: requantize and what follows rerun
    assert first == {"skipped": before, "ran": after}
    assert read_record(out / "requantize")["outside"]["requantize.calib_text"] == sha256_files([calib])

    calib.write_text(calib.read_text() + "\nA line the user added to their calibration text.\n")
    edited = _run(path, out)  # the same recipe, but the file it names changed
    assert edited == {"skipped": before, "ran": after}
    assert read_record(out / "requantize")["outside"]["requantize.calib_text"] == sha256_files([calib])

    assert _run(path, out) == {"skipped": set(STAGE_NAMES), "ran": set()}


def test_a_missing_declared_file_is_one_clear_error(tiny_run, tmp_path, tiny_model_dir):
    import pytest

    from edgepeft.core.errors import EdgepeftError

    out = tmp_path / "run"
    shutil.copytree(tiny_run["out"], out)
    path = write_recipe(tmp_path / "tiny.toml", tiny_model_dir)
    path.write_text(path.read_text().replace("[evaluate]\n", '[evaluate]\ntext = "gone.txt"\n'))
    with pytest.raises(EdgepeftError, match=r"\[evaluate\] text: file not found: gone.txt"):
        run_stages(STAGES, recipe_mod.load(path), out, echo=lambda s: None)
