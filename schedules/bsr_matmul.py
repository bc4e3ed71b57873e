"""Block-sparse matmul kernels: Y[N, P] = W[N, K] . X[K, P] with W in BSR, as unscheduled TIR.

W is the layer weight in the [out, in] view (see tvm_sparse.sparsity); X is the activation with
the reduction dim first ("K-major"), which is what makes the inner loop a broadcast-FMA over
contiguous columns of X: per nonzero block and reduction element, R broadcasts of W times
P/16 vector loads of X. Pointwise NCHW convs are natively in this form ([C, H*W]); MatMul layers
get there through transposes. P = 1 (batch-1 FC, recurrent GEMV) vectorises over the block rows
instead, with block data stored [nnzb, C, R].

Every variant is a row of `VARIANTS`; dispatch, tests and benchmarks iterate that table. The
kernels here are plain loops and blocks; their schedules (defaults and tuning spaces) are in
`bsr_matmul_space`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from tvm_sparse._compat import ATTR_NOALIAS
from tvm_sparse.formats import BSR, bucket

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


def kernel_arrays(bsr: BSR, variant: Variant) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data, indices, indptr) as the kernels take them: stored blocks padded to the nnz bucket
    (`tvm_sparse.formats.bucket`, so the kernel's shapes do not depend on the pattern) and
    data packed for the variant. The kernel's `nnzb` argument is ``len(indices)``."""
    padded = bucket(bsr)
    return pack(padded, variant), padded.indices.astype(np.int32), padded.indptr.astype(np.int32)


def _attrs(func: tirx.PrimFunc, variant: Variant) -> tirx.PrimFunc:
    # TVMScript names the function "kernel"; module-level names come from bb.add_func. No
    # ATTR_SCHEDULED: the schedule phase applies a tuning record or the default schedule
    # (`bsr_matmul_space`). Only the variant name is attached, so equal shapes share a task.
    func = func.without_attr("global_symbol")
    return func.with_attrs(
        {ATTR_NOALIAS: True, KERNEL_ATTR: variant.name, "op_pattern": OPAQUE_PATTERN}
    )


KERNEL_ATTR = "tvm_sparse.kernel"
OPAQUE_PATTERN = 8  # relax OpPatternKind kOpaque: FuseOps never merges other ops into it
FLOAT_MIN = -3.4028234663852886e38


def bsr_wx(
    n: int, k: int, p: int, variant: Variant, nnzb: int, relu: bool = False
) -> tirx.PrimFunc:
    """Y[N, P] = max(W . X + bias[N, None], floor), W in BSR; N and K padded to the block.

    Unscheduled: one "row" block per block row (its index is a block variable, so the
    indptr-driven loop inside stays splittable), an "update" reduction over the row's stored
    blocks into an [R, P] accumulator, and the "out" epilogue. `bsr_matmul_space` tiles it.

    Parameters
    ----------
    n, k, p
        Padded output rows, padded reduction length, columns of X.
    variant
        Block shape (``variant.form == "wx"``).
    nnzb
        Number of stored blocks (a buffer size; the pattern itself is runtime data; see
        `tvm_sparse.formats.bucket`).
    relu
        Clamp at 0 (fused ReLU); otherwise no clamp.
    """
    r, c = variant.rows, variant.cols
    nb, nnzb_ = n // r, max(nnzb, 1)
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
        for br in range(nb):
            with T.sblock("row"):
                vb = T.axis.spatial(nb, br)
                T.reads(
                    X[0:k, 0:p],
                    data[0:nnzb_, 0:r, 0:c],
                    indices[0:nnzb_],
                    indptr[vb : vb + 2],
                    bias[vb * r : vb * r + r],
                )
                T.writes(Y[vb * r : vb * r + r, 0:p])
                acc = T.sblock_alloc_buffer((r, p), "float32")
                for i, j in T.grid(r, p):
                    for blk in range(indptr[vb], indptr[vb + 1]):
                        for kk in range(c):
                            with T.sblock("update"):
                                vi, vj, vblk, vk = T.axis.remap("SSRR", [i, j, blk, kk])
                                with T.init():
                                    acc[vi, vj] = T.float32(0)
                                acc[vi, vj] = (
                                    acc[vi, vj] + data[vblk, vi, vk] * X[indices[vblk] * c + vk, vj]
                                )
                for i, j in T.grid(r, p):
                    with T.sblock("out"):
                        vi, vj = T.axis.remap("SS", [i, j])
                        Y[vb * r + vi, vj] = T.max(
                            acc[vi, vj] + bias[vb * r + vi], T.float32(floor)
                        )

    return _attrs(kernel, variant)


def bsr_gemv(n: int, k: int, variant: Variant, nnzb: int, relu: bool = False) -> tirx.PrimFunc:
    """y[N] = max(W . x + bias, floor) for one activation column; data stored [nnzb, C, R].

    Scheduled vectorised over the R rows of a block (R >= 4), so one nonzero block costs C
    broadcasts of x and C vector FMAs; R = 1 reduces each row with a scalar loop LLVM may
    reassociate. Unscheduled like `bsr_wx`.
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
        for br in range(nb):
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
                acc = T.sblock_alloc_buffer((r,), "float32")
                for i in range(r):
                    for blk in range(indptr[vb], indptr[vb + 1]):
                        for kk in range(c):
                            with T.sblock("update"):
                                vi, vblk, vk = T.axis.remap("SRR", [i, blk, kk])
                                with T.init():
                                    acc[vi] = T.float32(0)
                                acc[vi] = acc[vi] + data[vblk, vk, vi] * x[indices[vblk] * c + vk]
                for i in range(r):
                    with T.sblock("out"):
                        vi = T.axis.spatial(r, i)
                        y[vb * r + vi] = T.max(acc[vi] + bias[vb * r + vi], T.float32(floor))

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

    Scheduled per stored block and reduction element: one vector load of the block column (R
    outputs) and one broadcast of X per row of an M tile, so no transpose of X or Y is needed.
    Unscheduled like `bsr_wx`.
    """
    r, c = variant.rows, variant.cols
    nb, nnzb_ = n // r, max(nnzb, 1)
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
        for br in range(nb):
            with T.sblock("row"):
                vb = T.axis.spatial(nb, br)
                T.reads(
                    X[0:m, 0:k],
                    data[0:nnzb_, 0:c, 0:r],
                    indices[0:nnzb_],
                    indptr[vb : vb + 2],
                    bias[vb * r : vb * r + r],
                )
                T.writes(Y[0:m, vb * r : vb * r + r])
                acc = T.sblock_alloc_buffer((m, r), "float32")
                for mi, i in T.grid(m, r):
                    for blk in range(indptr[vb], indptr[vb + 1]):
                        for kk in range(c):
                            with T.sblock("update"):
                                vm, vi, vblk, vk = T.axis.remap("SSRR", [mi, i, blk, kk])
                                with T.init():
                                    acc[vm, vi] = T.float32(0)
                                acc[vm, vi] = (
                                    acc[vm, vi] + X[vm, indices[vblk] * c + vk] * data[vblk, vk, vi]
                                )
                for mi, i in T.grid(m, r):
                    with T.sblock("out"):
                        vm, vi = T.axis.remap("SS", [mi, i])
                        Y[vm, vb * r + vi] = T.max(
                            acc[vm, vi] + bias[vb * r + vi], T.float32(floor)
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
