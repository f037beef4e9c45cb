"""Block quantization written by edgepeft (edgepeft.onnx.quant) checked against ONNX Runtime's own kernels and
quantizer, and the calibrated methods against round-to-nearest on the error they minimize."""

import numpy as np
import pytest

from edgepeft.onnx import quant


def _matmulnbits(x: np.ndarray, q: quant.Quantized) -> np.ndarray:
    """x @ W through ONNX Runtime's MatMulNBits kernel (exact fp32 accuracy level) on q's packed weight."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    b, s, zp = q.packed()
    k, n = x.shape[1], q.codes.shape[0]
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(s, "S")]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "Z"))
    node = helper.make_node("MatMulNBits", ["X"] + [i.name for i in inits], ["Y"], domain="com.microsoft",
                            K=k, N=n, bits=q.bits, block_size=q.block, accuracy_level=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])], inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"X": x})[0]


@pytest.mark.parametrize("bits,symmetric,k", [(4, True, 96), (4, False, 96), (4, False, 64), (8, True, 64),
                                              (8, False, 96)])
def test_packing_is_what_the_kernel_reads(bits, symmetric, k):
    """ONNX Runtime's MatMulNBits on our packed codes equals x @ our dequantized weight (odd and even block
    counts: 4-bit zero points are packed two per byte, padded per column)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, 24)).astype(np.float32)
    x = rng.standard_normal((5, k)).astype(np.float32)
    q = quant.quantize_rtn(w, bits, 32, symmetric)
    np.testing.assert_allclose(_matmulnbits(x, q), x @ q.dequantize(), rtol=1e-4, atol=1e-4)
    assert np.abs(q.dequantize() - w).max() < (0.3 if bits == 4 else 0.03)


def test_symmetric_rtn_matches_onnxruntimes_quantizer():
    """Round-to-nearest symmetric int4 gives the same weights as ONNX Runtime's own block quantizer."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    rng = np.random.default_rng(1)
    w = rng.standard_normal((128, 40)).astype(np.float32)
    packed, scales, _ = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
        block_size=32, is_symmetric=True, bits=4)).qbits_block_quant(w)
    ours = quant.quantize_rtn(w, 4, 32, True)
    b, s, _ = ours.packed()
    np.testing.assert_array_equal(b, packed)
    np.testing.assert_allclose(s, scales, rtol=1e-6)


def _output_error(w, q: quant.Quantized, h):
    e = w - q.dequantize()
    return float(np.einsum("kn,kj,jn->", e, h, e))


def _correlated_inputs(k=128, tokens=2048, seed=2):
    """Activations like a transformer's: correlated channels, a few of them large (outlier features)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    x = rng.standard_normal((tokens, k)) @ mix
    x[:, rng.choice(k, 4, replace=False)] *= 12
    return (x.T @ x) / tokens


@pytest.mark.parametrize("symmetric", [True, False])
def test_calibrated_methods_beat_round_to_nearest_on_output_error(symmetric):
    """The error both calibrated methods minimize, E||(W - Q) x||^2 on the calibration inputs: the activation
    -aware range search is never worse than round-to-nearest (its grid includes the full range) and GPTQ is
    well below both."""
    rng = np.random.default_rng(3)
    h = _correlated_inputs()
    w = (rng.standard_t(4, (128, 64)) * 0.05).astype(np.float32)  # heavy tails, like trained weights
    rtn = _output_error(w, quant.quantize_rtn(w, 4, 32, symmetric), h)
    clip = _output_error(w, quant.quantize_rtn(w, 4, 32, symmetric, np.diag(h).copy()), h)
    gptq = _output_error(w, quant.quantize_gptq(w, h, 4, 32, symmetric), h)
    assert clip <= rtn
    assert gptq < 0.8 * clip


def test_gptq_codes_stay_in_range_and_dead_inputs_are_zero():
    rng = np.random.default_rng(4)
    h = _correlated_inputs(k=64)
    h[5, :] = h[:, 5] = 0.0  # an input that never fires
    w = rng.standard_normal((64, 16)).astype(np.float32)
    q = quant.quantize_gptq(w, h, 4, 32, False)
    assert q.codes.max() <= 15 and q.zero_points.max() <= 15
    np.testing.assert_array_equal(q.dequantize()[5], 0.0)


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False)])
def test_from_packed_inverts_packed(bits, symmetric):
    """What the heal mirror reads back from a graph is the weight that was packed into it (an odd number of
    blocks: zero points padded to a whole byte)."""
    from edgepeft.onnx.quant import Quantized, quantize_rtn

    w = np.random.default_rng(0).standard_normal((96, 12)).astype(np.float32)  # K 96 = 3 blocks of 32
    q = quantize_rtn(w, bits, 32, symmetric)
    back = Quantized.from_packed(*q.packed(), bits, 32)
    assert np.array_equal(back.codes, q.codes) and np.array_equal(back.scales, q.scales)
    assert (back.zero_points is None) == symmetric
    np.testing.assert_array_equal(back.dequantize(), q.dequantize())


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_act_order_rounds_strong_inputs_first_and_stays_a_valid_weight(symmetric):
    """With act order the columns are rounded strongest first, but every input still lands in its own block
    with that block's one range: the same output error as the plain order or less (here: less, inputs with
    outliers spread over blocks), codes in range, and the packed weight is what is read back."""
    rng = np.random.default_rng(5)
    h = _correlated_inputs(k=256, seed=6)
    w = (rng.standard_t(4, (256, 48)) * 0.05).astype(np.float32)
    plain = quant.quantize_gptq(w, h, 4, 64, symmetric)
    ordered = quant.quantize_gptq(w, h, 4, 64, symmetric, act_order=True)
    assert ordered.codes.max() <= 15 and ordered.codes.shape == plain.codes.shape
    assert _output_error(w, ordered, h) < _output_error(w, plain, h)
    back = quant.Quantized.from_packed(*ordered.packed(), 4, 64)
    np.testing.assert_array_equal(back.dequantize(), ordered.dequantize())
