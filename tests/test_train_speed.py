"""The train stage's fast path computes what the plain one does, and `nox -s bench-train` runs both recipes."""

import dataclasses
import subprocess
import sys

import pytest


def _examples(tiny_run, count: int):
    from edgepeft.calib.data import recipe_splits
    from transformers import AutoTokenizer

    from edgepeft.adapters.training import encoded
    from edgepeft.pipeline import recipe as recipes

    recipe = recipes.load(tiny_run["recipe"])
    qdir = tiny_run["out"] / "quantize" / "model"
    tokenizer = AutoTokenizer.from_pretrained(qdir)
    return recipe, qdir, tokenizer, encoded(tokenizer, recipe_splits(recipe)["train"], recipe.train)[:count]


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_a_packed_step_has_the_loss_and_gradients_of_padded_rows(tiny_run, method):
    import torch

    from edgepeft.adapters.training import step_inputs, task_loss, trainable_model

    recipe, qdir, tokenizer, examples = _examples(tiny_run, 5)
    adapter = dataclasses.replace(recipe.adapter, method=method)
    cfg = dataclasses.replace(recipe.train, compute_dtype="float32")
    torch.manual_seed(0)
    model, dtype, packed = trainable_model(qdir, adapter, cfg, torch.device("cpu"))
    assert packed and dtype == torch.float32
    for p in model.parameters():  # away from the identity init, so that the adapter takes part
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    model.eval()  # no dropout: both layouts must see the same function

    def loss_and_grads(pack: bool):
        loss = task_loss(model, step_inputs(examples, tokenizer.pad_token_id, pack, torch.device("cpu")))
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        model.zero_grad(set_to_none=True)
        return loss.item(), grads

    padded, g_padded = loss_and_grads(False)
    packed_loss, g_packed = loss_and_grads(True)
    batch = step_inputs(examples, tokenizer.pad_token_id, True, torch.device("cpu"))
    assert batch["tokens"] < sum(len(ids) for ids, _ in examples)  # the shared prompt prefix was computed once
    assert packed_loss == pytest.approx(padded, rel=1e-5)
    assert float((g_packed - g_padded).norm() / g_padded.norm()) < 1e-4


def test_packing_is_off_where_it_would_change_the_function(tiny_run):
    from types import SimpleNamespace

    from edgepeft.adapters.training import packable

    recipe = _examples(tiny_run, 1)[0]
    lora, cfg = recipe.adapter, recipe.train
    assert packable(SimpleNamespace(), lora, cfg)
    # a sliding window shorter than an example: the packed mask would let tokens see past it
    assert not packable(SimpleNamespace(sliding_window=8), lora, cfg)
    assert packable(SimpleNamespace(sliding_window=cfg.max_length), lora, cfg)
    # edgepeft's own adapters (a prefix adds positions to every row)
    assert not packable(SimpleNamespace(), dataclasses.replace(lora, method="prefix"), cfg)


def test_bench_train_runs_both_recipes_on_the_same_batches(tiny_run):
    done = subprocess.run([sys.executable, "-m", "edgepeft.latency.bench_train", str(tiny_run["recipe"]), "--out",
                           str(tiny_run["out"]), "--steps", "3", "--rounds", "1", "--threads", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    from edgepeft.latency.bench_train import VARIANTS

    table = {line[:30].strip(): line[30:].split() for line in done.stdout.splitlines()
             if line[:30].strip() in VARIANTS}
    assert set(table) == set(VARIANTS), done.stdout
    for name, (s_step, tokens_s, peak, loaded, loss) in table.items():
        assert float(s_step) > 0 and float(tokens_s) > 0 and float(peak) >= float(loaded) > 0, name
        assert float(loss) == float(loss), name  # finite, not NaN
    assert "edgepeft / HF QLoRA, checkpointing: tokens/s" in done.stdout


def test_bench_train_needs_a_quantized_run(tmp_path, tiny_recipe):
    done = subprocess.run([sys.executable, "-m", "edgepeft.latency.bench_train", str(tiny_recipe), "--out",
                           str(tmp_path / "none")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "has no quantize stage" in done.stderr and "Traceback" not in done.stderr
