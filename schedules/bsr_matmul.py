"""Block-sparse matmul kernels: Y[N, P] = W[N, K] . X[K, P] with W in BSR, hand-scheduled.

W is the layer weight in the [out, in] view (see tvm_sparse.sparsity); X is the activation with
the reduction dim first ("K-major"), which is what makes the inner loop a broadcast-FMA over
contiguous columns of X: per nonzero block and reduction element, R broadcasts of W times
P/16 vector loads of X. Pointwise NCHW convs are natively in this form ([C, H*W]); MatMul layers
get there through transposes. P = 1 (batch-1 FC, recurrent GEMV) vectorises over the block rows
instead, with block data stored [nnzb, C, R].

Every variant is a row of `VARIANTS`; dispatch, tests and benchmarks iterate that table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from tvm_sparse._compat import ATTR_NOALIAS, ATTR_SCHEDULED
from tvm_sparse.formats import BSR

ACCUMULATOR_BYTES = 1024  # "global" scratch under this size is promoted to registers


@dataclass(frozen=True)
class Variant:
    """A kernel variant: block shape R x C and form.

    Forms: "wx" (Y = W . X with X [K, P] K-major, vectorised over P), "gemv" (P = 1,
    vectorised over the R rows of a block), "xw" (Y = X . W^T with X [M, K] row-major,
    vectorised over R, a tile of M rows: no activation transposes; R >= 8 only).
    """

    rows: int
    cols: int
    form: str = "wx"

    @property
    def gemv(self) -> bool:
        return self.form == "gemv"

    @property
    def name(self) -> str:
        return f"bsr_{self.form}_{self.rows}x{self.cols}_f32"


BLOCKS = ((1, 1), (4, 1), (8, 1), (16, 1), (1, 4), (4, 4), (8, 8))
VARIANTS: tuple[Variant, ...] = tuple(
    [Variant(r, c, "wx") for r, c in BLOCKS]
    + [Variant(r, c, "gemv") for r, c in BLOCKS]
    + [Variant(r, c, "xw") for r, c in BLOCKS if r >= 8]
)


def column_tile(rows: int, p: int) -> int:
    """Columns of X per register tile: rows x tile floats must fit the accumulator budget."""
    budget = ACCUMULATOR_BYTES // 4 // rows  # floats per accumulator row
    for tile in (64, 48, 32, 16, 8, 4, 2, 1):
        if tile <= budget and p % tile == 0 and tile <= p:
            return tile
    return 1


def pack(bsr: BSR, variant: Variant) -> np.ndarray:
    """Block data in the layout the variant reads: [nnzb, R, C] (wx), [nnzb, C, R] (gemv, xw)."""
    data = bsr.data if variant.form == "wx" else bsr.data.transpose(0, 2, 1)
    return np.ascontiguousarray(data, dtype=np.float32)


def _attrs(func: tirx.PrimFunc, variant: Variant) -> tirx.PrimFunc:
    # TVMScript names the function "kernel"; module-level names come from bb.add_func.
    func = func.without_attr("global_symbol")
    return func.with_attrs(
        {ATTR_NOALIAS: True, ATTR_SCHEDULED: True, "tvm_sparse.kernel": variant.name}
    )


FLOAT_MIN = -3.4028234663852886e38


def bsr_wx(
    n: int, k: int, p: int, variant: Variant, nnzb: int, relu: bool = False
) -> tirx.PrimFunc:
    """Y[N, P] = max(W . X + bias[N, None], floor), W in BSR; N and K padded to the block.

    Parameters
    ----------
    n, k, p
        Padded output rows, padded reduction length, columns of X.
    variant
        Block shape (``variant.gemv`` False).
    nnzb
        Number of stored blocks (a buffer size; the pattern itself is runtime data).
    relu
        Clamp at 0 (fused ReLU); otherwise no clamp.
    """
    r, c = variant.rows, variant.cols
    nb, pv = n // r, column_tile(r, p)
    nnzb_ = max(nnzb, 1)
    floor = 0.0 if relu else FLOAT_MIN

    @T.prim_func(s_tir=True)
    def kernel(
        X: T.Buffer((k, p), "float32"),
        data: T.Buffer((nnzb_, r, c), "float32"),
        indices: T.Buffer((nnzb_,), "int32"),
        indptr: T.Buffer((nb + 1,), "int32"),
        bias: T.Buffer((n,), "float32"),
        Y: T.Buffer((n, p), "float32"),
    ):
        for br in T.parallel(nb):
            for p0 in range(p // pv):
                with T.sblock("tile"):
                    vb, vp = T.axis.remap("SS", [br, p0])
                    T.reads(
                        X[0:k, vp * pv : vp * pv + pv],
                        data[0:nnzb_, 0:r, 0:c],
                        indices[0:nnzb_],
                        indptr[vb : vb + 2],
                        bias[vb * r : vb * r + r],
                    )
                    T.writes(Y[vb * r : vb * r + r, vp * pv : vp * pv + pv])
                    acc = T.sblock_alloc_buffer((r, pv), "float32", scope="global")
                    for i in T.unroll(r):
                        for j in T.vectorized(pv):
                            acc[i, j] = T.float32(0)
                    for blk in range(indptr[vb], indptr[vb + 1]):
                        for kk in range(c):
                            for i in T.unroll(r):
                                for j in T.vectorized(pv):
                                    acc[i, j] = (
                                        acc[i, j]
                                        + data[blk, i, kk] * X[indices[blk] * c + kk, vp * pv + j]
                                    )
                    for i in T.unroll(r):
                        for j in T.vectorized(pv):
                            Y[vb * r + i, vp * pv + j] = T.max(
                                acc[i, j] + bias[vb * r + i], T.float32(floor)
                            )

    return _attrs(kernel, variant)


def bsr_gemv(n: int, k: int, variant: Variant, nnzb: int, relu: bool = False) -> tirx.PrimFunc:
    """y[N] = max(W . x + bias, floor) for one activation column; data stored [nnzb, C, R].

    Vectorised over the R rows of a block (R >= 4), so one nonzero block costs C broadcasts of
    x and C vector FMAs; R = 1 reduces each row with a scalar loop LLVM may reassociate.
    """
    r, c = variant.rows, variant.cols
    nb, nnzb_ = n // r, max(nnzb, 1)
    floor = 0.0 if relu else FLOAT_MIN

    @T.prim_func(s_tir=True)
    def kernel(
        x: T.Buffer((k,), "float32"),
        data: T.Buffer((nnzb_, c, r), "float32"),
        indices: T.Buffer((nnzb_,), "int32"),
        indptr: T.Buffer((nb + 1,), "int32"),
        bias: T.Buffer((n,), "float32"),
        y: T.Buffer((n,), "float32"),
    ):
        for br in T.parallel(nb):
            with T.sblock("row"):
                vb = T.axis.spatial(nb, br)
                T.reads(
                    x[0:k],
                    data[0:nnzb_, 0:c, 0:r],
                    indices[0:nnzb_],
                    indptr[vb : vb + 2],
                    bias[vb * r : vb * r + r],
                )
                T.writes(y[vb * r : vb * r + r])
                acc = T.sblock_alloc_buffer((r,), "float32", scope="global")
                for i in T.vectorized(r):
                    acc[i] = T.float32(0)
                for blk in range(indptr[vb], indptr[vb + 1]):
                    for kk in range(c):
                        for i in T.vectorized(r):
                            acc[i] = acc[i] + data[blk, kk, i] * x[indices[blk] * c + kk]
                for i in T.vectorized(r):
                    y[vb * r + i] = T.max(acc[i] + bias[vb * r + i], T.float32(floor))

    return _attrs(kernel, variant)


def row_tile(m: int) -> int:
    """Rows of X per "xw" register tile (one accumulator register per row)."""
    for tile in (16, 12, 8, 6, 4, 2, 1):
        if m % tile == 0:
            return tile
    return 1


def bsr_xw(
    m: int, n: int, k: int, variant: Variant, nnzb: int, relu: bool = False
) -> tirx.PrimFunc:
    """Y[M, N] = max(X . W^T + bias[N], floor) for row-major X [M, K]; data stored [nnzb, C, R].

    Per stored block and reduction element: one vector load of the block column (R outputs)
    and one broadcast of X per row of the tile, so no transpose of X or Y is needed.
    """
    r, c = variant.rows, variant.cols
    nb, nnzb_, mt = n // r, max(nnzb, 1), row_tile(m)
    floor = 0.0 if relu else FLOAT_MIN

    @T.prim_func(s_tir=True)
    def kernel(
        X: T.Buffer((m, k), "float32"),
        data: T.Buffer((nnzb_, c, r), "float32"),
        indices: T.Buffer((nnzb_,), "int32"),
        indptr: T.Buffer((nb + 1,), "int32"),
        bias: T.Buffer((n,), "float32"),
        Y: T.Buffer((m, n), "float32"),
    ):
        for br in T.parallel(nb):
            for m0 in range(m // mt):
                with T.sblock("tile"):
                    vb, vm = T.axis.remap("SS", [br, m0])
                    T.reads(
                        X[vm * mt : vm * mt + mt, 0:k],
                        data[0:nnzb_, 0:c, 0:r],
                        indices[0:nnzb_],
                        indptr[vb : vb + 2],
                        bias[vb * r : vb * r + r],
                    )
                    T.writes(Y[vm * mt : vm * mt + mt, vb * r : vb * r + r])
                    acc = T.sblock_alloc_buffer((mt, r), "float32", scope="global")
                    for mi in T.unroll(mt):
                        for i in T.vectorized(r):
                            acc[mi, i] = T.float32(0)
                    for blk in range(indptr[vb], indptr[vb + 1]):
                        for kk in range(c):
                            for mi in T.unroll(mt):
                                for i in T.vectorized(r):
                                    acc[mi, i] = (
                                        acc[mi, i]
                                        + X[vm * mt + mi, indices[blk] * c + kk] * data[blk, kk, i]
                                    )
                    for mi in T.unroll(mt):
                        for i in T.vectorized(r):
                            Y[vm * mt + mi, vb * r + i] = T.max(
                                acc[mi, i] + bias[vb * r + i], T.float32(floor)
                            )

    return _attrs(kernel, variant)


def reference(
    w: np.ndarray, x: np.ndarray, bias: np.ndarray | None = None, relu: bool = False
) -> np.ndarray:
    """NumPy reference: W[N, K] . X[K, P] (+ bias per row) (ReLU), in float64 then float32."""
    y = w.astype(np.float64) @ x.astype(np.float64)
    if bias is not None:
        y += bias.reshape(-1, *([1] * (y.ndim - 1)))
    return (np.maximum(y, 0) if relu else y).astype(np.float32)
