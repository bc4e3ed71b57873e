"""Block-sparse matmul on row-major activations with the transposes inside: Y = X . W^T.

The K-major kernel (``bsr_matmul.bsr_wx``) is the fast form of a BSR matmul (per nonzero
element: R broadcasts of W, P/16 vector loads of X), but a MatMul layer has X [M, K] and wants
Y [M, N] row-major, so used alone it needs two transposes and three parallel launches. This
kernel does it all in one launch: each thread transposes X into its own K-major scratch in
16x16 register tiles (:mod:`.tile_transpose`), computes its share of 64-row output groups with
the K-major inner loop into a stack stage, and stores each group into Y through 16x16
transposes and a row buffer. Tails (M, K or N not multiples of 16) take scalar loops.

Every variant is a row of `VARIANTS` (form "rm"); tests and selection iterate it.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from tvm_sparse._compat import ATTR_NOALIAS, ATTR_SCHEDULED
from tvm_sparse.formats import BSR

from . import tile_transpose as tt
from .bsr_matmul import Variant
from .common import ON_STACK

FORM = "rm"
BLOCKS = ((1, 1), (4, 1), (8, 1), (16, 1), (1, 4), (4, 4), (8, 8))
VARIANTS: tuple[Variant, ...] = tuple(Variant(r, c, FORM) for r, c in BLOCKS)
# Register budget of one accumulator tile (bytes): "global" scratch under 1 KB is promoted to
# registers; 16 zmm of 32 leaves room for the broadcasts and loads.
ACCUMULATOR_BYTES = 1024
FLOAT_MIN = -3.4028234663852886e38
G = tt.TILE
# Output rows computed into the stack stage before they are transposed into Y.
GROUP = 64
# Most rows of X offered: the per-thread output stage (GROUP x M floats) lives on the stack.
MAX_ROWS = 256


def register_tile(rows: int, cols: int) -> tuple[int, int]:
    """(rows of a block, columns of X) per accumulator tile, within the register budget.

    Widest columns first: per stored element a tile costs one broadcast of W per row and one
    load of X per 16 columns, so a 16x1 block runs as four 4x64 tiles (32 loads per 64 FMAs)
    rather than four 16x16 ones (68 loads per 64 FMAs).
    """
    budget = ACCUMULATOR_BYTES // 4
    pv = next(t for t in (64, 48, 32, 16) if cols % t == 0)
    rt = max(d for d in range(1, rows + 1) if rows % d == 0 and d * pv <= budget)
    return rt, pv


def pack(bsr: BSR) -> np.ndarray:
    """Block data as the kernel reads it: [nnzb, R, C] (at least one block)."""
    data = bsr.data if bsr.nnzb else np.zeros((1, *bsr.block), np.float32)
    return np.ascontiguousarray(data, dtype=np.float32)


def _ceil(a: int, b: int) -> int:
    return -(-a // b) * b


def bsr_rm(
    m: int, n: int, k: int, variant: Variant, nnzb: int, relu: bool = False, threads: int = 2
) -> tirx.PrimFunc:
    """Y[M, N] = max(X . W^T + bias[N], floor) for row-major X [M, K], W [N, K] in BSR.

    Parameters
    ----------
    m, n, k
        Rows of X, padded output columns (a multiple of R), padded reduction length (a
        multiple of C).
    variant
        Block shape, ``variant.form == "rm"``.
    nnzb
        Number of stored blocks (a buffer size; the pattern itself is runtime data).
    relu
        Clamp at 0 (fused ReLU); otherwise no clamp.
    threads
        Work chunks (the core count): each transposes all of X and computes 1/threads of the
        output groups; any runtime thread count stays correct.
    """
    r, c = variant.rows, variant.cols
    assert variant.form == FORM and n % r == 0 and k % c == 0, (variant, n, k)
    mp = _ceil(m, G)  # columns of the K-major scratch: whole 16-wide tiles
    (rt, pv), nnzb_, floor = register_tile(r, mp), max(nnzb, 1), 0.0 if relu else FLOAT_MIN
    ktiles, groups = k // G, -(-n // GROUP)
    k_tail, m_tail = k % G, m % G
    last = n - (groups - 1) * GROUP  # output rows of the last group

    @T.inline
    def store_group(stage, rows, Y, g, w16, tail):
        # Y[:, g * GROUP + i] = stage[i, :] for i < w16 + tail (w16 a multiple of 16). Rows of
        # Y are 4 * N bytes apart (the same L1 set for N = 1024): 16 stores down a column of Y
        # ran 5x slower than 16 transposed rows into `rows` (row stride GROUP) copied out
        # along the rows of Y.
        for q in range(m // G):
            for s in range(w16 // G):
                T.evaluate(tt.transpose16(stage, s * G * mp + q * G, mp, rows, s * G, GROUP))
            if w16 > 0:
                for j in range(G):
                    for i in T.vectorized(w16):
                        Y[q * G + j, g * GROUP + i] = rows[j * GROUP + i]
        if m_tail > 0 and w16 > 0:
            for p, i in T.grid(m_tail, w16):
                Y[m - m_tail + p, g * GROUP + i] = stage[i * mp + m - m_tail + p]
        if tail > 0:
            for p, i in T.grid(m, tail):
                Y[p, g * GROUP + w16 + i] = stage[(w16 + i) * mp + p]

    @T.prim_func(s_tir=True)
    def kernel(
        X: T.Buffer((m, k), "float32"),
        data: T.Buffer((nnzb_, r, c), "float32"),
        indices: T.Buffer((nnzb_,), "int32"),
        indptr: T.Buffer((n // r + 1,), "int32"),
        bias: T.Buffer((n,), "float32"),
        Y: T.Buffer((m, n), "float32"),
    ):
        with T.attr(0, tt.IMPORT, tt.LLVM_IR):
            for th in T.parallel(threads):
                # Every thread transposes all of X into its own scratch: no barrier, and no
                # lines written by one core and read by the other (a shared scratch with a
                # spin barrier measured 38.5 us against 35.8 us, and much worse when a
                # thread is preempted).
                xt = T.alloc_buffer((k * mp,), "float32")
                # xt[kk * mp + p] = X[p, kk], zero for p >= m. Along rows of X first:
                # consecutive tiles read the next 64 bytes of the same 16 rows.
                for q, kb in T.grid(m // G, ktiles):
                    T.evaluate(
                        tt.transpose16(X, q * G * k + kb * G, k, xt, kb * G * mp + q * G, mp)
                    )
                if m_tail > 0:
                    for kb, kk, p in T.grid(ktiles, G, G):
                        xt[(kb * G + kk) * mp + m - m_tail + p] = T.if_then_else(
                            p < m_tail,
                            X[m - m_tail + T.min(p, m_tail - 1), kb * G + kk],
                            T.float32(0),
                        )
                if k_tail > 0:
                    for kk, p in T.grid(k_tail, mp):
                        xt[(ktiles * G + kk) * mp + p] = T.if_then_else(
                            p < m, X[T.min(p, m - 1), ktiles * G + kk], T.float32(0)
                        )
                stage = T.alloc_buffer((GROUP * mp,), "float32", annotations=ON_STACK)
                rows = T.alloc_buffer((G * GROUP,), "float32", annotations=ON_STACK)
                for g in range(th * groups // threads, (th + 1) * groups // threads):
                    for sub in range(GROUP // r):
                        br: T.let = g * (GROUP // r) + sub
                        if br < n // r:
                            for r0, p0 in T.grid(r // rt, mp // pv):
                                acc = T.alloc_buffer((rt, pv), "float32", scope="global")
                                for i in T.unroll(rt):
                                    for j in T.vectorized(pv):
                                        acc[i, j] = T.float32(0)
                                for blk in range(indptr[br], indptr[br + 1]):
                                    for kk in range(c):
                                        for i in T.unroll(rt):
                                            for j in T.vectorized(pv):
                                                acc[i, j] = (
                                                    acc[i, j]
                                                    + data[blk, r0 * rt + i, kk]
                                                    * xt[(indices[blk] * c + kk) * mp + p0 * pv + j]
                                                )
                                for i in T.unroll(rt):
                                    for j in T.vectorized(pv):
                                        stage[(sub * r + r0 * rt + i) * mp + p0 * pv + j] = T.max(
                                            acc[i, j] + bias[br * r + r0 * rt + i],
                                            T.float32(floor),
                                        )
                    if g < groups - 1:
                        store_group(stage, rows, Y, g, GROUP, 0)
                    else:
                        store_group(stage, rows, Y, g, last // G * G, last % G)

    func = kernel.without_attr("global_symbol")
    return func.with_attrs(
        {ATTR_NOALIAS: True, ATTR_SCHEDULED: True, "tvm_sparse.kernel": variant.name}
    )


def reference(
    w: np.ndarray, x: np.ndarray, bias: np.ndarray | None = None, relu: bool = False
) -> np.ndarray:
    """NumPy reference: X[M, K] . W[N, K]^T (+ bias) (ReLU), in float64 then float32."""
    y = x.astype(np.float64) @ w.astype(np.float64).T
    if bias is not None:
        y += bias
    return (np.maximum(y, 0) if relu else y).astype(np.float32)
