"""3x3 convs over few channels as int8 matmuls over kernel rows: bit-exact against NumPy."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tvm

from tvm_sparse.passes.rewrite_quantized import QuantLayer, epilogue_operands, weight_operands
from tvm_sparse.schedules import int8_depthwise as dw
from tvm_sparse.schedules import int8_matmul, int8_rows3
from tvm_sparse.schedules.int8_matmul import Int8Variant

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver5", "num-cores": 2})


@functools.cache
def _build(func):
    return tvm.compile(func.with_attr("global_symbol", "main"), target=TARGET)


def reference(x, weight, stride, pads, x_zp, bias, scale, zp):
    """int64 conv of ``x - x_zp`` (zero padding) + bias, requantized to uint8 with ReLU."""
    n, c = weight.shape[:2]
    _, _, h, w = x.shape
    xp = np.pad(x.astype(np.int64) - x_zp, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    ho = dw.output_size(h, stride, (pads[0], pads[2]))
    wo = dw.output_size(w, stride, (pads[1], pads[3]))
    acc = np.zeros((n, ho, wo), np.int64)
    for ci in range(c):
        for dy in range(3):
            for dx in range(3):
                win = xp[0, ci, dy : dy + stride * ho : stride, dx : dx + stride * wo : stride]
                acc += win[None] * weight[:, ci, dy, dx].astype(np.int64)[:, None, None]
    real = (acc + bias[:, None, None]).astype(np.float32) * scale[:, None, None]
    return np.clip(np.rint(real) + zp, max(0, zp), 255).astype(np.uint8)[None]


def run(x, weight, stride, pads, x_dtype, x_zp, bias, scale, zp, quantize=None):
    """pad -> lanes -> dense int8 kernel (NCHW output), as RewriteQuantized emits them."""
    c, hw = x.shape[1], x.shape[2:]
    ho, wo, rows, row_len = dw.geometry(hw, stride, pads)
    pp = int8_matmul.padded_columns(ho * wo)
    matrix = int8_rows3.weight_matrix(weight)
    layer = QuantLayer("t", "rows3", matrix, ho * wo, x_dtype, x_zp, bias, scale, "uint8", zp, True)
    variant = Int8Variant(4, sparse=False)
    weights, npad, _ = weight_operands(layer, variant)
    kernel_bias, kernel_scale = epilogue_operands(layer, npad)
    planes = tvm.runtime.tensor(np.zeros((c, rows, row_len), np.uint8))
    xp = tvm.runtime.tensor(np.zeros((c * 3, pp, 4), np.uint8))
    y = tvm.runtime.tensor(np.zeros((1, npad, ho, wo), np.uint8))
    _build(int8_rows3.pad(c, hw, stride, pads, x_dtype, x_zp, quantize))(
        tvm.runtime.tensor(x), planes
    )
    _build(int8_rows3.lanes(c, hw, stride, pads, pp))(planes, xp)
    func = int8_matmul.int8_wx(
        npad, matrix.shape[1] // 4, pp, variant, 0, "uint8", zp, True, conv_hw=(ho, wo)
    )
    args = [tvm.runtime.tensor(a) for a in (*weights, kernel_bias, kernel_scale)]
    _build(func)(xp, *args, y)
    return y.numpy()[:, : weight.shape[0]]


def params(rng, n):
    bias = rng.integers(-3000, 3000, n).astype(np.int32)
    return bias, (rng.random(n) * 2e-3 + 1e-4).astype(np.float32), 5


@pytest.mark.parametrize(
    "c, n, hw, stride, pads",
    [
        (3, 32, (224, 224), 2, (0, 0, 1, 1)),  # MobileNet's stem as ORT pads it
        (3, 8, (9, 9), 1, (1, 1, 1, 1)),
        (2, 4, (33, 40), 2, (1, 1, 1, 1)),  # widths that leave a partial vector
        (1, 12, (7, 19), 1, (0, 0, 0, 0)),
    ],
)
def test_layers(c, n, hw, stride, pads):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (1, c, *hw)).astype(np.uint8)
    weight = rng.integers(-127, 128, (n, c, 3, 3)).astype(np.int8)
    bias, scale, zp = params(rng, n)
    got = run(x, weight, stride, pads, "uint8", 117, bias, scale, zp)
    np.testing.assert_array_equal(got, reference(x, weight, stride, pads, 117, bias, scale, zp))


@pytest.mark.parametrize("dtype, x_zp", [("uint8", 120), ("int8", -7)])
def test_pad_quantizes_the_float_input(dtype, x_zp):
    """The stem's QuantizeLinear fused into the padding kernel (round half to even)."""
    rng = np.random.default_rng(1)
    x_scale, n, stride, pads = 0.02, 8, 2, (1, 1, 1, 1)
    xf = rng.standard_normal((1, 3, 21, 26)).astype(np.float32)
    lo, hi = int8_matmul.QRANGE[dtype]
    xq = np.clip(np.rint(xf / np.float32(x_scale)) + x_zp, lo, hi).astype(dtype)
    weight = rng.integers(-127, 128, (n, 3, 3, 3)).astype(np.int8)
    bias, scale, zp = params(rng, n)
    got = run(xf, weight, stride, pads, dtype, x_zp, bias, scale, zp, quantize=(x_scale, x_zp))
    np.testing.assert_array_equal(got, reference(xq, weight, stride, pads, x_zp, bias, scale, zp))
