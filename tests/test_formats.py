"""BSR packing round trips for every block shape, including padding and empty rows."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvm_sparse.examples import prune_out_in
from tvm_sparse.formats import (
    NNZ_BUCKETS,
    bucket,
    nnzb_bucket,
    to_bsr,
    to_column_quads,
    to_dense,
)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    k=st.integers(1, 40),
    block=st.sampled_from([(1, 1), (4, 1), (16, 1), (1, 4), (8, 8), (3, 5)]),
    density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_roundtrip(n, k, block, density, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    w = prune_out_in(w, 1.0 - density, block)
    bsr = to_bsr(w, block)
    np.testing.assert_array_equal(to_dense(bsr), w)
    assert bsr.indptr[-1] == bsr.nnzb and np.all(np.diff(bsr.indptr) >= 0)
    for row in range(len(bsr.indptr) - 1):  # ascending, unique block columns per row
        cols = bsr.indices[bsr.indptr[row] : bsr.indptr[row + 1]]
        assert np.all(np.diff(cols) > 0)


def test_all_zero_and_dense():
    assert to_bsr(np.zeros((8, 8), np.float32), (4, 4)).nnzb == 0
    dense = to_bsr(np.ones((8, 8), np.float32), (4, 4))
    assert dense.nnzb == 4 and dense.density == 1.0


def test_rejects_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        to_bsr(np.zeros((2, 2, 2)), (1, 1))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 64),
    k=st.integers(1, 64),
    block=st.sampled_from([(1, 1), (4, 1), (16, 1), (8, 8), (3, 5)]),
    density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_bucket_pads_without_changing_the_matrix(n, k, block, density, seed):
    w = prune_out_in(np.random.default_rng(seed).standard_normal((n, k)), 1.0 - density, block)
    bsr = to_bsr(w.astype(np.float32), block)
    padded = bucket(bsr)
    np.testing.assert_array_equal(to_dense(padded), to_dense(bsr))
    assert padded.nnzb == bsr.nnzb and padded.stored >= max(bsr.nnzb, 1)
    assert padded.stored == nnzb_bucket(bsr.nnzb, bsr.total_blocks)
    assert padded.stored - max(bsr.nnzb, 1) < max(1, -(-bsr.total_blocks // NNZ_BUCKETS))
    assert not padded.data[bsr.nnzb :].any() and padded.indices.dtype == np.int32
    assert np.array_equal(padded.indptr, bsr.indptr)  # no block row reaches the padding


def test_bucket_is_independent_of_the_pattern():
    """Two prunings at the same sparsity (nnzb 819 and 818 of 8192) store the same count."""
    counts = []
    for seed, drop in ((0, 0), (1, 1)):
        w = prune_out_in(np.random.default_rng(seed).standard_normal((256, 128)), 0.9, (4, 1))
        bsr = to_bsr(w.astype(np.float32), (4, 1))
        counts.append((bsr.nnzb - drop, bucket(bsr).stored))
        assert nnzb_bucket(bsr.nnzb - drop, bsr.total_blocks) == bucket(bsr).stored
    assert counts[0][0] != counts[1][0] and counts[0][1] == counts[1][1]


@settings(max_examples=30, deadline=None)
@given(
    blocks=st.integers(1, 6),
    rows=st.sampled_from([1, 4]),
    k=st.integers(1, 70),
    density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    seed=st.integers(0, 1000),
)
def test_column_quads_hold_the_weight(blocks, rows, k, density, seed):
    """Every stored column quad, expanded, gives back the weight (pad columns carry zeros)."""
    rng = np.random.default_rng(seed)
    w = (rng.random((blocks * rows, k)) < density) * rng.integers(-127, 128, (blocks * rows, k))
    quads = to_column_quads(w.astype(np.int8), rows)
    rebuilt = np.zeros_like(w)
    for b in range(blocks):
        for q in range(quads.indptr[b], quads.indptr[b + 1]):
            for e, col in enumerate(quads.cols[q]):
                rebuilt[b * rows : (b + 1) * rows, col] += quads.data[q][:, e]
    np.testing.assert_array_equal(rebuilt, w)
    nonzero_cols = (w != 0).reshape(blocks, rows, k).any(axis=1).sum(axis=1)
    np.testing.assert_array_equal(np.diff(quads.indptr), -(-nonzero_cols // 4))


def test_column_quads_of_a_4x1_pruning_keep_a_quarter_of_the_aligned_blocks():
    rng = np.random.default_rng(0)
    w = prune_out_in(rng.standard_normal((256, 512)).astype(np.float32), 0.9, (4, 1))
    quads = to_column_quads(w, 4)
    aligned = to_bsr(w, (4, 4))
    assert quads.nnzb < 0.35 * aligned.nnzb
    with pytest.raises(ValueError, match="multiple of 4"):
        to_column_quads(w[:6], 4)
