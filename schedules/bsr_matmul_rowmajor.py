"""Block-sparse matmul on row-major activations with the transposes inside: Y = X . W^T.

The K-major kernel (``bsr_matmul.bsr_wx``) is the fast form of a BSR matmul (per nonzero
element: R broadcasts of W, P/16 vector loads of X), but a MatMul layer has X [M, K] and wants
Y [M, N] row-major, so used alone it needs two transposes and three parallel launches. This
kernel does it all in one launch. X is cut into panels of rows (`default_panel`); each thread
transposes the panels it computes into its own K-major scratch in 16x16 register tiles
(:mod:`.tile_transpose`), computes the panel's 64-column output groups with the K-major inner
loop into a stack stage, and stores each group into Y through 16x16 transposes and a row
buffer. Tails (M, K or N not multiples of 16) take scalar loops.

Where the time goes (M = 64, N = K = 1024, 90 % sparse 16x1, two 32-row panels, 2 threads):
compute alone 26.6 us (the FMA peak of this machine is 24.4 us for the stored MACs), the
transposes of X +2.5 us, the transposed stores of Y +2.2 us: 31 us in all.

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
# Most rows of X offered to the measured selection.
MAX_ROWS = 256
# Panel heights (rows of X per transposed panel) the kernel offers.
PANELS = (64, 32, 16)


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


def accumulator_sets(rows: int, panel: int) -> int:
    """2 when a register tile fills at most half the budget: a second accumulator set takes the
    odd blocks of a row, so 8 zmm of FMAs are not one dependency chain (4x1 blocks on a
    32-row panel: 32.8 against 35.6 us)."""
    rt, pv = register_tile(rows, panel)
    return 2 if 2 * rt * pv * 4 <= ACCUMULATOR_BYTES else 1


def default_panel(m: int, threads: int) -> int:
    """Rows of X per panel: the least per-thread work, counting transposed rows at 1/4 of a
    computed row; ties go to the wider panel (wider register tiles).

    Panels are shared out between the threads; when there are fewer panels than threads, the
    threads split a panel's output columns instead and each transposes the panel. M = 64 on two
    cores: two 32-row panels (30.6 us) against one 64-row panel split by columns (36.1 us),
    whose threads each transpose all of X.
    """
    best = None
    for panel in sorted({min(p, _ceil(m, G)) for p in PANELS}, reverse=True):
        panels, nsplit, items = _layout(m, panel, threads)
        per_thread = -(-items // threads)
        transposed = panel * (per_thread if nsplit == 1 else 1)
        cost = per_thread * panel / nsplit + 0.25 * transposed
        if best is None or cost < best[0]:
            best = (cost, panel)
    return best[1]


def _layout(m: int, panel: int, threads: int) -> tuple[int, int, int]:
    """(panels, column splits per panel, work items) for `panel`-row panels."""
    panels = -(-m // panel)
    nsplit = -(-threads // panels) if panels < threads else 1
    return panels, nsplit, panels * nsplit


def pack(bsr: BSR) -> np.ndarray:
    """Block data as the kernel reads it: [nnzb, R, C] (at least one block)."""
    data = bsr.data if bsr.nnzb else np.zeros((1, *bsr.block), np.float32)
    return np.ascontiguousarray(data, dtype=np.float32)


def _ceil(a: int, b: int) -> int:
    return -(-a // b) * b


def bsr_rm(
    m: int,
    n: int,
    k: int,
    variant: Variant,
    nnzb: int,
    relu: bool = False,
    threads: int = 2,
    panel: int | None = None,
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
        Work chunks (the core count); any runtime thread count stays correct.
    panel
        Rows of X transposed and computed together (a multiple of 16; `default_panel`).
    """
    r, c = variant.rows, variant.cols
    assert variant.form == FORM and n % r == 0 and k % c == 0, (variant, n, k)
    panel = min(_ceil(m, G), panel or default_panel(m, threads))
    assert panel % G == 0, panel
    panels, nsplit, items = _layout(m, panel, threads)
    (rt, pv), nnzb_, floor = register_tile(r, panel), max(nnzb, 1), 0.0 if relu else FLOAT_MIN
    sets = accumulator_sets(r, panel)
    ktiles, groups, k_tail = k // G, -(-n // GROUP), k % G
    last = n - (groups - 1) * GROUP  # output rows of the last group
    # The last panel's rows: whole 16-row tiles and the rows after them.
    last_rows = m - (panels - 1) * panel
    last_full, last_tail = last_rows // G, last_rows % G

    @T.inline
    def transpose_panel(X, xt, row0, full, tail):
        # xt[kk * panel + p] = X[row0 + p, kk] for the panel's rows (p < full * 16 + tail).
        # Along rows of X first: consecutive tiles read the next 64 bytes of the same 16 rows.
        for q, kb in T.grid(full, ktiles):
            T.evaluate(
                tt.transpose16(X, (row0 + q * G) * k + kb * G, k, xt, kb * G * panel + q * G, panel)
            )
        if tail > 0:
            for kb, kk, p in T.grid(ktiles, G, G):
                xt[(kb * G + kk) * panel + full * G + p] = T.if_then_else(
                    p < tail,
                    X[row0 + full * G + T.min(p, tail - 1), kb * G + kk],
                    T.float32(0),
                )
        if k_tail > 0:
            for kk, p in T.grid(k_tail, panel):
                xt[(ktiles * G + kk) * panel + p] = T.if_then_else(
                    p < full * G + tail,
                    X[row0 + T.min(p, full * G + tail - 1), ktiles * G + kk],
                    T.float32(0),
                )

    @T.inline
    def store_group(stage, rows, Y, row0, full, tail, g, w16, ctail):
        # Y[row0 + p, g * GROUP + i] = stage[i * panel + p] for p < full * 16 + tail and
        # i < w16 + ctail (w16 a multiple of 16). Rows of Y are 4 * N bytes apart (the same L1
        # set for N = 1024): 16 stores down a column of Y ran 5x slower than 16 transposed rows
        # into `rows` (row stride GROUP) copied out along the rows of Y.
        for q in range(full):
            for s in range(w16 // G):
                T.evaluate(tt.transpose16(stage, s * G * panel + q * G, panel, rows, s * G, GROUP))
            if w16 > 0:
                for j in range(G):
                    for i in T.vectorized(w16):
                        Y[row0 + q * G + j, g * GROUP + i] = rows[j * GROUP + i]
        if tail > 0 and w16 > 0:
            for p, i in T.grid(tail, w16):
                Y[row0 + full * G + p, g * GROUP + i] = stage[i * panel + full * G + p]
        if ctail > 0:
            for p, i in T.grid(full * G + tail, ctail):
                Y[row0 + p, g * GROUP + w16 + i] = stage[(w16 + i) * panel + p]

    @T.inline
    def accumulate(acc, a, xt, data, indices, blk, r0, p0):
        for kk in range(c):
            for i in T.unroll(rt):
                for j in T.vectorized(pv):
                    acc[a, i, j] = (
                        acc[a, i, j]
                        + data[blk, r0 * rt + i, kk]
                        * xt[(indices[blk] * c + kk) * panel + p0 * pv + j]
                    )

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
                # Each thread transposes the panels it computes into its own scratch: no
                # barrier, and no lines written by one core and read by the other (a shared
                # scratch with a spin barrier measured 38.5 us against 35.8 us).
                xt = T.alloc_buffer((k * panel,), "float32")
                stage = T.alloc_buffer((GROUP * panel,), "float32", annotations=ON_STACK)
                rows = T.alloc_buffer((G * GROUP,), "float32", annotations=ON_STACK)
                first: T.let = th * items // threads
                for it in range(first, (th + 1) * items // threads):
                    pi: T.let = it // nsplit
                    row0: T.let = pi * panel
                    full: T.let = T.if_then_else(pi == panels - 1, last_full, panel // G)
                    tail: T.let = T.if_then_else(pi == panels - 1, last_tail, 0)
                    if it == first or it % nsplit == 0:
                        transpose_panel(X, xt, row0, full, tail)
                    part: T.let = it % nsplit
                    for g in range(part * groups // nsplit, (part + 1) * groups // nsplit):
                        for sub in range(GROUP // r):
                            br: T.let = g * (GROUP // r) + sub
                            if br < n // r:
                                for r0, p0 in T.grid(r // rt, panel // pv):
                                    acc = T.alloc_buffer((sets, rt, pv), "float32", scope="global")
                                    for a, i in T.grid(sets, rt):
                                        for j in T.vectorized(pv):
                                            acc[a, i, j] = T.float32(0)
                                    lo: T.let = indptr[br]
                                    for b2 in range((indptr[br + 1] - lo) // sets):
                                        for a in T.unroll(sets):
                                            accumulate(
                                                acc,
                                                a,
                                                xt,
                                                data,
                                                indices,
                                                lo + b2 * sets + a,
                                                r0,
                                                p0,
                                            )
                                    if sets == 2:
                                        if (indptr[br + 1] - lo) % 2 == 1:
                                            accumulate(
                                                acc,
                                                0,
                                                xt,
                                                data,
                                                indices,
                                                indptr[br + 1] - 1,
                                                r0,
                                                p0,
                                            )
                                        for i in T.unroll(rt):
                                            for j in T.vectorized(pv):
                                                acc[0, i, j] = acc[0, i, j] + acc[1, i, j]
                                    for i in T.unroll(rt):
                                        for j in T.vectorized(pv):
                                            stage[(sub * r + r0 * rt + i) * panel + p0 * pv + j] = (
                                                T.max(
                                                    acc[0, i, j] + bias[br * r + r0 * rt + i],
                                                    T.float32(floor),
                                                )
                                            )
                        if g < groups - 1:
                            store_group(stage, rows, Y, row0, full, tail, g, GROUP, 0)
                        else:
                            store_group(
                                stage, rows, Y, row0, full, tail, g, last // G * G, last % G
                            )

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
