"""The train stage under a real distributed launcher: torchrun, 2 CPU processes (gloo), DDP."""

import json
import subprocess
import sys

from edgepeft.pipeline import recipe as recipe_mod
from edgepeft.pipeline.runner import run_stages
from edgepeft.stages.registry import STAGES


def test_train_stage_runs_under_torchrun(tiny_recipe, tmp_path):
    out = tmp_path / "run"
    run_stages(STAGES, recipe_mod.load(tiny_recipe), out, last="quantize", echo=lambda s: None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "edgepeft",
                        "train", str(tiny_recipe), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((out / "train" / "record.json").read_text())
    assert rec["figures"]["processes"] == 2 and rec["figures"]["global_batch"] == 8
    assert (out / "train" / "adapter" / "adapter_model.safetensors").is_file()
    assert [p.name for p in out.glob(".*")] == [".lock"]
    assert r.stdout.count("run folder:") == 1  # only the main process reports
