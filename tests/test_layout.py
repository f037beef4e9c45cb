"""The package's shape, kept by tests: no import cycle among edgepeft's modules (imports inside functions
counted), nothing but the registry and the CLI imports a stage, every folder says what lives in it, and the
CLI starts without PyTorch or ONNX Runtime."""

from __future__ import annotations

import ast
import subprocess
import sys

from edgepeft.core import imports
from edgepeft.pipeline.stage import source_hash
from edgepeft.stages.registry import STAGES

STAGES_PKG = "edgepeft.stages"
MAY_IMPORT_STAGES = {"edgepeft.stages.registry", "edgepeft.cli"}


def stage_imports(edges: dict[str, set[str]]) -> list[str]:
    """Every import of a stage module by a module that may not import one."""
    return sorted(f"{m} imports {t}" for m, ts in edges.items() if m not in MAY_IMPORT_STAGES
                  for t in ts if t.startswith(STAGES_PKG + "."))


def test_no_import_cycles():
    edges = imports.graph(imports.module_files())
    assert len(edges) > 40 and "edgepeft.stages.train" in edges and "edgepeft.calib.sets" in edges
    assert imports.cycles(edges) == []


def test_only_the_registry_and_the_cli_import_stages():
    edges = imports.graph(imports.module_files())
    assert stage_imports(edges) == []
    assert {f"edgepeft.stages.{s.name}" for s in STAGES} <= edges["edgepeft.stages.registry"]


def test_the_checks_can_fail():
    # a cycle through an import inside a function, and a library module that imports a stage
    assert imports.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert stage_imports({"edgepeft.quality.gate": {"edgepeft.stages.train"}}) == [
        "edgepeft.quality.gate imports edgepeft.stages.train"]


def test_imports_inside_functions_are_edges(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from edgepeft.b import g\n    return g\n")
    (tmp_path / "b.py").write_text("import edgepeft.a\n")
    files = {"edgepeft.a": tmp_path / "a.py", "edgepeft.b": tmp_path / "b.py"}
    edges = imports.graph(files)
    assert edges == {"edgepeft.a": {"edgepeft.b"}, "edgepeft.b": {"edgepeft.a"}}
    assert imports.cycles(edges) == [["edgepeft.a", "edgepeft.b"]]


def test_code_version_follows_every_reachable_module(tmp_path):
    (tmp_path / "s.py").write_text("def run():\n    from edgepeft.lib import x\n    return x\n")
    (tmp_path / "lib.py").write_text("x = 1\n")
    (tmp_path / "other.py").write_text("y = 1\n")
    files = {f"edgepeft.{n}": tmp_path / f"{n}.py" for n in ("s", "lib", "other")}
    before = source_hash("edgepeft.s", files)
    (tmp_path / "other.py").write_text("y = 2\n")  # not reachable from the stage
    assert source_hash("edgepeft.s", files) == before
    (tmp_path / "lib.py").write_text("x = 2\n")  # reached through an import inside a function
    assert source_hash("edgepeft.s", files) != before


def test_every_stage_declares_itself_beside_its_run():
    for stage in STAGES:
        assert stage.module == f"{STAGES_PKG}.{stage.name}", stage.name
        assert stage.sections and stage.description


def test_every_folder_says_what_lives_there():
    for name, path in imports.module_files().items():
        if path.name == "__init__.py":
            doc = ast.get_docstring(ast.parse(path.read_text()))
            assert doc and len(doc.split()) >= 12, f"{name}: no docstring saying what lives there"


def test_the_cli_starts_without_heavy_libraries():
    code = ("import sys, edgepeft.cli; heavy = [m for m in ('torch', 'transformers', 'onnx', 'onnxruntime') "
            "if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
