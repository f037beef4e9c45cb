"""Stage ``bundle``: the folder an app team ships, ``<run>/bundle/<target>/``.

It holds the quantized model in the target's formats (``model.onnx`` and/or ``model.ort`` with
``model.required_operators.config``, the input of a reduced-operator ONNX Runtime build), the tokenizer
and chat template, a ``genai_config.json`` so onnxruntime-genai runs the folder as it is, and
``manifest.json`` (see ``edgepeft.bundle.manifest``).

The output head computes the last prompt position only (``[bundle] prune_lm_head``, on by default;
``edgepeft.onnx.rewrite.prune_lm_head``): a generator's prefill needs no other row, and the quality gate feeds
the graph's ``logits_positions`` input to read every row of the same graph.

The ORT-format file is converted with every graph optimization except constant folding
(``edgepeft.onnx.ortformat``: folding would undo the shared embedding). The converted file is loaded back
as a mobile app loads it (from bytes, no graph optimizer) and must compute the logits of the ONNX graph it
came from, or the stage fails. A mobile target (``readiness`` in its TOML) gets ``readiness/``: which nodes
NNAPI, CoreML or XNNPACK would take, and what falls back to the CPU provider (see
``edgepeft.bundle.readiness``).

Before sealing the manifest the stage measures the bundle's latency as shipped (``[profile]``, see
``edgepeft.latency.profile``: load time, prefill and decode by length, memory, the physical floor and the
on-device estimate, next to the fp32 export), written into ``profile/`` as a report with plots.

A recipe with ``[tasks]`` gets one base graph with adapter slots and one runtime adapter per task in
``adapters/<task>.onnx_adapter`` (``edgepeft.onnx.switchable``), each listed in the manifest's ``adapters``
with its method, size, system prompt and hashes (the values the heal stage fitted on the shipped base where it
kept them, ``fitted_on_base``; else the trained ones); the profile measures the base with no adapter active and
with each adapter, interleaved. Its
quality is the next stage's job (``evaluate``), which adds ``quality/`` and re-seals. The pipeline writes
the stage into a temporary folder and renames it when done, so a failure leaves no half bundle.
"""

from __future__ import annotations

import json
import shutil
import time

from edgepeft import __version__
from edgepeft.bundle import readiness
from edgepeft.bundle.manifest import MANIFEST, adapter_sha256, intact_bundle, write_manifest
from edgepeft.calib.data import recipe_splits
from edgepeft.core.config import as_dict
from edgepeft.core.console import mb
from edgepeft.core.errors import EdgepeftError
from edgepeft.latency.profile import Variant, adapter_variants, headline, measure, write_report
from edgepeft.onnx.adapters import prefix_tokens_of
from edgepeft.onnx.ortformat import to_ort
from edgepeft.pipeline.layout import bundle_in
from edgepeft.pipeline.stage import Stage, StageContext, record_intact, task_files
from edgepeft.pipeline.tables import TABLES

# onnxruntime-genai reads tokenizer.json (+ its config); vocab.json/merges.txt would only repeat it (1.3 MB)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
MODEL_FILES = {"onnx": "model.onnx", "ort": "model.ort"}


def system_prompt(samples) -> str | None:
    firsts = {s.messages[0][1] for s in samples if s.messages and s.messages[0][0] == "system"}
    return firsts.pop() if len(firsts) == 1 else None


def run(ctx: StageContext) -> None:
    recipe, target = ctx.recipe, ctx.recipe.target
    src = ctx.artifact("heal")
    name = f"{recipe.name}-{target.name}"
    out = bundle_in(ctx.out, target.name)
    out.mkdir()
    model_src = src / "model.onnx"
    switch = {}
    if recipe.tasks.names:
        model_src, switch = _switchable(ctx, model_src, out)
    model_src, rewrites = _shipped_graph(ctx, model_src)
    for f in TOKENIZER_FILES:
        if f == "tokenizer.json" and (src / f).is_file():
            # without the indentation transformers writes: Gemma 3's (262k pieces, 515k merges) 32 MB -> 13.6 MB
            tokenizer = json.loads((src / f).read_text())
            (out / f).write_text(json.dumps(tokenizer, ensure_ascii=False, separators=(",", ":")))
        elif (src / f).is_file():
            shutil.copy2(src / f, out / f)
    if "onnx" in target.formats:
        for f in model_src.parent.glob("model.onnx*"):
            shutil.copy2(f, out / f.name)
    model_file = MODEL_FILES[target.formats[0]]
    genai = json.loads((src / "genai_config.json").read_text())
    decoder = genai["model"]["decoder"]
    decoder["filename"] = model_file
    decoder.setdefault("session_options", {})["intra_op_num_threads"] = target.threads
    decoder["session_options"]["inter_op_num_threads"] = 1
    (out / "genai_config.json").write_text(json.dumps(genai, indent=4) + "\n")

    ready, convert_seconds = None, 0.0
    if "ort" in target.formats:
        ort_file = out / MODEL_FILES["ort"]
        t0 = time.time()
        to_ort(model_src, ort_file)
        convert_seconds = time.time() - t0
        # the converted file must load as an app loads it, and compute what the ONNX graph computes
        load = readiness.load_check(ort_file, out / "genai_config.json", model_src)
        if target.readiness:
            ready = readiness.check(out, ort_file.name, target.readiness, load)

    samples = recipe_splits(recipe)["train"][:64]
    eos = genai["model"].get("eos_token_id", [])
    stops = sorted(set(eos if isinstance(eos, list) else [eos]))
    manifest = {
        "name": name, "edgepeft": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "target": as_dict(target), "model_file": model_file, "runtime": target.runtime,
        "recipe": {"name": recipe.name, "path": str(recipe.path) if recipe.path else None,
                   **{s: as_dict(recipe.section(s)) for s in TABLES},
                   **({"tasks": recipe.tasks.tables} if recipe.tasks.names else {})},
        "base_model_sha256": ctx.record_of("load")["outside"]["model.source"],
        "adapter_sha256": adapter_sha256(ctx.artifact("train")),
        "prompt": {"system": system_prompt(samples), "stop_token_ids": stops},
    }
    if switch:
        manifest["adapters"] = switch["adapters"]
    if ready is not None:
        manifest["readiness"] = readiness.summary(ready)
    reserve = prefix_tokens_of(src / "model.onnx")
    if reserve:  # what an app must know to run the bundle (onnxruntime-genai sizes the KV cache by max_length)
        manifest["kv_cache_reserve_tokens"] = reserve
        manifest["kv_cache_reserve_why"] = (
            f"a prefix or soft prompt of {reserve} positions sits in the KV cache ahead of the prompt: set the "
            f"generator's max_length to prompt + answer + {reserve} and stop after the answer's tokens (the context "
            "in genai_config.json is already shorter by them)")

    variants = [Variant(f"bundle ({target.weights}, {model_file})", out / model_file, out / "genai_config.json"),
                *adapter_variants(out, {"model_file": model_file, **switch}, "bundle")]
    if recipe.profile.compare_fp32:
        fp32 = ctx.artifact("export")
        variants.append(Variant("fp32 export (model.onnx)", fp32 / "model.onnx", fp32 / "genai_config.json"))
    profile = measure(variants, target, recipe.profile)
    manifest["profiles"] = {"profile": write_report(profile, out / "profile", name)}
    lat = headline(profile)
    figures = {"formats": target.formats, "model_file": model_file, **rewrites,
               **({"switchable": switch} if switch else {}),
               "model_bytes": (out / model_file).stat().st_size, "ort_convert_seconds": round(convert_seconds, 2),
               **lat, "device": target.device, "profile_warnings": profile["warnings"]}
    upstream = {s: ctx.record_of(s)["figures"] for s in ("quantize", "train", "merge", "export", "requantize",
                                                              "heal")}
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    figures["bundle_bytes_before_manifest"] = total
    write_manifest(out, {**manifest, "figures": {"bundle": figures, **upstream}})
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    figures.update(bundle=name, bundle_bytes=total)
    ctx.figures.update(figures)
    if switch:
        print(f"  {len(switch['adapters'])} runtime adapters over one base ({switch['slot_nodes']} slot nodes): "
              + ", ".join(f"{n} ({a['method']}, {a['bytes'] / 1e6:.2f} MB)" for n, a in switch["adapters"].items()))
    line = (f"  {name}: {mb(total)}, decode {lat['decode_ms_per_token']:.2f} ms/token at {lat['context_tokens']} "
            f"tokens of context ({lat['measured_over_floor']:.2f}x the memory floor) and prefill "
            f"{lat['prompt_tokens']} tokens {lat['prefill_ms']:.0f} ms at {lat['threads']} threads")
    print(line)
    if ready is not None:
        print(f"  mobile readiness ({out.name}/{readiness.FOLDER}/report.md): {ready['recommendation']}")
    if target.max_bundle_mb is not None and total > target.max_bundle_mb * 1e6:
        raise EdgepeftError(f"[bundle] {name} is {mb(total)}, over target {target.name}'s budget of "
                            f"{target.max_bundle_mb:g} MB")


def _shipped_graph(ctx: StageContext, model_file):
    """The graph as shipped: with ``[bundle] prune_lm_head`` the head computes the last prompt position only
    (``edgepeft.onnx.rewrite``), written in the stage's work folder; else the graph itself. Also what was done."""
    import onnx

    from edgepeft.onnx.builder import save_graph
    from edgepeft.onnx.rewrite import prune_lm_head

    if not ctx.config.prune_lm_head:
        return model_file, {"lm_head_pruned": False}
    model = onnx.load(str(model_file))
    if not prune_lm_head(model):
        return model_file, {"lm_head_pruned": False}
    folder = ctx.work / "shipped"
    folder.mkdir(parents=True, exist_ok=True)
    save_graph(model, folder)
    return folder / "model.onnx", {"lm_head_pruned": True}


def _switchable(ctx: StageContext, model_file, out):
    """The base graph with every task's adapter slots (written in the stage's work folder) and each task's runtime
    adapter in ``out/adapters/``; returns the graph's path and what the manifest records."""
    import onnx
    from transformers import AutoConfig

    from edgepeft.onnx import switchable

    recipe, adir = ctx.recipe, ctx.artifact("train")
    config = AutoConfig.from_pretrained(ctx.artifact("merge"))
    model = onnx.load(str(model_file))
    params, methods = {}, {}
    fitted = set()
    for name in recipe.tasks.names:
        methods[name], params[name] = switchable.adapter_params(model.graph, config, adir / name)
        own = ctx.artifact("heal") / "adapters" / f"{name}{switchable.EXTENSION}"
        if own.is_file():  # the heal stage fitted this adapter's values on the shipped base
            values = switchable.read_adapter(own)
            if set(values) != set(params[name]):
                raise EdgepeftError(f"[bundle] {own} does not hold the slots of adapter {name!r}: rerun --from heal")
            params[name] = values
            fitted.add(name)
    slots = switchable.slots_for(model.graph, params.values())
    added = switchable.insert_slots(model, slots)
    path = ctx.work / "switchable" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    (out / "adapters").mkdir()
    adapters = {}
    for name in recipe.tasks.names:
        rel = f"adapters/{name}{switchable.EXTENSION}"
        switchable.write_adapter(params[name], out / rel)
        task = recipe.task(name)
        adapters[name] = {"file": rel, "method": methods[name], "bytes": (out / rel).stat().st_size,
                          "tensors": len(params[name]), "data": task.train.data,
                          "adapter_sha256": adapter_sha256(adir / name), "fitted_on_base": name in fitted,
                          "prompt": {"system": system_prompt(recipe_splits(task)["train"][:64])}}
    return path, {"adapters": adapters, "slot_nodes": added, "lora_slots": len(slots.lora),
                  "ia3_slots": len(slots.ia3_out) + len(slots.ia3_in)}


def preflight(recipe) -> None:
    """The profile's longest prompt and its decode steps fit in the target's context."""
    context, longest = recipe.target.context, max(recipe.profile.lengths)
    if context and longest + recipe.profile.decode_tokens > context:
        raise EdgepeftError(f"[profile] lengths reach {longest} tokens + {recipe.profile.decode_tokens} decoded, past "
                            f"target {recipe.target.name}'s context of {context}: shorten them or raise the context")


def intact(folder, record: dict) -> list[str]:
    """A finished bundle stage: its sealed bundle checked against its own manifest (sections added later by
    ``evaluate`` and ``profile`` are sealed there), the rest of the folder against the record."""
    bundles = [m.parent for m in folder.glob(f"*/{MANIFEST}")]
    sealed = tuple(f"{b.name}/" for b in bundles)
    rest = {k: v for k, v in record.get("files", {}).items() if not k.startswith(sealed)}
    return record_intact(folder, {**record, "files": rest}) + [
        f"{b.name}: {p}" for b in bundles for p in intact_bundle(b)]


STAGE = Stage("bundle", run, sections=("bundle", "target", "profile", "tasks"),
              reads=("heal", "requantize", "export", "load", "quantize", "train", "merge"),
              files=lambda recipe: task_files(recipe, "train", "data", "validation_data"), preflight=preflight,
              description="write the deployable bundle, profile its latency, seal its manifest", intact=intact)
