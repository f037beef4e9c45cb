"""Bad input and faults, tried as a demanding user would (issue #19): each case ends with one clear line, is
refused, or leaves nothing broken; never a traceback, never a silent pass."""

import json
import math
import shutil
import subprocess
import sys

import pytest
from edgepeft.calib.data import Sample, encode, read_jsonl

from edgepeft.bundle.manifest import MANIFEST, gate_failure, read_manifest, seal
from edgepeft.bundle.runner import Runner
from edgepeft.core.config import from_table, load_toml
from edgepeft.core.errors import EdgepeftError
from edgepeft.latency import check as latency_check
from edgepeft.pipeline import recipe as recipe_mod
from edgepeft.quality.gate import EvaluateConfig
from edgepeft.quality.scores import Budgets, passed, verdict
from tests.conftest import interrupt_heal_at_first_checkpoint, run_before_heal, write_recipe


def cli(*args):
    return subprocess.run([sys.executable, "-m", "edgepeft", *args], capture_output=True, text=True, timeout=300)


def one_line(r, code=2):
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("warning")]
    return lines[-1]


# --- values that must be refused -------------------------------------------------------------------------

def test_nan_is_refused_in_any_table(tmp_path, tiny_model_dir):
    with pytest.raises(EdgepeftError, match="max_kl = nan: nan is not a value"):
        from_table(EvaluateConfig, {"max_kl": math.nan}, "r.toml [evaluate]")
    path = write_recipe(tmp_path / "r.toml", tiny_model_dir, budgets="max_kl = nan")
    assert "nan is not a value" in one_line(cli("run", str(path), "--out", str(tmp_path / "o")))
    assert from_table(EvaluateConfig, {"max_kl": math.inf}, "w").budgets().max_kl is None  # inf: switched off
    assert Budgets(max_kl=math.nan).problems() is not None


@pytest.mark.parametrize("figure", ["kl", "perplexity_increase", "next_token_agreement", "accuracy_drop"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_measured_nan_or_inf_fails_the_gate(figure, value):
    figures = {"kl": 0.1, "perplexity_increase": 0.05, "next_token_agreement": 0.9, "accuracy_drop": 0.0}
    assert passed(verdict(figures, Budgets()))
    figures[figure] = value
    rows = verdict(figures, Budgets())
    assert not passed(rows) and [r["budget"] for r in rows if not r["passed"]]


@pytest.mark.parametrize("args, words", [(("--rounds", "0"), "--rounds 0"), (("--rounds", "3"), "at least 6"),
                                         (("--tolerance", "-1"), "tolerance -1"),
                                         (("--tolerance", "nan"), "tolerance nan")])
def test_latency_check_refuses_bad_rounds_and_tolerance(tmp_path, args, words):
    with pytest.raises(EdgepeftError, match=words):
        latency_check.check(tmp_path, tmp_path / "b.json", update=True,
                            rounds=int(args[1]) if args[0] == "--rounds" else None,
                            tolerance=float(args[1]) if args[0] == "--tolerance" else None)


def test_non_utf8_recipe_and_jsonl_are_one_line(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(EdgepeftError, match="not UTF-8"):
        load_toml(bad)
    assert "not UTF-8" in one_line(cli("run", str(bad)))
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(EdgepeftError, match=r"d.jsonl:2: not UTF-8"):
        read_jsonl(data)


def test_a_huge_example_is_cut_before_tokenizing(tiny_model_dir):
    """A 6 MB example costs what its first max_length tokens cost (the tokenizer never sees the rest), and the
    ids and labels are those of the whole example."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    class Spy:
        longest = 0

        def __call__(self, text, **kw):
            Spy.longest = max(Spy.longest, len(text))
            return tok(text, **kw)

        def __getattr__(self, name):
            return getattr(tok, name)

    words = " ".join(f"word{i}" for i in range(700_000))
    small = " ".join(f"word{i}" for i in range(2000))
    cases = [(Sample(text=words), Sample(text=small)),
             (Sample(prompt=words, completion="x"), Sample(prompt=small, completion="x"))]
    if getattr(tok, "chat_template", None) is not None:
        cases.append((Sample(messages=(("user", words), ("assistant", "ok"))),
                      Sample(messages=(("user", small), ("assistant", "ok")))))
    for huge, short in cases:
        Spy.longest = 0
        assert encode(Spy(), huge, 64) == encode(tok, short, 64)
        assert 0 < Spy.longest < 10_000 + 64 * 64, Spy.longest


@pytest.mark.parametrize("name, words", [('"../../../x"', "plain folder name"), ('""', "plain folder name"),
                                         ('".hidden"', "plain folder name")])
def test_a_target_name_cannot_leave_the_run_folder(tmp_path, tiny_model_dir, name, words):
    (tmp_path / "targets").mkdir()
    src = (recipe_mod.Path(__file__).parent.parent / "targets" / "android-arm64.toml").read_text()
    (tmp_path / "targets" / "evil.toml").write_text(src.replace('name = "android-arm64"', f"name = {name}"))
    write_recipe(tmp_path / "r.toml", tiny_model_dir, target="evil")
    with pytest.raises(EdgepeftError, match=words):
        recipe_mod.load(tmp_path / "r.toml")


def test_a_target_opset_below_the_builders_fails_before_training(tmp_path, tiny_model_dir):
    (tmp_path / "targets").mkdir()
    src = (recipe_mod.Path(__file__).parent.parent / "targets" / "android-arm64.toml").read_text()
    (tmp_path / "targets" / "old.toml").write_text(src.replace("opset = 21", "opset = 5"))
    path = write_recipe(tmp_path / "r.toml", tiny_model_dir, target="old")
    assert "needs ai.onnx opset 21, target android-arm64 supports up to 5" in one_line(
        cli("run", str(path), "--out", str(tmp_path / "o")))
    assert not (tmp_path / "o" / "train").exists()


# --- bundles: what the manifest says is checked -----------------------------------------------------------

def _resealed(run, tmp_path, change):
    copy = tmp_path / "b"
    shutil.copytree(run["bundle"], copy)
    m = json.loads((copy / MANIFEST).read_text())
    change(m)
    (copy / MANIFEST).write_bytes(seal(m))
    return copy


@pytest.mark.parametrize("change, words", [
    (lambda m: m.update(model_file="../../requantize/model/model.onnx"), "outside the bundle"),
    (lambda m: m.update(model_file="/etc/passwd"), "outside the bundle"),
    (lambda m: m.update(model_file="nothing.onnx"), "not one of the bundle's files"),
    (lambda m: m.pop("target"), "incomplete manifest"),
    (lambda m: m.pop("model_file"), "incomplete manifest"),
])
def test_manifest_model_file_and_target_are_checked(tiny_run, tmp_path, change, words):
    copy = _resealed(tiny_run, tmp_path, change)
    with pytest.raises(EdgepeftError, match=words):
        read_manifest(copy)
    assert words in one_line(cli("verify", str(copy)))


def test_a_bundle_that_failed_its_gate_is_said_loudly(tiny_run, tmp_path):
    def fail(m):
        m["quality"] = {**m.get("quality", {}), "passed": False, "report": "quality/report.md",
                        "rows": [{"budget": "max_kl", "passed": False}]}
    copy = _resealed(tiny_run, tmp_path, fail)
    assert "max_kl" in gate_failure(read_manifest(copy))
    r = cli("verify", str(copy))
    assert r.returncode == 1 and "FAILED its quality gate" in r.stderr and "--allow-failed-gate" in r.stderr
    r = cli("verify", str(copy), "--allow-failed-gate")
    assert r.returncode == 0 and "warning" in r.stderr and "FAILED its quality gate" in r.stderr
    r = cli("generate", str(copy), "hello", "--max-new-tokens", "2")
    assert r.returncode == 0 and "FAILED its quality gate" in r.stderr
    assert gate_failure(read_manifest(tiny_run["bundle"])) is None


def test_generate_refuses_bad_lengths_and_caps_huge_ones(tiny_run):
    b = str(tiny_run["bundle"])
    for n in ("0", "-5"):
        assert "must be at least 1" in one_line(cli("generate", b, "hi", "--max-new-tokens", n))
    runner = Runner(tiny_run["bundle"])
    context = runner.context_length
    assert context
    with pytest.raises(EdgepeftError, match="context holds"):
        runner.generate([5] * context, 4)
    assert runner.generate([5] * (context - 3), 10**9).tokens <= 3  # capped at the context's end


# --- run folders: a lock, and nothing skipped or reused on trust -------------------------------------------

def _copy_run(tiny_run, dest, keep=None):
    """A copy of the tiny run's folder (``keep``: only these stage folders)."""
    ignore = None if keep is None else (lambda d, names: [n for n in names if d == str(tiny_run["out"])
                                                           and n not in keep and not n.startswith("record")])
    shutil.copytree(tiny_run["out"], dest, ignore=ignore)
    return dest


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_second_run_into_the_same_folder_is_one_clear_line(tiny_run, tmp_path):
    from edgepeft.core.files import folder_lock
    from edgepeft.pipeline.runner import run_stages
    from edgepeft.stages.registry import STAGES

    out = _copy_run(tiny_run, tmp_path / "run")
    recipe = recipe_mod.load(tiny_run["recipe"])
    with folder_lock(out):  # another process's run, as far as the lock can tell (flock: per open file)
        with pytest.raises(EdgepeftError, match=r"in use by another edgepeft process \(pid \d+\)"):
            run_stages(STAGES, recipe, out, echo=lambda s: None)
        r = cli("run", str(tiny_run["recipe"]), "--out", str(out))
        assert "in use by another edgepeft process" in one_line(r)
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    records = run_stages(STAGES, recipe, out, echo=lambda s: None)  # released: runs (everything skipped)
    assert set(records) == {s.name for s in STAGES}


def test_a_changed_byte_in_a_finished_stage_reruns_it_and_what_reads_it(tiny_run, tmp_path):
    from edgepeft.bundle.runner import verify
    from edgepeft.pipeline.runner import run_stages
    from edgepeft.stages.registry import STAGES

    out = _copy_run(tiny_run, tmp_path / "run")
    recipe = recipe_mod.load(tiny_run["recipe"])
    said = []
    _flip(out / "bundle" / "android-arm64" / "quality" / "quality.json")  # written by evaluate, into the bundle
    assert verify(out / "bundle" / "android-arm64")[0]
    run_stages(STAGES, recipe, out, echo=said.append)
    assert any(s.startswith("[bundle] its finished folder changed (android-arm64: quality/quality.json")
               for s in said), said
    assert any(s.startswith("[evaluate] quality gate") for s in said)  # evaluate ran again on the new bundle
    assert verify(out / "bundle" / "android-arm64")[0] == []
    assert (out / "bundle" / "android-arm64" / "quality" / "quality.json").is_file()

    said.clear()
    _flip(out / "train" / "adapter" / "adapter_model.safetensors")
    run_stages(STAGES, recipe, out, last="merge", echo=said.append)
    changed = "[train] its finished folder changed (adapter/adapter_model.safetensors: sha256 differs from its record"
    assert any(changed in s for s in said), said
    assert any(s.startswith("[merge] ") and "skipped" not in s for s in said)  # reads train: made again
    said.clear()
    run_stages(STAGES, recipe, out, echo=said.append)  # now everything is intact again: all skipped
    assert all("skipped" in s for s in said), said


def test_a_changed_byte_in_a_sibling_run_is_not_reused(tiny_run, tmp_path):
    from edgepeft.pipeline.runner import run_stages
    from edgepeft.stages.registry import STAGES

    dist = tmp_path / "dist"
    sib = _copy_run(tiny_run, dist / "tiny", keep={"load", "quantize", "train"})
    _flip(sib / "train" / "adapter" / "adapter_model.safetensors")
    recipe = recipe_mod.load(tiny_run["recipe"])
    records = run_stages(STAGES, recipe, dist / "other", last="train", echo=lambda s: None)
    assert records["quantize"].get("reused_from") == str(sib / "quantize")  # intact: shared
    assert "reused_from" not in records["train"]  # flipped: trained again
    assert not (dist / "other" / "train" / "adapter" / "adapter_model.safetensors").samefile(
        sib / "train" / "adapter" / "adapter_model.safetensors")


# --- sections of a sealed bundle: all or nothing ----------------------------------------------------------

_KILL = """
import os, sys
from pathlib import Path
from edgepeft.bundle import manifest as m
bundle, where = Path(sys.argv[1]), sys.argv[2]
man = m.open_for_update(bundle)
def fill(tmp):
    (tmp / "report.md").write_text("x" * 1000)
    if where == "fill":
        (tmp / "half.json").write_text('{"half": ')
        os._exit(9)
if where == "seal":
    real = m.write_atomic
    def dying(path, data):
        Path(str(path) + ".partial").write_text(str(data)[:50])
        os._exit(9)
    m.write_atomic = dying
m.add_section(bundle, man, "quality", fill, quality={"passed": True})
"""


@pytest.mark.parametrize("where", ["fill", "seal"])
def test_a_kill_while_adding_a_section_leaves_the_bundle_whole(tiny_run, tmp_path, where):
    from edgepeft.bundle.runner import verify

    copy = tmp_path / "b"
    shutil.copytree(tiny_run["bundle"], copy)
    before = (copy / MANIFEST).read_bytes()
    r = subprocess.run([sys.executable, "-c", _KILL, str(copy), where], capture_output=True, text=True, timeout=300)
    assert r.returncode == 9, r.stderr[-2000:]
    assert verify(copy)[0] == [] and (copy / MANIFEST).read_bytes() == before
    r = subprocess.run([sys.executable, "-c", _KILL, str(copy), "none"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert verify(copy)[0] == [] and (copy / "quality" / "report.md").read_text() == "x" * 1000
    assert not (copy / "quality" / "quality.json").exists()  # the section was replaced whole
    assert not list(tmp_path.glob(".b.*"))


def test_two_commands_adding_sections_to_one_bundle_do_not_mix(tiny_run, tmp_path):
    from edgepeft.bundle.manifest import add_section, open_for_update
    from edgepeft.bundle.runner import verify
    from edgepeft.core.files import folder_lock

    copy = tmp_path / "b"
    shutil.copytree(tiny_run["bundle"], copy)
    manifest = open_for_update(copy)
    with folder_lock(tmp_path), pytest.raises(EdgepeftError, match="adding a section to this bundle"):
        add_section(copy, manifest, "profile", lambda d: (d / "r.md").write_text("a"))
    add_section(copy, open_for_update(copy), "profile", lambda d: (d / "r.md").write_text("b"))
    with pytest.raises(EdgepeftError, match="changed since its manifest was read"):  # read before the other's
        add_section(copy, manifest, "quality", lambda d: (d / "q.md").write_text("c"))
    assert verify(copy)[0] == [] and (copy / "profile" / "r.md").read_text() == "b"


def test_profile_json_into_a_missing_folder_fails_before_measuring(tiny_run, tmp_path):
    from edgepeft.latency.profile import profile_bundle

    with pytest.raises(EdgepeftError, match="does not exist"):
        profile_bundle(tiny_run["bundle"], json_out=tmp_path / "nowhere" / "p.json")


# --- the machine: a full disk or a read-only folder is one line, and nothing half-written stays -----------

@pytest.mark.parametrize("err", ["ENOSPC", "EROFS"])
def test_disk_full_or_read_only_is_one_line(tiny_run, tmp_path, monkeypatch, capsys, err):
    import dataclasses
    import errno
    import os

    from edgepeft import cli
    from edgepeft.stages import registry

    out = _copy_run(tiny_run, tmp_path / "run", keep={"load"})

    def full(ctx):
        (ctx.out / "partial.bin").write_bytes(b"\0" * 10)
        raise OSError(getattr(errno, err), os.strerror(getattr(errno, err)), str(ctx.out / "model.bin"))
    full.__module__ = "edgepeft.stages.quantize"  # the stage's fingerprint hashes its module's code
    monkeypatch.setattr(cli, "STAGES", [dataclasses.replace(s, run=full) if s.name == "quantize" else s
                                        for s in registry.STAGES])
    code = cli.main(["run", str(tiny_run["recipe"]), "--out", str(out), "--to", "quantize"])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("edgepeft")]
    assert code == 2 and lines == [f"edgepeft: error: {out / '.quantize.tmp' / 'model.bin'}: "
                                   f"{os.strerror(getattr(errno, err))}"]
    assert not (out / "quantize").exists() and not (out / ".quantize.tmp").exists()


def test_a_corrupt_checkpoint_is_set_aside_and_does_not_block_resuming(tiny_run, tmp_path, monkeypatch, capsys):
    from edgepeft.pipeline.runner import run_stages
    from edgepeft.stages.registry import STAGES

    out = run_before_heal(tiny_run, tmp_path / "run")
    recipe = recipe_mod.load(tiny_run["recipe"])
    interrupt_heal_at_first_checkpoint(recipe, out, monkeypatch)
    ckpt = out / ".heal.work" / "step-000002"
    (ckpt / "optim.pt").write_bytes(b"not a checkpoint")
    rec = run_stages(STAGES, recipe, out, first="heal", last="heal", options={"resume": True},
                     echo=lambda s: None)["heal"]["figures"]
    assert rec["resumed_from_step"] == 0 and rec["steps"] == 4  # started over, and finished
    assert "checkpoint step-000002 cannot be read" in capsys.readouterr().out
    assert not ckpt.exists()  # set aside, so it blocks nothing
    assert not (out / ".heal.work").exists() or (out / ".heal.work" / "bad-step-000002").is_dir()


@pytest.mark.parametrize("damage, words", [
    (lambda d: (d / "model.safetensors").write_bytes(b"garbage" * 100), "not a safetensors file"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-1000]), "truncated"),
    (lambda d: (d / "model.safetensors").rename(d / "weights.safetensors"), "name the weights model.safetensors"),
])
def test_damaged_weights_are_found_in_preflight(tiny_model_dir, tmp_path, damage, words):
    from edgepeft.models.sources import resolve

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    resolve(str(model))  # intact: accepted
    damage(model)
    with pytest.raises(EdgepeftError, match=words):
        resolve(str(model))
    path = write_recipe(tmp_path / "r.toml", model)
    assert words in one_line(cli("run", str(path), "--out", str(tmp_path / "o")))


def test_more_bad_input_found_by_trying(tiny_run, tmp_path, tiny_model_dir):
    """Found by trying ~75 bad inputs on the CLI (the closing note of #19 has the list)."""
    recipe = str(tiny_run["recipe"])
    (tmp_path / "afile").write_text("x")
    assert "a file is there" in one_line(cli("run", recipe, "--out", str(tmp_path / "afile")))
    assert "a folder, not a TOML file" in one_line(cli("run", str(tmp_path)))
    assert "repeats must be positive" in one_line(cli("profile", str(tiny_run["bundle"]), "--repeats", "0"))
    path = write_recipe(tmp_path / "r.toml", tiny_model_dir, extra="weight_decay = inf")
    assert "weight_decay = inf: must be finite" in one_line(cli("run", str(path), "--out", str(tmp_path / "o")))
    path = write_recipe(tmp_path / "d.toml", tiny_model_dir)
    path.write_text(path.read_text().replace("alpha = 16", "alpha = 16\ndropout = 2.0"))
    assert "dropout must be in [0, 1)" in one_line(cli("run", str(path), "--out", str(tmp_path / "o")))


def test_a_prompt_of_100_kb_on_the_command_line_is_one_line_not_a_crash(tiny_run):
    """onnxruntime-genai's Model() needs most of an 8 MB main-thread stack, which argv shares: it is built on a
    thread with a large stack (bundle.runner.with_large_stack); before, this died with SIGSEGV."""
    r = cli("generate", str(tiny_run["bundle"]), "word " * 20000)
    assert "the model's context holds" in one_line(r)


def test_a_profile_longer_than_the_targets_context_fails_before_training(tmp_path, tiny_model_dir):
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "short.toml").write_text('extends = "android-arm64"\ncontext = 64\n')
    path = write_recipe(tmp_path / "r.toml", tiny_model_dir, target="short")
    assert ("[profile] lengths reach 64 tokens + 4 decoded, past target short's context of 64" in one_line(
        cli("run", str(path), "--out", str(tmp_path / "o"))))
    assert not (tmp_path / "o" / "train").exists()
