"""BSR packing round trips for every block shape, including padding and empty rows."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvm_sparse.examples import prune_out_in
from tvm_sparse.formats import to_bsr, to_dense


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
