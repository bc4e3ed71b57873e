"""Block-sparse direct conv kernel: every output element against NumPy, over geometries and
block patterns (empty block rows, all-zero and fully dense weights, K not dividing the block)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tvm_sparse.formats import to_bsr
from tvm_sparse.schedules import bsr_conv2d as bc

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver5", "num-cores": 2})
TOL = dict(rtol=1e-5, atol=1e-5)


class Runner:
    """One conv geometry and kernel, compiled once; the pattern (and its block count) is data."""

    def __init__(self, geom, kernel, relu=True, residual=False):
        self.geom, self.kernel, self.relu, self.residual = geom, kernel, relu, residual
        func = bc.bsr_conv2d(geom, kernel, relu, residual)
        self.conv = tvm.compile(func.with_attr("global_symbol", "main"), target=TARGET)
        self.prep = tvm.compile(bc.prepare(geom).with_attr("global_symbol", "main"), target=TARGET)

    def __call__(self, x, view, bias, res=None):
        packed = bc.pack(view, self.geom, self.kernel)
        xq = tvm.runtime.tensor(np.full(self.geom.buffer_size, np.nan, np.float32))
        self.prep(tvm.runtime.tensor(x), xq)
        out = tvm.runtime.tensor(
            np.full((1, self.geom.out_channels, *self.geom.out_hw), np.nan, np.float32)
        )
        args = [xq, packed.data, packed.offsets, packed.chunkptr, bias] + (
            [res] if self.residual else []
        )
        self.conv(
            *[a if isinstance(a, tvm.runtime.Tensor) else tvm.runtime.tensor(a) for a in args], out
        )
        return out.numpy()


def weight_of(view: np.ndarray, geom) -> np.ndarray:
    kh, kw = geom.kernel
    return np.moveaxis(view.reshape(view.shape[0], kh, kw, geom.in_channels), -1, 1)


def check(runner, view, seed=0, what=""):
    geom = runner.geom
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, geom.in_channels, geom.height, geom.width)).astype(np.float32)
    bias = rng.standard_normal(geom.out_channels).astype(np.float32)
    res = None
    if runner.residual:
        res = rng.standard_normal((1, geom.out_channels, *geom.out_hw)).astype(np.float32)
    got = runner(x, view, bias, res)
    ref = bc.reference(x, weight_of(view, geom), geom, bias, res, runner.relu)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    bad = np.argwhere(~np.isclose(got, ref, **TOL))
    assert not bad.size, (
        f"{what} {runner.kernel}: {len(bad)} wrong elements, first at {tuple(bad[0])} "
        f"(tile {runner.kernel.tile}): {got[tuple(bad[0])]} vs {ref[tuple(bad[0])]}"
    )


def random_view(geom, block, density, seed):
    """An [O, K] view whose RxC blocks are kept with probability `density`."""
    rng = np.random.default_rng(seed)
    r, c = block
    o, k = geom.out_channels, geom.reduction
    keep = rng.random((o // r, -(-k // c))) < density
    mask = np.repeat(np.repeat(keep, r, axis=0), c, axis=1)[:, :k]
    return (rng.standard_normal((o, k)) * mask).astype(np.float32)


G = bc.ConvGeometry
GEOMETRIES = {
    "3x3 s1": G(8, 8, 9, 11, (3, 3), (1, 1), (1, 1, 1, 1)),
    "3x3 s2": G(8, 16, 10, 12, (3, 3), (2, 2), (1, 1, 1, 1)),
    "3x3 s2 odd": G(6, 8, 9, 7, (3, 3), (2, 2), (1, 1, 1, 1)),
    "1x1 s2": G(8, 8, 8, 10, (1, 1), (2, 2)),
    "7x7 s2 stem": G(3, 16, 14, 14, (7, 7), (2, 2), (3, 3, 3, 3)),
    "asym dilated": G(5, 8, 10, 7, (3, 3), (2, 1), (1, 0, 2, 1), (2, 1)),
    "5x3 no pad": G(4, 8, 9, 23, (5, 3)),
    "wide 31": G(4, 8, 3, 31, (3, 3), (1, 1), (1, 1, 1, 1)),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
@pytest.mark.parametrize("block", [(1, 1), (4, 1), (2, 4)])
def test_geometries(name, block):
    geom = GEOMETRIES[name]
    runner = Runner(geom, bc.default_kernel(geom, block), residual=name == "3x3 s1")
    check(runner, random_view(geom, block, 0.5, seed=1), what=name)


@pytest.mark.parametrize("relu, residual", [(False, False), (True, True), (False, True)])
def test_epilogues_and_chunks(relu, residual):
    """Several channel chunks (partial sums stored to Y and reloaded) and every epilogue."""
    geom = G(12, 8, 6, 21, (3, 3), (1, 1), (1, 1, 1, 1))
    kernel = bc.ConvKernel((4, 1), (2, 21), chunk=4)
    runner = Runner(geom, kernel, relu=relu, residual=residual)
    check(runner, random_view(geom, (4, 1), 0.6, seed=2), what="chunked")


@pytest.fixture(scope="module")
def chunked_runner():
    geom = G(8, 8, 7, 19, (3, 3), (1, 1), (1, 1, 1, 1))
    return Runner(geom, bc.ConvKernel((4, 2), (7, 19), chunk=4))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    empty_rows=st.lists(st.integers(0, 1), min_size=2, max_size=2),
    seed=st.integers(0, 2**16),
)
def test_patterns(chunked_runner, density, empty_rows, seed):
    """Random block masks, all-zero and fully dense weights, empty block rows; K = 72 is not a
    multiple of the chunk's columns and the block spans two channels."""
    geom = chunked_runner.geom
    view = random_view(geom, (4, 2), density, seed)
    for row, empty in enumerate(empty_rows):
        if empty:
            view[row * 4 : row * 4 + 4] = 0
    check(chunked_runner, view, seed, what=f"density {density}")


def test_pack_chunk_pointers():
    geom = G(8, 4, 5, 5, (3, 3), (1, 1), (1, 1, 1, 1))
    view = random_view(geom, (4, 1), 0.5, seed=3)
    kernel = bc.ConvKernel((4, 1), (5, 5), chunk=3)
    packed = bc.pack(view, geom, kernel)
    assert packed.chunkptr.shape == (1, 4)  # 8 channels in chunks of 3: 3 chunks
    assert packed.chunkptr[0, 0] == 0 and packed.chunkptr[0, -1] == packed.nnzb
    assert packed.nnzb == to_bsr(view, (4, 1)).nnzb
    assert np.all(np.diff(packed.chunkptr[0]) >= 0)


def test_block_rows_must_divide_channels():
    geom = G(4, 6, 5, 5, (3, 3))
    with pytest.raises(ValueError, match="does not divide"):
        bc.bsr_conv2d(geom, bc.ConvKernel((4, 1), (1, 3), 4))
