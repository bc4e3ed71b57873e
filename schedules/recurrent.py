"""Fused recurrent kernels: one PrimFunc runs a whole LSTM, GRU or RNN direction over time.

Each kernel takes the input projection ``xw`` (X·Wᵀ + biases for all time steps, computed by
an ordinary matmul outside) and loops over time inside one call. A time step is a parallel
loop over *panels*: a panel holds every gate of ``unit`` hidden units, so the thread that
computes a panel's gate pre-activations also applies the cell update to those units. The
recurrent product is a broadcast-FMA vectorised over the panel's outputs, reading R packed
as ``[panels, hidden, gates * unit]``, for a tile of batch rows at once (every R vector
loaded feeds each row); the accumulator tile is a stack array that LLVM keeps in registers.
The end of the parallel loop is the barrier between steps; h is double-buffered so no thread
reads a value being overwritten. Each thread walks its panels backwards on odd steps,
starting with those still in its L2.

Layouts and weight packing live in :mod:`.recurrent_layout`, the activations and cell updates
in :mod:`.recurrent_cells` (both re-exported here); the block-sparse variants of these kernels
in :mod:`.recurrent_sparse`.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from tvm_sparse._compat import ATTR_NOALIAS, ATTR_SCHEDULED
from tvm_sparse.target import num_cores

from .recurrent_cells import (  # noqa: F401 - re-exported
    ON_STACK,
    assert_full_lengths,
    fast_exp,
    fast_sigmoid,
    fast_tanh,
    gru_candidate,
    gru_gates,
    gru_lbr_cell,
    gru_lbr_init,
    load_h0,
    load_xw,
    lstm_cell,
    rnn_cell,
)
from .recurrent_layout import (  # noqa: F401 - re-exported
    ACC_FLOATS,
    GATES,
    PANEL_UNITS,
    GateGroup,
    NumpyOps,
    PackedWeights,
    PanelLayout,
    kernel_kind,
    onnx_rows,
    pack_bias,
    pack_input_weight,
    pack_recurrent_weight,
    pack_vector,
    pack_weights,
    panel_layout,
    tile_rows,
    unpack_recurrent_weight,
)


def kernel_attrs(layer: str, kind: str, reverse: bool) -> dict:
    """Function attributes of every recurrent kernel, dense or sparse: ``tvm_sparse.kind`` is
    the kernel (and panel layout) kind, "GRU0" for GRU with linear_before_reset=0."""
    return {
        "tvm_sparse.layer": layer,
        "tvm_sparse.kind": kind,
        "tvm_sparse.direction": "reverse" if reverse else "forward",
        ATTR_NOALIAS: True,
        ATTR_SCHEDULED: True,
    }


def finish(func: tirx.PrimFunc, **present: bool) -> tirx.PrimFunc:
    """Drop the optional parameters that are not ``present``: each kernel is written once in
    TVMScript with all of them, and the variants without one never touch it."""
    params = [p for p in func.params if present.get(p.name, True)]
    return tirx.PrimFunc(params, func.body, func.ret_type, func.attrs)


def _thread_chunks(panels: int, threads: int | None) -> tuple[int, int]:
    """(chunks, panels per chunk): one chunk per thread when they divide evenly, else one
    panel per chunk (plain parallel loop, no zig-zag)."""
    threads = threads or num_cores()
    return (threads, panels // threads) if panels % threads == 0 else (panels, 1)


def _batch_tiles(batch: int, width: int) -> tuple[int, int, int]:
    """(rows per tile, whole tiles, rows in the last partial tile) for ``width``-float panels."""
    rows = tile_rows(batch, width)
    return rows, batch // rows, batch % rows


@T.inline
def _gemv(acc, r, p, h, s, b0, rows, n_k, width):
    """acc[i, 0:width] += h[s, b0 + i, :] @ r[p]: per k, one R load feeds ``rows`` FMAs."""
    for k in range(n_k):
        for i in T.unroll(rows):
            for j in T.vectorized(width):
                acc[i, j] = acc[i, j] + h[s, b0 + i, k] * r[p, k, j]


def lstm_recurrence(
    seq_len: int,
    batch: int,
    hidden: int,
    *,
    peephole: bool = False,
    reverse: bool = False,
    check_lengths: bool = False,
    threads: int | None = None,
    dtype: str = "float32",
) -> tirx.PrimFunc:
    """One LSTM direction over all time steps (ONNX semantics, default activations).

    Parameters
    ----------
    seq_len, batch, hidden
        T, B and H.
    peephole
        Take peephole weights ``p`` ([3, padded]: i, o, f, from :func:`pack_vector`).
    reverse
        Run from the last time step to the first (Y keeps the input's time order).
    check_lengths
        Take ``lens`` ([B] int32, ONNX sequence_lens) and fail unless every entry is T.
    threads
        Threads the panels are divided among (default: the cores of this machine). Each
        thread walks its panels backwards on odd steps, starting with those still in its L2
        from the previous step (10-20% faster at H = 1024). Any run-time thread count gives
        the same results.
    dtype
        Only "float32" has been checked for accuracy.

    Returns
    -------
    tvm.tirx.PrimFunc
        ``(xw [T, B, 4 * padded], r [panels, H, 4 * unit], p?, h0 [B, H], c0 [B, H], lens?)
        -> (y [T, B, H], h_n [B, H], c_n [B, H])``, packed as ``panel_layout("LSTM", H, B)``.
    """
    lay = panel_layout("LSTM", hidden, batch)
    u, width, n_p = lay.groups[0].unit, lay.groups[0].width, lay.panels(0)
    n_t, n_b, n_h, n_pad = seq_len, batch, hidden, lay.padded
    rev, masked, attrs = int(reverse), n_pad != hidden, kernel_attrs("LSTM", "LSTM", reverse)
    bt, n_tiles, tail = _batch_tiles(n_b, width)
    n_th, per = _thread_chunks(n_p, threads)

    @T.inline
    def rows_step(xw, r, peep, h, c, y, t, tt, p, b0, rows):
        # acc[i]: the gate pre-activations i | o | f | c of units p * u ... p * u + u - 1.
        acc = T.alloc_buffer((rows, width), dtype, annotations=ON_STACK)
        load_xw(acc, xw, tt, b0, rows, p * width, width)
        _gemv(acc, r, p, h, t % 2, b0, rows, n_h, width)
        lstm_cell(acc, peep, h, c, y, t, tt, p, b0, rows, u, n_h, masked, peephole)

    @T.prim_func(s_tir=True)
    def lstm_recurrence(
        xw: T.Buffer((n_t, n_b, 4 * n_pad), dtype),
        r: T.Buffer((n_p, n_h, width), dtype),
        peep: T.Buffer((3, n_pad), dtype),
        h0: T.Buffer((n_b, n_h), dtype),
        c0: T.Buffer((n_b, n_h), dtype),
        lens: T.Buffer((n_b,), "int32"),
        y: T.Buffer((n_t, n_b, n_h), dtype),
        hn: T.Buffer((n_b, n_h), dtype),
        cn: T.Buffer((n_b, n_h), dtype),
    ):
        T.func_attr(attrs)
        h = T.alloc_buffer((2, n_b, n_pad), dtype)
        c = T.alloc_buffer((n_b, n_pad), dtype)
        if check_lengths:
            assert_full_lengths(lens, n_b, n_t)
        load_h0(h, h0, n_b, n_h, n_pad, dtype)
        for b, m in T.grid(n_b, n_pad):
            c[b, m] = T.if_then_else(m < n_h, c0[b, m], T.cast(0, dtype))
        for t in range(n_t):
            tt = t + rev * (n_t - 1 - 2 * t)
            for th in T.parallel(n_th):
                for q in range(per):
                    p = th * per + q + (t % 2) * (per - 1 - 2 * q)
                    for bo in range(n_tiles):
                        rows_step(xw, r, peep, h, c, y, t, tt, p, bo * bt, bt)
                    if tail > 0:
                        rows_step(xw, r, peep, h, c, y, t, tt, p, n_tiles * bt, tail)
        for b, m in T.grid(n_b, n_h):
            hn[b, m] = h[n_t % 2, b, m]
            cn[b, m] = c[b, m]

    return finish(lstm_recurrence, peep=peephole, lens=check_lengths)


def gru_recurrence(
    seq_len: int,
    batch: int,
    hidden: int,
    *,
    linear_before_reset: bool = False,
    reverse: bool = False,
    check_lengths: bool = False,
    threads: int | None = None,
    dtype: str = "float32",
) -> tirx.PrimFunc:
    """One GRU direction over all time steps (ONNX semantics, default activations).

    With ``linear_before_reset`` the reset gate scales ``h @ Rh + Rbh``, so one GEMV per step
    suffices and ``rbh`` ([1, padded]) is an input. Without it the candidate GEMV reads
    ``r * h``, which needs every unit's reset gate first: two parallel phases per step,
    (z, r) then the candidate, each over its own panels. Other parameters as in
    :func:`lstm_recurrence`.

    Returns
    -------
    tvm.tirx.PrimFunc
        lbr=1: ``(xw [T, B, 3 * padded], r [panels, H, 3 * unit], rbh [1, padded], h0, lens?)``;
        lbr=0: ``(xw, r_zr [panels, H, 2 * unit], r_h [panels_h, H, unit_h], h0, lens?)``;
        both ``-> (y [T, B, H], h_n [B, H])``, packed as ``panel_layout(kind, H, B)`` with kind
        "GRU" (lbr=1) or "GRU0".
    """
    if linear_before_reset:
        return _gru_fused(seq_len, batch, hidden, reverse, check_lengths, threads, dtype)
    return _gru_two_phase(seq_len, batch, hidden, reverse, check_lengths, threads, dtype)


def _gru_fused(n_t, n_b, n_h, reverse, check_lengths, threads, dtype):
    lay = panel_layout("GRU", n_h, n_b)
    u, width, n_p, n_pad = lay.groups[0].unit, lay.groups[0].width, lay.panels(0), lay.padded
    rev, masked, attrs = int(reverse), n_pad != n_h, kernel_attrs("GRU", "GRU", reverse)
    bt, n_tiles, tail = _batch_tiles(n_b, width)
    n_th, per = _thread_chunks(n_p, threads)

    @T.inline
    def rows_step(xw, r, rbh, h, y, t, tt, p, b0, rows):
        acc = T.alloc_buffer((rows, width), dtype, annotations=ON_STACK)
        gru_lbr_init(acc, xw, rbh, tt, p, b0, rows, u, width)
        _gemv(acc, r, p, h, t % 2, b0, rows, n_h, width)
        gru_lbr_cell(acc, xw, h, y, t, tt, p, b0, rows, u, width, n_h, masked)

    @T.prim_func(s_tir=True)
    def gru_recurrence(
        xw: T.Buffer((n_t, n_b, 3 * n_pad), dtype),
        r: T.Buffer((n_p, n_h, width), dtype),
        rbh: T.Buffer((1, n_pad), dtype),
        h0: T.Buffer((n_b, n_h), dtype),
        lens: T.Buffer((n_b,), "int32"),
        y: T.Buffer((n_t, n_b, n_h), dtype),
        hn: T.Buffer((n_b, n_h), dtype),
    ):
        T.func_attr(attrs)
        h = T.alloc_buffer((2, n_b, n_pad), dtype)
        if check_lengths:
            assert_full_lengths(lens, n_b, n_t)
        load_h0(h, h0, n_b, n_h, n_pad, dtype)
        for t in range(n_t):
            tt = t + rev * (n_t - 1 - 2 * t)
            for th in T.parallel(n_th):
                for q in range(per):
                    p = th * per + q + (t % 2) * (per - 1 - 2 * q)
                    for bo in range(n_tiles):
                        rows_step(xw, r, rbh, h, y, t, tt, p, bo * bt, bt)
                    if tail > 0:
                        rows_step(xw, r, rbh, h, y, t, tt, p, n_tiles * bt, tail)
        for b, m in T.grid(n_b, n_h):
            hn[b, m] = h[n_t % 2, b, m]

    return finish(gru_recurrence, lens=check_lengths)


def _gru_two_phase(n_t, n_b, n_h, reverse, check_lengths, threads, dtype):
    lay = panel_layout("GRU0", n_h, n_b)
    (g_zr, g_h), n_pad = lay.groups, lay.padded
    u, u2, n_p, n_p2 = g_zr.unit, g_h.unit, lay.panels(0), lay.panels(1)
    rev, masked, attrs = int(reverse), n_pad != n_h, kernel_attrs("GRU", "GRU0", reverse)
    bt, n_tiles, tail = _batch_tiles(n_b, max(2 * u, u2))
    (n_th, per), (n_th2, per2) = _thread_chunks(n_p, threads), _thread_chunks(n_p2, threads)

    @T.inline
    def gates_step(xw, r_zr, h, rh, z, t, tt, p, b0, rows):
        """Phase 1: z, and r * h for the candidate GEMV, of units p * u ... p * u + u - 1."""
        acc = T.alloc_buffer((rows, 2 * u), dtype, annotations=ON_STACK)
        load_xw(acc, xw, tt, b0, rows, p * 2 * u, 2 * u)
        _gemv(acc, r_zr, p, h, t % 2, b0, rows, n_h, 2 * u)
        gru_gates(acc, h, rh, z, t, p, b0, rows, u)

    @T.inline
    def candidate_step(xw, r_h, h, rh, z, y, t, tt, p, b0, rows):
        """Phase 2: the candidate from (r * h) @ Rh, and the new h of units p * u2 ..."""
        acc = T.alloc_buffer((rows, u2), dtype, annotations=ON_STACK)
        load_xw(acc, xw, tt, b0, rows, 2 * n_pad + p * u2, u2)
        _gemv(acc, r_h, p, rh, 0, b0, rows, n_h, u2)
        gru_candidate(acc, h, z, y, t, tt, p, b0, rows, u2, n_h, masked)

    @T.prim_func(s_tir=True)
    def gru_recurrence(
        xw: T.Buffer((n_t, n_b, 3 * n_pad), dtype),
        r_zr: T.Buffer((n_p, n_h, 2 * u), dtype),
        r_h: T.Buffer((n_p2, n_h, u2), dtype),
        h0: T.Buffer((n_b, n_h), dtype),
        lens: T.Buffer((n_b,), "int32"),
        y: T.Buffer((n_t, n_b, n_h), dtype),
        hn: T.Buffer((n_b, n_h), dtype),
    ):
        T.func_attr(attrs)
        h = T.alloc_buffer((2, n_b, n_pad), dtype)
        rh = T.alloc_buffer((1, n_b, n_pad), dtype)
        z = T.alloc_buffer((n_b, n_pad), dtype)
        if check_lengths:
            assert_full_lengths(lens, n_b, n_t)
        load_h0(h, h0, n_b, n_h, n_pad, dtype)
        for t in range(n_t):
            tt = t + rev * (n_t - 1 - 2 * t)
            for th in T.parallel(n_th):
                for q in range(per):
                    p = th * per + q + (t % 2) * (per - 1 - 2 * q)
                    for bo in range(n_tiles):
                        gates_step(xw, r_zr, h, rh, z, t, tt, p, bo * bt, bt)
                    if tail > 0:
                        gates_step(xw, r_zr, h, rh, z, t, tt, p, n_tiles * bt, tail)
            for th in T.parallel(n_th2):
                for q in range(per2):
                    p = th * per2 + q + (t % 2) * (per2 - 1 - 2 * q)
                    for bo in range(n_tiles):
                        candidate_step(xw, r_h, h, rh, z, y, t, tt, p, bo * bt, bt)
                    if tail > 0:
                        candidate_step(xw, r_h, h, rh, z, y, t, tt, p, n_tiles * bt, tail)
        for b, m in T.grid(n_b, n_h):
            hn[b, m] = h[n_t % 2, b, m]

    return finish(gru_recurrence, lens=check_lengths)


def rnn_recurrence(
    seq_len: int,
    batch: int,
    hidden: int,
    *,
    reverse: bool = False,
    check_lengths: bool = False,
    threads: int | None = None,
    dtype: str = "float32",
) -> tirx.PrimFunc:
    """One Elman RNN direction (tanh) over all time steps; parameters as in :func:`lstm_recurrence`.

    Returns
    -------
    tvm.tirx.PrimFunc
        ``(xw [T, B, padded], r [panels, H, unit], h0 [B, H], lens?) -> (y [T, B, H], h_n [B, H])``.
    """
    lay = panel_layout("RNN", hidden, batch)
    u, n_p = lay.groups[0].unit, lay.panels(0)
    n_t, n_b, n_h, n_pad = seq_len, batch, hidden, lay.padded
    rev, masked, attrs = int(reverse), n_pad != hidden, kernel_attrs("RNN", "RNN", reverse)
    bt, n_tiles, tail = _batch_tiles(n_b, u)
    n_th, per = _thread_chunks(n_p, threads)

    @T.inline
    def rows_step(xw, r, h, y, t, tt, p, b0, rows):
        acc = T.alloc_buffer((rows, u), dtype, annotations=ON_STACK)
        load_xw(acc, xw, tt, b0, rows, p * u, u)
        _gemv(acc, r, p, h, t % 2, b0, rows, n_h, u)
        rnn_cell(acc, h, y, t, tt, p, b0, rows, u, n_h, masked)

    @T.prim_func(s_tir=True)
    def rnn_recurrence(
        xw: T.Buffer((n_t, n_b, n_pad), dtype),
        r: T.Buffer((n_p, n_h, u), dtype),
        h0: T.Buffer((n_b, n_h), dtype),
        lens: T.Buffer((n_b,), "int32"),
        y: T.Buffer((n_t, n_b, n_h), dtype),
        hn: T.Buffer((n_b, n_h), dtype),
    ):
        T.func_attr(attrs)
        h = T.alloc_buffer((2, n_b, n_pad), dtype)
        if check_lengths:
            assert_full_lengths(lens, n_b, n_t)
        load_h0(h, h0, n_b, n_h, n_pad, dtype)
        for t in range(n_t):
            tt = t + rev * (n_t - 1 - 2 * t)
            for th in T.parallel(n_th):
                for q in range(per):
                    p = th * per + q + (t % 2) * (per - 1 - 2 * q)
                    for bo in range(n_tiles):
                        rows_step(xw, r, h, y, t, tt, p, bo * bt, bt)
                    if tail > 0:
                        rows_step(xw, r, h, y, t, tt, p, n_tiles * bt, tail)
        for b, m in T.grid(n_b, n_h):
            hn[b, m] = h[n_t % 2, b, m]

    return finish(rnn_recurrence, lens=check_lengths)
