from dataclasses import dataclass
from typing import Literal

import pytest

from edgepeft.core.config import from_table, load_toml
from edgepeft.core.errors import EdgepeftError
from edgepeft.pipeline import recipe


@dataclass
class Cfg:
    method: Literal["a", "b"] = "a"
    steps: int = 3
    lr: float = 0.1
    names: list[str] | None = None


def test_from_table_fills_and_keeps_defaults():
    c = from_table(Cfg, {"steps": 7, "lr": 1, "names": ["x"]}, "t")
    assert (c.method, c.steps, c.lr, c.names) == ("a", 7, 1, ["x"])


@pytest.mark.parametrize("table, words", [
    ({"stepz": 1}, "unknown key 'stepz'"),
    ({"steps": "many"}, "steps = 'many' must be int"),
    ({"steps": True}, "must be int"),
    ({"method": "c"}, "one of 'a', 'b'"),
    ({"names": [1]}, "names = [1]"),
])
def test_from_table_rejects(table, words):
    with pytest.raises(EdgepeftError, match=words.replace("[", r"\[").replace("]", r"\]")):
        from_table(Cfg, table, "f.toml [t]")


def test_bad_toml_is_one_clear_error(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text("[train\nsteps = 1")
    with pytest.raises(EdgepeftError, match="invalid TOML"):
        load_toml(p)
    with pytest.raises(EdgepeftError, match="no such file"):
        load_toml(tmp_path / "missing.toml")


def test_recipe_rejects_unknown_table_and_key(tmp_path):
    with pytest.raises(EdgepeftError, match="unknown key or table 'trian'"):
        recipe.parse({"trian": {}}, "r.toml")
    with pytest.raises(EdgepeftError, match=r"r.toml \[train\]: unknown key 'lerning_rate'"):
        recipe.parse({"train": {"lerning_rate": 1e-3}}, "r.toml")
    with pytest.raises(EdgepeftError, match="IA3 takes named target_modules"):
        recipe.parse({"adapter": {"method": "ia3", "target_modules": "all-linear"}}, "r.toml")
    with pytest.raises(EdgepeftError, match="feedforward_modules applies to IA3 only"):
        recipe.parse({"adapter": {"feedforward_modules": ["down_proj"]}}, "r.toml")
    assert recipe.parse({"adapter": {"method": "ia3"}}, "r.toml").adapter.target_modules is None


def test_default_recipe_parses():
    r = recipe.load("export/android.toml")
    assert r.name == "android" and r.model.source == "smollm2-135m-instruct"
    assert r.adapter.method == "lora" and r.train.data == "builtin:phone-commands"


def test_a_recipe_extends_another_key_by_key(tmp_path):
    (tmp_path / "base.toml").write_text('name = "base"\ntarget = "android-arm64"\n[train]\nsteps = 50\nlr = 0.01\n'
                                        '[adapter]\nr = 4\n')
    (tmp_path / "child.toml").write_text('extends = "base.toml"\nname = "child"\ntarget = "ios-arm64"\n'
                                         '[train]\nsteps = 7\n')
    r = recipe.load(tmp_path / "child.toml")
    assert (r.name, r.target.name, r.train.steps, r.train.lr, r.adapter.r) == ("child", "ios-arm64", 7, 0.01, 4)
    (tmp_path / "nameless.toml").write_text('extends = "base.toml"\n')
    assert recipe.load(tmp_path / "nameless.toml").name == "nameless"  # the base's name is not inherited


def test_an_extending_recipe_changes_one_key_of_a_task(tmp_path):
    """Tables nested in ``[tasks]`` merge key by key too: one key of one task, the rest inherited."""
    (tmp_path / "base.toml").write_text('name = "base"\n[tasks.phone.adapter]\nmethod = "lora"\n'
                                        '[tasks.cal.adapter]\nmethod = "ia3"\n'
                                        '[tasks.cal.train]\ndata = "builtin:calendar-events"\nlr = 0.1\n')
    (tmp_path / "child.toml").write_text('extends = "base.toml"\n[tasks.cal.train]\nreplay_batch = 2\n')
    r = recipe.load(tmp_path / "child.toml")
    cal = r.task("cal")
    assert set(r.tasks.names) == {"phone", "cal"}
    assert (cal.adapter.method, cal.train.data, cal.train.lr, cal.train.replay_batch) == \
        ("ia3", "builtin:calendar-events", 0.1, 2)
    assert r.task("phone").train.replay_batch == 0


@pytest.mark.parametrize("text, words", [
    ('extends = "a.toml"\n', "makes a cycle"),
    ('extends = "missing.toml"\n', "no such file"),
    ('extends = 3\n', "extends must be the path of another recipe"),
])
def test_bad_extends_is_one_clear_error(tmp_path, text, words):
    (tmp_path / "a.toml").write_text(text)
    with pytest.raises(EdgepeftError, match=words):
        recipe.load(tmp_path / "a.toml")


def test_shipped_recipes_differ_only_in_name_and_target():
    a, i, c = (recipe.load(f"export/{n}.toml") for n in ("android", "ios", "cpu"))
    assert (a.target.name, i.target.name, c.target.name) == ("android-arm64", "ios-arm64", "cpu-x86_64")
    for section in ("model", "quantize", "adapter", "train", "merge", "export", "requantize", "evaluate"):
        assert a.section(section) == i.section(section) == c.section(section), section
    assert a.target.precision == i.target.precision != c.target.precision  # desktop int4 has zero points
    assert a.target.graph_keys == c.target.graph_keys


@pytest.mark.parametrize("table, words", [
    ({"readiness": ["nnapi", "tpu"]}, "readiness must list"),
    ({"readiness": ["nnapi"], "formats": ["onnx"]}, "must ship the ORT format"),
])
def test_bad_readiness_in_a_target(tmp_path, table, words):
    from edgepeft.pipeline import target

    (tmp_path / "t.toml").write_text("\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in table.items()) + "\n")
    with pytest.raises(EdgepeftError, match=words):
        target.load(str(tmp_path / "t.toml"))
