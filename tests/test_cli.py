"""User mistakes end with one clear line on stderr and exit status 2, never a traceback."""

import subprocess
import sys

import pytest


def edgepeft(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgepeft", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def _recipe(tmp_path, body):
    p = tmp_path / "r.toml"
    p.write_text(body)
    return str(p)


@pytest.mark.parametrize("body, words", [
    (None, "no such file"),
    ("[train\n", "invalid TOML"),
    ("[train]\nstepz = 3\n", "unknown key 'stepz'"),
    ("[model]\nsource = \"smollm9-1t\"\n", "model 'smollm9-1t' not found"),
    ("[model]\nsource = \"/nowhere/model.gguf\"\n", "model file not found"),
    ("[train]\ndata = \"BAD\"\n", "malformed JSON"),
    ("[train]\ndata = \"EMPTY\"\n", "no examples"),
    ("[heal]\nadapter_methods = [\"prefix\"]\n", "adapter_methods must name runtime adapter methods"),
    ("[heal]\nadapter_max_kl_increase = -0.1\n", "adapter_max_kl_increase must not be negative"),
])
def test_bad_input_is_one_line(tmp_path, body, words):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (tmp_path / "empty.jsonl").write_text("")
    if body is None:
        path = str(tmp_path / "missing.toml")
    else:
        for word, name in (("BAD", "bad.jsonl"), ("EMPTY", "empty.jsonl")):
            body = body.replace(word, (tmp_path / name).as_posix())
        path = _recipe(tmp_path, body)
    r = edgepeft("run", path, "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgepeft: error: ") and words in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "load").exists()  # preflight failed before any stage ran


def test_unknown_stage_name_is_a_usage_error(tmp_path):
    r = edgepeft("run", "export/android.toml", "--to", "bake")
    assert r.returncode == 2 and "invalid choice: 'bake'" in r.stderr and "Traceback" not in r.stderr


def test_stage_subcommands_exist():
    r = edgepeft("--help")
    assert r.returncode == 0
    for name in ("run", "load", "quantize", "train", "merge"):
        assert name in r.stdout
