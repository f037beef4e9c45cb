"""Healing: the PyTorch mirror computes what ONNX Runtime computes from the quantized graph, the fitted
values go back into the graph, the stage brings the int4 model closer to the trained one, and resumes."""

import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from edgepeft.arm64 import emulate
from edgepeft.heal.mirror import GraphWeights, Mirror, QuantLinear, fake_int8
from edgepeft.onnx.decoder import Decoder
from edgepeft.pipeline import recipe as recipe_mod
from edgepeft.pipeline.runner import run_stages
from edgepeft.pipeline.target import Kernels
from edgepeft.stages.registry import STAGES
from tests.conftest import interrupt_heal_at_first_checkpoint, run_before_heal


def _config(run_out):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(run_out / "merge" / "model")


def _graph(path):
    import onnx

    return GraphWeights(onnx.load(str(path)))


def _ort_logits(model, genai, ids, level=None):
    from edgepeft.stages.heal import _with_accuracy_level

    if level is not None:
        model = _with_accuracy_level(model, level)
    return Decoder(model.SerializeToString(), genai_config=genai).prefill(ids)[0]


def _mirror_logits(mirror, ids):
    with torch.no_grad():
        return mirror.model(input_ids=torch.tensor([ids])).logits[0].numpy()


def test_activation_rounding_follows_the_target_kernels():
    assert Kernels("arm64", "int4", True, "int8").activation_rounding == "rowwise"  # KleidiAI
    assert Kernels("arm64", "int4", False, "int8").activation_rounding == "blockwise"  # zero points: MLAS
    assert Kernels("x86_64", "int4", True, "int8").activation_rounding == "blockwise"
    assert Kernels("x86_64", "int4", True, "fp32").activation_rounding is None
    assert Kernels("arm64", "int4", True, "int8").bf16_scales  # KleidiAI packs the scales as bf16
    assert not Kernels("arm64", "int4", False, "int8").bf16_scales
    assert not Kernels("x86_64", "int4", True, "int8").bf16_scales
    x = torch.randn(3, 64)
    for scheme in ("blockwise", "rowwise"):
        q = fake_int8(x, scheme, 32)
        assert 0 < (q - x).abs().max() < x.abs().max() / 100  # rounded, to int8 resolution
    assert torch.equal(fake_int8(x, None, 32), x)


def test_fake_int8_straight_through_gradient():
    x = torch.randn(2, 64, requires_grad=True)
    fake_int8(x, "blockwise", 32).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def _one_matmul(k=576, n=96, block=32, seed=0):
    """One symmetric int4 MatMulNBits at accuracy_level 4 (serialized), its inputs, and the mirror's layer for
    each simulation: activation rounding x scale format."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, size=(n, k // block, block)).astype(np.uint8)
    scales = rng.uniform(0.01, 0.05, size=(n, k // block)).astype(np.float32)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft", K=k, N=n,
                            bits=4, block_size=block, accuracy_level=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.ravel(), "scales")])
    model = helper.make_model(graph, ir_version=10,
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    # channels of very different ranges and a shifted mean: the roundings differ most on such inputs
    x = (rng.standard_normal((16, k)) * rng.uniform(0.1, 3, size=(1, k)) + 0.3).astype(np.float32)
    centered = torch.from_numpy(codes.astype(np.float32) - 8)
    sims = {}
    for act in (None, "blockwise", "rowwise"):
        for bf16 in (False, True):
            with torch.no_grad():
                layer = QuantLinear(centered, torch.from_numpy(scales), act, bf16)
                sims[act, bf16] = layer(torch.from_numpy(x)).numpy()
    return model.SerializeToString(), x, sims


def _closest(y, sims) -> tuple:
    errors = {key: float(np.abs(y - v).max()) for key, v in sims.items()}
    best = min(errors, key=errors.get)
    second = min(v for key, v in errors.items() if key != best)
    return best, errors[best], second


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="MLAS's x86 int8 kernels")
def test_blockwise_rounding_is_what_the_x86_kernel_computes():
    """One MatMulNBits at accuracy_level 4 on this x86 CPU: of the mirror's simulations, block-wise int8
    activations with fp32 scales match it to float rounding, every other one is far off."""
    from edgepeft.onnx.decoder import session

    model, x, sims = _one_matmul()
    best, err, second = _closest(session(model).run(None, {"x": x})[0], sims)
    assert best == ("blockwise", False) and err < 1e-3 and second > 100 * err


ROOT = emulate.DEFAULT_ROOT


@pytest.mark.skipif(not (ROOT / emulate.ROOT_MARK).is_file() or os.geteuid() != 0,
                    reason=f"no arm64 root at {ROOT} (build it with `nox -s emulate-android`; needs root)")
def test_rowwise_bf16_is_what_kleidiai_computes(tmp_path):
    """The same MatMulNBits on the official aarch64 onnxruntime under qemu: KleidiAI's kernels (i8mm and
    dot-product CPUs alike) compute the mirror's per-row activations with bf16-truncated scales; with KleidiAI
    off, MLAS's arm64 kernels compute the x86 simulation."""
    model, x, sims = _one_matmul()
    info = emulate.build_root(ROOT)
    site, _ = emulate.install_wheels(ROOT, info["python"])
    qemu, _ = emulate.sync_qemu(ROOT)
    work = Path(tempfile.mkdtemp(prefix="edgepeft-kernel-", dir=ROOT / "tmp"))
    inside = "/" + work.relative_to(ROOT).as_posix()
    try:
        (work / "m.onnx").write_bytes(model)
        np.save(work / "x.npy", x)
        (work / "run.py").write_text(
            "import sys, numpy as np, onnxruntime as ort\n"
            "so = ort.SessionOptions()\n"
            "for kv in sys.argv[4:]:\n    so.add_session_config_entry(*kv.split('='))\n"
            "s = ort.InferenceSession(sys.argv[1], so, providers=['CPUExecutionProvider'])\n"
            "np.save(sys.argv[3], s.run(None, {'x': np.load(sys.argv[2])})[0])\n")
        for cpu in emulate.CPUS:
            for config, expected in (((), ("rowwise", True)), (("mlas.disable_kleidiai=1",), ("blockwise", False))):
                cmd = [*emulate.guest_python(ROOT, qemu, cpu), f"{inside}/run.py", f"{inside}/m.onnx",
                       f"{inside}/x.npy", f"{inside}/y.npy", *config]
                r = subprocess.run(cmd, env=emulate.guest_env(site), capture_output=True, text=True, timeout=600)
                assert r.returncode == 0, r.stderr[-1000:]
                best, err, second = _closest(np.load(work / "y.npy"), sims)
                assert best == expected and err < 1e-3 and second > 100 * err, (cpu, config, best, err, second)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_mirror_equals_onnx_runtime_and_writes_back(tiny_run):
    """With float activations the mirror is the graph; changed scales and norms, written back, are what ONNX
    Runtime then computes; the integer codes are untouched."""
    src = tiny_run["out"] / "requantize" / "model"
    genai = src / "genai_config.json"
    graph = _graph(src / "model.onnx")
    mirror = Mirror(graph, _config(tiny_run["out"]), None)
    ids = list(range(200, 248))
    ort0 = _ort_logits(graph.model, genai, ids, level=0)
    assert np.abs(ort0 - _mirror_logits(mirror, ids)).max() < 1e-3

    codes = {n: graph.array(node.input[1]).copy() for n, (node, *_) in graph.matmuls.items()}
    torch.manual_seed(0)
    with torch.no_grad():
        for g in mirror.gains():
            g.add_(0.05 * torch.randn_like(g))
        for w in mirror.norm_weights():
            w.mul_(1.1)
    mirror.write_back()
    moved = _ort_logits(graph.model, genai, ids, level=0)
    assert np.abs(moved - ort0).max() > 1e-2  # the graph changed...
    assert np.abs(moved - _mirror_logits(mirror, ids)).max() < 1e-3  # ...into what the mirror computes
    for n, (node, *_) in graph.matmuls.items():
        assert np.array_equal(graph.array(node.input[1]), codes[n])


def test_heal_stage_brings_the_graph_closer_to_the_trained_model(tiny_run):
    rec = tiny_run["records"]["heal"]["figures"]
    assert rec["healed"] and rec["steps"] == 4 and rec["activation_rounding"] == "rowwise"  # android-arm64
    assert rec["calibration_after"]["kl"] < rec["calibration_before"]["kl"]
    assert rec["mirror_vs_ort_max_logit_diff"] < 1e-3
    # the tiny recipe's 32-token task windows hold no answer; the shares are reported, not checked
    assert rec["answer_agreement_before"].keys() == rec["answer_agreement_fitted"].keys()
    assert rec["answers_lost"] == []
    before = _graph(tiny_run["out"] / "requantize" / "model" / "model.onnx")
    after = _graph(tiny_run["out"] / "heal" / "model" / "model.onnx")
    changed = 0
    for node, *_ in before.matmuls.values():
        assert np.array_equal(before.array(node.input[1]), after.array(node.input[1]))  # same codes
        changed += not np.array_equal(before.array(node.input[2]), after.array(node.input[2]))
    assert changed == len(before.matmuls)  # every MatMul's scales were fitted
    assert rec["bf16_scales"]  # android-arm64: written as KleidiAI reads them, so x86 computes the same
    for node, *_ in after.matmuls.values():
        assert not (after.array(node.input[2]).view(np.uint32) & 0xFFFF).any()
    manifest = json.loads((tiny_run["bundle"] / "manifest.json").read_text())
    assert manifest["figures"]["heal"]["calibration_after"] == rec["calibration_after"]
    assert manifest["recipe"]["heal"]["steps"] == 4


def test_heal_resumes_exactly(tmp_path, tiny_run, monkeypatch):
    recipe = recipe_mod.load(tiny_run["recipe"])
    kw = {"first": "heal", "last": "heal", "echo": lambda s: None}
    straight = run_before_heal(tiny_run, tmp_path / "a" / "run")
    run_stages(STAGES, recipe, straight, **kw)

    interrupted = run_before_heal(tiny_run, tmp_path / "b" / "run")
    interrupt_heal_at_first_checkpoint(recipe, interrupted, monkeypatch)
    assert not (interrupted / "heal").exists() and (interrupted / ".heal.work" / "step-000002").is_dir()
    rec = run_stages(STAGES, recipe, interrupted, options={"resume": True}, **kw)["heal"]["figures"]
    assert rec["resumed_from_step"] == 2
    a = json.loads((straight / "heal" / "losses.json").read_text())
    b = json.loads((interrupted / "heal" / "losses.json").read_text())
    assert np.allclose(a, b, rtol=0, atol=1e-5)
    ga, gb = _graph(straight / "heal" / "model" / "model.onnx"), _graph(interrupted / "heal" / "model" / "model.onnx")
    for node, *_ in ga.matmuls.values():
        assert np.allclose(ga.array(node.input[2]), gb.array(node.input[2]), rtol=1e-5, atol=0)


def test_answer_agreement_counts_the_answers_the_graph_gives_exactly_as_the_teacher(tiny_run):
    import onnx

    from edgepeft.stages.heal import _answer_agreement, _judged, _ort_logits

    src = tiny_run["out"] / "requantize" / "model"
    model = onnx.load(str(src / "model.onnx"))
    genai = src / "genai_config.json"
    rng = np.random.default_rng(0)
    windows = [[int(t) for t in rng.integers(0, 200, 16)] for _ in range(3)]
    logits = dict(enumerate(_ort_logits(model, genai, windows)))
    teacher = [torch.log_softmax(torch.from_numpy(x), -1) for x in logits.values()]
    answers = [None, [0] * 2 + [1] * 4 + [0] * 2 + [1] * 8, [1] * 4 + [0] * 12]  # prose, then three answers
    assert _answer_agreement(logits, teacher, windows, answers) == {"(task)": 1.0}
    moved = [t.clone() for t in teacher]
    for w, pos in ((1, 9), (2, 0), (0, 3), (1, 7)):  # one token of two answers, a prose and a question token differ
        moved[w][pos] = moved[w][pos].flip(0)
    assert _answer_agreement(logits, moved, windows, answers) == {"(task)": round(1 / 3, 5)}
    per = _answer_agreement(logits, moved, windows, answers, under=[None, "a", "b"])
    assert per == {"a": 0.5, "b": 0.0}
    # _judged computes both figures from one ONNX Runtime pass over the windows either needs
    scores, agreed = _judged(model, genai, moved, windows, [0, 1], answers)
    assert agreed == {"(task)": round(1 / 3, 5)} and scores["tokens"] == 32


def test_a_fit_that_costs_the_answers_is_not_shipped(tmp_path, tiny_run, monkeypatch):
    """With ``[heal] max_answer_drop``, lower KL is not enough: a fit that loses more of any task's answers
    (teacher-forced, in its calibration windows) ships the requantized graph instead."""
    from edgepeft.stages import heal

    out = run_before_heal(tiny_run, tmp_path / "d" / "run")
    calls = []

    def agreement(*args, **kw):
        calls.append(args)
        return {"(task)": 0.9 if len(calls) == 1 else 0.85}

    monkeypatch.setattr(heal, "_answer_agreement", agreement)
    path = tmp_path / "d" / "tiny.toml"
    path.write_text(tiny_run["recipe"].read_text().replace("[heal]\n", "[heal]\nmax_answer_drop = 0.02\n"))
    rec = run_stages(STAGES, recipe_mod.load(path), out, first="heal", last="heal",
                     echo=lambda s: None)["heal"]["figures"]
    assert len(calls) == 2 and rec["answers_lost"] == ["(task)"] and not rec["healed"]
    assert rec["calibration_fitted"]["kl"] < rec["calibration_before"]["kl"]  # the KL alone would have shipped it
    assert (out / "heal" / "model" / "model.onnx").read_bytes() == \
        (tiny_run["out"] / "requantize" / "model" / "model.onnx").read_bytes()


def test_heal_steps_zero_passes_the_graph_through(tmp_path, tiny_run):
    out = run_before_heal(tiny_run, tmp_path / "c" / "run")
    text = tiny_run["recipe"].read_text().replace("[heal]\nsteps = 4", "[heal]\nsteps = 0")
    path = tmp_path / "c" / "tiny.toml"
    path.write_text(text)
    rec = run_stages(STAGES, recipe_mod.load(path), out, first="heal", last="heal", echo=lambda s: None)["heal"]
    assert rec["figures"] == {"steps": 0, "healed": False}
    assert (out / "heal" / "model" / "model.onnx").read_bytes() == \
        (tiny_run["out"] / "requantize" / "model" / "model.onnx").read_bytes()


def test_every_window_once_per_epoch_in_a_fresh_order():
    from edgepeft.heal.distill import kl_loss, lr_factor, window_of

    first = [window_of(s, 10, seed=0) for s in range(10)]
    second = [window_of(s, 10, seed=0) for s in range(10, 20)]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert first == [window_of(s, 10, seed=0) for s in range(10)]  # a function of (seed, step) alone
    assert lr_factor(0, 4, 100) < lr_factor(3, 4, 100) < lr_factor(4, 4, 100) == 1.0
    assert lr_factor(99, 4, 100) < 0.01
    logits = torch.randn(5, 30)
    assert abs(float(kl_loss(torch.log_softmax(logits, -1).half(), logits))) < 1e-3  # KL(p || p) = 0
    assert float(kl_loss(torch.log_softmax(logits, -1).half(), torch.randn(5, 30))) > 0.1
    # weighted by position: all the weight on the one position that differs gives that position's KL
    other = logits.clone()
    other[2] = torch.randn(30)
    teacher = torch.log_softmax(logits, -1).half()
    one = float(kl_loss(teacher[2:3], other[2:3]))
    assert float(kl_loss(teacher, other)) == pytest.approx(one / 5, rel=1e-3)
    assert float(kl_loss(teacher, other, torch.tensor([1.0, 1, 1e6, 1, 1]))) == pytest.approx(one, rel=1e-3)


def test_answer_masks_mark_the_positions_that_predict_answers(smollm_tokenizer_dir):
    """The heal's answer weight falls on the positions whose next token is an answer token of a training
    example (what training took its loss on): decoded, those next tokens are the examples' answers."""
    from edgepeft.calib.data import builtin_splits
    from edgepeft.calib.sets import task_windows
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    samples = builtin_splits("calendar-events")["train"][:40]
    masks: list = []
    windows = task_windows(tok, samples, 3, 256, masks)
    assert len(masks) == len(windows) == 3 and all(len(m) == len(w) for m, w in zip(masks, windows, strict=True))
    flat = [t for w in windows for t in w]
    flat_mask = [b for m in masks for b in m]
    answers = tok.decode([flat[t + 1] for t in range(len(flat) - 1) if flat_mask[t]])
    assert samples[0].reference in answers and samples[1].reference in answers
    assert 0 < sum(flat_mask) < len(flat_mask) / 2  # the prompts (system, question) outweigh the answers
    assert samples[0].messages[0][1] not in answers


def test_task_examples_are_single_conversations_with_their_answers(smollm_tokenizer_dir):
    """The adapter fit's examples: each training sample alone, from the start of its conversation as generation
    reads it, its mask on exactly the positions that predict the answer and its end-of-turn token (not the
    newline training appends after it, which is never generated)."""
    from edgepeft.calib.data import builtin_splits, prompt_ids
    from edgepeft.calib.sets import task_examples
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    samples = builtin_splits("calendar-events")["train"][:10]
    masks: list = []
    examples = task_examples(tok, samples, 4, 256, masks)
    assert len(examples) == len(masks) == 4
    for s, ids, mask in zip(samples[:4], examples, masks, strict=True):
        prompt = prompt_ids(tok, s)
        assert ids[:len(prompt)] == prompt  # one conversation, as the gate prompts it
        assert len(mask) == len(ids) and mask[-1] == 0
        answer = [ids[t + 1] for t in range(len(ids) - 1) if mask[t]]
        assert answer == ids[len(prompt):len(prompt) + len(answer)]
        assert tok.decode(answer) == s.reference + tok.eos_token
    assert task_examples(tok, samples, 0, 256) == []
    assert len(task_examples(tok, samples, 50, 256)) == 10  # no more than there are


def test_label_loss_reads_the_answer_positions_inside_the_window():
    import torch

    from edgepeft.heal.distill import label_loss

    torch.manual_seed(0)
    logits = torch.randn(5, 11)
    window = [3, 1, 4, 1, 5]
    # position t predicts token t + 1; the last position predicts a token outside the window and is not counted
    want = torch.nn.functional.cross_entropy(logits[[1, 2]], torch.tensor([4, 1]))
    assert torch.allclose(label_loss(window, logits, [0, 1, 1, 0, 1]), want)
    assert label_loss(window, logits, [0, 0, 0, 0, 1]) is None
