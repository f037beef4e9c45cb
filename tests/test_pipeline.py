"""The stages end to end on a tiny random-init Llama: records, skipping, resume, atomicity, merge."""

import json

import pytest
import torch

from edgepeft.core.errors import EdgepeftError
from edgepeft.pipeline import recipe as recipe_mod
from edgepeft.pipeline.runner import run_stages
from edgepeft.stages.registry import STAGES
from tests.conftest import write_recipe


def _run(recipe_path, out, **kw):
    kw.setdefault("last", "merge")  # the PyTorch stages; test_bundle.py runs the whole pipeline
    return run_stages(STAGES, recipe_mod.load(recipe_path), out, echo=lambda s: None, **kw)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def _check_merge(out):
    """The saved merged model reproduces (4-bit base + adapter), and differs from the base alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgepeft.models.pytorch import dequantized_model, load_4bit

    adapter_dir = out / "train" / "adapter"
    reference = PeftModel.from_pretrained(load_4bit(out / "quantize" / "model"), adapter_dir)
    merged = AutoModelForCausalLM.from_pretrained(out / "merge" / "model", dtype=torch.float32)
    assert "quantization_config" not in merged.config.to_dict()
    ids = list(range(100, 140))
    diff = (_logits(reference, ids) - _logits(merged, ids)).abs().max().item()
    assert diff < 1e-3
    base = dequantized_model(out / "quantize" / "model")
    assert (_logits(base, ids) - _logits(merged, ids)).abs().max().item() > 10 * max(diff, 1e-6)


def test_lora_pipeline_records_skips_and_merges(tiny_recipe, tmp_path):
    out = tmp_path / "run"
    recs = _run(tiny_recipe, out)
    assert list(recs) == ["load", "quantize", "train", "merge"]
    for name, rec in recs.items():
        on_disk = json.loads((out / name / "record.json").read_text())
        assert on_disk["fingerprint"] == rec["fingerprint"] and on_disk["files"]
    q = recs["quantize"]["figures"]
    assert q["weight_bytes_after"] < q["weight_bytes_before"] and q["linear_4bit_modules"] == 14
    t = recs["train"]["figures"]
    assert t["trainable_parameters"] > 0 and len(t["losses"]) == 6
    assert 0.0 <= t["validation_exact_match_adapter"] <= 1.0
    assert recs["merge"]["figures"]["max_logit_diff"] < 1e-3
    assert [p.name for p in out.glob(".*")] == [".lock"]  # no temporary or work folders left behind

    # the adapter is in PEFT's own format: PeftModel loads it unchanged
    adapter_dir = out / "train" / "adapter"
    assert (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "adapter_model.safetensors").is_file()
    _check_merge(out)

    # unchanged rerun: every stage skipped, nothing rewritten
    mtime = (out / "merge" / "record.json").stat().st_mtime_ns
    again = _run(tiny_recipe, out)
    assert all(again[k]["fingerprint"] == recs[k]["fingerprint"] for k in recs)
    assert (out / "merge" / "record.json").stat().st_mtime_ns == mtime

    # a train-config change reruns train and merge only
    write_recipe(tiny_recipe, tiny_recipe.parent / "unused", steps=4)
    text = tiny_recipe.read_text().replace((tiny_recipe.parent / "unused").as_posix(),
                                           recs["load"]["figures"]["source"])
    tiny_recipe.write_text(text)
    changed = _run(tiny_recipe, out)
    assert changed["load"]["fingerprint"] == recs["load"]["fingerprint"]
    assert changed["quantize"]["fingerprint"] == recs["quantize"]["fingerprint"]
    assert changed["train"]["fingerprint"] != recs["train"]["fingerprint"]
    assert changed["merge"]["fingerprint"] != recs["merge"]["fingerprint"]
    assert len(changed["train"]["figures"]["losses"]) == 4


def test_ia3_merges_into_the_dequantized_base(tmp_path, tiny_model_dir):
    r = write_recipe(tmp_path / "ia3.toml", tiny_model_dir, method="ia3", steps=4)
    recs = _run(r, tmp_path / "run")
    cfg = json.loads((tmp_path / "run" / "train" / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3"
    # per layer: k and v scale their 32 outputs, down scales its 128 inputs
    assert recs["train"]["figures"]["trainable_parameters"] == 2 * (32 + 32 + 128)
    assert recs["merge"]["figures"]["max_logit_diff"] < 1e-3
    _check_merge(tmp_path / "run")


def test_resume_continues_exactly(tmp_path, tiny_model_dir, monkeypatch):
    from safetensors.torch import load_file

    from edgepeft.stages import train

    r = write_recipe(tmp_path / "r.toml", tiny_model_dir, steps=6)
    # separate parents: a sibling run with the same fingerprint would be reused, not trained again
    straight = tmp_path / "a" / "straight"
    _run(r, straight, last="train")

    interrupted = tmp_path / "b" / "interrupted"
    real_save = train._save_checkpoint

    def save_then_die(work, step, *a, **k):
        path = real_save(work, step, *a, **k)
        if step == 4:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(train, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(r, interrupted, last="train")
    assert not (interrupted / "train").exists() and not (interrupted / ".train.tmp").exists()
    assert (interrupted / ".train.work" / "step-000004").is_dir()
    monkeypatch.setattr(train, "_save_checkpoint", real_save)
    rec = _run(r, interrupted, last="train", options={"resume": True})["train"]
    assert rec["figures"]["resumed_from_step"] == 4
    a = load_file(straight / "train" / "adapter" / "adapter_model.safetensors")
    b = load_file(interrupted / "train" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert rec["figures"]["losses"] == json.loads((straight / "train" / "record.json").read_text())["figures"]["losses"]


def test_failed_stage_leaves_nothing_half_written(tmp_path, tiny_model_dir):
    r = write_recipe(tmp_path / "r.toml", tiny_model_dir, steps=2, extra="")
    r.write_text(r.read_text().replace("max_logit_diff = 0.001", "max_logit_diff = 0.0"))
    out = tmp_path / "run"
    with pytest.raises(EdgepeftError, match="more than max_logit_diff"):
        _run(r, out)
    assert (out / "train" / "record.json").is_file()
    assert not (out / "merge").exists() and not (out / ".merge.tmp").exists()


def test_from_needs_earlier_stages(tiny_recipe, tmp_path):
    with pytest.raises(EdgepeftError, match="needs stage 'load', which has not run"):
        _run(tiny_recipe, tmp_path / "empty", first="train")
    with pytest.raises(EdgepeftError, match="unknown stage"):
        _run(tiny_recipe, tmp_path / "empty", first="bake")


def test_empty_training_data_is_a_clear_error(tmp_path, tiny_model_dir):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    r = write_recipe(tmp_path / "r.toml", tiny_model_dir, extra=f'data = "{data.as_posix()}"')
    with pytest.raises(EdgepeftError, match="no examples"):
        _run(r, tmp_path / "run")


def _prose_loss(run_dir, recipe_path) -> tuple[float, float]:
    """Mean next-token loss of (4-bit base + adapter), then of the 4-bit base alone, on the gate's held-out prose."""
    from transformers import AutoTokenizer

    from edgepeft.adapters import api
    from edgepeft.quality.gate import heldout
    from edgepeft.quality.reference import Reference

    recipe = recipe_mod.load(recipe_path)
    ref = Reference.of_run(run_dir)
    windows, _ = heldout(recipe, recipe.evaluate, AutoTokenizer.from_pretrained(ref.adapter))
    model = ref.load()
    ids = torch.tensor(windows)

    def loss():
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()

    tuned = loss()
    with api.disabled(model):
        return tuned, loss()


def test_prose_rehearsal_keeps_held_out_prose_and_stays_out_of_the_gate(tmp_path, tiny_model_dir):
    """[train] replay_batch: prose windows rehearsed each step (from the calibration part of Python's help topics)
    leave the adapter better on the gate's held-out prose than the task alone does; with a user's file as both the
    rehearsed and the held-out text, the gate drops every line that was rehearsed."""
    from edgepeft.calib.sets import evaluation_text

    plain = write_recipe(tmp_path / "plain.toml", tiny_model_dir, steps=6)
    rehearsed = write_recipe(tmp_path / "rehearsed.toml", tiny_model_dir, steps=6,
                             extra="replay_batch = 4\nreplay_tokens = 64")
    a = _run(plain, tmp_path / "a" / "run", last="train")["train"]["figures"]
    b = _run(rehearsed, tmp_path / "b" / "run", last="train")["train"]["figures"]
    assert "replay_losses" not in a and len(b["replay_losses"]) == 6
    plain_loss, base_loss = _prose_loss(tmp_path / "a" / "run", plain)
    rehearsed_loss, _ = _prose_loss(tmp_path / "b" / "run", rehearsed)
    assert rehearsed_loss < min(plain_loss, base_loss) - 0.05, (rehearsed_loss, plain_loss, base_loss)

    prose = tmp_path / "prose.txt"
    prose.write_text("\n".join(f"Line {i} of the user's own prose, long enough to count." for i in range(40)))
    mine = write_recipe(tmp_path / "mine.toml", tiny_model_dir,
                        extra=f'replay_batch = 1\nreplay_text = "{prose.as_posix()}"')
    _, about = evaluation_text(recipe_mod.load(mine), prose.as_posix(), "builtin:python-docs")
    assert about["lines_dropped_as_seen_in_calibration_or_training"] == 40
    _, about = evaluation_text(recipe_mod.load(plain), prose.as_posix(), "builtin:python-docs")
    assert about["lines_dropped_as_seen_in_calibration_or_training"] == 0
