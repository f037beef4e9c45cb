"""The arm64 emulation check (edgepeft.arm64): the standalone probe computes what ``Decoder`` computes, the
comparison passes equal logits and fails broken ones, and (only where the arm64 root is already built, see
``edgepeft.arm64.emulate``) the tiny bundle run under qemu on the official aarch64 onnxruntime matches x86."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgepeft.arm64 import emulate
from edgepeft.onnx.decoder import Decoder

PROBE = Path(emulate.__file__).with_name("probe.py")


def _probe(tmp_path, spec) -> dict:
    (tmp_path / "in.json").write_text(json.dumps(spec))
    subprocess.run([sys.executable, str(PROBE), str(tmp_path / "in.json"), str(tmp_path / "out.npz")], check=True)
    with np.load(tmp_path / "out.npz") as z:
        return {k: z[k] for k in z.files}


def test_probe_computes_what_decoder_computes(tiny_run, tmp_path):
    bundle = tiny_run["bundle"]
    model = bundle / json.loads((bundle / "genai_config.json").read_text())["model"]["decoder"]["filename"]
    ids, forced = [1, 504, 3117, 314, 253, 1789, 30], [28, 9001, 17, 4]
    spec = {"model": str(model), "genai_config": str(bundle / "genai_config.json"), "prompt": ids,
            "decode_steps": len(forced), "forced": forced, "threads": 1}
    out = _probe(tmp_path, spec)
    meta = json.loads(str(out["meta"]))
    assert meta["machine"] and meta["onnxruntime"] and meta["providers"] == ["CPUExecutionProvider"]

    dec = Decoder(model, threads=1)
    logits, cache = dec.prefill(ids)
    assert out["prefill"].shape[0] == len(ids)  # every prompt position, from the bundle's pruned head too
    np.testing.assert_array_equal(out["prefill"], logits)
    assert out["fed"].tolist() == forced  # the forced tokens are fed, not the greedy ones
    for i, token in enumerate(forced):
        row, cache = dec.step(token, cache, len(ids) + i + 1)
        np.testing.assert_array_equal(out["decode"][i], row)
    assert out["greedy"].tolist() == [int(logits[-1].argmax()), *out["decode"].argmax(-1).tolist()]

    greedy = _probe(tmp_path, {**spec, "forced": None})  # without forced tokens: its own greedy choices
    assert greedy["fed"].tolist() == greedy["greedy"][:-1].tolist()
    np.testing.assert_array_equal(greedy["prefill"], out["prefill"])


def test_compare_passes_equal_logits_and_fails_broken_ones():
    rng = np.random.default_rng(0)
    x86 = rng.normal(0, 4, (24, 500)).astype(np.float32)
    x86[np.arange(24), rng.integers(0, 500, 24)] += 12  # a clear favourite per row, as a trained model has
    same = emulate.compare(x86, x86.copy())
    assert same["passed"] and same["failures"] == []
    assert same["max_abs_diff"] == same["max_kl"] == same["max_flip_gap"] == 0 and same["argmax_agreement"] == 1

    noisy = emulate.compare(x86, x86 + rng.normal(0, 0.05, x86.shape).astype(np.float32))
    assert noisy["passed"] and 0 < noisy["max_kl"] < 0.01

    shifted = emulate.compare(x86, np.roll(x86, 1, axis=0))  # rows off by one: a wrong cache or position
    assert not shifted["passed"] and shifted["argmax_agreement"] < 0.2
    assert {f.split()[0] for f in shifted["failures"]} == {"max_kl", "rel_max_diff", "argmax_agreement",
                                                           "max_flip_gap"}
    flipped = x86.copy()
    flipped[3, flipped[3].argmin()] = flipped[3].max() + 1  # one row: arm64 picks the token x86 ranked last
    one = emulate.compare(x86, flipped)
    assert not one["passed"] and one["argmax_agreement"] == pytest.approx(23 / 24)
    assert any(f.startswith("max_flip_gap") for f in one["failures"])
    tight = emulate.CHECKS["no-kleidiai"][1]
    scaled = emulate.compare(x86, x86 * 1.1, tight)  # 10% off everywhere: within "shipped", not within tight
    assert emulate.compare(x86, x86 * 1.1)["passed"] and not scaled["passed"]
    nan = x86.copy()
    nan[0, 0] = np.nan
    assert emulate.compare(x86, nan)["failures"] == ["arm64 logits are not all finite"]


def test_judge_fails_a_wrong_platform_a_version_mismatch_or_a_failed_run():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 4, (6, 50)).astype(np.float32)
    greedy = logits.argmax(-1)
    x86 = {"onnxruntime": "1.32.0", "arrays": {"greedy": greedy}}

    def arm(machine="aarch64", version="1.32.0"):
        return {"machine": machine, "onnxruntime": version,
                "arrays": {"prefill": logits[:4], "decode": logits[4:], "greedy": greedy}}

    ok = emulate.judge(arm(), x86, logits, emulate.TOLERANCE)
    assert ok["passed"] and ok["greedy_matches_x86"] and "arrays" not in ok
    assert not emulate.judge(arm(machine="x86_64"), x86, logits, emulate.TOLERANCE)["passed"]
    assert not emulate.judge(arm(version="1.31.0"), x86, logits, emulate.TOLERANCE)["passed"]
    failed = emulate.judge({"error": "boom"}, x86, logits, emulate.TOLERANCE)
    assert failed["failures"] == ["arm64 run failed: boom"] and not failed["passed"]


def test_prompt_has_the_requested_length(tiny_run):
    ids, text = emulate.prompt_ids(tiny_run["bundle"], 40)
    assert len(ids) == 40 and text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\n" in text
    with pytest.raises(emulate.EdgepeftError, match="--prompt-tokens must be between"):
        emulate.prompt_ids(tiny_run["bundle"], 5)


def test_user_errors_are_one_line(tmp_path, capsys):
    assert emulate.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("emulate: error:") and "no genai_config.json" in err and err.count("\n") == 1
    assert emulate.default_out(Path("dist/android/bundle/android-arm64")) == Path("dist/android/emulate/arm64.json")


ROOT = emulate.DEFAULT_ROOT


@pytest.mark.skipif(not (ROOT / emulate.ROOT_MARK).is_file() or os.geteuid() != 0,
                    reason=f"no arm64 root at {ROOT} (build it with `nox -s emulate-android`; needs root)")
def test_emulated_arm64_matches_x86(tiny_run, tmp_path):
    out = tmp_path / "arm64.json"
    result = emulate.emulate(tiny_run["bundle"], ROOT, prompt_tokens=32, decode_steps=4,
                             cpus=("cortex-a76",), out=out)
    assert json.loads(out.read_text())["passed"] == result["passed"]
    assert [r["check"] for r in result["arm64"]] == list(emulate.CHECKS)
    for run in result["arm64"]:
        assert run["machine"] == "aarch64" and run["onnxruntime"] == result["x86"]["onnxruntime"]
        assert run["passed"], emulate.table(result)
    # the gate's prose figures on the arm64 kernels, against the run's (4-bit base + adapter)
    q = result["quality"]
    assert q["windows"] == 2 and q["tokens"] == 2 * 32 and q["cpu"] == "cortex-a76"
    # the tiny recipe's budgets: perplexity and KL (its agreement budget is 0, switched off); never exact match
    assert [r["budget"] for r in q["rows"]] == ["max_perplexity_increase", "max_kl"]
    assert abs(q["arm64"]["perplexity_reference"] - q["x86"]["perplexity_reference"]) < 1e-9
    assert q["arm64"]["kl"] < 0.5 and result["passed"] == (all(r["passed"] for r in result["arm64"]) and q["passed"])
