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

from conftest import TOLERANCE
from tvm_sparse._compat import s_tir
from tvm_sparse.examples import prune_out_in
from tvm_sparse.formats import to_bsr
from tvm_sparse.schedules import bsr_matmul
from tvm_sparse.schedules.bsr_matmul import (
    VARIANTS,
    Variant,
    bsr_gemv,
    bsr_wx,
    bsr_xw,
    kernel_arrays,
    reference,
)
from tvm_sparse.schedules.bsr_matmul_space import FAMILIES, BsrMatmul

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver5", "num-cores": 2})


def kernel(variant: Variant, n: int, k: int, p: int, stored: int, relu: bool):
    """The unscheduled kernel of `variant` for padded [n, k] weights and p columns."""
    if variant.gemv:
        return bsr_gemv(n, k, variant, stored, relu=relu)
    if variant.form == "xw":
        return bsr_xw(p, n, k, variant, stored, relu=relu)
    return bsr_wx(n, k, p, variant, stored, relu=relu)


@functools.cache
def build(variant: Variant, n: int, k: int, p: int, stored: int, relu: bool, sample: int = -1):
    """Built with the default schedule (the dlight rule), or with the family's random sample
    number `sample` (its seed) of the tuning space."""
    func = kernel(variant, n, k, p, stored, relu)
    if sample < 0:
        sch = BsrMatmul().apply(func, TARGET, False)
    else:
        sch = s_tir.Schedule(func, seed=sample)
        assert FAMILIES[variant.form].apply(sch, TARGET, True)
    return tvm.compile(sch.mod["main"].with_attr("global_symbol", "main"), target=TARGET)


def check(
    variant: Variant, w: np.ndarray, p: int, relu: bool, seed: int = 0, sample: int = -1
) -> None:
    rng = np.random.default_rng(seed)
    n, k = w.shape
    bsr = to_bsr(w, (variant.rows, variant.cols))
    npad, kpad = bsr.padded_shape
    x = rng.standard_normal((kpad, p) if not variant.gemv else (kpad,)).astype(np.float32)
    x[k:] = 0  # the padded reduction rows multiply zero weights
    bias = rng.standard_normal(npad).astype(np.float32)
    data, indices, indptr = kernel_arrays(bsr, variant)
    row_major = variant.form == "xw"  # X [M, K] and Y [M, N]: the transposed problem
    operand = np.ascontiguousarray(x.T) if row_major else x
    shape = (p, npad) if row_major else ((npad, p) if not variant.gemv else (npad,))
    out = tvm.runtime.tensor(np.full(shape, np.nan, np.float32))
    lib = build(variant, npad, kpad, p, len(indices), relu, sample)
    lib(*[tvm.runtime.tensor(a) for a in (operand, data, indices, indptr, bias)], out)
    wpad = np.zeros((npad, kpad), np.float32)
    wpad[:n, :k] = w
    ref = reference(wpad, x, bias, relu)
    ref = ref.T if row_major else ref
    got = out.numpy()
    assert got.shape == ref.shape and got.dtype == ref.dtype
    bad = np.argwhere(~np.isclose(got, ref, **TOLERANCE["float32"]))
    assert not bad.size, (
        f"{variant.name} {n}x{k}x{p} (sample {sample}): {len(bad)} wrong, first at {tuple(bad[0])} "
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


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("sample", [1, 2, 3])
def test_random_space_samples(variant, sample):
    """Schedules sampled from the variant's tuning space compute the same result."""
    w = prune_out_in(
        np.random.default_rng(sample).standard_normal((64, 48)).astype(np.float32),
        0.7,
        (variant.rows, variant.cols),
    )
    check(variant, w, p=1 if variant.gemv else 64, relu=bool(sample % 2), sample=sample)
