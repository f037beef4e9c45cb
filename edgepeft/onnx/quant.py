"""Block-wise weight quantization for ONNX Runtime's ``MatMulNBits``, with or without calibration data.

A MatMul weight ``B`` [K, N] is cut into blocks of ``block`` consecutive inputs (along K) for each output
column; each block stores ``bits``-bit codes, one scale and (asymmetric) one zero point:
``w ~ (code - zero_point) * scale``. Three ways to choose the codes:

* ``rtn``: round to nearest on the block's full range (symmetric: the largest magnitude maps to -2^(bits-1),
  as ONNX Runtime's own quantizer does; asymmetric: min..max).
* ``clip``: activation-aware range search. For every block, a grid of shrunken ranges is tried and the one
  with the least output error is kept, the error of input k weighted by ``E[x_k^2]`` measured on the
  calibration data. Shrinking clips a few outliers to round the many small weights finer; the weighting
  keeps the inputs that carry large activations exact (the clipping search of AWQ, Lin et al. 2023).
* ``gptq``: GPTQ (Frantar et al. 2022): weights are rounded one input at a time and the rounding error is
  pushed onto the inputs not yet rounded, through the inverse of ``H = E[x x^T]`` from the calibration
  data. Each block's range is chosen (with the ``clip`` search) when the algorithm reaches it.

Everything here is numpy/PyTorch on the CPU; packing follows the ``MatMulNBits`` contrib op: ``B`` as
uint8 [N, K/block, block*bits/8] (the lower nibble first), scales [N, K/block], zero points uint8
[N, ceil(K/block*bits/8)] (omitted when symmetric: the op then uses 2^(bits-1)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(9))  # ranges shrunk to 100%, 95%, ..., 60%


@dataclass
class Quantized:
    """One quantized weight: codes [N, K/block, block] (uint8), scales [N, K/block], zero points or None."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block: int

    @classmethod
    def from_packed(cls, b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
                    block: int) -> Quantized:
        """The inverse of ``packed``: a weight from MatMulNBits' B, scales and (packed) zero points."""
        n = b.shape[0]

        def nibbles(x):
            return np.stack([x & 0x0F, x >> 4], axis=-1).reshape(n, -1)

        codes = (b if bits == 8 else nibbles(b)).reshape(n, -1, block)
        nb = codes.shape[1]
        zp = None
        if zero_points is not None:
            zp = zero_points.reshape(n, nb) if bits == 8 else nibbles(zero_points.reshape(n, -1))[:, :nb]
        return cls(codes, scales.reshape(n, nb), zp, bits, block)

    def centered(self) -> np.ndarray:
        """``codes - zero_points`` [N, K/block, block] float32 (the op's default zero point, 2^(bits-1), when
        none is stored)."""
        zp = self.zero_points if self.zero_points is not None else np.full(self.scales.shape, 2 ** (self.bits - 1))
        return self.codes.astype(np.float32) - zp[..., None].astype(np.float32)

    def dequantize(self) -> np.ndarray:
        """The weight as the kernel sees it, [K, N] float32."""
        w = self.centered() * self.scales[..., None]
        return w.reshape(w.shape[0], -1).T.copy()

    def packed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(B, scales, zero_points) as MatMulNBits stores them."""
        n, nb, block = self.codes.shape
        if self.bits == 8:
            b = self.codes.astype(np.uint8)
            zp = None if self.zero_points is None else self.zero_points.astype(np.uint8)
        else:
            c = self.codes.astype(np.uint8)
            b = (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)
            zp = None
            if self.zero_points is not None:
                z = self.zero_points.astype(np.uint8)
                if nb % 2:
                    z = np.concatenate([z, np.zeros((n, 1), np.uint8)], axis=1)
                zp = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
        return b.reshape(n, nb, block * self.bits // 8), self.scales.astype(np.float32), zp

    def tensors(self, base: str) -> list:
        """The packed weight, scales (and zero points) as ONNX initializers named after ``base`` (made once)."""
        from onnx import numpy_helper

        cached = getattr(self, "_tensors", None)
        if cached is None or cached[0] != base:
            b, s, zp = self.packed()
            made = [numpy_helper.from_array(b, f"{base}_Q{self.bits}"), numpy_helper.from_array(s, f"{base}_scales")]
            if zp is not None:
                made.append(numpy_helper.from_array(zp, f"{base}_zero_points"))
            self._tensors = cached = (base, made)
        return cached[1]


def _ranges(blocks: np.ndarray, bits: int, symmetric: bool, shrink: float):
    """Scale and zero point per block for a range shrunk by ``shrink``; blocks [..., block]."""
    levels = 2 ** bits - 1
    if symmetric:
        i = np.abs(blocks).argmax(-1)[..., None]
        peak = np.take_along_axis(blocks, i, -1)[..., 0] * shrink
        scale = peak / -(2 ** (bits - 1))
        scale = np.where(scale == 0, 1.0, scale)
        zp = np.full(scale.shape, 2 ** (bits - 1), np.float32)
    else:
        lo, hi = blocks.min(-1) * shrink, blocks.max(-1) * shrink
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)  # zero stays exact: padding and dead inputs
        scale = (hi - lo) / levels
        scale = np.where(scale == 0, 1.0, scale)
        zp = np.clip(np.round(-lo / scale), 0, levels)
    return scale.astype(np.float32), zp.astype(np.float32)


def _codes(blocks, scale, zp, bits):
    return np.clip(np.round(blocks / scale[..., None]) + zp[..., None], 0, 2 ** bits - 1)


def choose_ranges(blocks: np.ndarray, bits: int, symmetric: bool, importance: np.ndarray | None,
                  grid=CLIP_GRID) -> tuple[np.ndarray, np.ndarray]:
    """Per block, the (scale, zero point) of the grid's range with the least ``importance``-weighted squared
    error. blocks [N, nb, block]; importance [nb, block] (E[x^2] of each input) or None for round-to-nearest."""
    if importance is None:
        return _ranges(blocks, bits, symmetric, 1.0)
    best_err = best_scale = best_zp = None
    for shrink in grid:
        scale, zp = _ranges(blocks, bits, symmetric, shrink)
        err = ((((_codes(blocks, scale, zp, bits) - zp[..., None]) * scale[..., None]) - blocks) ** 2
               * importance).sum(-1)
        if best_err is None:
            best_err, best_scale, best_zp = err, scale, zp
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_scale = np.where(better, scale, best_scale)
            best_zp = np.where(better, zp, best_zp)
    return best_scale, best_zp


def quantize_rtn(w: np.ndarray, bits: int, block: int, symmetric: bool,
                 importance: np.ndarray | None = None) -> Quantized:
    """Round-to-nearest of ``w`` [K, N]; with ``importance`` (E[x_k^2], [K]) each block's range is searched."""
    k, n = w.shape
    blocks = np.ascontiguousarray(w.T, dtype=np.float32).reshape(n, k // block, block)
    imp = None if importance is None else importance.reshape(k // block, block)
    scale, zp = choose_ranges(blocks, bits, symmetric, imp)
    codes = _codes(blocks, scale, zp, bits).astype(np.uint8)
    return Quantized(codes, scale, None if symmetric else zp.astype(np.uint8), bits, block)


def quantize_gptq(w: np.ndarray, hessian: np.ndarray, bits: int, block: int, symmetric: bool,
                  damp: float = 0.01, clip: bool = True, lazy: int = 128, act_order: bool = False) -> Quantized:
    """GPTQ of ``w`` [K, N] with ``hessian`` = E[x x^T] [K, K] of its input on the calibration data.

    ``act_order``: round the inputs with the most energy first (the largest diagonal of the Hessian), so the
    error of the rest is pushed onto inputs that matter less; each block's range is then chosen up front from
    the unrounded weights ("static groups"), since its columns are no longer rounded together."""
    import torch

    k, n = w.shape
    W = torch.tensor(w.T, dtype=torch.float64)  # [N, K]: one row per output, rounded column by column
    H = torch.tensor(hessian, dtype=torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=torch.float64)
    importance = torch.diag(H).numpy() if clip else None
    nb = k // block
    codes = np.zeros((n, nb, block), np.uint8)
    S, Z = torch.zeros(n, nb, dtype=torch.float64), torch.zeros(n, nb, dtype=torch.float64)  # scales, zero points
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    if act_order:
        imp = None if importance is None else importance.reshape(nb, block)
        s, z = choose_ranges(W.numpy().astype(np.float32).reshape(n, nb, block), bits, symmetric, imp)
        S[:], Z[:] = torch.from_numpy(s), torch.from_numpy(z)
        W, H = W[:, order], H[order][:, order]
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    lazy = max(block, lazy // block * block)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=torch.float64), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(order[i1 + i])  # the input this column is
            b = col // block
            if not act_order and col % block == 0:
                group = W1[:, i:i + block].numpy().astype(np.float32)[:, None, :]
                imp = None if importance is None else importance[col:col + block][None, :]
                s, z = choose_ranges(group, bits, symmetric, imp)
                S[:, b], Z[:, b] = (torch.tensor(v[:, 0], dtype=torch.float64) for v in (s, z))
            x = W1[:, i]
            q = torch.clamp(torch.round(x / S[:, b]) + Z[:, b], 0, 2 ** bits - 1)
            codes[:, b, col % block] = q.numpy().astype(np.uint8)
            err = (x - (q - Z[:, b]) * S[:, b]) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Quantized(codes, S.numpy().astype(np.float32), None if symmetric else Z.numpy().astype(np.uint8), bits,
                     block)


# ---- the ONNX graph side ------------------------------------------------------------------------------

def weight_matmuls(model) -> list:
    """The graph's MatMul nodes whose second input is a 2-D initializer (the ones to quantize)."""
    inits = {i.name: i for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2]


def input_statistics(model, windows: list[list[int]], decoder_factory, full: bool = True,
                     progress=None, feeds: list[dict] | None = None,
                     nodes: set[str] | None = None) -> dict[str, tuple[np.ndarray, int]]:
    """E[x x^T] (``full``) or E[x^2] of every weight MatMul's input over the calibration ``windows``:
    {input tensor name: (matrix or vector, tokens)}. ``decoder_factory(model_bytes)`` builds a Decoder;
    ``feeds``: extra graph inputs for each window (a runtime adapter's slot values); ``nodes``: only these
    MatMuls."""
    import onnx

    names = sorted({n.input[0] for n in weight_matmuls(model) if nodes is None or n.name in nodes})
    outputs = model.graph.output
    before = len(outputs)
    existing = {o.name for o in outputs}
    outputs.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                   for n in names if n not in existing)
    try:  # the inputs as extra outputs, in the serialized copy only (no copy of the weights in memory)
        decoder = decoder_factory(model.SerializeToString())
    finally:
        del outputs[before:]
    sums: dict[str, np.ndarray] = {}
    tokens = 0
    for k, w in enumerate(windows):
        if feeds is not None:
            decoder.extra = feeds[k]
        outs = decoder.run_all(np.asarray([w], np.int64), None, len(w))
        for name in names:
            x = outs[name].reshape(-1, outs[name].shape[-1]).astype(np.float64)
            s = x.T @ x if full else (x * x).sum(0)
            sums[name] = s if name not in sums else sums[name] + s
        tokens += len(w)
        if progress:
            progress(1)
    return {k: (v / tokens, tokens) for k, v in sums.items()}


def adapter_statistics(model, windows: list[list[int]], under: list, params: dict, decoder_factory,
                       full: bool = True, progress=None) -> dict[str, tuple[np.ndarray, int]]:
    """``input_statistics`` of the graph that serves runtime adapters (``edgepeft.onnx.switchable``): each
    window computed with its adapter's slot values (``under[k]``: a name in ``params``, or None for the base),
    so that a MatMul's statistics are those of the inputs it multiplies in use, IA3's scaling of a
    feed-forward input and every upstream LoRA included. Keyed by the input names of ``model`` (no slots)."""
    from edgepeft.onnx.switchable import with_slots

    slotted = with_slots(model, params)
    originals = {n.name: n.input[0] for n in weight_matmuls(model)}
    stats = input_statistics(slotted, windows, decoder_factory, full, progress,
                             [params[u] if u is not None else {} for u in under], set(originals))
    seen = {n.name: n.input[0] for n in slotted.graph.node if n.name in originals}
    return {originals[name]: stats[x] for name, x in seen.items()}


def keep_initializers(model, keep) -> None:
    """Drop the initializers whose name ``keep`` rejects (one pass; no per-item search of big tensors)."""
    g = model.graph
    kept = [i for i in g.initializer if keep(i.name)]
    if len(kept) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(kept)


def to_matmulnbits(model, choices: dict[str, Quantized], accuracy_level: int) -> None:
    """Replace each MatMul named in ``choices`` by a MatMulNBits over its quantized weight, in place."""
    from onnx import helper

    g = model.graph
    for node in [n for n in g.node if n.op_type == "MatMul" and n.name in choices]:
        q = choices[node.name]
        n, k = q.codes.shape[0], q.codes.shape[1] * q.block
        new = q.tensors(node.input[1])
        attrs = {"K": k, "N": n, "bits": q.bits, "block_size": q.block}
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        repl = helper.make_node("MatMulNBits", [node.input[0]] + [t.name for t in new], list(node.output),
                                name=f"{node.name}_Q{q.bits}", domain="com.microsoft", **attrs)
        at = list(g.node).index(node)
        g.node.remove(node)
        g.node.insert(at, repl)
        g.initializer.extend(new)
    used = {i for node in g.node for i in node.input}
    keep_initializers(model, lambda name: name in used)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
