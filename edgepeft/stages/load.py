"""Stage ``load``: resolve the model source and write it as a plain fp32 Hugging Face folder.

Every later stage then reads one format whatever the source was (local folder, HF cache id, GGUF file,
built-in name), and the record holds the hash of the source files, so a changed base model reruns
everything after it.
"""

from __future__ import annotations

from edgepeft.core.console import mb
from edgepeft.models.sources import load_config, load_tokenizer, resolve
from edgepeft.pipeline.stage import Stage, StageContext


def preflight(recipe) -> None:
    load_config(resolve(recipe.model.source, recipe.base_dir))  # found, and a supported architecture


def model_files(recipe) -> dict[str, list]:
    return {"model.source": resolve(recipe.model.source, recipe.base_dir).files()}


def run(ctx: StageContext) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from edgepeft.models.pytorch import param_count

    source = resolve(ctx.config.source, ctx.recipe.base_dir)
    config = load_config(source)
    tokenizer = load_tokenizer(source)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, **source.load_kwargs())
    model.save_pretrained(ctx.output, safe_serialization=True)
    tokenizer.save_pretrained(ctx.output)
    n = param_count(model)
    ctx.figures.update(source=source.spec, source_kind=source.kind, model_type=config.model_type,
                       parameters=n, fp32_bytes=int(model.get_memory_footprint()))
    print(f"  {source.spec} ({source.kind}): {config.model_type}, {n / 1e6:.1f}M parameters, "
          f"{mb(model.get_memory_footprint())} in fp32")


STAGE = Stage("load", run, sections=("model",), files=model_files, preflight=preflight, shared=True,
              description="resolve the model source, write it as an fp32 Hugging Face folder")
