"""``nox -s bench``: the bundle against the references, measured in one run on the same merged model.

Rows: the edgepeft bundle's model file; onnxruntime-genai's model builder int4 CPU export of the same
merged model (the tool to beat); PyTorch eager fp32. For each: size on disk, decode ms/token (batch 1,
greedy, after a prompt) and prefill time of the prompt, all at the target's thread count. Variants are
measured interleaved, round after round in a shuffled order, and the median per variant reported, because these shared
machines drift by ±15% over minutes. Ratios are edgepeft / builder: below 1 is better.

Each row also gets its physical floor (``edgepeft.latency.costmodel``): the weight bytes a decode step reads
plus the KV cache, over this machine's memory read bandwidth measured at the same thread count in the
same run; measured / floor says how much of the memory's speed each variant uses.

    python -m edgepeft.latency.bench dist/android [--rounds 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

from edgepeft.adapters.api import unmerged_spec
from edgepeft.bundle.manifest import read_manifest
from edgepeft.latency import costmodel
from edgepeft.onnx.builder import build_onnx
from edgepeft.onnx.decoder import Decoder, latency
from edgepeft.pipeline.layout import RunDir


def torch_latency(model_dir: Path, threads: int, prompt_tokens: int, decode_tokens: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = model.config.vocab_size

    @torch.no_grad()
    def measure(seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(100, vocab - 1, (1, prompt_tokens), generator=g)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        prefill = time.perf_counter() - t0
        cache, token, steps = out.past_key_values, out.logits[:, -1:].argmax(-1), []
        for _ in range(decode_tokens):
            t = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            steps.append(time.perf_counter() - t)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return {"prefill_ms": 1000 * prefill, "decode_ms_per_token": 1000 * statistics.median(steps)}

    return measure


def ort_latency(model_file: Path, genai_config: Path, threads: int, prompt_tokens: int, decode_tokens: int):

    dec = Decoder(model_file, threads, genai_config)
    return lambda: latency(dec, prompt_tokens, decode_tokens, repeats=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgepeft.latency.bench", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, help="a finished run folder, e.g. dist/android")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    args = p.parse_args(argv)

    run = RunDir(args.run_dir)
    bundles = run.bundles()
    merged = run.artifact("merge")
    if not bundles or not merged.is_dir():
        print(f"edgepeft bench: error: {args.run_dir} has no finished bundle (run `nox -s export-android` first)",
              file=sys.stderr)
        return 2
    bundle = bundles[0]
    manifest = read_manifest(bundle)
    threads = manifest["target"]["threads"]
    if unmerged_spec(merged) is not None:  # the builder and PyTorch rows read the merged folder's weights only
        method = manifest["recipe"]["adapter"]["method"]
        print(f"edgepeft bench: warning: {args.run_dir}'s adapter ({method}) is not merged; the reference rows are "
              "the base model without it, the bundle has it", file=sys.stderr)
    builder_dir = run.scratch("bench") / "builder-int4"
    if not (builder_dir / "model.onnx").is_file():
        print("building the reference: onnxruntime-genai model builder, int4, CPU ...", flush=True)
        seconds = build_onnx(merged, builder_dir, "int4", cache_dir=run.scratch("bench") / "cache",
                             context=manifest["target"].get("context"))
        print(f"  built in {seconds:.1f} s")

    def size(files):
        return sum(f.stat().st_size for f in files)

    bandwidth = costmodel.read_bandwidth_gbs(threads)
    windows = costmodel.attention_windows(bundle / manifest["model_file"])
    kv = costmodel.kv_bytes_read(bundle / "genai_config.json", windows, args.prompt_tokens + args.decode_tokens / 2)
    read = {"edgepeft bundle": costmodel.weight_bytes(bundle / manifest["model_file"])["read_per_token"],
            "ort-genai builder int4": costmodel.weight_bytes(builder_dir / "model.onnx")["read_per_token"],
            # PyTorch reads every parameter once per step (the tied embedding is the head's weight)
            "PyTorch eager fp32": size(merged.glob("*.safetensors"))}

    rows = {
        "edgepeft bundle": (size([bundle / manifest["model_file"]]),
                            ort_latency(bundle / manifest["model_file"], bundle / "genai_config.json", threads,
                                        args.prompt_tokens, args.decode_tokens)),
        "ort-genai builder int4": (size(builder_dir.glob("model.onnx*")),
                                   ort_latency(builder_dir / "model.onnx", builder_dir / "genai_config.json", threads,
                                               args.prompt_tokens, args.decode_tokens)),
        "PyTorch eager fp32": (size(merged.glob("*.safetensors")),
                               torch_latency(merged, threads, args.prompt_tokens, args.decode_tokens)),
    }
    results = {name: [] for name in rows}
    for _, fn in rows.values():
        fn()  # warm-up
    for r in range(args.rounds):
        order = list(rows)
        random.Random(r).shuffle(order)  # no variant always runs right after another (caches, clock boost)
        for name in order:
            results[name].append(rows[name][1]())
        bandwidth = max(bandwidth, costmodel.read_bandwidth_gbs(threads, passes=3))
        print(f"  round {r + 1}/{args.rounds} done", flush=True)

    def med(name, key):
        return statistics.median(x[key] for x in results[name])

    print(f"\nbench: {bundle.name}, {threads} threads, prompt {args.prompt_tokens} tokens, median of {args.rounds} "
          f"interleaved rounds")
    print(f"memory read bandwidth {bandwidth:.1f} GB/s at {threads} threads; floor = (weights read per token + KV "
          f"cache) / bandwidth")
    print(f"{'':26}{'size MB':>10}{'decode ms/token':>18}{'prefill ms':>12}{'floor ms':>10}{'measured/floor':>16}")
    for name, (nbytes, _) in rows.items():
        decode, prefill = med(name, "decode_ms_per_token"), med(name, "prefill_ms")
        floor = costmodel.floor_ms(read[name] + kv, bandwidth)
        print(f"{name:26}{nbytes / 1e6:>10.1f}{decode:>18.2f}{prefill:>12.1f}{floor:>10.2f}{decode / floor:>16.2f}")
    ours, ref = "edgepeft bundle", "ort-genai builder int4"
    print(f"ratios edgepeft / builder: size {rows[ours][0] / rows[ref][0]:.3f}, decode "
          f"{med(ours, 'decode_ms_per_token') / med(ref, 'decode_ms_per_token'):.3f}, prefill "
          f"{med(ours, 'prefill_ms') / med(ref, 'prefill_ms'):.3f}")
    eager = "PyTorch eager fp32"
    print(f"speed-up over PyTorch eager: decode "
          f"{med(eager, 'decode_ms_per_token') / med(ours, 'decode_ms_per_token'):.1f}x, prefill "
          f"{med(eager, 'prefill_ms') / med(ours, 'prefill_ms'):.1f}x; "
          f"size {rows[eager][0] / rows[ours][0]:.1f}x smaller")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
