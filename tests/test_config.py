from dataclasses import dataclass
from typing import Literal

import pytest

from edgepeft import recipe
from edgepeft.config import from_table, load_toml
from edgepeft.errors import EdgepeftError


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
