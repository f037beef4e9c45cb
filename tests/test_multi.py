"""A multi-adapter bundle end to end (issue #17): two tasks (LoRA on phone commands, IA3 on calendar events)
trained on one 4-bit base, one int4 graph with slots, one runtime adapter file each, judged each against its own
(4-bit base + adapter)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgepeft.cli import main as cli
from tests.conftest import write_recipe

TASKS = """
[tasks.phone.adapter]
method = "lora"
r = 8
alpha = 16
[tasks.calendar.adapter]
method = "ia3"
[tasks.calendar.train]
data = "builtin:calendar-events"
lr = 0.05
"""


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory, tiny_model_dir):
    from edgepeft.pipeline import recipe as recipe_mod
    from edgepeft.pipeline.runner import run_stages
    from edgepeft.stages.registry import STAGES

    root = tmp_path_factory.mktemp("multi")
    recipe = write_recipe(root / "multi.toml", tiny_model_dir, tail=TASKS)
    out = root / "run"
    records = run_stages(STAGES, recipe_mod.load(recipe), out, echo=lambda s: None)
    return {"recipe": recipe, "out": out, "records": records, "bundle": out / "bundle" / "android-arm64"}


def test_two_tasks_one_bundle(multi_run, capsys):
    from edgepeft.bundle.manifest import read_manifest
    from edgepeft.bundle.runner import verify
    from edgepeft.onnx.decoder import Decoder

    out, bundle, records = multi_run["out"], multi_run["bundle"], multi_run["records"]
    train = records["train"]["figures"]["tasks"]
    assert train["phone"]["method"] == "lora" and train["calendar"]["method"] == "ia3"
    assert train["calendar"]["trainable_parameters"] < train["phone"]["trainable_parameters"] / 10
    for task in ("phone", "calendar"):
        assert (out / "train" / "adapter" / task / "adapter_config.json").is_file()
    assert records["merge"]["figures"]["reference"] == "4-bit base"
    # the shared base's GPTQ statistics were taken under each task's adapter, on its own examples
    under = records["requantize"]["figures"]["statistics_under_adapters"]
    assert under["task_windows_per_adapter"] == {"phone": 1, "calendar": 1}

    manifest = read_manifest(bundle)
    adapters = manifest["adapters"]
    assert set(adapters) == {"phone", "calendar"}
    assert {a["method"] for a in adapters.values()} == {"lora", "ia3"}
    for a in adapters.values():
        assert a["file"] in manifest["files"] and (bundle / a["file"]).is_file()
    assert adapters["phone"]["prompt"]["system"] != adapters["calendar"]["prompt"]["system"]
    assert adapters["calendar"]["bytes"] < adapters["phone"]["bytes"]  # IA3: vectors; LoRA: matrices

    # each gate ran against its own reference and wrote its own report
    evaluate = records["evaluate"]["figures"]
    assert evaluate["passed"] and set(evaluate["tasks"]) == {"phone", "calendar"}
    for task in ("phone", "calendar"):
        assert adapters[task]["quality"]["passed"] is True
        assert (bundle / f"quality-{task}" / "report.md").is_file()

    report = (bundle / "profile" / "report.md").read_text()  # the base and each adapter, profiled interleaved
    assert "bundle + calendar (ia3)" in report and "bundle + phone (lora)" in report

    problems, sample = verify(bundle)
    assert not problems and "[phone]" in sample and "[calendar]" in sample

    # the graph as shipped (ORT format): no adapter is the base; each adapter changes the logits, differently
    ids = list(range(40, 72))
    model = bundle / manifest["model_file"]
    logits = {None: Decoder(model, 1, bundle / "genai_config.json").prefill(ids)[0]}
    for task in ("phone", "calendar"):
        logits[task] = Decoder(model, 1, bundle / "genai_config.json", adapter=bundle / adapters[task]["file"]
                               ).prefill(ids)[0]
        assert np.abs(logits[task] - logits[None]).max() > 1e-3, task
    assert np.abs(logits["phone"] - logits["calendar"]).max() > 1e-3

    capsys.readouterr()
    assert cli(["generate", str(bundle), "set an alarm for seven", "--adapter", "phone", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    assert cli(["generate", str(bundle), "hi", "--adapter", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no adapter 'nope' in the bundle (it has: calendar, phone)" in err and "Traceback" not in err


def test_heal_fits_the_shared_base_under_each_adapter(multi_run):
    """The heal stage fits the shared base under each runtime adapter (and the base alone): its calibration
    windows are dealt to the base and each task, each scored under its adapter; the PyTorch mirror with an
    adapter's values computes what ONNX Runtime computes with the same values fed to the graph's slots."""
    import onnx
    import torch
    from transformers import AutoConfig

    from edgepeft.heal.mirror import GraphWeights, Mirror
    from edgepeft.onnx.decoder import Decoder
    from edgepeft.onnx.switchable import adapter_params, with_slots
    from edgepeft.stages.heal import _with_accuracy_level

    out, heal = multi_run["out"], multi_run["records"]["heal"]["figures"]
    about = heal["calibration"]
    assert set(about["prose_windows_per_adapter"]) == {"(base)", "phone", "calendar"}
    assert set(about["task_windows_per_adapter"]) == {"phone", "calendar"}
    assert all(n > 0 for n in about["task_windows_per_adapter"].values())
    per = heal["calibration_before"]["per_adapter"]
    assert set(per) == {"(base)", "phone", "calendar"} and per["phone"]["kl"] != per["calendar"]["kl"]

    graph = GraphWeights(onnx.load(str(out / "heal" / "model" / "model.onnx")))
    config = AutoConfig.from_pretrained(out / "merge" / "model")
    params = {t: adapter_params(graph.model.graph, config, out / "train" / "adapter" / t)[1]
              for t in ("phone", "calendar")}
    mirror = Mirror(graph, config, None)  # float activations, as ONNX Runtime at accuracy level 0
    dec = Decoder(with_slots(_with_accuracy_level(graph.model, 0), params).SerializeToString(),  # float activations
                  genai_config=out / "heal" / "model" / "genai_config.json")
    ids = list(range(40, 72))
    seen = {}
    for task in (None, "phone", "calendar"):
        mirror.set_adapter(params.get(task))
        dec.extra = params.get(task, {})
        with torch.no_grad():
            mine = mirror.model(input_ids=torch.tensor([ids])).logits[0].numpy()
        ort = dec.prefill(ids)[0]
        assert np.abs(mine - ort).max() < 1e-3, task
        seen[task] = mine
    assert np.abs(seen["phone"] - seen[None]).max() > 1e-3 and np.abs(seen["calendar"] - seen[None]).max() > 1e-3
    with pytest.raises(ValueError, match="no slot"):
        mirror.set_adapter({"model.layers.0.attn.nope.lora_A": np.zeros((4, 1), np.float32)})


def test_each_adapter_is_fitted_on_the_shipped_base(multi_run):
    """After the shared base, each runtime adapter's own values are fitted on it (``[heal] adapter_steps``); the
    bundle ships the fitted values of an adapter whose fit held (KL lower, answers kept) and the trained values of
    one whose fit did not, and the manifest says which."""
    from edgepeft.bundle.manifest import read_manifest
    from edgepeft.onnx.switchable import adapter_params, read_adapter

    out, bundle = multi_run["out"], multi_run["bundle"]
    fits = multi_run["records"]["heal"]["figures"]["adapter_fit"]
    manifest = read_manifest(bundle)
    assert set(fits) == {"phone", "calendar"}
    import onnx
    from transformers import AutoConfig

    graph = onnx.load(str(out / "heal" / "model" / "model.onnx")).graph
    config = AutoConfig.from_pretrained(out / "merge" / "model")
    for task, f in fits.items():
        assert f["steps"] == 12 and f["method"] == manifest["adapters"][task]["method"]
        # its share of the prose windows, and its task's training examples, each alone
        assert f["examples"] == 6
        assert f["prose_windows"] == multi_run["records"]["heal"]["figures"]["calibration"][
            "prose_windows_per_adapter"][task]
        assert f["lr"] == (3e-3 if f["method"] == "ia3" else 3e-4)
        assert f["fitted"] == ((f["prose_kl_before"] is None or f["prose_kl_after"] <= 1.1 * f["prose_kl_before"]) and
                               (f["answers_before"] is None or f["answers_after"] >= f["answers_before"]))
        assert (out / "heal" / "model" / "adapters" / f"{task}.onnx_adapter").is_file() == f["fitted"]
        assert manifest["adapters"][task]["fitted_on_base"] == f["fitted"]
        shipped = read_adapter(bundle / manifest["adapters"][task]["file"])
        trained = adapter_params(graph, config, out / "train" / "adapter" / task)[1]
        assert set(shipped) == set(trained)
        assert all(np.array_equal(shipped[k], trained[k]) for k in trained) != f["fitted"], task


def test_only_the_adapter_methods_are_fitted(multi_run, tmp_path):
    """``[heal] adapter_methods`` (both by default) picks which adapters are fitted: the others keep their
    trained values and are not tried."""
    import shutil

    from edgepeft.bundle.manifest import read_manifest
    from edgepeft.pipeline import recipe as recipe_mod
    from edgepeft.pipeline.runner import run_stages
    from edgepeft.stages.registry import STAGES

    out = tmp_path / "run"
    shutil.copytree(multi_run["out"], out, symlinks=True)
    text = multi_run["recipe"].read_text()
    assert recipe_mod.load(multi_run["recipe"]).heal.adapter_methods == ["ia3", "lora"]
    for method, tried in (("ia3", {"calendar"}), ("lora", {"phone"})):
        (tmp_path / "r.toml").write_text(text.replace("[heal]\n", f'[heal]\nadapter_methods = ["{method}"]\n', 1))
        recipe = recipe_mod.load(tmp_path / "r.toml")
        assert recipe.heal.adapter_methods == [method]
        recs = run_stages(STAGES, recipe, out, first="heal", last="bundle", echo=lambda s: None)
        fits = recs["heal"]["figures"]["adapter_fit"]
        assert set(fits) == tried
        # what ships is what this run fitted and kept, none of the copied run's files
        shipped = {p.stem for p in (out / "heal" / "model" / "adapters").glob("*.onnx_adapter")}
        assert shipped == {n for n, f in fits.items() if f["fitted"]}
        manifest = read_manifest(out / "bundle" / "android-arm64")
        assert {n for n, a in manifest["adapters"].items() if a["fitted_on_base"]} == shipped


def _calendar_mirror(multi_run):
    """The multi run's healed graph as a PyTorch mirror (float activations), the calendar IA3's trained values, four
    windows, and as teacher the mirror's own log-probabilities under those values."""
    import onnx
    from transformers import AutoConfig

    from edgepeft.heal.distill import teacher_log_probs
    from edgepeft.heal.mirror import GraphWeights, Mirror
    from edgepeft.onnx.switchable import adapter_params

    out = multi_run["out"]
    graph = GraphWeights(onnx.load(str(out / "heal" / "model" / "model.onnx")))
    config = AutoConfig.from_pretrained(out / "merge" / "model")
    trained = adapter_params(graph.model.graph, config, out / "train" / "adapter" / "calendar")[1]
    mirror = Mirror(graph, config, None)
    windows = [list(range(40 + 7 * k, 72 + 7 * k)) for k in range(4)]
    mirror.set_adapter(trained)
    return mirror, trained, windows, teacher_log_probs(mirror.model, windows)


def test_an_adapter_fit_brings_the_mirror_to_its_teacher(multi_run):
    """``distill.fit_adapter`` trains only the adapter's values, on the mirror with the base fixed: from the
    slots' defaults (IA3 vectors of ones) towards a teacher that is the same mirror under the trained vectors."""
    import torch

    from edgepeft.heal.distill import fit_adapter, kl_loss

    mirror, trained, windows, teacher = _calendar_mirror(multi_run)
    ones = {k: np.ones_like(v) for k, v in trained.items()}
    scales = [g.detach().clone() for g in mirror.gains()]

    def kl(values):
        mirror.set_adapter(values)
        with torch.no_grad():
            return float(np.mean([kl_loss(t, mirror.model(input_ids=torch.tensor([w])).logits[0]).item()
                                  for w, t in zip(windows, teacher, strict=True)]))

    before = kl(ones)
    fitted, losses = fit_adapter(mirror, ones, windows, teacher, 3e-2, 24, 0)
    assert len(losses) == 24 and all((v == 1).all() for v in ones.values())  # the input is left as it was
    assert kl(fitted) < 0.5 * before
    moved = np.concatenate([fitted[k] - 1 for k in trained])
    toward = np.concatenate([trained[k] - 1 for k in trained])
    assert float(moved @ toward) > 0  # towards the teacher's vectors
    assert all(torch.equal(a, b) for a, b in zip(scales, mirror.gains(), strict=True))  # the base stayed fixed


def test_an_adapter_fit_with_labels_learns_its_answers(multi_run):
    """With ``label_weight`` the fit also learns the task windows' own tokens at their answer positions: from the
    teacher's own values, where the KL alone has nothing to move, the answers' cross-entropy falls."""
    import torch

    from edgepeft.heal.distill import fit_adapter, label_loss

    mirror, trained, windows, teacher = _calendar_mirror(multi_run)
    mask = [0] * 20 + [1] * 11 + [0]  # positions 20..30 predict the "answer", tokens 21..31

    def answers_ce(values):
        mirror.set_adapter(values)
        with torch.no_grad():
            return float(np.mean([label_loss(w, mirror.model(input_ids=torch.tensor([w])).logits[0], mask).item()
                                  for w in windows]))

    before = answers_ce(trained)
    fitted, losses = fit_adapter(mirror, trained, windows, teacher, 1e-1, 16, 0, labels=[mask] * 4,
                                 label_weight=10.0)
    kl_only, _ = fit_adapter(mirror, trained, windows, teacher, 1e-1, 16, 0)
    assert answers_ce(fitted) < min(before, answers_ce(kl_only)) - 0.03  # a random-init model moves little
    assert losses[0] < 1e-3 < max(losses)  # what is recorded is the KL: none at first, then paid for the answers


def test_task_tables_are_checked(tmp_path, tiny_model_dir, capsys):
    for tail, words in (
            ('[tasks.a.adapter]\nmethod = "prefix"\n', "a runtime-switchable adapter is LoRA or IA3"),
            ('[tasks.a.heal]\nsteps = 1\n', "a task overrides only [adapter], [train], [evaluate]"),
            ('[tasks."a/b".adapter]\nmethod = "lora"\n', "must be a plain name"),
            ('[tasks.a.train]\nsteps = -1\n', "[tasks.a].train"),
    ):
        recipe = write_recipe(tmp_path / "r.toml", tiny_model_dir, tail=tail)
        assert cli(["run", str(recipe), "--out", str(tmp_path / "o"), "--to", "load"]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (tail, err)


def test_a_task_inherits_the_recipes_tables(tmp_path, tiny_model_dir):
    from edgepeft.pipeline import recipe as recipe_mod

    recipe = recipe_mod.load(write_recipe(tmp_path / "r.toml", tiny_model_dir, tail=TASKS))
    phone, calendar = recipe.task("phone"), recipe.task("calendar")
    assert phone.train.data == "builtin:phone-commands" and calendar.train.data == "builtin:calendar-events"
    assert phone.train.steps == calendar.train.steps == recipe.train.steps == 6
    assert calendar.train.lr == 0.05 and phone.train.lr == recipe.train.lr
    assert phone.adapter.r == 8 and calendar.adapter.method == "ia3" and not calendar.tasks.names
    manifest = {"recipe": {"tasks": recipe.tasks.tables}, "target": json.loads(json.dumps(
        __import__("dataclasses").asdict(recipe.target)))}
    assert recipe_mod.from_manifest(manifest, "m").tasks.tables == recipe.tasks.tables

    shipped = recipe_mod.load("export/multi.toml")  # the recipe of `nox -s export-multi`, and its merged twin
    twin = recipe_mod.load("export/calendar.toml")
    assert shipped.tasks.names == ["phone", "calendar"] and shipped.task("phone").adapter == recipe_mod.load(
        "export/android.toml").adapter
    assert shipped.task("calendar").adapter == twin.adapter and shipped.task("calendar").train == twin.train
