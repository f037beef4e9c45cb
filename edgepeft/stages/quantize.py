"""Stage ``quantize``: the QLoRA base. bitsandbytes NF4 weights with double quantization (the 4-bit
block scales are themselves quantized to 8 bits), on CUDA when present and on the CPU otherwise.

The frozen 4-bit base is what the adapter is trained against, and what the merge stage dequantizes: the
adapter learns to correct *these* weights, not the original ones.
"""

from __future__ import annotations

from edgepeft.core.console import mb
from edgepeft.pipeline.stage import Stage, StageContext


def run(ctx: StageContext) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from edgepeft.models.pytorch import device, device_map

    src = ctx.artifact("load")
    cfg = ctx.config
    dev = device()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                             bnb_4bit_use_double_quant=cfg.double_quant, bnb_4bit_compute_dtype=torch.float32,
                             llm_int8_skip_modules=cfg.skip_modules)
    # dtype float32 keeps the layers bitsandbytes does not quantize (norms, embedding) in fp32; without it
    # they become fp16 and CPU training runs ~6x slower.
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, quantization_config=bnb,
                                                 use_safetensors=True, device_map=device_map(dev))
    before = ctx.record_of("load")["figures"]["fp32_bytes"]
    after = int(model.get_memory_footprint())
    n4 = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
    model.save_pretrained(ctx.output, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(ctx.output)
    ctx.figures.update(device=dev.type, quant_type=cfg.quant_type, double_quant=cfg.double_quant,
                       linear_4bit_modules=n4, weight_bytes_before=before, weight_bytes_after=after,
                       ratio=round(before / after, 2))
    print(f"  {cfg.quant_type}{' + double quant' if cfg.double_quant else ''} on {dev.type}: {n4} linear layers "
          f"in 4-bit, weights {mb(before)} -> {mb(after)} ({before / after:.2f}x smaller)")


STAGE = Stage("quantize", run, sections=("quantize",), reads=("load",), shared=True,
              description="quantize the base to 4-bit (bitsandbytes)")
