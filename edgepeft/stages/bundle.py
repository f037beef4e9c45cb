"""Stage ``bundle``: the folder an app team ships, ``<run>/bundle/<target>/``.

It holds the quantized model in the target's formats (``model.onnx`` and/or ``model.ort`` with
``model.required_operators.config``, the input of a reduced-operator ONNX Runtime build), the tokenizer
and chat template, a ``genai_config.json`` so onnxruntime-genai runs the folder as it is, and
``manifest.json`` (see ``edgepeft.bundle``).

The ORT-format file is converted with every graph optimization except constant folding: folding would
materialize a reshaped copy of the output head's weights for the shared embedding (+14 MB on SmolLM2)
and undo the sharing. The converted file is loaded back as a mobile app loads it (from bytes, no graph
optimizer) and must compute the logits of the ONNX graph it came from, or the stage fails. A mobile target
(``readiness`` in its TOML) gets ``readiness/``: which nodes NNAPI, CoreML or XNNPACK would take, and what
falls back to the CPU provider (see ``edgepeft.readiness``).

Before sealing the manifest the stage measures the bundle's latency as shipped (``[profile]``, see
``edgepeft.profile``: load time, prefill and decode by length, memory, the physical floor and the
on-device estimate, next to the fp32 export), written into ``profile/`` as a report with plots. Its
quality is the next stage's job (``evaluate``), which adds ``quality/`` and re-seals. The pipeline writes
the stage into a temporary folder and renames it when done, so a failure leaves no half bundle.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from edgepeft import __version__, readiness
from edgepeft.errors import EdgepeftError
from edgepeft.pipeline import StageContext

# onnxruntime-genai reads tokenizer.json (+ its config); vocab.json/merges.txt would only repeat it (1.3 MB)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
MODEL_FILES = {"onnx": "model.onnx", "ort": "model.ort"}
ORT_CONFIG = "model.required_operators.config"


@dataclass
class BundleConfig:
    """The bundle's contents follow from the target (formats, threads); its latency settings are in
    ``[profile]`` and its quality budgets in ``[evaluate]``. No keys of its own yet."""


def to_ort(onnx_file: Path, ort_file: Path, constant_folding: bool = False) -> None:
    """Convert to ORT format (optimized; no constant folding unless asked, see the module doc) and write the
    required-operators config. Whether the result loads is ``edgepeft.readiness.load_check``'s to say."""
    import logging

    import onnxruntime as ort
    from onnxruntime.tools.ort_format_model import create_config_from_models

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(ort_file)
    so.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(onnx_file), so, providers=["CPUExecutionProvider"],
                         disabled_optimizers=[] if constant_folding else ["ConstantFolding"])
    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
    create_config_from_models([ort_file], ort_file.with_name(ORT_CONFIG), enable_type_reduction=False)


def system_prompt(samples) -> str | None:
    firsts = {s.messages[0][1] for s in samples if s.messages and s.messages[0][0] == "system"}
    return firsts.pop() if len(firsts) == 1 else None


def run(ctx: StageContext) -> None:
    from edgepeft.bundle import adapter_sha256, write_manifest
    from edgepeft.config import as_dict
    from edgepeft.data import load_splits
    from edgepeft.profile import Variant, headline, measure, write_report
    from edgepeft.runtime import mb

    recipe, target = ctx.recipe, ctx.recipe.target
    src = ctx.input("requantize") / "model"
    name = f"{recipe.name}-{target.name}"
    out = ctx.out / target.name
    out.mkdir()
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy2(src / f, out / f)
    if "onnx" in target.formats:
        for f in src.glob("model.onnx*"):
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
        to_ort(src / "model.onnx", ort_file)
        convert_seconds = time.time() - t0
        # the converted file must load as an app loads it, and compute what the ONNX graph computes
        load = readiness.load_check(ort_file, out / "genai_config.json", src / "model.onnx")
        if target.readiness:
            ready = readiness.check(out, ort_file.name, target.readiness, load)

    t = recipe.train
    samples = load_splits(t.data, t.validation_data, recipe.base_dir, seed=t.seed)["train"][:64]
    eos = genai["model"].get("eos_token_id", [])
    stops = sorted(set(eos if isinstance(eos, list) else [eos]))
    manifest = {
        "name": name, "edgepeft": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "target": as_dict(target), "model_file": model_file, "runtime": target.runtime,
        "recipe": {"name": recipe.name, "path": str(recipe.path) if recipe.path else None,
                   **{s: as_dict(recipe.section(s)) for s in ("model", "quantize", "adapter", "train", "merge",
                                                               "export", "requantize", "bundle", "profile",
                                                               "evaluate")}},
        "base_model_sha256": ctx.record_of("load")["outside"]["model_files"],
        "adapter_sha256": adapter_sha256(ctx.input("train") / "adapter"),
        "prompt": {"system": system_prompt(samples), "stop_token_ids": stops},
    }
    if ready is not None:
        manifest["readiness"] = readiness.summary(ready)

    variants = [Variant(f"bundle ({target.weights}, {model_file})", out / model_file, out / "genai_config.json")]
    if recipe.profile.compare_fp32:
        fp32 = ctx.input("export") / "model"
        variants.append(Variant("fp32 export (model.onnx)", fp32 / "model.onnx", fp32 / "genai_config.json"))
    profile = measure(variants, target, recipe.profile)
    manifest["profiles"] = {"profile": write_report(profile, out / "profile", name)}
    lat = headline(profile)
    figures = {"formats": target.formats, "model_file": model_file,
               "model_bytes": (out / model_file).stat().st_size, "ort_convert_seconds": round(convert_seconds, 2),
               **lat, "device": target.device, "profile_warnings": profile["warnings"]}
    upstream = {s: ctx.record_of(s)["figures"] for s in ("quantize", "train", "merge", "export", "requantize")}
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    figures["bundle_bytes_before_manifest"] = total
    write_manifest(out, {**manifest, "figures": {"bundle": figures, **upstream}})
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    figures.update(bundle=name, bundle_bytes=total)
    ctx.figures.update(figures)
    line = (f"  {name}: {mb(total)}, decode {lat['decode_ms_per_token']:.2f} ms/token at {lat['context_tokens']} "
            f"tokens of context ({lat['measured_over_floor']:.2f}x the memory floor) and prefill "
            f"{lat['prompt_tokens']} tokens {lat['prefill_ms']:.0f} ms at {lat['threads']} threads")
    print(line)
    if ready is not None:
        print(f"  mobile readiness ({out.name}/{readiness.FOLDER}/report.md): {ready['recommendation']}")
    if target.max_bundle_mb is not None and total > target.max_bundle_mb * 1e6:
        raise EdgepeftError(f"[bundle] {name} is {mb(total)}, over target {target.name}'s budget of "
                            f"{target.max_bundle_mb:g} MB")


def bundle_dir(run_dir: Path, recipe) -> Path:
    return run_dir / "bundle" / recipe.target.name
