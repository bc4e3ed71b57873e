"""BSR matmul kernels against NumPy: every variant of the table, random and generated patterns.

Outputs are pre-filled with NaN so a block row the kernel never writes fails; failures name the
first wrong element and its block (tile).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tvm_sparse.examples import prune_out_in
from tvm_sparse.formats import to_bsr
from tvm_sparse.schedules import bsr_matmul
from tvm_sparse.schedules.bsr_matmul import (
    VARIANTS,
    Variant,
    bsr_gemv,
    bsr_wx,
    bsr_xw,
    pack,
    reference,
)

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver5", "num-cores": 2})


@functools.cache
def build(variant: Variant, n: int, k: int, p: int, nnzb: int, relu: bool):
    if variant.gemv:
        func = bsr_gemv(n, k, variant, nnzb, relu=relu)
    elif variant.form == "xw":
        func = bsr_xw(p, n, k, variant, nnzb, relu=relu)
    else:
        func = bsr_wx(n, k, p, variant, nnzb, relu=relu)
    return tvm.compile(func.with_attr("global_symbol", "main"), target=TARGET)


def check(variant: Variant, w: np.ndarray, p: int, relu: bool, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n, k = w.shape
    bsr = to_bsr(w, (variant.rows, variant.cols))
    npad, kpad = bsr.padded_shape
    x = rng.standard_normal((kpad, p) if not variant.gemv else (kpad,)).astype(np.float32)
    x[k:] = 0  # the padded reduction rows multiply zero weights
    bias = rng.standard_normal(npad).astype(np.float32)
    data, indices = pack(bsr, variant), bsr.indices
    if bsr.nnzb == 0:  # kernels take at least one (unused) block
        data = np.zeros((1,) + data.shape[1:], np.float32)
        indices = np.zeros(1, np.int32)
    row_major = variant.form == "xw"  # X [M, K] and Y [M, N]: the transposed problem
    operand = np.ascontiguousarray(x.T) if row_major else x
    shape = (p, npad) if row_major else ((npad, p) if not variant.gemv else (npad,))
    out = tvm.runtime.tensor(np.full(shape, np.nan, np.float32))
    lib = build(variant, npad, kpad, p, bsr.nnzb, relu)
    lib(*[tvm.runtime.tensor(a) for a in (operand, data, indices, bsr.indptr, bias)], out)
    wpad = np.zeros((npad, kpad), np.float32)
    wpad[:n, :k] = w
    ref = reference(wpad, x, bias, relu)
    ref = ref.T if row_major else ref
    got = out.numpy()
    bad = np.argwhere(~np.isclose(got, ref, rtol=1e-5, atol=1e-5))
    assert not bad.size, (
        f"{variant.name} {n}x{k}x{p}: {len(bad)} wrong, first at {tuple(bad[0])} "
        f"(block row {bad[0][-1 if row_major else 0] // variant.rows}): got {got[tuple(bad[0])]}, "
        f"want {ref[tuple(bad[0])]}"
    )


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_every_variant(variant, sparsity):
    rng = np.random.default_rng(1)
    w = prune_out_in(
        rng.standard_normal((64, 48)).astype(np.float32), sparsity, (variant.rows, variant.cols)
    )
    check(variant, w, p=1 if variant.gemv else 32, relu=sparsity == 0.5)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if not v.gemv], ids=lambda v: v.name)
@pytest.mark.parametrize("p", [16, 48, 64, 80, 6])
def test_column_tiles(variant, p):
    w = prune_out_in(
        np.random.default_rng(2).standard_normal((32, 32)).astype(np.float32),
        0.8,
        (variant.rows, variant.cols),
    )
    check(variant, w, p, relu=True)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    variant=st.sampled_from(VARIANTS),
    n=st.integers(1, 40),
    k=st.integers(1, 40),
    density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    empty_rows=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_generated_patterns(variant, n, k, density, empty_rows, seed):
    rng = np.random.default_rng(seed)
    w = prune_out_in(
        rng.standard_normal((n, k)).astype(np.float32), 1 - density, (variant.rows, variant.cols)
    )
    if empty_rows:
        w[: max(1, n // 2)] = 0
    check(variant, w, p=1 if variant.gemv else 16, relu=bool(seed % 2), seed=seed)


def test_column_tile_fits_the_register_budget():
    for variant in VARIANTS:
        for p in (16, 32, 64, 100, 1024):
            tile = bsr_matmul.column_tile(variant.rows, p)
            assert p % tile == 0
            assert variant.rows * tile * 4 <= bsr_matmul.ACCUMULATOR_BYTES
            assert p % bsr_matmul.row_tile(p) == 0
