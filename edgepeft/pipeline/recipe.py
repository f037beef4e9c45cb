"""A recipe: one TOML file describing one bundle (``export/*.toml``). Data, not code.

Each table configures one stage (``[train]`` and ``[adapter]`` both feed the train stage). Every key has a
default, so a recipe says only what differs; an unknown table or key is an error, never silently ignored.

``extends = "android.toml"`` (a path next to the recipe) starts from another recipe: its tables are merged
key by key, the extending recipe's keys winning. ``export/ios.toml`` is the Android recipe for another
target, and stays so when the Android recipe changes.

``[tasks.<name>]`` tables make a multi-adapter bundle (issue #17): one adapter per task on the same 4-bit
base, each switchable at run time over one shared int4 graph. A task's ``adapter``, ``train`` and
``evaluate`` sub-tables override the recipe's own tables, key by key (``[tasks.calendar.train] data =
"builtin:calendar-events"``); ``Recipe.task(name)`` is the recipe one task trains and is judged by.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from edgepeft.core.config import from_table, load_toml, plain_name
from edgepeft.core.errors import EdgepeftError
from edgepeft.pipeline import target as target_mod
from edgepeft.pipeline.tables import (
    TABLES,
    AdapterConfig,
    BundleConfig,
    EvaluateConfig,
    ExportConfig,
    HealConfig,
    MergeConfig,
    ModelConfig,
    ProfileConfig,
    QuantizeConfig,
    RequantizeConfig,
    TrainConfig,
)
from edgepeft.pipeline.target import Target

SECTIONS = TABLES
DEFAULT_TARGET = "android-arm64"
TASK_TABLES = ("adapter", "train", "evaluate")  # what a task may override
SWITCHABLE = ("lora", "ia3")  # the methods a runtime-switchable adapter may use (edgepeft.onnx.switchable)


@dataclass
class Tasks:
    """The ``[tasks.<name>]`` tables as written: {name: {"adapter": {...}, "train": {...}, "evaluate": {...}}}."""

    tables: dict[str, dict[str, dict]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.tables)


@dataclass
class Recipe:
    name: str
    path: Path | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    requantize: RequantizeConfig = field(default_factory=RequantizeConfig)
    heal: HealConfig = field(default_factory=HealConfig)
    bundle: BundleConfig = field(default_factory=BundleConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    target: Target = field(default_factory=lambda: Target(DEFAULT_TARGET))  # `target = "<name>"`: targets/<name>.toml
    tasks: Tasks = field(default_factory=Tasks)

    @property
    def base_dir(self) -> Path | None:
        return self.path.parent if self.path else None

    @property
    def target_graph(self):
        """The target's opset and context: the only target keys the export stage reads."""
        return self.target.graph_keys

    @property
    def precision(self):
        """The target's keys that decide the graph and its weights (a section the export and requantize stages
        read, see ``target.Precision``)."""
        return self.target.precision

    @property
    def kernels(self):
        """The target's keys that decide what its kernels compute (the heal stage's section, see
        ``target.Kernels``)."""
        return self.target.kernels

    def section(self, name: str):
        return getattr(self, name)

    def task(self, name: str) -> Recipe:
        """The recipe of task ``name``: this one with the task's tables over its own, and no tasks."""
        table = self.tasks.tables[name]
        where = f"{self.path or self.name} [tasks.{name}]"
        sections = {key: from_table(TABLES[key], {**dataclasses.asdict(self.section(key)), **table.get(key, {})},
                                    f"{where}.{key}") for key in TASK_TABLES}
        return dataclasses.replace(self, tasks=Tasks(), **sections)


def parse_tasks(value, where: str) -> Tasks:
    if not isinstance(value, dict) or not value:
        raise EdgepeftError(f"{where}: tasks must hold one table per task ([tasks.<name>.adapter] ...)")
    for name, table in value.items():
        if not plain_name(name):
            raise EdgepeftError(f"{where}: task name {name!r} must be a plain name (it names the adapter's file)")
        if not isinstance(table, dict):
            raise EdgepeftError(f"{where}: tasks.{name} must be a table")
        for key, sub in table.items():
            if key not in TASK_TABLES:
                raise EdgepeftError(f"{where}: [tasks.{name}] {key!r}: a task overrides only "
                                    f"{', '.join('[' + t + ']' for t in TASK_TABLES)}")
            if not isinstance(sub, dict):
                raise EdgepeftError(f"{where}: tasks.{name}.{key} must be a table")
    return Tasks({name: {k: dict(v) for k, v in table.items()} for name, table in value.items()})


def check_tasks(recipe: Recipe, where: str) -> None:
    """Every task's recipe is valid, and every adapter can be switched at run time."""
    for name in recipe.tasks.names:
        task = recipe.task(name)
        if task.adapter.method not in SWITCHABLE or task.adapter.gated:
            raise EdgepeftError(f"{where}: [tasks.{name}] method {task.adapter.method!r}"
                                f"{' (gated)' if task.adapter.gated else ''}: a runtime-switchable adapter is LoRA "
                                "or IA3 (ungated)")


def parse(data: dict, where: str, path: Path | None = None) -> Recipe:
    top = {"name", "target", "extends", "tasks"}
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise EdgepeftError(f"{where}: {key} must be a table ([{key}])")
        elif key not in top:
            raise EdgepeftError(f"{where}: unknown key or table {key!r} "
                                f"(known: name, target, extends, {', '.join('[' + s + ']' for s in SECTIONS)}, "
                                f"[tasks.<name>])")
    name = data.get("name", path.stem if path else "run")
    if not plain_name(name):
        raise EdgepeftError(f"{where}: name must be a plain folder name, got {name!r}")
    sections = {key: from_table(cls, data.get(key), f"{where} [{key}]") for key, cls in SECTIONS.items()}
    spec = data.get("target", DEFAULT_TARGET)
    if not isinstance(spec, str) or not spec:
        raise EdgepeftError(f"{where}: target must be a target name or a .toml path, got {spec!r}")
    target = target_mod.load(spec, path.parent if path else None)
    tasks = parse_tasks(data["tasks"], where) if "tasks" in data else Tasks()
    recipe = Recipe(name=name, path=path, target=target, tasks=tasks, **sections)
    check_tasks(recipe, where)
    return recipe


def resolve_extends(data: dict, path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """``data`` merged onto the recipe it extends (recursively); ``path`` is where ``data`` was read."""
    if "extends" not in data:
        return data
    spec = data["extends"]
    if not isinstance(spec, str) or not spec.endswith(".toml"):
        raise EdgepeftError(f"{path}: extends must be the path of another recipe (.toml), got {spec!r}")
    base_path = (path.parent / spec).resolve()
    if base_path in seen or base_path == path.resolve():
        raise EdgepeftError(f"{path}: extends {spec} makes a cycle")
    base = resolve_extends(load_toml(base_path), base_path, (*seen, path.resolve()))
    return _merged({k: v for k, v in base.items() if k not in ("name", "extends")},
                   {k: v for k, v in data.items() if k != "extends"})


def _merged(base: dict, over: dict) -> dict:
    """``over`` merged onto ``base`` key by key, at every depth (``[tasks.calendar.train] lr`` in an extending
    recipe changes that one key of that task, not the whole ``[tasks]`` table)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load(path: str | Path) -> Recipe:
    path = Path(path)
    if path.suffix != ".toml" and not path.exists() and (Path("export") / f"{path}.toml").is_file():
        path = Path("export") / f"{path}.toml"  # `edgepeft run android` finds export/android.toml
    return parse(resolve_extends(load_toml(path), path), str(path), path.resolve())


def from_manifest(manifest: dict, where: str) -> Recipe:
    """The recipe a bundle was made with, from its manifest (``where`` names it in errors; keys this edgepeft
    does not know are left out)."""
    rec = manifest.get("recipe", {})
    sections = {}
    for key, cls in SECTIONS.items():
        known = {f.name for f in dataclasses.fields(cls)}
        table = {k: v for k, v in (rec.get(key) or {}).items() if k in known}
        sections[key] = from_table(cls, table, f"{where} [recipe.{key}]")
    path = Path(rec["path"]) if rec.get("path") else None
    tasks = parse_tasks(rec["tasks"], where) if rec.get("tasks") else Tasks()
    return Recipe(name=rec.get("name", "bundle"), path=path, tasks=tasks,
                  target=target_mod.from_manifest(manifest["target"], f"{where} [target]"), **sections)
