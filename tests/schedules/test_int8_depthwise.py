"""int8 depthwise 3x3 kernel: bit-exact against a NumPy integer reference."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tvm_sparse.schedules import int8_depthwise as dw
from tvm_sparse.schedules import int8_matmul, int8_pack

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver5", "num-cores": 2})
SENTINEL = 77


@functools.cache
def _build(func):
    return tvm.compile(func.with_attr("global_symbol", "main"), target=TARGET)


def packed(y: np.ndarray, columns: int) -> np.ndarray:
    """NCHW (u)int8 output -> the pointwise kernels' Yp[C/4, columns, 4] uint8 (NumPy)."""
    ref = int8_matmul.pack_activations(y.reshape(y.shape[1], -1))
    out = np.zeros((ref.shape[0], columns, 4), np.uint8)
    out[:, : ref.shape[1]] = ref
    return out


def check(c, hw, stride, pads, x_dtype="uint8", out_dtype="uint8", relu=True, seed=0, columns=None):
    """The kernel against `dw.reference`; with `columns`, its packed output against
    `packed` of the reference."""
    rng = np.random.default_rng(seed)
    info = np.iinfo(x_dtype)
    x = rng.integers(info.min, info.max + 1, (1, c, *hw)).astype(x_dtype)
    weight = rng.integers(-127, 128, (c, 3, 3)).astype(np.int8)
    x_zp = int(rng.integers(info.min, info.max + 1))
    bias = rng.integers(-3000, 3000, c).astype(np.int32)
    scale = (rng.random(c) * 2e-3 + 1e-4).astype(np.float32)
    zp = int(rng.integers(*dw.QRANGE[out_dtype]))
    want = dw.reference(x, weight, stride, pads, x_zp, bias, scale, out_dtype, zp, relu)
    # the kernel's bias carries the zero-point correction (int8 activations are read +128)
    zp_in = x_zp + (128 if x_dtype == "int8" else 0)
    wsum = weight.reshape(c, -1).astype(np.int64).sum(axis=1)
    kernel_bias = (bias.astype(np.int64) - zp_in * wsum).astype(np.int32)
    func = dw.depthwise3x3(c, hw, stride, pads, x_dtype, x_zp, out_dtype, zp, relu, columns)
    if columns:
        want = packed(want, columns)
    out = tvm.runtime.tensor(np.full(want.shape, SENTINEL, want.dtype))
    args = (x, dw.weight_words(weight), kernel_bias, scale)
    _build(func)(*[tvm.runtime.tensor(a) for a in args], out)
    np.testing.assert_array_equal(out.numpy(), want)


@pytest.mark.parametrize(
    "c, hw, stride, pads",
    [
        (32, (112, 112), 1, (1, 1, 1, 1)),  # MobileNet's layers (ORT pads stride 2 as SAME)
        (64, (112, 112), 2, (0, 0, 1, 1)),
        (128, (28, 28), 2, (1, 1, 1, 1)),
        (16, (14, 14), 1, (1, 1, 1, 1)),
        (8, (7, 7), 1, (1, 1, 1, 1)),
        # several channels per parallel chunk: a row's vector runs on into the rows after it
        # (two of them for 7-pixel rows), never into the next chunk
        (512, (14, 14), 2, (0, 0, 1, 1)),
        (40, (7, 7), 1, (1, 1, 1, 1)),
        (24, (5, 3), 1, (1, 0, 1, 0)),
        (3, (33, 40), 2, (1, 1, 1, 1)),  # widths that leave a partial vector
        (5, (9, 20), 1, (0, 0, 0, 0)),
    ],
)
def test_layers(c, hw, stride, pads):
    check(c, hw, stride, pads)


@pytest.mark.parametrize(
    "x_dtype, out_dtype", [("int8", "int8"), ("int8", "uint8"), ("uint8", "int8")]
)
def test_signed_activations_and_outputs(x_dtype, out_dtype):
    check(6, (11, 13), 1, (1, 1, 1, 1), x_dtype, out_dtype, relu=False)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    c=st.integers(1, 40),
    h=st.integers(3, 24),
    w=st.integers(3, 40),
    stride=st.sampled_from([1, 2]),
    pads=st.tuples(*[st.integers(0, 1)] * 4),
    relu=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_generated_shapes(c, h, w, stride, pads, relu, seed):
    check(c, (h, w), stride, pads, relu=relu, seed=seed)


@pytest.mark.parametrize(
    "c, hw, stride, pads, columns, x_dtype, out_dtype",
    [
        (32, (112, 112), 1, (1, 1, 1, 1), 12544, "uint8", "uint8"),  # MobileNet's layers
        (512, (14, 14), 1, (1, 1, 1, 1), 208, "uint8", "uint8"),  # several groups a chunk
        (1024, (14, 14), 2, (0, 0, 1, 1), 64, "uint8", "uint8"),  # 49 pixels, padding columns
        (12, (7, 7), 1, (1, 1, 1, 1), 64, "uint8", "int8"),  # int8 out: shifted by +128
        (8, (11, 13), 1, (1, 1, 1, 1), 160, "int8", "uint8"),
        (36, (9, 5), 2, (1, 1, 1, 1), 16, "uint8", "uint8"),  # 9 groups over 8 chunks
    ],
)
def test_packed_output(c, hw, stride, pads, columns, x_dtype, out_dtype):
    """The output written as the next pointwise kernel's packed input: the 4 channels of a
    group interleaved per pixel, padding columns zero."""
    check(c, hw, stride, pads, x_dtype, out_dtype, relu=False, columns=columns)


def test_packed_output_needs_channel_groups_and_whole_vectors():
    with pytest.raises(ValueError, match="multiple of 4"):
        dw.depthwise3x3(6, (8, 8), 1, (1, 1, 1, 1), "uint8", 3, packed_columns=64)
    with pytest.raises(ValueError, match="whole vectors over 64 pixels"):
        dw.depthwise3x3(8, (8, 8), 1, (1, 1, 1, 1), "uint8", 3, packed_columns=48)


def test_asm_uses_vpdpbusd():
    lib = _build(dw.depthwise3x3(4, (8, 8), 1, (1, 1, 1, 1), "uint8", 3))
    assert "vpdpbusd" in lib.mod.inspect_source("asm")


def test_bad_stride_is_a_clear_error():
    with pytest.raises(ValueError, match="stride 3"):
        dw.depthwise3x3(4, (8, 8), 3, (1, 1, 1, 1), "uint8", 3)


@pytest.mark.parametrize(
    "dtype, zp, shift", [("uint8", 131, False), ("int8", -3, False), ("int8", 5, True)]
)
def test_quantize_flat(dtype, zp, shift):
    """The flat QuantizeLinear feeding integer layers, against NumPy (round half to even)."""
    rng = np.random.default_rng(7)
    scale, shape = 0.0173, (1, 3, 17, 23)
    x = (rng.standard_normal(shape) * 1.5).astype(np.float32)
    x.reshape(-1)[:6] = np.float32(scale) * np.array([0.5, 1.5, 2.5, -0.5, 300, -300], np.float32)
    lo, hi = dw.QRANGE[dtype]
    want = np.clip(np.rint(x / np.float32(scale)) + zp, lo, hi).astype(dtype)
    if shift:
        want = (want.astype(np.int16) + 128).astype(np.uint8)
    out_dtype = "uint8" if shift else dtype
    out = tvm.runtime.tensor(np.zeros(shape, out_dtype))
    _build(int8_pack.quantize_flat(shape, dtype, scale, zp, shift))(tvm.runtime.tensor(x), out)
    np.testing.assert_array_equal(out.numpy(), want)
