"""Fused int8 LSTM kernels with AVX512-VNNI: ONNX Runtime's DynamicQuantizeLSTM over time.

ORT's quantized LSTM quantizes h to uint8 at every step from h's own range (one scale and
zero point for the whole [B, H] state), multiplies it with the int8 recurrent weight in
int32, and scales the product by ``h_scale * r_scale`` in float32 before the gates. The
kernel here runs a whole direction in one call, like the float kernels of :mod:`.recurrent`:
each step is one parallel loop over panels (every gate of ``unit`` hidden units), and each
thread first quantizes the previous h itself into a stack buffer (a few hundred vector
instructions, cheaper than a second barrier per step).

The recurrent product is a GEMV with its lanes over the panel's output columns: per group of
4 hidden inputs, one broadcast 32-bit word of quantized h feeds ``vpdpbusd`` on 16 columns x
4 weight bytes (R packed ``[panels, H / 4, 4 * unit, 4]``), so every weight byte is used for
each batch row of a tile. The block-sparse variant keeps, per 16-column vector of a panel,
only the nonzero 16x4 blocks (16 outputs x 4 inputs: the reduction dimension of a block is
the 4 bytes one lane of ``vpdpbusd`` sums) with their input-quad indices; its lists are split
in two halves walked side by side, so two accumulator chains hide the instruction's latency.

``zp * colsum(R)`` corrects for h's zero point (the uint8 operand is ``q = q_signed + zp``).
Float arithmetic follows the order of ORT's kernel: ``(xw + rec)``, then the i/f peepholes,
then the bias, then the o peephole with the new c.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from tvm_sparse._compat import ATTR_NOALIAS, ATTR_SCHEDULED

from .common import ON_STACK
from .int8_vnni import GROUP, LANES, broadcast_word, vpdpbusd
from .recurrent import _thread_chunks, finish, kernel_attrs
from .recurrent_cells import lstm_cell

GATES = 4
KIND = "LSTM_INT8"  #: the kernels' ``tvm_sparse.kind``
SPARSE_FORMAT = "int8bsr16x4"  #: the sparse kernel's ``tvm_sparse.format``
#: zmm accumulators a tile of batch rows may hold (of 32 registers; the rest for operands)
ACC_VECTORS = 24
#: The quantized h of one step stays on each thread's stack up to this many bytes.
STACK_BYTES = 1 << 17


def dot(acc, word, w):
    """The lanes-over-columns step: the activation word (4 uint8 inputs) broadcast to every
    column, times each column's 4 int8 weights in ``w``."""
    return vpdpbusd(acc, broadcast_word(word, "uint8"), w)


def fits_int8(values: np.ndarray) -> bool:
    """Whether integer weights (zero point subtracted) fit the int8 operand of vpdpbusd."""
    return bool(values.min() >= -128 and values.max() <= 127)


def panel_unit(hidden: int) -> int | None:
    """Hidden units per panel (32, or 16 when H is not a multiple of 32); None when H is not
    a multiple of 16 (such layers keep the float path)."""
    for unit in (32, 16):
        if hidden % unit == 0:
            return unit
    return None


def _columns(hidden: int, unit: int) -> np.ndarray:
    """ONNX column (gate g, unit m -> g * H + m) of every packed column, [panels, 4 * unit]."""
    n_p = hidden // unit
    p, g, j = np.meshgrid(np.arange(n_p), np.arange(GATES), np.arange(unit), indexing="ij")
    return (g * hidden + p * unit + j).reshape(n_p, GATES * unit)


@dataclass
class PackedInt8R:
    """R of one direction for the int8 kernels (`values` as the kernel reads them)."""

    unit: int
    values: np.ndarray  # dense: [panels, H/4, width * 4] int8; sparse: [blocks, 64] int8
    colsum: np.ndarray  # [panels, width] int32: column sums of R (zero-point correction)
    indptr: np.ndarray | None = None  # sparse: [panels * width / 16 + 1] int32
    indices: np.ndarray | None = None  # sparse: [blocks] int32, the input quad of each block

    @property
    def blocks(self) -> int:
        return 0 if self.indptr is None else int(self.indptr[-1])


def pack_r(r: np.ndarray, unit: int, sparse: bool = False) -> PackedInt8R:
    """Pack R ([H, 4H], input rows first as DynamicQuantizeLSTM stores it, zero point already
    subtracted, values in int8 range) for :func:`lstm_int8_recurrence`."""
    r = np.asarray(r)
    hidden = r.shape[0]
    if r.shape != (hidden, GATES * hidden) or hidden % unit:
        raise ValueError(f"R of shape {r.shape} does not fit panels of {unit} units")
    if not fits_int8(r):
        raise ValueError("R does not fit int8")
    cols = _columns(hidden, unit)
    n_p, width = cols.shape
    # [H, panels, width] -> [panels, H/4, width, 4]
    panels = r[:, cols].reshape(hidden // GROUP, GROUP, n_p, width).transpose(2, 0, 3, 1)
    colsum = r.astype(np.int64).sum(axis=0)[cols].astype(np.int32)
    if not sparse:
        return PackedInt8R(
            unit, np.ascontiguousarray(panels, np.int8).reshape(n_p, -1, width * 4), colsum
        )
    # [panels, H/4, width/16, 16, 4] -> per (panel, vector): the nonzero 16x4 blocks in k order
    vec = panels.reshape(n_p, hidden // GROUP, width // LANES, LANES * GROUP).transpose(0, 2, 1, 3)
    vec = vec.reshape(n_p * (width // LANES), hidden // GROUP, LANES * GROUP)
    nonzero = np.any(vec != 0, axis=2)
    counts = nonzero.sum(axis=1)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    rows, quads = np.nonzero(nonzero)
    values = vec[rows, quads].astype(np.int8)
    if values.size == 0:  # an all-zero R: one unused block keeps the arrays non-empty
        values, quads = np.zeros((1, LANES * GROUP), np.int8), np.zeros(1, np.int64)
    return PackedInt8R(
        unit, values.reshape(-1, LANES * GROUP), colsum, indptr, quads.astype(np.int32)
    )


def unpack_r(values: np.ndarray, hidden: int) -> np.ndarray:
    """R ([H, 4H] int8) back from the dense packing of :func:`pack_r`."""
    unit = panel_unit(hidden)
    cols = _columns(hidden, unit)
    n_p, width = cols.shape
    panels = np.asarray(values).reshape(n_p, hidden // GROUP, width, GROUP).transpose(1, 3, 0, 2)
    r = np.empty((hidden, GATES * hidden), np.int8)
    r[:, cols] = panels.reshape(hidden, n_p, width)
    return r


def pack_columns(v: np.ndarray, hidden: int, unit: int) -> np.ndarray:
    """A per-column vector ([4H], ONNX gate order; or a scalar) as [panels, width] float32."""
    v = np.asarray(v, np.float32)
    if v.size == 1:
        v = np.full(GATES * hidden, v.reshape(()), np.float32)
    return np.ascontiguousarray(v.reshape(-1)[_columns(hidden, unit)])


def block_fraction(r: np.ndarray, unit: int) -> float:
    """Share of R's 16x4 blocks (16 packed columns x 4 inputs) that are all zero."""
    packed = pack_r(r, unit, sparse=True)
    total = (r.shape[0] // GROUP) * (r.shape[1] // LANES)
    return 1.0 - packed.blocks / total


def _rows_per_tile(batch: int, vectors: int) -> int:
    return max(1, min(batch, ACC_VECTORS // vectors))


def lstm_int8_recurrence(
    seq_len: int,
    batch: int,
    hidden: int,
    *,
    blocks: int | None = None,
    peephole: bool = False,
    reverse: bool = False,
    threads: int | None = None,
) -> tirx.PrimFunc:
    """One DynamicQuantizeLSTM direction over all time steps.

    Parameters
    ----------
    seq_len, batch, hidden
        T, B and H (H a multiple of 16: :func:`panel_unit`).
    blocks
        None: dense R. Otherwise the number of nonzero 16x4 blocks of the sparse R
        (:func:`pack_r` with ``sparse=True``).
    peephole, reverse, threads
        As in :func:`tvm_sparse.schedules.recurrent.lstm_recurrence`.

    Returns
    -------
    tvm.tirx.PrimFunc
        ``(xw [T, B, 4H] (X's quantized product, ONNX gate order, no bias), r..., colsum,
        rscale [panels, width], bias [4H], p? [3, H], h0 [B, H], c0 [B, H]) -> (y [T, B, H],
        h_n, c_n)``; ``r...`` is ``r [panels, H/4, width * 4]`` (dense) or ``values [blocks,
        64], indptr, indices`` (sparse), from :func:`pack_r`.
    """
    unit = panel_unit(hidden)
    if unit is None:
        raise ValueError(f"hidden size {hidden} is not a multiple of 16")
    n_t, n_b, n_h, u = seq_len, batch, hidden, unit
    width, n_p, n_kq = GATES * unit, hidden // unit, hidden // GROUP
    n_v = width // LANES
    sparse = blocks is not None
    n_blk = max(int(blocks or 0), 1)
    rev = int(reverse)
    # two accumulator chains per vector in the sparse kernel
    bt = _rows_per_tile(n_b, n_v * (2 if sparse else 1))
    n_tiles, tail = n_b // bt, n_b % bt
    n_th, per = _thread_chunks(n_p, threads)
    q_scope = ON_STACK if n_b * n_h <= STACK_BYTES else None
    attrs = kernel_attrs("LSTM", KIND, reverse)
    if sparse:
        attrs["tvm_sparse.format"] = SPARSE_FORMAT
    zero_f = T.float32(0)

    def word(q, b, kq):
        return T.reinterpret("int32", q.vload([b * n_h + kq * GROUP], "uint8x4"))

    @T.macro
    def quantize(h, q, stat, s):
        # ORT's dynamic quantization of h[s] (all of [B, H]): range including 0, scale
        # range / 255 (1 if empty), zero point and values rounded half to even
        for j in T.vectorized(LANES):
            stat[0, j] = zero_f
            stat[1, j] = zero_f
        for b, k16 in T.grid(n_b, n_h // LANES):
            for j in T.vectorized(LANES):
                stat[0, j] = T.min(stat[0, j], h[s, b, k16 * LANES + j])
                stat[1, j] = T.max(stat[1, j], h[s, b, k16 * LANES + j])
        for j in range(1, LANES):
            stat[0, 0] = T.min(stat[0, 0], stat[0, j])
            stat[1, 0] = T.max(stat[1, 0], stat[1, j])
        stat[1, 1] = stat[1, 0] - stat[0, 0]
        stat[1, 1] = T.if_then_else(stat[1, 1] == zero_f, T.float32(1), stat[1, 1] / T.float32(255))
        stat[0, 1] = tirx.nearbyint(T.min(T.max(-stat[0, 0] / stat[1, 1], zero_f), T.float32(255)))
        for b, k16 in T.grid(n_b, n_h // LANES):
            for j in T.vectorized(LANES):
                q[b * n_h + k16 * LANES + j] = T.Cast(
                    "uint8",
                    T.min(
                        T.max(
                            tirx.nearbyint(h[s, b, k16 * LANES + j] / stat[1, 1]) + stat[0, 1],
                            zero_f,
                        ),
                        T.float32(255),
                    ),
                )

    @T.macro
    def dense_gemv(acc, r, q, p, b0, rows):
        for kq in range(n_kq):
            for i in T.unroll(rows):
                for v in T.unroll(n_v):
                    acc[i, v * LANES : v * LANES + LANES] = dot(
                        acc.vload([i, v * LANES], "int32x16"),
                        word(q, b0 + i, kq),
                        r.vload([p, kq, v * LANES * GROUP], "int8x64"),
                    )

    @T.macro
    def sparse_gemv(acc, values, indptr, indices, q, p, b0, rows):
        # acc[i, 0:width] and acc[i, width:2 width] take the two halves of each list
        for v in range(n_v):
            lo: T.int32 = indptr[p * n_v + v]
            half: T.int32 = (indptr[p * n_v + v + 1] - lo) // 2
            for e in range(half):
                for i in T.unroll(rows):
                    acc[i, v * LANES : v * LANES + LANES] = dot(
                        acc.vload([i, v * LANES], "int32x16"),
                        word(q, b0 + i, indices[lo + e]),
                        values.vload([lo + e, 0], "int8x64"),
                    )
                    acc[i, width + v * LANES : width + v * LANES + LANES] = dot(
                        acc.vload([i, width + v * LANES], "int32x16"),
                        word(q, b0 + i, indices[lo + half + e]),
                        values.vload([lo + half + e, 0], "int8x64"),
                    )
            if indptr[p * n_v + v + 1] - lo > 2 * half:  # odd length: the last block
                for i in T.unroll(rows):
                    acc[i, v * LANES : v * LANES + LANES] = dot(
                        acc.vload([i, v * LANES], "int32x16"),
                        word(q, b0 + i, indices[lo + 2 * half]),
                        values.vload([lo + 2 * half, 0], "int8x64"),
                    )
        for i, j in T.grid(rows, width):
            acc[i, j] = acc[i, j] + acc[i, width + j]

    @T.macro
    def cell(acc, g, xw, colsum, rscale, bias, peep, h, c, y, stat, t, tt, p, b0, rows):
        for i in range(rows):
            for gate in range(GATES):
                for j in T.vectorized(u):
                    g[i, gate * u + j] = xw[tt, b0 + i, gate * n_h + p * u + j] + T.Cast(
                        "float32",
                        acc[i, gate * u + j]
                        - T.Cast("int32", stat[0, 1]) * colsum[p, gate * u + j],
                    ) * (stat[1, 1] * rscale[p, gate * u + j])
        lstm_cell(g, peep, h, c, y, t, tt, p, b0, rows, u, n_h, False, peephole, bias)

    acc_cols = 2 * width if sparse else width

    @T.macro
    def rows_step(
        xw,
        r,
        values,
        indptr,
        indices,
        colsum,
        rscale,
        bias,
        peep,
        h,
        c,
        y,
        q,
        stat,
        t,
        tt,
        p,
        b0,
        rows,
    ):
        acc = T.alloc_buffer((rows, acc_cols), "int32", annotations=ON_STACK)
        g = T.alloc_buffer((rows, width), "float32", annotations=ON_STACK)
        for i, j in T.grid(rows, acc_cols):
            acc[i, j] = 0
        if sparse:
            sparse_gemv(acc, values, indptr, indices, q, p, b0, rows)
        else:
            dense_gemv(acc, r, q, p, b0, rows)
        cell(acc, g, xw, colsum, rscale, bias, peep, h, c, y, stat, t, tt, p, b0, rows)

    @T.prim_func(s_tir=True)
    def lstm_int8_recurrence(
        xw: T.Buffer((n_t, n_b, GATES * n_h), "float32"),
        r: T.Buffer((n_p, n_kq, width * GROUP), "int8"),
        values: T.Buffer((n_blk, LANES * GROUP), "int8"),
        indptr: T.Buffer((n_p * n_v + 1,), "int32"),
        indices: T.Buffer((n_blk,), "int32"),
        colsum: T.Buffer((n_p, width), "int32"),
        rscale: T.Buffer((n_p, width), "float32"),
        bias: T.Buffer((GATES * n_h,), "float32"),
        peep: T.Buffer((3, n_h), "float32"),
        h0: T.Buffer((n_b, n_h), "float32"),
        c0: T.Buffer((n_b, n_h), "float32"),
        y: T.Buffer((n_t, n_b, n_h), "float32"),
        hn: T.Buffer((n_b, n_h), "float32"),
        cn: T.Buffer((n_b, n_h), "float32"),
    ):
        T.func_attr(attrs)
        h = T.alloc_buffer((2, n_b, n_h), "float32")
        c = T.alloc_buffer((n_b, n_h), "float32")
        for b, m in T.grid(n_b, n_h):
            h[0, b, m] = h0[b, m]
            c[b, m] = c0[b, m]
        for t in range(n_t):
            tt = t + rev * (n_t - 1 - 2 * t)
            for th in T.parallel(n_th):
                q = T.alloc_buffer((n_b * n_h,), "uint8", annotations=q_scope)
                stat = T.alloc_buffer((2, LANES), "float32", annotations=ON_STACK)
                quantize(h, q, stat, t % 2)
                for qq in range(per):
                    p = th * per + qq + (t % 2) * (per - 1 - 2 * qq)
                    for bo in range(n_tiles):
                        rows_step(
                            xw,
                            r,
                            values,
                            indptr,
                            indices,
                            colsum,
                            rscale,
                            bias,
                            peep,
                            h,
                            c,
                            y,
                            q,
                            stat,
                            t,
                            tt,
                            p,
                            bo * bt,
                            bt,
                        )
                    if tail > 0:
                        rows_step(
                            xw,
                            r,
                            values,
                            indptr,
                            indices,
                            colsum,
                            rscale,
                            bias,
                            peep,
                            h,
                            c,
                            y,
                            q,
                            stat,
                            t,
                            tt,
                            p,
                            n_tiles * bt,
                            tail,
                        )
        for b, m in T.grid(n_b, n_h):
            hn[b, m] = h[n_t % 2, b, m]
            cn[b, m] = c[b, m]

    return finish(
        lstm_int8_recurrence,
        r=not sparse,
        values=sparse,
        indptr=sparse,
        indices=sparse,
        peep=peephole,
    )


#: output columns of one projection panel (8 accumulator vectors per activation row)
PROJECTION_COLUMNS = 128


def pack_projection(w: np.ndarray) -> np.ndarray:
    """W ([K, N], zero point subtracted, int8 range; K and N multiples of 4 and 16) as
    :func:`int8_projection` reads it: ``[N / 16, K / 4, 64]``, 16 columns x 4 inputs per row."""
    k, n = w.shape
    if k % GROUP or n % LANES:
        raise ValueError(f"W of shape {w.shape}: K must be a multiple of 4 and N of 16")
    if not fits_int8(w):
        raise ValueError("W does not fit int8")
    tiles = np.asarray(w).reshape(k // GROUP, GROUP, n // LANES, LANES).transpose(2, 0, 3, 1)
    return np.ascontiguousarray(tiles, np.int8).reshape(n // LANES, k // GROUP, LANES * GROUP)


def int8_projection(m: int, k: int, n: int, threads: int | None = None) -> tirx.PrimFunc:
    """ORT's quantized GEMM of DynamicQuantizeLSTM's input: ``y = float32(q @ W - zp *
    colsum(W)) * (x_scale * w_scale)`` for uint8 ``q`` [m, k] with a run-time scale and zero
    point ([1] each), W packed by :func:`pack_projection`, per-column ``colsum`` and
    ``w_scale`` [n]. Lanes over output columns, as in the recurrent kernels: a panel of 128
    columns (128 x k bytes of W, in L2) is swept over every row, 3 rows (24 accumulators) at
    a time."""
    n_v = min(PROJECTION_COLUMNS, n) // LANES
    while (n // LANES) % n_v:
        n_v -= 1
    n_p, n_kq = n // (n_v * LANES), k // GROUP
    rows = _rows_per_tile(m, n_v)
    n_tiles, tail = m // rows, m % rows
    chunks, per = _thread_chunks(n_p, threads)

    @T.macro
    def tile(q, w, colsum, wscale, xscale, xzp, y, p, r0, nr):
        acc = T.alloc_buffer((nr, n_v * LANES), "int32", annotations=ON_STACK)
        for i, j in T.grid(nr, n_v * LANES):
            acc[i, j] = 0
        for kq in range(n_kq):
            for i in T.unroll(nr):
                for v in T.unroll(n_v):
                    acc[i, v * LANES : v * LANES + LANES] = dot(
                        acc.vload([i, v * LANES], "int32x16"),
                        T.reinterpret("int32", q.vload([r0 + i, kq * GROUP], "uint8x4")),
                        w.vload([p * n_v + v, kq, 0], "int8x64"),
                    )
        for i in range(nr):
            for j in T.vectorized(n_v * LANES):
                y[r0 + i, p * n_v * LANES + j] = T.Cast(
                    "float32",
                    acc[i, j] - T.Cast("int32", xzp[0]) * colsum[p * n_v * LANES + j],
                ) * (xscale[0] * wscale[p * n_v * LANES + j])

    @T.prim_func(s_tir=True)
    def int8_projection(
        q: T.Buffer((m, k), "uint8"),
        xscale: T.Buffer((1,), "float32"),
        xzp: T.Buffer((1,), "uint8"),
        w: T.Buffer((n // LANES, n_kq, LANES * GROUP), "int8"),
        colsum: T.Buffer((n,), "int32"),
        wscale: T.Buffer((n,), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({ATTR_NOALIAS: True, ATTR_SCHEDULED: True})
        for ch in T.parallel(chunks):
            for pp in range(per):
                for t in range(n_tiles):
                    tile(q, w, colsum, wscale, xscale, xzp, y, ch * per + pp, t * rows, rows)
                if tail > 0:
                    tile(q, w, colsum, wscale, xscale, xzp, y, ch * per + pp, n_tiles * rows, tail)

    return int8_projection
