"""int8 VNNI kernels and activation packers: bit-exact against a NumPy integer reference."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tvm_sparse.examples import prune_out_in
from tvm_sparse.passes.rewrite_quantized import QuantLayer, epilogue_operands, weight_operands
from tvm_sparse.schedules import int8_matmul, int8_pack
from tvm_sparse.schedules.int8_matmul import VARIANTS, Int8Variant

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver5", "num-cores": 2})
SENTINEL = 77  # outputs are pre-filled with it, so elements the kernel never writes show up


def reference(layer: QuantLayer, x: np.ndarray) -> np.ndarray:
    """Y[N, P] from X[K, P]: int64 accumulation, then the float32 requantization."""
    acc = layer.weight.astype(np.int64) @ (x.astype(np.int64) - layer.x_zp)
    real = (acc + layer.bias[:, None]).astype(np.float32) * layer.scale[:, None]
    lo, hi = int8_matmul.QRANGE[layer.y_dtype]
    lo = max(lo, layer.y_zp) if layer.relu else lo
    return np.clip(np.rint(real) + layer.y_zp, lo, hi).astype(layer.y_dtype)


@functools.cache
def _build(func):
    return tvm.compile(func.with_attr("global_symbol", "main"), target=TARGET)


def pack(layer: QuantLayer, variant: Int8Variant, x: np.ndarray, row_major: bool, hw=None):
    """Run the variant's activation pack on X[K, P] (given transposed, [P, K], when
    `row_major`; as [1, K, H, W] with `hw`), check it against its NumPy reference, return it
    and its column count."""
    k, p = x.shape
    x_in = np.ascontiguousarray(x.T) if row_major else x
    if hw:
        x_in = x.reshape(1, k, *hw)
    if variant.gather:
        pp = int8_matmul.padded_columns(p, variant, conv=hw is not None)
        if row_major:
            func = int8_pack.bytes_rowmajor(p, k, layer.x_dtype, columns=pp)
        else:
            func = int8_pack.bytes_kmajor(k, p, layer.x_dtype, hw=hw, columns=pp)
        want = int8_matmul.pack_bytes(x, pp, permuted=not row_major)
    else:
        pp = int8_matmul.padded_columns(p, variant, conv=True) if hw else -(-p // 16) * 16
        if row_major:
            func = int8_pack.from_rowmajor(p, k, layer.x_dtype, columns=pp)
        else:
            func = int8_pack.from_kmajor(k, p, layer.x_dtype, hw=hw, columns=pp)
        want = np.zeros((k // 4, pp, 4), np.uint8)
        ref = int8_matmul.pack_activations(x)
        want[:, : ref.shape[1]] = ref
    xp = tvm.runtime.tensor(np.full(want.shape, SENTINEL, np.uint8))
    _build(func)(tvm.runtime.tensor(x_in), xp)
    np.testing.assert_array_equal(xp.numpy(), want, err_msg="pack")
    return xp, pp


def run(layer: QuantLayer, variant: Int8Variant, x: np.ndarray, row_major: bool) -> np.ndarray:
    """Pack + kernel on X[K, P] (or, `row_major`, the transposed X[P, K]); returns Y[N, P]."""
    n, k = layer.shape
    p = x.shape[1]
    xp, pp = pack(layer, variant, x, row_major)
    weights, npad, nnzb = weight_operands(layer, variant)
    bias, scale = epilogue_operands(layer, npad)
    rows_out = p if row_major else None
    func = int8_matmul.int8_wx(
        npad, k // 4, pp, variant, nnzb, layer.y_dtype, layer.y_zp, layer.relu, rows_out
    )
    shape = (p, npad) if row_major else (npad, pp)
    out = tvm.runtime.tensor(np.full(shape, SENTINEL, layer.y_dtype))
    args = [xp] + [tvm.runtime.tensor(a) for a in (*weights, bias, scale)] + [out]
    _build(func)(*args)
    y = out.numpy()
    return y[:, :n].T if row_major else y[:n, :p]


def make_layer(w, rng, x_dtype="uint8", y_dtype="uint8", relu=False) -> QuantLayer:
    n, k = w.shape
    info = np.iinfo(x_dtype)
    return QuantLayer(
        key="test",
        kind="matmul",
        weight=w,
        columns=0,
        x_dtype=x_dtype,
        x_zp=int(rng.integers(info.min, info.max + 1)),
        bias=rng.integers(-5000, 5000, n).astype(np.int32),
        scale=(rng.random(n) * 4e-4 + 1e-5).astype(np.float32),
        y_dtype=y_dtype,
        y_zp=int(rng.integers(*int8_matmul.QRANGE[y_dtype])),
        relu=relu,
    )


def quantized_weight(rng, n, k, sparsity, block) -> np.ndarray:
    w = prune_out_in(rng.standard_normal((n, k)).astype(np.float32), sparsity, block)
    return np.clip(np.rint(w * 50), -128, 127).astype(np.int8)


def check(layer, variant, p, row_major, seed=0):
    rng = np.random.default_rng(seed)
    info = np.iinfo(layer.x_dtype)
    x = rng.integers(info.min, info.max + 1, (layer.shape[1], p), dtype=layer.x_dtype)
    got, want = run(layer, variant, x, row_major), reference(layer, x)
    assert got.shape == want.shape and got.dtype == want.dtype
    bad = np.argwhere(got != want)
    assert not bad.size, (
        f"{variant.name} {layer.shape}x{p} row_major={row_major}: {len(bad)} wrong, first at "
        f"{tuple(bad[0])} (block row {bad[0][0] // variant.rows}): got {got[tuple(bad[0])]}, "
        f"want {want[tuple(bad[0])]}"
    )


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("row_major", [False, True], ids=["kmajor", "rowmajor"])
def test_every_variant(variant, sparsity, row_major):
    rng = np.random.default_rng(1)
    w = quantized_weight(rng, 64, 48, sparsity, (variant.rows, 4))
    check(make_layer(w, rng, relu=sparsity == 0.5), variant, 32, row_major)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize(
    "x_dtype, y_dtype", [("int8", "int8"), ("int8", "uint8"), ("uint8", "int8")]
)
def test_signed_activations_and_outputs(variant, x_dtype, y_dtype):
    """int8 activations go through the +128 shift; int8 outputs saturate at -128..127."""
    rng = np.random.default_rng(3)
    w = quantized_weight(rng, 32, 64, 0.7, (variant.rows, 4))
    check(make_layer(w, rng, x_dtype, y_dtype, relu=True), variant, 48, row_major=True)


def test_rounding_is_half_to_even():
    """acc * scale landing exactly on .5 rounds to the even neighbour, as MLAS does."""
    w = np.ones((16, 4), np.int8)
    layer = QuantLayer(
        "t",
        "matmul",
        w,
        0,
        "uint8",
        0,
        np.zeros(16, np.int32),
        np.full(16, 0.5, np.float32),
        "uint8",
        0,
    )
    x = np.zeros((4, 16), np.uint8)
    x[0] = np.arange(16)  # acc = 0..15, acc * 0.5 = 0, .5, 1, 1.5, ...
    got = run(layer, Int8Variant(4, sparse=False), x, row_major=False)
    np.testing.assert_array_equal(got[0], np.rint(np.arange(16) * 0.5).astype(np.uint8))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    variant=st.sampled_from(VARIANTS),
    n=st.integers(1, 40),
    kg=st.integers(1, 12),
    p=st.integers(1, 70),
    density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    empty_rows=st.booleans(),
    row_major=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_generated_patterns(variant, n, kg, p, density, empty_rows, row_major, seed):
    rng = np.random.default_rng(seed)
    w = quantized_weight(rng, n, 4 * kg, 1 - density, (variant.rows, 4))
    if empty_rows:
        w[: max(1, n // 2)] = 0
    layer = make_layer(w, rng, relu=bool(seed % 2))
    check(layer, variant, p, row_major, seed=seed)


def test_asm_uses_vpdpbusd():
    for variant in VARIANTS:
        lib = _build(int8_matmul.int8_wx(16, 4, 64, variant, nnzb=2))
        assert "vpdpbusd" in lib.mod.inspect_source("asm"), variant.name


def test_padded_columns():
    assert [int8_matmul.padded_columns(p) for p in (1, 49, 196, 784, 3136)] == [
        16,
        64,
        224,
        832,
        3136,
    ]
    quads = Int8Variant(4, gather=True)
    assert [int8_matmul.padded_columns(p, quads) for p in (1, 64, 65, 3136)] == [64, 64, 128, 3136]
    # 1 x 4 convs: 8-vector tiles on small maps (at most 1/4 padding, up to 1024 columns)
    one = Int8Variant(1)
    assert [int8_matmul.padded_columns(p, one, conv=True) for p in (49, 196, 784, 3136)] == [
        64,
        256,
        896,
        3136,
    ]
    assert int8_matmul.padded_columns(196, one) == 224  # MatMul forms keep 4-vector tiles
    assert int8_matmul.vectors_per_tile(1, 256, conv=True) == 8
    assert int8_matmul.vectors_per_tile(1, 256) == 4


def test_tile_fits_the_register_budget():
    for variant in VARIANTS:
        for p in (16, 32, 64, 112, 12544):
            v = int8_matmul.vectors_per_tile(variant.rows, p, conv=True)
            assert (p // 16) % v == 0
            assert variant.rows * v * 16 * 4 <= int8_matmul.ACCUMULATOR_BYTES


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("hw", [(4, 4), (7, 7), (3, 5), (14, 14), (28, 28)])
def test_nchw_conv_form(variant, hw):
    """Pointwise convs: pack reads [1, K, H, W] and the kernel writes [1, N, H, W] directly;
    pixel counts that are not a multiple of 16 exercise the partial last vector."""
    rng = np.random.default_rng(4)
    w = quantized_weight(rng, 32, 24, 0.8, (variant.rows, 4))
    layer = make_layer(w, rng, relu=True)
    n, k = layer.shape
    p = hw[0] * hw[1]
    x = rng.integers(0, 256, (k, p), dtype=np.uint8)
    xp, pp = pack(layer, variant, x, row_major=False, hw=hw)  # 14x14: 13 vectors -> 14
    weights, npad, nnzb = weight_operands(layer, variant)
    bias, scale = epilogue_operands(layer, npad)
    func = int8_matmul.int8_wx(
        npad, k // 4, pp, variant, nnzb, relu=True, zp=layer.y_zp, conv_hw=hw
    )
    out = tvm.runtime.tensor(np.full((1, npad, *hw), SENTINEL, np.uint8))
    _build(func)(xp, *[tvm.runtime.tensor(a) for a in (*weights, bias, scale)], out)
    want = reference(layer, x).reshape(1, n, *hw)
    np.testing.assert_array_equal(out.numpy()[:, :n], want, err_msg=variant.name)


def _quantize_np(x: np.ndarray, scale: float, zp: int, dtype: str) -> np.ndarray:
    """QuantizeLinear: round half to even of x / scale, plus zp, saturated."""
    lo, hi = int8_matmul.QRANGE[dtype]
    q = np.clip(np.rint(x / np.float32(scale)) + zp, lo, hi).astype(dtype)
    return q


@pytest.mark.parametrize("dtype,zp", [("uint8", 131), ("int8", -3)])
@pytest.mark.parametrize("m,k", [(64, 128), (7, 72)])
def test_quantize_rowmajor_matches_quantize_then_pack(m, k, dtype, zp):
    rng = np.random.default_rng(5)
    scale = 0.0173
    x = (rng.standard_normal((m, k)) * 1.5).astype(np.float32)
    x[0, :8] = np.float32(scale) * np.array([0.5, 1.5, 2.5, -0.5, -1.5, 300, -300, 0], np.float32)
    cols = -(-m // 16) * 16 + 16  # one padding vector past the tiles
    lib = _build(int8_pack.quantize_rowmajor(m, k, scale, zp, dtype, columns=cols))
    out = tvm.runtime.tensor(np.full((k // 4, cols, 4), SENTINEL, np.uint8))
    lib["main"](tvm.runtime.tensor(x), out)
    expected = np.zeros((k // 4, cols, 4), np.uint8)
    expected[:, :m] = int8_matmul.pack_activations(_quantize_np(x, scale, zp, dtype).T)[:, :m]
    np.testing.assert_array_equal(out.numpy(), expected)


@pytest.mark.parametrize("dtype,zp", [("uint8", 128), ("int8", 5)])
def test_kmajor_pack_quantizes_nchw(dtype, zp):
    rng = np.random.default_rng(6)
    scale, k, hw = 0.021, 8, (5, 7)
    x = rng.standard_normal((1, k, *hw)).astype(np.float32)
    p = hw[0] * hw[1]
    lib = _build(int8_pack.from_kmajor(k, p, dtype, hw=hw, columns=48, quantize=(scale, zp)))
    out = tvm.runtime.tensor(np.full((k // 4, 48, 4), SENTINEL, np.uint8))
    lib["main"](tvm.runtime.tensor(x), out)
    q = _quantize_np(x.reshape(k, p), scale, zp, dtype)
    expected = np.zeros((k // 4, 48, 4), np.uint8)
    expected[:, :p] = int8_matmul.pack_activations(q)[:, :p]
    np.testing.assert_array_equal(out.numpy(), expected)


def test_dequantize_epilogue_equals_kernel_then_dequantize():
    rng = np.random.default_rng(8)
    n, k, p = 32, 64, 48
    layer = QuantLayer(
        key="t:00000000",
        kind="conv1x1",
        weight=rng.integers(-127, 128, (n, k)).astype(np.int8),
        columns=p,
        x_dtype="uint8",
        x_zp=120,
        bias=rng.integers(-500, 500, n).astype(np.int32),
        scale=np.full(n, 0.0011, np.float32),
        y_dtype="uint8",
        y_zp=100,
        relu=True,
    )
    variant = Int8Variant(4, sparse=False)
    x = rng.integers(0, 256, (k, p)).astype(np.uint8)
    xp = tvm.runtime.tensor(int8_matmul.pack_activations(x))
    weights, npad, _ = weight_operands(layer, variant)
    bias, scale = epilogue_operands(layer, npad)
    args = [tvm.runtime.tensor(a) for a in (*weights, bias, scale)]
    y_scale = 0.05
    lib = _build(
        int8_matmul.int8_wx(npad, k // 4, p, variant, 0, "uint8", 100, True, dequantize=y_scale)
    )
    y = tvm.runtime.tensor(np.zeros((npad, p), np.float32))
    lib["main"](xp, *args, y)
    q = reference(layer, x)
    expected = (q.astype(np.int32) - 100).astype(np.float32) * np.float32(y_scale)
    np.testing.assert_array_equal(y.numpy(), expected)


@pytest.mark.parametrize("dtype,zp", [("uint8", 131), ("int8", -3)])
@pytest.mark.parametrize("row_major", [False, True], ids=["kmajor", "rowmajor"])
def test_byte_packs_quantize(dtype, zp, row_major):
    """The column-quad packs with QuantizeLinear fused, against NumPy (K past a whole tile of
    32, P past a window of 64: both tails)."""
    rng = np.random.default_rng(9)
    scale, k, p = 0.0173, 72, 70
    x = (rng.standard_normal((k, p)) * 1.5).astype(np.float32)
    x[0, :6] = np.float32(scale) * np.array([0.5, 1.5, 2.5, -0.5, 300, -300], np.float32)
    pp = int8_matmul.padded_columns(p, Int8Variant(4, gather=True))
    if row_major:
        func = int8_pack.bytes_rowmajor(p, k, dtype, columns=pp, quantize=(scale, zp))
        x_in = np.ascontiguousarray(x.T)
    else:
        func = int8_pack.bytes_kmajor(k, p, dtype, columns=pp, quantize=(scale, zp))
        x_in = x
    want = int8_matmul.pack_bytes(_quantize_np(x, scale, zp, dtype), pp, permuted=not row_major)
    out = tvm.runtime.tensor(np.full(want.shape, SENTINEL, np.uint8))
    _build(func)(tvm.runtime.tensor(x_in), out)
    np.testing.assert_array_equal(out.numpy(), want)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_dequantize_epilogue_row_major(variant):
    """MatMul form with the output's DequantizeLinear fused: float32 Y[M, N] through the
    staged 16-row tile (and, for column quads, the columns mapped back to their order)."""
    rng = np.random.default_rng(10)
    n, k, p, y_scale = 32, 64, 70, 0.05
    w = quantized_weight(rng, n, k, 0.6, (variant.rows, 4))
    layer = make_layer(w, rng, relu=True)
    x = rng.integers(0, 256, (k, p), dtype=np.uint8)
    xp, pp = pack(layer, variant, x, row_major=True)
    weights, npad, nnzb = weight_operands(layer, variant)
    bias, scale = epilogue_operands(layer, npad)
    func = int8_matmul.int8_wx(
        npad, k // 4, pp, variant, nnzb, "uint8", layer.y_zp, True, p, dequantize=y_scale
    )
    y = tvm.runtime.tensor(np.full((p, npad), np.nan, np.float32))
    _build(func)(xp, *[tvm.runtime.tensor(a) for a in (*weights, bias, scale)], y)
    q = reference(layer, x)
    expected = (q.astype(np.int32) - layer.y_zp).astype(np.float32) * np.float32(y_scale)
    np.testing.assert_array_equal(y.numpy()[:, :n], expected.T)
