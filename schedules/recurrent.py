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

Sigmoid and tanh are plain arithmetic (a rational tanh, an exponent-bits exp) so that LLVM
vectorises them: TIR's ``T.tanh`` / ``T.sigmoid`` lower to scalar libm calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from tvm_sparse._compat import ATTR_NOALIAS, ATTR_SCHEDULED
from tvm_sparse.target import num_cores

#: Hidden units per panel at batch 1, by kernel: 64-float panels (4 zmm accumulators).
#: "GRU" is the linear_before_reset=1 kernel; "GRU0" the two-phase linear_before_reset=0 one.
PANEL_UNITS = {"LSTM": 16, "GRU": 16, "GRU0": 32, "RNN": 64}
GATES = {"LSTM": 4, "GRU": 3, "GRU0": 3, "RNN": 1}
#: Accumulator floats of one batch tile: 16 zmm of the 32, the rest for loads and broadcasts.
ACC_FLOATS = 256


@dataclass(frozen=True)
class GateGroup:
    """Gates ``start:stop`` (ONNX order) packed together in panels of ``unit`` hidden units."""

    start: int
    stop: int
    unit: int

    @property
    def width(self) -> int:
        """Outputs per panel (the GEMV accumulator length)."""
        return (self.stop - self.start) * self.unit


@dataclass(frozen=True)
class PanelLayout:
    """How a layer's gate outputs are ordered in the projection and in the packed R.

    ``padded`` is ``hidden`` rounded up to whole panels; padded units get zero weights and
    biases, so their state stays exactly zero and is never written to an output.
    """

    hidden: int
    padded: int
    groups: tuple[GateGroup, ...]

    def panels(self, group: int) -> int:
        return self.padded // self.groups[group].unit

    def column_offset(self, group: int) -> int:
        """First projection column of a group (groups are concatenated)."""
        return sum((g.stop - g.start) * self.padded for g in self.groups[:group])


def panel_layout(kind: str, hidden: int, batch: int = 1) -> PanelLayout:
    """The panel layout of kernel ``kind`` ("LSTM", "GRU", "GRU0" or "RNN") for ``hidden``.

    Panels are as wide as possible (64 floats) unless halving them lets a batch tile hold
    more rows: every tile re-reads the whole of R once per step, which costs more than
    narrower panels (measured at H = 1024, batch 8: 15 ms with 32-float panels in one tile,
    36 ms with 64-float panels in three).
    """
    gates = 2 if kind == "GRU0" else GATES[kind]
    units = [u for u in (PANEL_UNITS[kind], PANEL_UNITS[kind] // 2) if gates * u % 16 == 0]
    unit = min(units, key=lambda u: (-(-batch // tile_rows(batch, gates * u)), -u))
    unit = min(unit, hidden)
    padded = -(-hidden // unit) * unit
    if kind != "GRU0":
        return PanelLayout(hidden, padded, (GateGroup(0, GATES[kind], unit),))
    # Phase two (the candidate) has one gate: twice the units give it the same panel width.
    unit_h = 2 * unit if padded % (2 * unit) == 0 else unit
    return PanelLayout(hidden, padded, (GateGroup(0, 2, unit), GateGroup(2, 3, unit_h)))


def tile_rows(batch: int, width: int) -> int:
    """Batch rows per tile for panels ``width`` floats wide (ACC_FLOATS accumulators)."""
    return max(1, min(batch, ACC_FLOATS // width))


def kernel_kind(layer: str, linear_before_reset: bool = False) -> str:
    """The kernel (and panel layout) name for an ONNX layer: "LSTM", "GRU", "GRU0" or "RNN"."""
    return "GRU0" if layer == "GRU" and not linear_before_reset else layer


class NumpyOps:
    """The array steps the packers need; the Relax frontend supplies the same for graph values."""

    reshape = staticmethod(np.reshape)
    transpose = staticmethod(np.transpose)
    add = staticmethod(np.add)

    @staticmethod
    def zeros(shape: tuple[int, ...], dtype: str):
        return np.zeros(shape, dtype)

    @staticmethod
    def concat(arrays: list, axis: int):
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=axis)

    @staticmethod
    def take(x, start: int, stop: int):
        """Rows ``start:stop`` of the first axis."""
        return x[start:stop]

    @staticmethod
    def pad(x, axis: int, amount: int):
        """Append ``amount`` zeros along ``axis``."""
        if amount == 0:
            return x
        width = [(0, 0)] * x.ndim
        width[axis] = (0, amount)
        return np.pad(x, width)


@dataclass(frozen=True)
class PackedWeights:
    """One direction's weights in kernel order (NumPy arrays, or Relax values from the frontend)."""

    w: Any  #: [input, gates * padded], the projection's right-hand side
    bias: Any  #: [gates * padded] projection bias (Wb + Rb, except GRU lbr=1's Rbh), or None
    r: list  #: per gate group, [panels, hidden, width]
    rbh: Any  #: GRU lbr=1 only: [1, padded] recurrent candidate bias, else None


def pack_weights(
    kind: str,
    hidden: int,
    w: Any,
    r: Any,
    b: Any = None,
    *,
    batch: int = 1,
    dtype: str = "float32",
    ops: Any = NumpyOps,
) -> PackedWeights:
    """Pack one direction's ONNX ``W`` [G*H, I], ``R`` [G*H, H] and ``B`` [2*G*H] (or None)
    for the kernel of ``batch`` rows (the panel width depends on it)."""
    lay = panel_layout(kind, hidden, batch)
    n_gh = GATES[kind] * hidden
    bias = rbh = None
    if b is not None:
        wb, rb = ops.take(b, 0, n_gh), ops.take(b, n_gh, 2 * n_gh)
        if kind == "GRU":  # Rbh sits inside the reset product: it goes to the kernel
            rbh = pack_vector(ops.take(rb, 2 * hidden, n_gh), lay, ops)
            rb = ops.pad(ops.take(rb, 0, 2 * hidden), 0, hidden)
        bias = pack_bias(ops.add(wb, rb), lay, ops)
    if kind == "GRU" and rbh is None:
        rbh = ops.zeros((1, lay.padded), dtype)
    return PackedWeights(
        pack_input_weight(w, lay, ops), bias, pack_recurrent_weight(r, lay, ops), rbh
    )


def pack_input_weight(w: Any, layout: PanelLayout, ops: Any = NumpyOps) -> Any:
    """ONNX ``W`` of one direction, ``[gates * hidden, input]``, to ``[input, gates * padded]``.

    The columns come in the kernel's panel order, so ``x @ result`` is the projection it reads.
    """
    return ops.transpose(_pack_rows(w, layout, ops), (1, 0))


def pack_bias(b: Any, layout: PanelLayout, ops: Any = NumpyOps) -> Any:
    """A per-gate vector ``[gates * hidden]`` to the projection's column order."""
    return ops.reshape(_pack_rows(ops.reshape(b, (-1, 1)), layout, ops), (-1,))


def pack_recurrent_weight(r: Any, layout: PanelLayout, ops: Any = NumpyOps) -> list:
    """ONNX ``R`` of one direction, ``[gates * hidden, hidden]``, to one array per gate group.

    Group ``g`` becomes ``[panels, hidden, gates_g * unit]``: panel ``p`` row ``k`` holds R's
    column ``k`` for every gate of hidden units ``p * unit ...``, contiguous for the FMA.
    """
    n_h, p_h = layout.hidden, layout.padded
    out = []
    for grp in layout.groups:
        n_g = grp.stop - grp.start
        rows = ops.pad(
            ops.reshape(ops.take(r, grp.start * n_h, grp.stop * n_h), (n_g, n_h, n_h)), 1, p_h - n_h
        )
        rows = ops.reshape(rows, (n_g, p_h // grp.unit, grp.unit, n_h))
        out.append(
            ops.reshape(ops.transpose(rows, (1, 3, 0, 2)), (p_h // grp.unit, n_h, grp.width))
        )
    return out


def pack_vector(v: Any, layout: PanelLayout, ops: Any = NumpyOps) -> Any:
    """Per-unit vectors ``[k * hidden]`` (peepholes, GRU's Rbh) to ``[k, padded]``."""
    rows = ops.reshape(v, (-1, layout.hidden))
    return ops.pad(rows, 1, layout.padded - layout.hidden)


def _pack_rows(w: Any, layout: PanelLayout, ops: Any) -> Any:
    n_h, p_h = layout.hidden, layout.padded
    parts = []
    for grp in layout.groups:
        n_g = grp.stop - grp.start
        rows = ops.reshape(ops.take(w, grp.start * n_h, grp.stop * n_h), (n_g, n_h, -1))
        rows = ops.reshape(ops.pad(rows, 1, p_h - n_h), (n_g, p_h // grp.unit, grp.unit, -1))
        parts.append(ops.reshape(ops.transpose(rows, (1, 0, 2, 3)), (n_g * p_h, -1)))
    return ops.concat(parts, 0)


# Eigen's generic_fast_tanh_float: a 13/6 rational minimax fit, about 2 ulp on the clamp range
# (the FMA variant of the clamp, since LLVM contracts the Horner steps into FMAs here).
_TANH_CLAMP = 7.99881172180175781
_TANH_P = (
    4.89352455891786e-03,
    6.37261928875436e-04,
    1.48572235717979e-05,
    5.12229709037114e-08,
    -8.60467152213735e-11,
    2.00018790482477e-13,
    -2.76076847742355e-16,
)
_TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)
# Cephes expf: ln 2 split in two for an exact reduction, then a degree-5 polynomial for e**r.
_LOG2E = 1.44269504088896341
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_EXP_P = (
    5.0000001201e-1,
    1.6666665459e-1,
    4.1665795894e-2,
    8.3334519073e-3,
    1.3981999507e-3,
    1.9875691500e-4,
)


def _horner(x2: tirx.PrimExpr, coeffs: tuple[float, ...], dtype: str) -> tirx.PrimExpr:
    acc = tirx.const(coeffs[-1], dtype)
    for c in reversed(coeffs[:-1]):
        acc = acc * x2 + tirx.const(c, dtype)
    return acc


def fast_tanh(x: tirx.PrimExpr, dtype: str = "float32") -> tirx.PrimExpr:
    """tanh as plain arithmetic (vectorisable), within about 3e-7 absolute of ``np.tanh``."""
    lim = tirx.const(_TANH_CLAMP, dtype)
    v = tirx.Var("tanh_x", dtype)
    v2 = tirx.Var("tanh_x2", dtype)
    ratio = v * _horner(v2, _TANH_P, dtype) / _horner(v2, _TANH_Q, dtype)
    return tirx.Let(v, tirx.Max(tirx.Min(x, lim), -lim), tirx.Let(v2, v * v, ratio))


def fast_exp(x: tirx.PrimExpr, dtype: str = "float32") -> tirx.PrimExpr:
    """exp for float32 as plain arithmetic: Cody-Waite reduction, Cephes polynomial, 2**n by
    exponent bits; about 2 ulp relative for x in [-87, 88] (clamped outside)."""

    def c(v):
        return tirx.const(v, dtype)

    v, n, r = tirx.Var("exp_x", dtype), tirx.Var("exp_n", dtype), tirx.Var("exp_r", dtype)
    poly = _horner(r, _EXP_P, dtype) * r * r + r + c(1.0)
    scale = tirx.reinterpret(
        dtype,
        tirx.shift_left(tirx.Cast("int32", n) + tirx.const(127, "int32"), tirx.const(23, "int32")),
    )
    body = tirx.Let(r, v - n * c(_LN2_HI) - n * c(_LN2_LO), poly * scale)
    body = tirx.Let(n, tirx.floor(v * c(_LOG2E) + c(0.5)), body)
    return tirx.Let(v, tirx.Max(tirx.Min(x, c(88.0)), c(-87.0)), body)


def fast_sigmoid(x: tirx.PrimExpr, dtype: str = "float32") -> tirx.PrimExpr:
    """1 / (1 + exp(-x)) with :func:`fast_exp`: about 3 ulp relative, also in the tails."""
    one = tirx.const(1.0, dtype)
    return one / (one + fast_exp(-x, dtype))


def _attrs(layer: str, reverse: bool) -> dict:
    return {
        "tvm_sparse.layer": layer,
        "tvm_sparse.direction": "reverse" if reverse else "forward",
        ATTR_NOALIAS: True,
        ATTR_SCHEDULED: True,
    }


def _finish(func: tirx.PrimFunc, **present: bool) -> tirx.PrimFunc:
    """Drop the optional parameters that are not ``present``: each kernel is written once in
    TVMScript with all of them, and the variants without one never touch it."""
    params = [p for p in func.params if present.get(p.name, True)]
    return tirx.PrimFunc(params, func.body, func.ret_type, func.attrs)


# The kernels below bind no scalar names inside T.vectorized loops: in TVM 0.27 the
# vectorizer turns `m = p * u + j` into a scalar variable holding a vector (silently wrong
# results). Intermediate gate values live in the accumulator buffer instead.
#
# A panel handles the batch in tiles of `rows` rows; each loaded R vector feeds `rows` FMAs.
# The accumulator [rows, width] must be a stack array for LLVM to keep it in registers: TVM
# moves allocations of 1024 bytes or more to a heap workspace (every FMA then goes through
# memory) unless they carry this annotation.
_ON_STACK = {"disable_lower_builtin": True}


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


@T.inline
def _load_h0(h, h0, n_b, n_h, n_pad, dtype):
    for b, m in T.grid(n_b, n_pad):
        h[0, b, m] = T.if_then_else(m < n_h, h0[b, m], T.cast(0, dtype))


@T.inline
def _check_lengths(lens, n_b, n_t):
    for b in range(n_b):
        assert lens[b] == n_t, "sequence_lens must all equal the sequence length"


@T.inline
def _store_h(h, y, acc, i, s, tt, b, base, u, n_h, masked):
    """Unit ``base + j``'s new h is ``acc[i, j]``: to the state and, unless padding, to Y."""
    for j in T.vectorized(u):
        h[s, b, base + j] = acc[i, j]
    if masked:
        for j in range(u):
            if base + j < n_h:
                y[tt, b, base + j] = acc[i, j]
    else:
        for j in T.vectorized(u):
            y[tt, b, base + j] = acc[i, j]


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
    rev, masked, attrs = int(reverse), n_pad != hidden, _attrs("LSTM", reverse)
    bt, n_tiles, tail = _batch_tiles(n_b, width)
    n_th, per = _thread_chunks(n_p, threads)

    @T.inline
    def rows_step(xw, r, peep, h, c, y, t, tt, p, b0, rows):
        # acc[i]: the gate pre-activations i | o | f | c of units p * u ... p * u + u - 1.
        acc = T.alloc_buffer((rows, width), dtype, annotations=_ON_STACK)
        for i, j in T.grid(rows, width):
            acc[i, j] = xw[tt, b0 + i, p * width + j]
        _gemv(acc, r, p, h, t % 2, b0, rows, n_h, width)
        for i in range(rows):
            if peephole:
                for j in T.vectorized(u):
                    acc[i, j] = acc[i, j] + peep[0, p * u + j] * c[b0 + i, p * u + j]
                    acc[i, 2 * u + j] = (
                        acc[i, 2 * u + j] + peep[2, p * u + j] * c[b0 + i, p * u + j]
                    )
            for j in T.vectorized(u):
                c[b0 + i, p * u + j] = fast_sigmoid(acc[i, 2 * u + j]) * c[b0 + i, p * u + j] + (
                    fast_sigmoid(acc[i, j]) * fast_tanh(acc[i, 3 * u + j])
                )
            if peephole:
                for j in T.vectorized(u):
                    acc[i, u + j] = acc[i, u + j] + peep[1, p * u + j] * c[b0 + i, p * u + j]
            for j in T.vectorized(u):
                acc[i, j] = fast_sigmoid(acc[i, u + j]) * fast_tanh(c[b0 + i, p * u + j])
            _store_h(h, y, acc, i, (t + 1) % 2, tt, b0 + i, p * u, u, n_h, masked)

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
            _check_lengths(lens, n_b, n_t)
        _load_h0(h, h0, n_b, n_h, n_pad, dtype)
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

    return _finish(lstm_recurrence, peep=peephole, lens=check_lengths)


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
    rev, masked, attrs = int(reverse), n_pad != n_h, _attrs("GRU", reverse)
    bt, n_tiles, tail = _batch_tiles(n_b, width)
    n_th, per = _thread_chunks(n_p, threads)

    @T.inline
    def rows_step(xw, r, rbh, h, y, t, tt, p, b0, rows):
        # acc[i]: z | r pre-activations, then h @ Rh + Rbh (which the reset gate scales).
        acc = T.alloc_buffer((rows, width), dtype, annotations=_ON_STACK)
        for i in range(rows):
            for j in T.vectorized(2 * u):
                acc[i, j] = xw[tt, b0 + i, p * width + j]
            for j in T.vectorized(u):
                acc[i, 2 * u + j] = rbh[0, p * u + j]
        _gemv(acc, r, p, h, t % 2, b0, rows, n_h, width)
        for i in range(rows):
            for j in T.vectorized(u):
                acc[i, 2 * u + j] = fast_tanh(
                    xw[tt, b0 + i, p * width + 2 * u + j]
                    + fast_sigmoid(acc[i, u + j]) * acc[i, 2 * u + j]
                )
            for j in T.vectorized(u):
                acc[i, j] = acc[i, 2 * u + j] + fast_sigmoid(acc[i, j]) * (
                    h[t % 2, b0 + i, p * u + j] - acc[i, 2 * u + j]
                )
            _store_h(h, y, acc, i, (t + 1) % 2, tt, b0 + i, p * u, u, n_h, masked)

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
            _check_lengths(lens, n_b, n_t)
        _load_h0(h, h0, n_b, n_h, n_pad, dtype)
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

    return _finish(gru_recurrence, lens=check_lengths)


def _gru_two_phase(n_t, n_b, n_h, reverse, check_lengths, threads, dtype):
    lay = panel_layout("GRU0", n_h, n_b)
    (g_zr, g_h), n_pad = lay.groups, lay.padded
    u, u2, n_p, n_p2 = g_zr.unit, g_h.unit, lay.panels(0), lay.panels(1)
    rev, masked, attrs = int(reverse), n_pad != n_h, _attrs("GRU", reverse)
    bt, n_tiles, tail = _batch_tiles(n_b, max(2 * u, u2))
    (n_th, per), (n_th2, per2) = _thread_chunks(n_p, threads), _thread_chunks(n_p2, threads)

    @T.inline
    def gates_step(xw, r_zr, h, rh, z, t, tt, p, b0, rows):
        """Phase 1: z, and r * h for the candidate GEMV, of units p * u ... p * u + u - 1."""
        acc = T.alloc_buffer((rows, 2 * u), dtype, annotations=_ON_STACK)
        for i, j in T.grid(rows, 2 * u):
            acc[i, j] = xw[tt, b0 + i, p * 2 * u + j]
        _gemv(acc, r_zr, p, h, t % 2, b0, rows, n_h, 2 * u)
        for i in range(rows):
            for j in T.vectorized(u):
                z[b0 + i, p * u + j] = fast_sigmoid(acc[i, j])
                rh[0, b0 + i, p * u + j] = fast_sigmoid(acc[i, u + j]) * h[t % 2, b0 + i, p * u + j]

    @T.inline
    def candidate_step(xw, r_h, h, rh, z, y, t, tt, p, b0, rows):
        """Phase 2: the candidate from (r * h) @ Rh, and the new h of units p * u2 ..."""
        acc = T.alloc_buffer((rows, u2), dtype, annotations=_ON_STACK)
        for i, j in T.grid(rows, u2):
            acc[i, j] = xw[tt, b0 + i, 2 * n_pad + p * u2 + j]
        _gemv(acc, r_h, p, rh, 0, b0, rows, n_h, u2)
        for i in range(rows):
            for j in T.vectorized(u2):
                acc[i, j] = fast_tanh(acc[i, j])
            for j in T.vectorized(u2):
                acc[i, j] = acc[i, j] + z[b0 + i, p * u2 + j] * (
                    h[t % 2, b0 + i, p * u2 + j] - acc[i, j]
                )
            _store_h(h, y, acc, i, (t + 1) % 2, tt, b0 + i, p * u2, u2, n_h, masked)

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
            _check_lengths(lens, n_b, n_t)
        _load_h0(h, h0, n_b, n_h, n_pad, dtype)
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

    return _finish(gru_recurrence, lens=check_lengths)


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
    rev, masked, attrs = int(reverse), n_pad != hidden, _attrs("RNN", reverse)
    bt, n_tiles, tail = _batch_tiles(n_b, u)
    n_th, per = _thread_chunks(n_p, threads)

    @T.inline
    def rows_step(xw, r, h, y, t, tt, p, b0, rows):
        acc = T.alloc_buffer((rows, u), dtype, annotations=_ON_STACK)
        for i, j in T.grid(rows, u):
            acc[i, j] = xw[tt, b0 + i, p * u + j]
        _gemv(acc, r, p, h, t % 2, b0, rows, n_h, u)
        for i in range(rows):
            for j in T.vectorized(u):
                acc[i, j] = fast_tanh(acc[i, j])
            _store_h(h, y, acc, i, (t + 1) % 2, tt, b0 + i, p * u, u, n_h, masked)

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
            _check_lengths(lens, n_b, n_t)
        _load_h0(h, h0, n_b, n_h, n_pad, dtype)
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

    return _finish(rnn_recurrence, lens=check_lengths)
