"""Fused recurrent kernels with a sparse R: the whole sequence in one call, per-gate formats.

Same contract as the dense kernels of :mod:`.recurrent` (same ``xw`` panel order, states,
outputs and attributes), but R comes from :func:`.recurrent_sparse_pack.pack_sparse`: the
sparse gates in one format (16x1 / 8x1 blocks; SELL-16 or 32-column windows for unstructured
patterns) and the dense gates as dense panels, so seed 000's selective pruning (i, f, o
sparse, c dense) runs in one kernel.

Per panel (every gate of ``unit`` hidden units) the kernel adds R @ h with
:mod:`.recurrent_sparse_gemv` (per sparse entry one lookup of ``h`` and one FMA; dense gates
by broadcast-FMA over their panel), then applies the cell update of :mod:`.recurrent_cells`.
Threads own contiguous panel ranges with balanced stored entries (``bounds``, so a thread's
rows cover whole units). All steps run inside one parallel launch with the spin barrier of
:mod:`.recurrent_llvm_ir` between them (GRU with linear_before_reset=0 has two phases per
step, so two barriers); h is double-buffered.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from . import recurrent_llvm_ir as lir
from .recurrent import finish, kernel_attrs
from .recurrent_cells import (
    ON_STACK,
    assert_full_lengths,
    gru_candidate,
    gru_gates,
    gru_lbr_cell,
    gru_lbr_init,
    load_h0,
    load_xw,
    lstm_cell,
    rnn_cell,
)
from .recurrent_layout import GATES
from .recurrent_sparse_gemv import Group, gemv_macro
from .recurrent_sparse_pack import WINDOW, SparseWeights

_LAYER = {"LSTM": "LSTM", "GRU": "GRU", "GRU0": "GRU", "RNN": "RNN"}


def _zigzag(lo, hi, q, t):
    """Panel ``q`` of a thread's range ``[lo, hi)``, walked backwards on odd steps: each step
    starts with the panels the previous one touched last, still in this core's L2 (15% at
    H = 1024, 90% 16x1)."""
    return lo + q + (t % 2) * (hi - lo - 1 - 2 * q)


def sparse_recurrence(
    weights: SparseWeights,
    seq_len: int,
    batch: int,
    hidden: int,
    *,
    peephole: bool = False,
    reverse: bool = False,
    check_lengths: bool = False,
    dtype: str = "float32",
) -> tirx.PrimFunc:
    """The sparse kernel for ``weights`` (which fix kind, format, gates and thread chunks).

    Parameters
    ----------
    weights
        From :func:`.recurrent_sparse_pack.pack_sparse` for this layer direction.
    seq_len, batch, hidden
        T, B and H.
    peephole, reverse, check_lengths, dtype
        As for the dense kernels (:func:`.recurrent.lstm_recurrence`).

    Returns
    -------
    tvm.tirx.PrimFunc
        As the dense kernel of ``weights.kind``, with the packed R replaced by
        ``weights.arrays()`` (per group: data, index, window, indptr, dense panels, those
        present; then ``bounds``): LSTM ``(xw, *R, p?, h0, c0, lens?) -> (y, h_n, c_n)``; GRU
        lbr=1 ``(xw, *R, rbh, h0, lens?) -> (y, h_n)``; GRU lbr=0 and RNN
        ``(xw, *R, h0, lens?) -> (y, h_n)``. Attribute ``tvm_sparse.format`` names the format.
    """
    if weights.kind == "GRU0":
        return _two_phase(weights, seq_len, batch, hidden, reverse, check_lengths, dtype)
    return _one_phase(weights, seq_len, batch, hidden, peephole, reverse, check_lengths, dtype)


def _present(weights: SparseWeights, suffix: str = "") -> dict:
    grp = weights.groups[int(suffix or 0)]
    sparse = grp.index is not None
    return {
        f"sd{suffix}": sparse,
        f"si{suffix}": sparse,
        f"sw{suffix}": sparse and grp.window is not None,
        f"sp{suffix}": sparse,
        f"rd{suffix}": grp.dense is not None,
    }


def _index(weights: SparseWeights, entries: int) -> tuple[tuple[int, ...], str]:
    """(shape, dtype) of the index array."""
    fmt = weights.fmt
    shape = (entries, fmt.rows) if fmt.per_lane else (entries,)
    return shape, "uint8" if fmt.lookup == "window" else "int32"


def _h_stride(n_pad: int) -> int:
    """Floats per row of the h buffers: whole 32-float windows (the tail stays zero)."""
    return -(-n_pad // WINDOW) * WINDOW


def _one_phase(weights, n_t, n_b, n_h, peephole, reverse, check_lengths, dtype):
    kind, lay = weights.kind, weights.layout
    grp = Group(weights, 0, n_b)
    u, width, n_pad, n_p = grp.unit, grp.width, lay.padded, grp.panels
    n_th, n_g, rr, n_hk = (
        weights.bounds.shape[1] - 1,
        GATES[kind],
        weights.fmt.rows,
        _h_stride(n_pad),
    )
    rev, masked = int(reverse), n_pad != n_h
    attrs = kernel_attrs(_LAYER[kind], kind, reverse) | {"tvm_sparse.format": weights.fmt.name}
    bt, n_tiles, tail = grp.rows, n_b // grp.rows, n_b % grp.rows
    n_e, n_d, n_sl = grp.entries, max(1, len(grp.dense)), grp.slices
    (si_shape, si_dtype) = _index(weights, n_e)
    gemv = gemv_macro(weights, grp, n_h, n_b, n_hk)
    is_lstm, is_gru = kind == "LSTM", kind == "GRU"

    @T.inline
    def panel(xw, w, peep, rbh, h, c, y, t, tt, p, b0, rows):
        acc = T.alloc_buffer((rows, width), dtype, annotations=ON_STACK)
        if is_gru:
            gru_lbr_init(acc, xw, rbh, tt, p, b0, rows, u, width)
        else:
            load_xw(acc, xw, tt, b0, rows, p * width, width)
        gemv(acc, w, h, t % 2, p, b0, rows)
        if is_lstm:
            lstm_cell(acc, peep, h, c, y, t, tt, p, b0, rows, u, n_h, masked, peephole)
        elif is_gru:
            gru_lbr_cell(acc, xw, h, y, t, tt, p, b0, rows, u, width, n_h, masked)
        else:
            rnn_cell(acc, h, y, t, tt, p, b0, rows, u, n_h, masked)

    @T.prim_func(s_tir=True)
    def sparse_recurrence(
        xw: T.Buffer((n_t, n_b, n_g * n_pad), dtype),
        sd: T.Buffer((n_e, rr), dtype),
        si: T.Buffer(si_shape, si_dtype),
        sw: T.Buffer((n_e,), "int32"),
        sp: T.Buffer((n_sl + 1,), "int32"),
        rd: T.Buffer((n_p, n_h, n_d * u), dtype),
        bounds: T.Buffer((1, n_th + 1), "int32"),
        peep: T.Buffer((3, n_pad), dtype),
        rbh: T.Buffer((1, n_pad), dtype),
        h0: T.Buffer((n_b, n_h), dtype),
        c0: T.Buffer((n_b, n_h), dtype),
        lens: T.Buffer((n_b,), "int32"),
        y: T.Buffer((n_t, n_b, n_h), dtype),
        hn: T.Buffer((n_b, n_h), dtype),
        cn: T.Buffer((n_b, n_h), dtype),
    ):
        T.func_attr(attrs)
        h = T.alloc_buffer((2, n_b, n_hk), dtype)
        c = T.alloc_buffer((n_b, n_pad), dtype)
        sync = T.alloc_buffer((n_th * lir.STRIDE,), "int32")
        if check_lengths:
            assert_full_lengths(lens, n_b, n_t)
        for k, b, m in T.grid(2, n_b, n_hk):
            h[k, b, m] = T.cast(0, dtype)
        load_h0(h, h0, n_b, n_h, n_pad, dtype)
        if is_lstm:
            for b, m in T.grid(n_b, n_pad):
                c[b, m] = T.if_then_else(m < n_h, c0[b, m], T.cast(0, dtype))
        for i in range(n_th * lir.STRIDE):
            sync[i] = 0
        with T.attr(0, lir.IMPORT, lir.LLVM_IR):
            with T.attr(0, "pragma_parallel_launch_point", 1):
                for t in range(n_t):
                    tt: T.let = t + rev * (n_t - 1 - 2 * t)
                    for th in T.parallel(n_th):
                        T.evaluate(lir.wait(sync, n_th, t))
                        for q in range(bounds[0, th + 1] - bounds[0, th]):
                            p: T.let = _zigzag(bounds[0, th], bounds[0, th + 1], q, t)
                            for bo in range(n_tiles):
                                panel(
                                    xw, (sd, si, sw, sp, rd), peep, rbh, h, c, y, t, tt, p,
                                    bo * bt, bt,
                                )  # fmt: skip
                            if tail > 0:
                                panel(
                                    xw, (sd, si, sw, sp, rd), peep, rbh, h, c, y, t, tt, p,
                                    n_tiles * bt, tail,
                                )  # fmt: skip
                        T.evaluate(lir.arrive(sync, th, t + 1))
        for b, m in T.grid(n_b, n_h):
            hn[b, m] = h[n_t % 2, b, m]
            if is_lstm:
                cn[b, m] = c[b, m]

    present = _present(weights) | {
        "peep": kind == "LSTM" and peephole,
        "rbh": kind == "GRU",
        "c0": kind == "LSTM",
        "cn": kind == "LSTM",
        "lens": check_lengths,
    }
    return finish(sparse_recurrence, **present)


def _two_phase(weights, n_t, n_b, n_h, reverse, check_lengths, dtype):
    lay = weights.layout
    g1, g2 = Group(weights, 0, n_b), Group(weights, 1, n_b)
    u, u2, n_pad, n_p, n_p2 = g1.unit, g2.unit, lay.padded, g1.panels, g2.panels
    n_th, rr, n_hk = weights.bounds.shape[1] - 1, weights.fmt.rows, _h_stride(n_pad)
    rev, masked = int(reverse), n_pad != n_h
    attrs = kernel_attrs("GRU", "GRU0", reverse) | {"tvm_sparse.format": weights.fmt.name}
    bt = min(g1.rows, g2.rows)
    n_tiles, tail = n_b // bt, n_b % bt
    e1, e2, n_sl1, n_sl2 = g1.entries, g2.entries, g1.slices, g2.slices
    d1, d2 = max(1, len(g1.dense)), max(1, len(g2.dense))
    (si0_shape, si_dtype), (si1_shape, _) = _index(weights, e1), _index(weights, e2)
    gemv1 = gemv_macro(weights, g1, n_h, n_b, n_hk)
    gemv2 = gemv_macro(weights, g2, n_h, n_b, n_hk)

    @T.inline
    def gates(xw, w, h, rh, z, t, tt, p, b0, rows):
        acc = T.alloc_buffer((rows, 2 * u), dtype, annotations=ON_STACK)
        load_xw(acc, xw, tt, b0, rows, p * 2 * u, 2 * u)
        gemv1(acc, w, h, t % 2, p, b0, rows)
        gru_gates(acc, h, rh, z, t, p, b0, rows, u)

    @T.inline
    def candidate(xw, w, h, rh, z, y, t, tt, p, b0, rows):
        acc = T.alloc_buffer((rows, u2), dtype, annotations=ON_STACK)
        load_xw(acc, xw, tt, b0, rows, 2 * n_pad + p * u2, u2)
        gemv2(acc, w, rh, 0, p, b0, rows)
        gru_candidate(acc, h, z, y, t, tt, p, b0, rows, u2, n_h, masked)

    @T.prim_func(s_tir=True)
    def sparse_recurrence(
        xw: T.Buffer((n_t, n_b, 3 * n_pad), dtype),
        sd0: T.Buffer((e1, rr), dtype),
        si0: T.Buffer(si0_shape, si_dtype),
        sw0: T.Buffer((e1,), "int32"),
        sp0: T.Buffer((n_sl1 + 1,), "int32"),
        rd0: T.Buffer((n_p, n_h, d1 * u), dtype),
        sd1: T.Buffer((e2, rr), dtype),
        si1: T.Buffer(si1_shape, si_dtype),
        sw1: T.Buffer((e2,), "int32"),
        sp1: T.Buffer((n_sl2 + 1,), "int32"),
        rd1: T.Buffer((n_p2, n_h, d2 * u2), dtype),
        bounds: T.Buffer((2, n_th + 1), "int32"),
        h0: T.Buffer((n_b, n_h), dtype),
        lens: T.Buffer((n_b,), "int32"),
        y: T.Buffer((n_t, n_b, n_h), dtype),
        hn: T.Buffer((n_b, n_h), dtype),
    ):
        T.func_attr(attrs)
        h = T.alloc_buffer((2, n_b, n_hk), dtype)
        rh = T.alloc_buffer((1, n_b, n_hk), dtype)
        z = T.alloc_buffer((n_b, n_pad), dtype)
        sync = T.alloc_buffer((n_th * lir.STRIDE,), "int32")
        if check_lengths:
            assert_full_lengths(lens, n_b, n_t)
        for k, b, m in T.grid(2, n_b, n_hk):
            h[k, b, m] = T.cast(0, dtype)
        for b, m in T.grid(n_b, n_hk):
            rh[0, b, m] = T.cast(0, dtype)
        load_h0(h, h0, n_b, n_h, n_pad, dtype)
        for i in range(n_th * lir.STRIDE):
            sync[i] = 0
        with T.attr(0, lir.IMPORT, lir.LLVM_IR):
            with T.attr(0, "pragma_parallel_launch_point", 1):
                for t in range(n_t):
                    tt: T.let = t + rev * (n_t - 1 - 2 * t)
                    for th in T.parallel(n_th):
                        T.evaluate(lir.wait(sync, n_th, 2 * t))
                        for q in range(bounds[0, th + 1] - bounds[0, th]):
                            p: T.let = _zigzag(bounds[0, th], bounds[0, th + 1], q, t)
                            for bo in range(n_tiles):
                                gates(
                                    xw, (sd0, si0, sw0, sp0, rd0), h, rh, z, t, tt, p, bo * bt, bt
                                )
                            if tail > 0:
                                gates(
                                    xw, (sd0, si0, sw0, sp0, rd0), h, rh, z, t, tt, p,
                                    n_tiles * bt, tail,
                                )  # fmt: skip
                        T.evaluate(lir.arrive(sync, th, 2 * t + 1))
                    for th in T.parallel(n_th):
                        T.evaluate(lir.wait(sync, n_th, 2 * t + 1))
                        for q in range(bounds[1, th + 1] - bounds[1, th]):
                            p: T.let = _zigzag(bounds[1, th], bounds[1, th + 1], q, t)
                            for bo in range(n_tiles):
                                candidate(
                                    xw, (sd1, si1, sw1, sp1, rd1), h, rh, z, y, t, tt, p,
                                    bo * bt, bt,
                                )  # fmt: skip
                            if tail > 0:
                                candidate(
                                    xw, (sd1, si1, sw1, sp1, rd1), h, rh, z, y, t, tt, p,
                                    n_tiles * bt, tail,
                                )  # fmt: skip
                        T.evaluate(lir.arrive(sync, th, 2 * t + 2))
        for b, m in T.grid(n_b, n_h):
            hn[b, m] = h[n_t % 2, b, m]

    return finish(
        sparse_recurrence, **_present(weights, "0"), **_present(weights, "1"), lens=check_lengths
    )
