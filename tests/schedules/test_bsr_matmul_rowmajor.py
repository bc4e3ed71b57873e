"""Row-major BSR matmul (transposes inside) against NumPy: every variant, generated patterns.

Outputs are pre-filled with NaN so an output the kernel never writes fails; M, N and K that are
not multiples of 16 exercise the scalar tails of the in-kernel transposes.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TOLERANCE
from tvm_sparse.examples import prune_out_in
from tvm_sparse.formats import to_bsr
from tvm_sparse.schedules import tile_transpose
from tvm_sparse.schedules.bsr_matmul_rowmajor import (
    PANELS,
    VARIANTS,
    Variant,
    bsr_rm,
    default_panel,
    pack,
    reference,
)

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver5", "num-cores": 2})


@functools.cache
def build(variant: Variant, m: int, n: int, k: int, nnzb: int, relu: bool, threads: int, panel):
    func = bsr_rm(m, n, k, variant, nnzb, relu=relu, threads=threads, panel=panel)
    return tvm.compile(func.with_attr("global_symbol", "main"), target=TARGET)


def check(
    variant: Variant, w: np.ndarray, m: int, relu: bool, seed: int = 0, threads=2, panel=None
) -> None:
    rng = np.random.default_rng(seed)
    n, k = w.shape
    bsr = to_bsr(w, (variant.rows, variant.cols))
    npad, kpad = bsr.padded_shape
    x = rng.standard_normal((m, kpad)).astype(np.float32)
    x[:, k:] = 0  # the padded reduction columns multiply zero weights
    bias = rng.standard_normal(npad).astype(np.float32)
    indices = bsr.indices if bsr.nnzb else np.zeros(1, np.int32)
    out = tvm.runtime.tensor(np.full((m, npad), np.nan, np.float32))
    lib = build(variant, m, npad, kpad, bsr.nnzb, relu, threads, panel)
    lib(*[tvm.runtime.tensor(a) for a in (x, pack(bsr), indices, bsr.indptr, bias)], out)
    wpad = np.zeros((npad, kpad), np.float32)
    wpad[:n, :k] = w
    ref = reference(wpad, x, bias, relu)
    got = out.numpy()
    assert got.shape == ref.shape and got.dtype == ref.dtype
    bad = np.argwhere(~np.isclose(got, ref, **TOLERANCE["float32"]))
    assert not bad.size, (
        f"{variant.name} m={m} {n}x{k}: {len(bad)} wrong, first at {tuple(bad[0])} "
        f"(block row {bad[0][1] // variant.rows}, 16x16 tile {tuple(bad[0] // 16)}): "
        f"got {got[tuple(bad[0])]}, want {ref[tuple(bad[0])]}"
    )


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_every_variant(variant, sparsity):
    rng = np.random.default_rng(1)
    w = prune_out_in(
        rng.standard_normal((64, 48)).astype(np.float32), sparsity, (variant.rows, variant.cols)
    )
    check(variant, w, m=32, relu=sparsity == 0.5)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
@pytest.mark.parametrize("m, n, k", [(64, 128, 64), (6, 40, 24), (33, 72, 40), (80, 16, 17)])
def test_tails_and_tiles(variant, m, n, k):
    """M, N, K off the 16-grid, and wider than one accumulator tile."""
    w = prune_out_in(
        np.random.default_rng(2).standard_normal((n, k)).astype(np.float32),
        0.8,
        (variant.rows, variant.cols),
    )
    check(variant, w, m, relu=True)


@pytest.mark.parametrize("threads", [1, 3, 5])
def test_any_chunk_count_is_correct(threads):
    """Every output group is written whatever the chunk count (fewer or more than the runtime
    threads)."""
    w = prune_out_in(np.random.default_rng(5).standard_normal((96, 80)).astype(np.float32), 0.7)
    check(Variant(1, 1, "rm"), w, m=48, relu=False, threads=threads)


@pytest.mark.parametrize("panel", PANELS)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("m", [6, 33, 80])
def test_every_panel_and_split(panel, threads, m):
    """Panels shared out between threads, or (fewer panels than threads) one panel's output
    groups split between them; a last panel with a partial 16-row tile; an accumulator set
    per parity of the blocks (4x1) and a single one (16x1)."""
    for variant in (Variant(4, 1, "rm"), Variant(16, 1, "rm")):
        w = prune_out_in(
            np.random.default_rng(m).standard_normal((160, 72)).astype(np.float32),
            0.7,
            (variant.rows, variant.cols),
        )
        check(variant, w, m, relu=False, threads=threads, panel=panel)


def test_default_panel_gives_each_thread_its_rows():
    """M = 64 on two cores: two 32-row panels (each thread transposes only its own rows)
    rather than one 64-row panel whose output the threads split."""
    assert default_panel(64, 2) == 32
    assert default_panel(128, 2) == 64
    assert default_panel(8, 2) == 16


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    variant=st.sampled_from(VARIANTS),
    m=st.integers(1, 40),
    n=st.integers(1, 40),
    k=st.integers(1, 40),
    density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    empty_rows=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_generated_patterns(variant, m, n, k, density, empty_rows, seed):
    rng = np.random.default_rng(seed)
    w = prune_out_in(
        rng.standard_normal((n, k)).astype(np.float32), 1 - density, (variant.rows, variant.cols)
    )
    if empty_rows:
        w[: max(1, n // 2)] = 0
    check(variant, w, m, relu=bool(seed % 2), seed=seed)


def test_transpose16_moves_every_element():
    """The helper alone, at offsets and strides that are not multiples of the tile."""
    from tvm.script import tirx as T

    rows, cols, dst_stride = 19, 37, 21

    @T.prim_func(s_tir=True)
    def func(a: T.Buffer((rows * cols,), "float32"), b: T.Buffer((16 * dst_stride,), "float32")):
        T.func_attr({"global_symbol": "main"})
        with T.attr(0, tile_transpose.IMPORT, tile_transpose.LLVM_IR):
            T.evaluate(tile_transpose.transpose16(a, 2 * cols + 3, cols, b, 4, dst_stride))

    lib = tvm.compile(func, target=TARGET)
    a = np.random.default_rng(6).standard_normal(rows * cols).astype(np.float32)
    b = tvm.runtime.tensor(np.full(16 * dst_stride, np.nan, np.float32))
    lib(tvm.runtime.tensor(a), b)
    want = np.full((16, dst_stride), np.nan, np.float32)
    want[:, 4:20] = a.reshape(rows, cols)[2:18, 3:19].T
    np.testing.assert_array_equal(b.numpy().reshape(16, dst_stride), want)
