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
    setup = trainable_model(qdir, adapter, cfg, torch.device("cpu"))
    model, dtype, packed = setup.model, setup.dtype, setup.packed
    assert packed and dtype == torch.float32 and setup.frozen == {}
    from edgepeft.models import packed as packed_attention

    assert packed_attention.active(model.get_base_model())  # example-by-example attention is what is compared
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


@pytest.mark.parametrize("kv_heads", [1, 3])
def test_packed_attention_is_the_masked_row(kv_heads):
    """Example-by-example attention gives the masked row's outputs and gradients, grouped heads or not."""
    from types import SimpleNamespace

    import torch
    from edgepeft.calib.data import pack

    from edgepeft.models import packed

    # a shared prefix of 2 tokens (the third is shared too, but it predicts a label), then 3 examples
    row = pack([([5, 6, 7, 1, 2, 3, 4], [-100] * 4 + [2, 3, 4]), ([5, 6, 7, 8], [-100] * 3 + [8]),
                ([5, 6, 7, 9, 9, 9, 9, 9, 9], [-100] * 4 + [9] * 5)])
    prefix, spans = row["segments"]
    assert prefix == 2 and spans == [(2, 7), (7, 9), (9, 16)]
    n = row["tokens"]
    torch.manual_seed(0)
    q = torch.randn(1, 6, n, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, kv_heads, n, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, kv_heads, n, 8, dtype=torch.float64, requires_grad=True)
    module = SimpleNamespace(training=False)
    out, _ = packed.attention(module, q, k, v, None, scaling=0.3, segments=packed.segments(prefix, spans, n))
    mask = row["attention_mask"].to(torch.float64)
    reps = 6 // kv_heads
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(reps, 1),
                                                           v.repeat_interleave(reps, 1), attn_mask=mask, scale=0.3)
    ref = ref.transpose(1, 2)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-12)
    w = torch.randn_like(ref)
    g = torch.autograd.grad((out * w).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(g, g_ref, strict=True))


def test_the_chunked_head_loss_is_cross_entropy_over_full_logits():
    import torch

    from edgepeft.adapters import training

    torch.manual_seed(0)
    hidden = torch.randn(150, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(300, 16, dtype=torch.float64)
    targets = torch.randint(0, 300, (150,))
    loss = training.head_loss(hidden, weight, targets)  # 150 rows: chunks of 64, 64 and 22
    ref = torch.nn.functional.cross_entropy(hidden @ weight.T, targets)
    assert float(loss) == pytest.approx(float(ref), rel=1e-12)
    (g,) = torch.autograd.grad(2.0 * loss, hidden)
    (g_ref,) = torch.autograd.grad(2.0 * ref, hidden)
    assert torch.allclose(g, g_ref, atol=1e-12)


def test_mixed_precision_training_holds_bf16_and_restores_the_reference(tiny_run):
    """Under bf16 mixed precision the frozen weights are held in bf16 (no float32 copy stays mapped), a step's
    loss is the float32 step's within bf16 rounding, and ``restore`` gives back the float32 model."""
    import torch

    from edgepeft.adapters import training
    from edgepeft.models.pytorch import load_4bit

    recipe, qdir, tokenizer, examples = _examples(tiny_run, 5)
    losses = {}
    for name in ("float32", "bfloat16"):
        cfg = dataclasses.replace(recipe.train, compute_dtype=name)
        mixed = training.mixed_precision(recipe.adapter, cfg, torch.device("cpu"))
        assert mixed == (name == "bfloat16")
        torch.manual_seed(0)
        setup = training.trainable_model(qdir, recipe.adapter, cfg, torch.device("cpu"))
        model = setup.model
        assert setup.mixed == mixed
        for p in model.parameters():
            if p.requires_grad:
                p.data.add_(0.05 * torch.randn_like(p))
        model.eval()
        embed = model.get_input_embeddings().weight
        assert embed.dtype == getattr(torch, name)
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        if name == "bfloat16":
            assert "model.embed_tokens.weight" in setup.frozen
        maps = open("/proc/self/maps").read() if sys.platform.startswith("linux") else ""
        assert str(qdir / "model.safetensors") not in maps  # the weights were copied out of the mapped file
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
            loss = training.task_loss(model, training.step_inputs(examples, tokenizer.pad_token_id, True, "cpu"))
        losses[name] = float(loss)
        if name == "bfloat16":
            training.restore(setup, qdir)
            reference = load_4bit(qdir).get_input_embeddings().weight
            assert embed.dtype == torch.float32 and torch.equal(embed, reference)
            from edgepeft.models import packed as packed_attention

            assert not packed_attention.active(model.get_base_model())
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.03)
    assert losses["bfloat16"] != losses["float32"]  # bf16 did run


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
