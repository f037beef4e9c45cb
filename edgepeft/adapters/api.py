"""Adapters: one interface over the methods the train stage can fit on the frozen 4-bit base.

``lora`` and ``ia3`` are HF peft's (saved as peft saves them: ``adapter_config.json``); ``adapter``
(bottleneck adapters, ``edgepeft.adapters.bottleneck``), gated LoRA (``lora`` with ``gated = true``,
``edgepeft.adapters.lora``), ``prefix`` (prefix tuning, ``edgepeft.adapters.prefix``) and ``prompt`` (prompt
tuning, ``edgepeft.adapters.prompt``) and ``unipelt`` (all of them gated) are edgepeft's own
(``edgepeft.adapters.model``; saved as ``edgepeft_adapter.json`` + ``edgepeft_adapter.safetensors``). The
stages call only the functions here, so the training loop, the reference (4-bit base + adapter), the merge
check, export and the quality gate work alike for every method.

What can be merged is merged (LoRA, IA3: into the dequantized base's weights); what cannot (bottleneck adapters,
gated LoRA, prefixes, soft prompts) is kept beside the merged model, in the merge folder's ``unmerged/``, and
becomes part of the exported graph.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

PEFT_METHODS = ("lora", "ia3")
CONFIG = "edgepeft_adapter.json"
WEIGHTS = "edgepeft_adapter.safetensors"
UNMERGED = "unmerged"  # the merge folder's subfolder holding what the merge could not fold into the weights
ATTR = "edgepeft_adapters"  # where an own adapter set hangs on the model


def is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() or (path / CONFIG).is_file()


def _own(model):
    return getattr(model, ATTR, None)


def peft_config(adapter, config=None):
    """peft's config for a LoRA or IA3 table; ``config`` (the model's) picks IA3's default targets for its
    family where the table names none (``edgepeft.models.families``: peft's own defaults where it has them)."""
    from peft import IA3Config, LoraConfig

    if adapter.method == "lora":
        return LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                          target_modules=adapter.target_modules or "all-linear", task_type="CAUSAL_LM")
    targets, feedforward = adapter.target_modules, adapter.feedforward_modules
    if targets is None and config is not None:
        from edgepeft.models.families import family_of

        targets, default_ff = family_of(config).ia3_targets()
        feedforward = feedforward or default_ff
    return IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type="CAUSAL_LM")


def is_peft(adapter) -> bool:
    """Whether the recipe's ``[adapter]`` table is trained by peft (ungated LoRA, IA3) or by edgepeft's own modules."""
    return adapter.method in PEFT_METHODS and not adapter.gated


def wrap(model, adapter):
    """``model`` with a new, trainable adapter of the recipe's ``[adapter]`` table; the base stays frozen."""
    if is_peft(adapter):
        from peft import get_peft_model

        return get_peft_model(model, peft_config(adapter, model.config))
    from edgepeft.adapters.model import spec_for

    model = attach_spec(model, spec_for(model, adapter))
    prompt = getattr(model, ATTR).prompt
    if prompt is not None:
        prompt.init_from_vocabulary(model.get_input_embeddings().weight)
    return model


def attach_spec(model, spec: dict, hooks: bool = True):
    """``model`` (frozen) with a new adapter set of definition ``spec`` hung on it and (``hooks``) hooked into
    its modules; without, ``getattr(model, ATTR).attach(model)`` hooks it in later (after the modules it hooks
    into were replaced, as the heal mirror does)."""
    from edgepeft.adapters.model import AdapterSet

    for p in model.parameters():
        p.requires_grad_(False)
    dev = next(model.parameters()).device
    aset = AdapterSet(spec, model.config).to(dev)
    if hooks:
        aset.attach(model)
    setattr(model, ATTR, aset)  # a submodule: DDP and the optimizer see its parameters
    return model


def state(model) -> dict:
    """The adapter's own tensors (what a checkpoint or the saved adapter holds), on the CPU."""
    own = _own(model)
    if own is None:
        from peft import get_peft_model_state_dict

        sd = get_peft_model_state_dict(model)
    else:
        sd = own.state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def set_state(model, tensors: dict) -> None:
    own = _own(model)
    if own is None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, tensors)
    else:
        own.load_state_dict(tensors, strict=True)


def save(model, out: Path) -> None:
    """The trained adapter as a folder (peft's format for peft methods)."""
    own = _own(model)
    if own is None:
        model.save_pretrained(out, safe_serialization=True)
        return
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    spec, tensors = own.saved()
    save_file(tensors, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps(spec, indent=1) + "\n")


def spec_of(adir: Path) -> dict | None:
    """An own adapter folder's definition, or None for a peft folder."""
    f = adir / CONFIG
    return json.loads(f.read_text()) if f.is_file() else None


def load(model, adir: Path):
    """``model`` with the saved adapter in ``adir`` on top (the reference: 4-bit base + adapter), for inference."""
    spec = spec_of(adir)
    if spec is None:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, adir).eval()
    from safetensors.torch import load_file

    attach_spec(model, spec)
    set_state(model, load_file(str(adir / WEIGHTS)))
    return model.eval()


@contextlib.contextmanager
def disabled(model):
    """The base model alone for the duration (the adapter is kept)."""
    own = _own(model)
    if own is None:
        with model.disable_adapter():
            yield
        return
    own.enabled = False
    try:
        yield
    finally:
        own.enabled = True


def merge_into(base, adir: Path, out: Path):
    """Merge the adapter in ``adir`` into ``base`` (the exactly dequantized 4-bit base) and save the result to
    ``out`` as a Hugging Face folder, with what cannot be merged in ``out/unmerged/``. Returns the merged model
    as it computes (with the unmerged parts attached), for the merge check."""
    spec = spec_of(adir)
    if spec is None:
        from peft import PeftModel

        merged = PeftModel.from_pretrained(base, adir).merge_and_unload()
        merged.save_pretrained(out, safe_serialization=True)
        return merged
    base.save_pretrained(out, safe_serialization=True)
    (out / UNMERGED).mkdir()
    for name in (CONFIG, WEIGHTS):
        shutil.copy2(adir / name, out / UNMERGED / name)
    return load(base, adir)


def unmerged_spec(merged_dir: Path) -> dict | None:
    """The definition of the merge folder's unmerged parts, or None when everything was merged."""
    return spec_of(merged_dir / UNMERGED)


def unmerged_tensors(merged_dir: Path) -> dict | None:
    """The unmerged parts' tensors (torch), or None when everything was merged."""
    if unmerged_spec(merged_dir) is None:
        return None
    from safetensors.torch import load_file

    return load_file(str(merged_dir / UNMERGED / WEIGHTS))


def load_merged(merged_dir: Path):
    """The merge stage's model as it computes, in fp32: the merged weights with the unmerged parts attached."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    if unmerged_spec(merged_dir) is not None:
        model = load(model, merged_dir / UNMERGED)
    return model.eval()
