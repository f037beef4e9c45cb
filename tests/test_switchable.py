"""Runtime-switchable adapters (edgepeft.onnx.switchable): one graph with LoRA and IA3 slots, two adapter files,
switched in onnxruntime-genai; each matches PyTorch's (base + that adapter), no adapter matches the base."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgepeft.onnx import switchable


def _peft_adapters(model_dir):
    """The tiny base, a LoRA (every projection, r 4) and an IA3 (k, v, down) with random non-trivial values."""
    import torch
    from peft import IA3Config, LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    out = {}
    for name, cfg in (("lora", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")),
                      ("ia3", IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                        feedforward_modules=["down_proj"]))):
        torch.manual_seed(1 if name == "lora" else 2)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2)
                elif "ia3_l" in n:
                    p.copy_(1 + 0.5 * torch.randn_like(p))
        model.eval()
        state = {k: v.float().numpy() for k, v in get_peft_model_state_dict(model).items()}
        out[name] = (model, state, cfg)
    return out


def _og_logits(folder, ids, adapter=None, files=()):
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    adapters = None
    if files:
        adapters = og.Adapters(model)
        for name, path in files:
            adapters.load(str(path), name)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 4)
    gen = og.Generator(model, params)
    if adapter:
        gen.set_active_adapter(adapters, adapter)
    gen.append_tokens(np.array(ids, dtype=np.int32))
    return gen.get_output("logits")[0].copy()


@pytest.fixture(scope="module")
def fp32_graph(tmp_path_factory, tiny_model_dir):
    from edgepeft.onnx.builder import build_onnx

    root = tmp_path_factory.mktemp("switch")
    build_onnx(tiny_model_dir, root / "fp32", "fp32", cache_dir=root / "cache")
    return root / "fp32"


def _switchable(src, out, config, adapters):
    """A copy of graph folder ``src`` in ``out`` with the slots all ``adapters`` need, and their files."""
    import onnx

    shutil.copytree(src, out)
    model = onnx.load(str(out / "model.onnx"))
    params = {"lora": switchable.lora_params(model.graph, config, adapters["lora"][1], 8 / 4),
              "ia3": switchable.ia3_params(model.graph, config, adapters["ia3"][1], ["down_proj"])}
    slots = switchable.slots_of(model.graph, params["lora"]) | switchable.slots_of(model.graph, params["ia3"])
    added = switchable.insert_slots(model, slots)
    onnx.save(model, str(out / "model.onnx"))
    files = []
    for name, p in params.items():
        switchable.write_adapter(p, out / f"{name}{switchable.EXTENSION}")
        files.append((name, out / f"{name}{switchable.EXTENSION}"))
    return params, slots, added, files


def test_one_graph_two_adapters_switched_in_onnxruntime_genai(fp32_graph, tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    adapters = _peft_adapters(tiny_model_dir)
    params, slots, added, files = _switchable(fp32_graph, tmp_path / "multi", config, adapters)
    layers = config.num_hidden_layers
    # LoRA on packed qkv, o, gate, up, down; IA3 on the qkv output (k and v) and down's input
    assert len(slots.lora) == 5 * layers and len(slots.ia3_out) == layers and len(slots.ia3_in) == layers
    assert added == 3 * 5 * layers + 2 * layers
    ia3 = params["ia3"]["model.layers.0.attn.qkv_proj.ia3_out"]
    q = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    assert np.all(ia3[:q] == 1) and not np.allclose(ia3[q:], 1)  # ones over q, k and v scaled
    # the files hold what was written, in arrays of their own (not views of memory the reader frees)
    back = switchable.read_adapter(files[1][1])
    import gc

    gc.collect()
    noise = [np.full(1 << 16, 7.0, np.float32) for _ in range(64)]
    assert len(noise) == 64
    assert set(back) == set(params["ia3"]) and all(np.array_equal(back[k], params["ia3"][k]) for k in back)

    ids = list(range(20, 60))
    base = _og_logits(fp32_graph, ids)
    none = _og_logits(tmp_path / "multi", ids, None, files)
    assert np.array_equal(none, base)  # loaded, not active: the base exactly
    got = {}
    for name in ("lora", "ia3", "lora"):  # switched back and forth on one model
        got[name] = _og_logits(tmp_path / "multi", ids, name, files)
        with torch.no_grad():
            want = adapters[name][0](torch.tensor([ids])).logits[0].numpy()
        assert np.abs(got[name] - want).max() < 2e-3, name
        assert np.abs(got[name] - base).max() > 0.1, name  # the adapter does change the answer
    assert np.abs(got["lora"] - got["ia3"]).max() > 0.1


def test_slots_on_an_int4_graph_leave_the_base_exact(fp32_graph, tiny_model_dir, tmp_path):
    """On MatMulNBits the slots sit beside the quantized weights; no adapter active gives the int4 base's logits
    bit for bit, and an active one equals the same values baked into the graph."""
    import onnx
    from transformers import AutoConfig

    from edgepeft.onnx.mixed import quantize
    from edgepeft.pipeline.target import Target

    config = AutoConfig.from_pretrained(tiny_model_dir)
    int4 = tmp_path / "int4"
    shutil.copytree(fp32_graph, int4)
    quantize(fp32_graph / "model.onnx", int4 / "model.onnx", Target("t"))
    adapters = _peft_adapters(tiny_model_dir)
    params, slots, _, files = _switchable(int4, tmp_path / "multi", config, adapters)
    assert all(n.endswith("_Q4") for n in slots.lora)
    ids = list(range(30, 70))
    assert np.array_equal(_og_logits(tmp_path / "multi", ids, None, files), _og_logits(int4, ids))

    baked = tmp_path / "baked"  # the IA3 values as the slots' defaults
    shutil.copytree(tmp_path / "multi", baked)
    model = onnx.load(str(baked / "model.onnx"))
    for init in model.graph.initializer:
        if init.name in params["ia3"]:
            init.CopyFrom(onnx.numpy_helper.from_array(params["ia3"][init.name], init.name))
    onnx.save(model, str(baked / "model.onnx"))
    assert np.array_equal(_og_logits(tmp_path / "multi", ids, "ia3", files), _og_logits(baked, ids))


def test_an_adapter_on_a_projection_the_graph_lacks_is_refused(fp32_graph, tiny_model_dir):
    import onnx
    from transformers import AutoConfig

    from edgepeft.core.errors import EdgepeftError

    model = onnx.load(str(fp32_graph / "model.onnx"))
    state = {"base_model.model.model.layers.0.mlp.gate_up_proj.lora_A.weight": np.zeros((2, 64), np.float32),
             "base_model.model.model.layers.0.mlp.gate_up_proj.lora_B.weight": np.zeros((256, 2), np.float32)}
    with pytest.raises(EdgepeftError, match="no projection for layer 0's gate_up_proj"):
        switchable.lora_params(model.graph, AutoConfig.from_pretrained(tiny_model_dir), state, 1.0)


def test_quantization_statistics_are_taken_under_each_adapter(fp32_graph, tiny_model_dir):
    """GPTQ's statistics of a shared base are those of the inputs each MatMul multiplies in use: down's input
    under an IA3 on down alone is the base's scaled by the IA3 vector; under a LoRA every layer after the first
    sees other inputs; the base's own windows give the base's statistics; keys are the slot-free graph's input
    names."""
    import onnx
    from transformers import AutoConfig

    from edgepeft.onnx import quant
    from edgepeft.onnx.decoder import Decoder

    config = AutoConfig.from_pretrained(tiny_model_dir)
    model = onnx.load(str(fp32_graph / "model.onnx"))
    adapters = _peft_adapters(tiny_model_dir)
    params = {"lora": switchable.lora_params(model.graph, config, adapters["lora"][1], 8 / 4),
              "ia3": switchable.ia3_params(model.graph, config, adapters["ia3"][1], ["down_proj"])}
    slot = "model.layers.0.mlp.down_proj.ia3_in"
    vec = params["ia3"][slot]
    params["down"] = {slot: vec}
    factory = lambda data: Decoder(data, genai_config=fp32_graph / "genai_config.json")  # noqa: E731
    window = [list(range(20, 52))]
    base = quant.input_statistics(model, window, factory)
    got = {u: quant.adapter_statistics(model, window, [u], params, factory) for u in (None, "down", "lora")}
    assert set(got["down"]) == set(base) and len(model.graph.node) == len(onnx.load(
        str(fp32_graph / "model.onnx")).graph.node)  # the caller's graph is left without slots
    for name in base:
        assert np.allclose(got[None][name][0], base[name][0], rtol=1e-6, atol=1e-9)
    down = next(n.input[0] for n in model.graph.node if n.name == "/model/layers.0/mlp/down_proj/MatMul")
    assert not np.allclose(vec, 1)
    assert np.allclose(got["down"][down][0], base[down][0] * np.outer(vec, vec), rtol=1e-4, atol=1e-7)
    last = next(n.input[0] for n in model.graph.node
                if n.name == f"/model/layers.{config.num_hidden_layers - 1}/attn/qkv_proj/MatMul")
    assert not np.allclose(got["lora"][last][0], base[last][0], rtol=1e-3)
