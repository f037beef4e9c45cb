"""Stage ``load``: resolve the model source and write it as a plain fp32 Hugging Face folder.

Every later stage then reads one format whatever the source was (local folder, HF cache id, GGUF file,
built-in name), and the record holds the hash of the source files, so a changed base model reruns
everything after it.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgepeft.pipeline import StageContext
from edgepeft.sources import DEFAULT_MODEL, load_config, load_tokenizer, resolve, sha256_files


@dataclass
class ModelConfig:
    source: str = DEFAULT_MODEL

    def check(self) -> str | None:
        return None if self.source.strip() else "source must not be empty"


def preflight(recipe) -> None:
    load_config(resolve(recipe.model.source, recipe.base_dir))  # found, and a supported architecture


def outside_inputs(recipe) -> dict[str, str]:
    return {"model_files": sha256_files(resolve(recipe.model.source, recipe.base_dir).files())}


def run(ctx: StageContext) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from edgepeft.runtime import mb, param_count

    source = resolve(ctx.config.source, ctx.recipe.base_dir)
    config = load_config(source)
    tokenizer = load_tokenizer(source)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, **source.load_kwargs())
    model.save_pretrained(ctx.out / "model", safe_serialization=True)
    tokenizer.save_pretrained(ctx.out / "model")
    n = param_count(model)
    ctx.figures.update(source=source.spec, source_kind=source.kind, model_type=config.model_type,
                       parameters=n, fp32_bytes=int(model.get_memory_footprint()))
    print(f"  {source.spec} ({source.kind}): {config.model_type}, {n / 1e6:.1f}M parameters, "
          f"{mb(model.get_memory_footprint())} in fp32")
