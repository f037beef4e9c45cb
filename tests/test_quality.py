"""The quality gate: its figures, its budgets and verdict table, the separation of evaluation data from
calibration and training data, and the evaluate stage / command on the tiny model's bundle."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from edgepeft.calib import sets

from edgepeft.bundle.manifest import check_files, read_manifest
from edgepeft.core.errors import EdgepeftError
from edgepeft.pipeline import recipe as recipe_mod
from edgepeft.pipeline.runner import run_stages
from edgepeft.quality.scores import Budgets, passed, score, table, verdict
from edgepeft.stages.registry import STAGES
from tests.conftest import write_recipe


def test_scores_of_a_model_against_itself_and_a_worse_one():
    rng = np.random.default_rng(0)
    ids = [int(t) for t in rng.integers(0, 50, 33)]
    ref = rng.standard_normal((33, 50)) * 3
    ref[np.arange(32), ids[1:]] += 4  # the reference predicts the text well
    same = score([ref], [ref.copy()], [ids])
    assert same["perplexity_increase"] == pytest.approx(0) and same["kl"] == pytest.approx(0)
    assert same["next_token_agreement"] == 1 and same["tokens"] == 33
    noisy = score([ref], [ref + rng.standard_normal(ref.shape) * 3], [ids])
    assert noisy["perplexity_increase"] > 0.05 and noisy["kl"] > 0.1 and noisy["next_token_agreement"] < 1
    # perplexity is exp(mean negative log-likelihood of the next token)
    lp = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    assert same["perplexity"] == pytest.approx(np.exp(-lp[np.arange(32), ids[1:]].mean()))


def test_verdict_table_says_what_broke_and_by_how_much():
    figures = {"perplexity_increase": 0.30, "kl": 0.1, "next_token_agreement": 0.70, "accuracy_drop": 0.0}
    rows = verdict(figures, Budgets(max_perplexity_increase=0.15, max_kl=0.25, min_next_token_agreement=0.75,
                                    max_accuracy_drop=0.05))
    assert not passed(rows)
    broken = {r["budget"]: r for r in rows if not r["passed"]}
    assert set(broken) == {"max_perplexity_increase", "min_next_token_agreement"}
    assert broken["max_perplexity_increase"]["by"] == pytest.approx(0.15)
    assert broken["min_next_token_agreement"]["by"] == pytest.approx(0.05)
    text = table(rows)
    assert "FAIL by 15.0%" in text and "FAIL by 5.0%" in text and text.count("pass") == 2
    # the search's margin tightens the limits; a missing figure (no task) is no row
    assert not passed(verdict({"perplexity_increase": 0.13}, Budgets(0.15, None, None, None), margin=0.8))
    assert verdict({"kl": 0.1}, Budgets(0.15, 0.25, 0.75, 0.05)) == [
        {"budget": "max_kl", "measured": 0.1, "allowed": 0.25, "passed": True, "by": pytest.approx(-0.15)}]


def test_builtin_evaluation_text_shares_no_line_with_calibration_or_training(tiny_recipe):
    recipe = recipe_mod.load(tiny_recipe)
    held, about = sets.evaluation_text(recipe, sets.BUILTIN_TEXT, sets.BUILTIN_TEXT)
    calib = sets.line_keys([sets.text_part(sets.BUILTIN_TEXT, "calibration")])
    assert len(held) > 50_000
    assert not sets.line_keys([held]) & calib
    assert about["lines_dropped_as_seen_in_calibration_or_training"] > 0  # some help lines recur across topics


def test_same_file_for_calibration_and_evaluation_leaves_nothing_to_evaluate(tmp_path, tiny_model_dir):
    text = "\n".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(400))
    (tmp_path / "prose.txt").write_text(text)
    (tmp_path / "other.txt").write_text(text.replace("quick", "slow"))
    path = write_recipe(tmp_path / "r.toml", tiny_model_dir)
    body = path.read_text().replace("[requantize]\n", '[requantize]\ncalib_text = "prose.txt"\n')
    path.write_text(body.replace("[evaluate]\n", '[evaluate]\ntext = "prose.txt"\n'))
    recipe = recipe_mod.load(path)
    held, about = sets.evaluation_text(recipe, "prose.txt", "prose.txt")
    assert held.strip() == "" and about["lines_dropped_as_seen_in_calibration_or_training"] == 400
    held, about = sets.evaluation_text(recipe, "other.txt", "prose.txt")
    assert about["lines_dropped_as_seen_in_calibration_or_training"] == 0 and held == text.replace("quick", "slow")


def test_jsonl_text_is_read_as_its_examples_text(tmp_path):
    rows = [{"text": "first held-out paragraph about tides"}, {"prompt": "Q: why?", "completion": "A: because."}]
    (tmp_path / "held.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = sets.text_part(str(tmp_path / "held.jsonl"), "evaluation")
    assert text == "first held-out paragraph about tides\n\nQ: why?\nA: because."
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(EdgepeftError, match="is empty"):
        sets.text_part(str(tmp_path / "empty.txt"), "evaluation")
    with pytest.raises(EdgepeftError, match="not found"):
        sets.text_part(str(tmp_path / "missing.txt"), "evaluation")


def test_test_prompts_seen_in_training_are_dropped():
    from edgepeft.calib.data import Sample

    train = [Sample(messages=(("system", "s"), ("user", "call mom"), ("assistant", "{}")))]
    test = [Sample(messages=(("system", "s"), ("user", "Call  Mom"), ("assistant", "{}"))),
            Sample(messages=(("system", "s"), ("user", "call dad"), ("assistant", "{}")))]
    kept, dropped = sets.disjoint_samples(test, train)
    assert dropped == 1 and [s.messages[1][1] for s in kept] == ["call dad"]


def test_builtin_task_splits_need_no_dropping():
    from edgepeft.calib.data import builtin_splits

    s = builtin_splits("phone-commands")
    assert sets.disjoint_samples(s["test"], s["train"])[1] == 0


def test_evaluate_stage_failure_writes_the_verdict_and_a_readable_table(tiny_run, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    shutil.copytree(tiny_run["out"], out)
    path = write_recipe(tmp_path / "tiny.toml", tiny_model_dir,
                        budgets="max_kl = 0.0\nmin_next_token_agreement = 1.0\nmax_perplexity_increase = 0.0")
    rec = recipe_mod.load(path)
    rec.name = "tiny"
    with pytest.raises(EdgepeftError) as e:
        run_stages(STAGES, rec, out, first="evaluate", echo=lambda s: None)
    msg = str(e.value)
    assert "broke" in msg and "FAIL by" in msg and "min_next_token_agreement" in msg
    bundle = out / "bundle" / "android-arm64"
    manifest = read_manifest(bundle)
    assert manifest["quality"]["passed"] is False
    assert check_files(bundle, read_manifest(bundle)) == []  # re-sealed: the failed bundle still verifies
    assert "**FAILED**" in (bundle / "quality" / "report.md").read_text()
    result = json.loads((bundle / "quality" / "quality.json").read_text())
    assert not result["passed"] and result["budgets"]["max_kl"] == 0.0
    assert not (out / "evaluate" / "record.json").exists() or json.loads(
        (out / "evaluate" / "record.json").read_text())["figures"]["passed"]  # no passing record for it


def test_evaluate_command_on_a_bundle(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run["out"], out)
    bundle = out / "bundle" / "android-arm64"
    cmd = [sys.executable, "-m", "edgepeft.cli", "evaluate", str(bundle)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "max_perplexity_increase" in done.stdout and "re-sealed" in done.stdout
    assert check_files(bundle, read_manifest(bundle)) == []
    # a bundle moved away from its run needs --run; a wrong run (another adapter) is refused
    moved = tmp_path / "moved"
    shutil.copytree(bundle, moved)
    done = subprocess.run(cmd[:-1] + [str(moved)], capture_output=True, text=True)
    assert done.returncode == 2 and "no trained reference there" in done.stderr
    assert "Traceback" not in done.stderr
    done = subprocess.run(cmd[:-1] + [str(moved), "--run", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (out / "train" / "adapter" / "adapter_config.json").write_text("{}")
    done = subprocess.run(cmd[:-1] + [str(moved), "--run", str(out)], capture_output=True, text=True)
    assert done.returncode == 2 and "not the adapter this bundle was made from" in done.stderr


def test_reference_answers_are_cached_by_what_decides_them(tiny_run, tmp_path, monkeypatch):
    # the Android, iOS and desktop bundles of one run ask the same reference the same prompts: its answers
    # are generated once and kept under the hash of the base, the adapter, the prompts and the settings
    import dataclasses

    from edgepeft.quality import answers, gate
    from edgepeft.quality.reference import Reference, answers_cache

    monkeypatch.setenv("EDGEPEFT_CACHE", str(tmp_path / "cache"))
    calls = []
    real = answers.greedy_answers
    monkeypatch.setattr(answers, "greedy_answers", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "run"
    shutil.copytree(tiny_run["out"], out)
    bundle, rec = out / "bundle" / "android-arm64", recipe_mod.load(tiny_run["recipe"])
    manifest, ref = read_manifest(bundle), Reference.of_run(out)

    first = gate.measure(bundle, manifest, rec, rec.evaluate, ref)
    second = gate.measure(bundle, manifest, rec, rec.evaluate, ref)
    assert len(calls) == 1 and first["task_examples"] == 4
    assert not first["reference_answers_cached"] and second["reference_answers_cached"]
    assert second["exact_match_reference"] == first["exact_match_reference"] < 1.0  # a random model's answers
    # what the second gate read is the cache: answers planted there become the reference's
    [kept] = answers_cache().glob("*.json")
    samples, _, _ = gate.test_prompts(rec, rec.evaluate)
    planted = json.loads(kept.read_text())
    kept.write_text(json.dumps({**planted, "answers": [s.reference for s in samples]}))
    assert gate.measure(bundle, manifest, rec, rec.evaluate, ref)["exact_match_reference"] == 1.0
    # another generation length, or another adapter, is another question
    longer = dataclasses.replace(rec.evaluate, max_new_tokens=rec.evaluate.max_new_tokens + 1)
    assert not gate.measure(bundle, manifest, rec, longer, ref)["reference_answers_cached"] and len(calls) == 2
    config = out / "train" / "adapter" / "adapter_config.json"
    config.write_text(config.read_text() + "\n")
    assert not gate.measure(bundle, manifest, rec, rec.evaluate, ref)["reference_answers_cached"] and len(calls) == 3


def test_mixed_precision_search_promotes_only_what_the_budget_needs(tiny_run, tmp_path, tiny_model_dir):
    """With calibration budgets that all-int4 misses, requantize keeps some MatMuls at int8 (chosen by
    measurement): bigger than all-int4, smaller than all-int8, and it meets the budget it aimed at."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run["out"], out)
    path = write_recipe(tmp_path / "tiny.toml", tiny_model_dir,
                        budgets="max_perplexity_increase = 0.002\nmax_kl = 0.0005\nmin_next_token_agreement = 0.97\n"
                                "max_accuracy_drop = 1.0")
    records = run_stages(STAGES, recipe_mod.load(path), out, first="requantize", last="requantize",
                         echo=lambda s: None)
    f = records["requantize"]["figures"]
    uniform = tiny_run["records"]["requantize"]["figures"]
    assert 0 < f["int8_matmuls"] < f["matmulnbits"]
    assert uniform["quantized_bytes"] < f["quantized_bytes"]
    assert f["budgets_met_on_calibration"] and uniform["budgets_met_on_calibration"] is not None
    steps = f["search_steps"]
    assert any(not s["passed"] for s in steps) and f["int8_matmuls"] == min(
        s["int8_matmuls"] for s in steps if s["passed"])
    detail = json.loads((out / "requantize" / "quantization.json").read_text())
    assert sum(b == 8 for b in detail["bits"].values()) == f["int8_matmuls"]
    assert set(detail["search_order"][:f["int8_matmuls"]]) == set(f["int8_matmul_names"])


def test_keep_int8_holds_the_named_matmuls_at_int8(tiny_run, tmp_path, tiny_model_dir):
    """``[requantize] keep_int8`` names MatMuls by a part of their node names: those, and only those (and the
    head where the target keeps it at int8), are int8 in the graph; a name that matches nothing fails in one line."""
    import onnx

    out = tmp_path / "run"
    shutil.copytree(tiny_run["out"], out)
    path = write_recipe(tmp_path / "tiny.toml", tiny_model_dir)
    path.write_text(path.read_text().replace("[requantize]\n", '[requantize]\nkeep_int8 = ["down_proj"]\n'))
    records = run_stages(STAGES, recipe_mod.load(path), out, first="requantize", last="requantize",
                         echo=lambda s: None)
    f = records["requantize"]["figures"]
    model = onnx.load(str(out / "requantize" / "model" / "model.onnx"))
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits")
            for n in model.graph.node if n.op_type == "MatMulNBits"}
    down = {n for n in bits if "down_proj" in n}
    layers = json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
    assert len(down) == layers
    assert {n for n, b in bits.items() if b == 8} - {n for n in bits if n.startswith("/lm_head")} == down
    assert set(f["int8_matmul_names"]) >= {n.rsplit("_Q", 1)[0] for n in down}
    assert f["quantized_bytes"] > tiny_run["records"]["requantize"]["figures"]["quantized_bytes"]

    path.write_text(path.read_text().replace('keep_int8 = ["down_proj"]', 'keep_int8 = ["no_such_proj"]'))
    with pytest.raises(EdgepeftError, match="keep_int8 'no_such_proj' names no weight MatMul"):
        run_stages(STAGES, recipe_mod.load(path), out, first="requantize", last="requantize", echo=lambda s: None)
