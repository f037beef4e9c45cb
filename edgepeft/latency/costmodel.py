"""The physical floor of decoding: bytes a decode step must read, over the memory's read bandwidth.

Batch-1 decoding multiplies one token's activations by every weight matrix once, so each step streams
all weights that matrices read (plus the KV cache so far) from DRAM; the arithmetic is small next to that.
The floor of one step is therefore ``bytes read per token / read bandwidth``, and ``measured / floor``
says how far a runtime is from what the memory allows (1.0 = streaming the weights at full speed).

- Bytes read per token: every initializer that a node other than a Gather reads. A token table read by
  Gather/GatherBlockQuantized costs one row per token, so it counts only when a MatMul reads it too (a
  tied output head). Works on ``.onnx`` (external data included) and on ORT-format ``.ort`` files.
- KV cache: 2 (key, value) x kv_heads x head_size x bytes per element, per layer and position of context
  that layer attends to: a sliding-window layer (Gemma 3: 5 of every 6, 512 positions) reads at most its window,
  whatever the context (``attention_windows`` reads each layer's window from the graph).
- Read bandwidth: the best of several passes of a multi-threaded read over a buffer far larger than the
  caches (numpy reductions release the GIL, so ``threads`` Python threads read in parallel).

The same model of cost estimates a device: its DRAM bandwidth (from the target profile, with a source)
times an efficiency, and the measured/floor ratio found on this machine carried over.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

GATHERS = {"Gather", "GatherBlockQuantized", "GatherND", "GatherElements"}
# bytes per element of ONNX TensorProto data types (4-bit types: half a byte)
ONNX_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2, 21: 0.5, 22: 0.5}


def read_bandwidth_gbs(threads: int = 1, megabytes: int = 256, passes: int = 10) -> float:
    """This machine's memory read bandwidth in GB/s: the fastest of ``passes`` reads of a buffer."""
    import numpy as np

    buf = np.ones(megabytes * 2**20 // 8, np.uint64)
    chunks = np.array_split(buf, threads)
    best = math.inf
    for _ in range(passes):
        workers = [threading.Thread(target=np.bitwise_or.reduce, args=(c,)) for c in chunks]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best / 1e9


def _onnx_tensors(path: Path):
    """(initializer sizes in bytes, op types reading each name) of an ONNX file, without loading weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    sizes = {}
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if "length" in ext:
            sizes[t.name] = int(ext["length"])
        elif t.raw_data:
            sizes[t.name] = len(t.raw_data)
        else:
            sizes[t.name] = int(math.ceil(math.prod(t.dims) * ONNX_ITEMSIZE.get(t.data_type, 4)))
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    return sizes, readers


def _ort_tensors(path: Path):
    """The same for an ORT-format file (a flatbuffer: ORT's own schema, shipped in its Python wheel)."""
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import InferenceSession

    buf = bytearray(path.read_bytes())
    graph = InferenceSession.InferenceSession.GetRootAs(buf, 0).Model().Graph()
    sizes = {}
    for i in range(graph.InitializersLength()):
        t = graph.Initializers(i)
        n = t.RawDataLength()
        if n == 0 and t.DimsLength():
            n = int(math.ceil(math.prod(t.DimsAsNumpy().tolist()) * ONNX_ITEMSIZE.get(t.DataType(), 4)))
        sizes[t.Name().decode()] = n
    readers: dict[str, set[str]] = {}
    for i in range(graph.NodesLength()):
        node = graph.Nodes(i)
        for j in range(node.InputsLength()):
            readers.setdefault(node.Inputs(j).decode(), set()).add(node.OpType().decode())
    return sizes, readers


def weight_bytes(model_file: Path) -> dict[str, int]:
    """``total``: every initializer; ``read_per_token``: those a decode step streams (see module doc)."""
    model_file = Path(model_file)
    sizes, readers = (_ort_tensors if model_file.suffix == ".ort" else _onnx_tensors)(model_file)
    read = sum(n for name, n in sizes.items() if readers.get(name, set()) - GATHERS)
    return {"total": sum(sizes.values()), "read_per_token": read}


def kv_bytes_per_position(genai_config: Path, bytes_per_element: int = 4) -> int:
    """KV-cache bytes one position of context adds (fp32 cache, as the CPU graphs keep it)."""
    dec = json.loads(Path(genai_config).read_text())["model"]["decoder"]
    return 2 * dec["num_hidden_layers"] * dec["num_key_value_heads"] * dec["head_size"] * bytes_per_element


def _attention_attributes(model_file: Path) -> list[dict[str, int]]:
    """The integer attributes of each ``GroupQueryAttention`` node, in graph order (``.onnx`` or ``.ort``)."""
    model_file = Path(model_file)
    if model_file.suffix == ".ort":
        from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import InferenceSession

        graph = InferenceSession.InferenceSession.GetRootAs(bytearray(model_file.read_bytes()), 0).Model().Graph()
        nodes = (graph.Nodes(i) for i in range(graph.NodesLength()))
        return [{n.Attributes(j).Name().decode(): n.Attributes(j).I() for j in range(n.AttributesLength())}
                for n in nodes if n.OpType().decode() == "GroupQueryAttention"]
    import onnx

    return [{a.name: a.i for a in n.attribute} for n in onnx.load(str(model_file), load_external_data=False).graph.node
            if n.op_type == "GroupQueryAttention"]


def attention_windows(model_file: Path) -> list[int]:
    """Each attention layer's sliding window from the graph (``GroupQueryAttention``'s ``local_window_size``;
    0: the layer attends to the whole context)."""
    return [max(0, a.get("local_window_size", -1)) for a in _attention_attributes(model_file)]


def kv_bytes_read(genai_config: Path, windows: list[int], context: float, bytes_per_element: int = 4) -> float:
    """KV-cache bytes a decode step reads at ``context`` positions: each layer its context or its window."""
    per_layer = kv_bytes_per_position(genai_config, bytes_per_element) / len(windows) if windows else 0
    return sum(per_layer * (min(context, w) if w else context) for w in windows)


def floor_ms(bytes_read: float, gbs: float) -> float:
    return 1000 * bytes_read / (gbs * 1e9)


def device_estimate(target, bytes_read: float, measured_over_floor: float) -> dict | None:
    """On-device decode estimate for ``target``'s device: its floor at the achievable bandwidth (peak x
    efficiency), and that floor times the measured/floor ratio seen on this machine."""
    if not target.device_memory_bandwidth_gbs:
        return None
    gbs = target.device_memory_bandwidth_gbs * target.device_bandwidth_efficiency
    floor = floor_ms(bytes_read, gbs)
    est = floor * measured_over_floor
    return {"device": target.device, "peak_gbs": target.device_memory_bandwidth_gbs,
            "efficiency": target.device_bandwidth_efficiency, "achievable_gbs": gbs, "floor_ms": floor,
            "estimate_ms": est, "estimate_tokens_per_second": 1000 / est}
