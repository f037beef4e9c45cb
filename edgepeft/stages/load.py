"""Stage ``load``: resolve the model source and write it as a plain fp32 Hugging Face folder.

Every later stage then reads one format whatever the source was (local folder, HF cache id, GGUF file,
built-in name), and the record holds the hash of the source files, so a changed base model reruns
everything after it.
"""

from __future__ import annotations

from pathlib import Path

from edgepeft.core.console import mb
from edgepeft.models.sources import cache_dir, choose_chat_template, load_config, load_tokenizer, resolve
from edgepeft.pipeline.stage import Stage, StageContext


def preflight(recipe) -> None:
    load_config(resolve(recipe.model.source, recipe.base_dir))  # found, and a supported architecture


def model_files(recipe) -> dict[str, list]:
    return {"model.source": resolve(recipe.model.source, recipe.base_dir).files()}


# The version of edgepeft's own part of a GGUF conversion (the tokenizer repairs in models.sources): a change
# there bumps it, so no cached folder from before is reused (2: SentencePiece BPE vocabularies rebuilt as BPE).
CONVERSION = 2


def converted_folder(source, file_hash: str | None) -> Path | None:
    """Where a GGUF source's conversion to a Hugging Face folder is cached: keyed by the file's hash (the one the
    stage's fingerprint took), the transformers version (converting Gemma 3's 262k-token tokenizer alone takes
    minutes) and ``CONVERSION``. None for other sources."""
    if not source.gguf_file or not file_hash:
        return None
    import transformers

    return cache_dir() / "converted" / f"{file_hash[:24]}-transformers-{transformers.__version__}-c{CONVERSION}"


def run(ctx: StageContext) -> None:
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgepeft.models.pytorch import param_count

    source = resolve(ctx.config.source, ctx.recipe.base_dir)
    config = load_config(source)
    cached = converted_folder(source, ctx.outside.get("model.source"))
    if cached is not None and (cached / "config.json").is_file():
        print(f"  converted before: {cached}")
        tokenizer = AutoTokenizer.from_pretrained(cached)
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32, use_safetensors=True)
    else:
        tokenizer = load_tokenizer(source)
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, **source.load_kwargs())
    model.save_pretrained(ctx.output, safe_serialization=True)
    tokenizer.save_pretrained(ctx.output)
    if cached is not None and not cached.is_dir():  # the conversion as it came, before a template is chosen
        tmp = cached.with_name(f".{cached.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            shutil.copytree(ctx.output, tmp)
            tmp.rename(cached)
        except OSError as e:  # a cache that cannot be written costs the next run time, not this one its result
            print(f"  (conversion not cached: {e})")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    template = choose_chat_template(tokenizer, ctx.config.chat_template, source.spec)
    if template == "plain":
        tokenizer.save_pretrained(ctx.output)
    n = param_count(model)
    ctx.figures.update(source=source.spec, source_kind=source.kind, model_type=config.model_type,
                       chat_template=template, parameters=n, fp32_bytes=int(model.get_memory_footprint()))
    print(f"  {source.spec} ({source.kind}): {config.model_type}, {n / 1e6:.1f}M parameters, "
          f"{mb(model.get_memory_footprint())} in fp32; chat template: {template}")


STAGE = Stage("load", run, sections=("model",), files=model_files, preflight=preflight, shared=True,
              description="resolve the model source, write it as an fp32 Hugging Face folder")
