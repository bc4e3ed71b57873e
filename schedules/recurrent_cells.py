"""The per-unit math the dense and sparse recurrent kernels share: activations, cell updates.

Sigmoid and tanh are plain arithmetic (a rational tanh, an exponent-bits exp) so that LLVM
vectorises them: TIR's ``T.tanh`` / ``T.sigmoid`` lower to scalar libm calls.

The cell macros run after a kernel has the gate pre-activations of one panel in ``acc``
(``[rows, width]``, gates in ONNX order, ``unit`` lanes each) for ``rows`` batch rows from
``b0``: they apply the ONNX update and store the new state. Step ``t`` reads ``h[t % 2]`` and
writes ``h[(t + 1) % 2]``; ``tt`` is the time index of X / Y (reversed for reverse layers).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .common import ON_STACK  # noqa: F401 - re-exported

# The macros bind no scalar names inside T.vectorized loops: in TVM 0.27 the vectorizer turns
# `m = p * u + j` into a scalar variable holding a vector (silently wrong results).
# Intermediate gate values live in the accumulator buffer instead.
#
# Accumulators must be stack arrays for LLVM to keep them in registers: TVM moves allocations
# of 1024 bytes or more to a heap workspace (every FMA then goes through memory) unless they
# carry the ON_STACK annotation (re-exported here for the recurrent kernels).


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


@T.inline
def load_h0(h, h0, n_b, n_h, n_pad, dtype):
    for b, m in T.grid(n_b, n_pad):
        h[0, b, m] = T.if_then_else(m < n_h, h0[b, m], T.cast(0, dtype))


@T.inline
def assert_full_lengths(lens, n_b, n_t):
    for b in range(n_b):
        assert lens[b] == n_t, "sequence_lens must all equal the sequence length"


@T.inline
def store_h(h, y, acc, i, s, tt, b, base, u, n_h, masked):
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


@T.inline
def load_xw(acc, xw, tt, b0, rows, base, width):
    """acc[i, :] = the projection's ``width`` columns from ``base`` for batch row ``b0 + i``."""
    for i, j in T.grid(rows, width):
        acc[i, j] = xw[tt, b0 + i, base + j]


@T.inline
def lstm_cell(acc, peep, h, c, y, t, tt, p, b0, rows, u, n_h, masked, peephole, bias=None):
    """acc[i] holds the i | o | f | c pre-activations of units ``p * u ...``: new c and h.
    ``bias`` ([4 * n_h], ONNX gate order; the int8 kernels') is added after the i / f
    peepholes, where ONNX Runtime's quantized LSTM adds it; the float kernels fold theirs into
    the projection."""
    for i in range(rows):
        if peephole:
            for j in T.vectorized(u):
                acc[i, j] = acc[i, j] + peep[0, p * u + j] * c[b0 + i, p * u + j]
                acc[i, 2 * u + j] = acc[i, 2 * u + j] + peep[2, p * u + j] * c[b0 + i, p * u + j]
        if bias is not None:
            for gate in range(4):
                for j in T.vectorized(u):
                    acc[i, gate * u + j] = acc[i, gate * u + j] + bias[gate * n_h + p * u + j]
        for j in T.vectorized(u):
            c[b0 + i, p * u + j] = fast_sigmoid(acc[i, 2 * u + j]) * c[b0 + i, p * u + j] + (
                fast_sigmoid(acc[i, j]) * fast_tanh(acc[i, 3 * u + j])
            )
        if peephole:
            for j in T.vectorized(u):
                acc[i, u + j] = acc[i, u + j] + peep[1, p * u + j] * c[b0 + i, p * u + j]
        for j in T.vectorized(u):
            acc[i, j] = fast_sigmoid(acc[i, u + j]) * fast_tanh(c[b0 + i, p * u + j])
        store_h(h, y, acc, i, (t + 1) % 2, tt, b0 + i, p * u, u, n_h, masked)


@T.inline
def gru_lbr_init(acc, xw, rbh, tt, p, b0, rows, u, width):
    """z | r pre-activations from the projection; the candidate slot starts at Rbh."""
    for i in range(rows):
        for j in T.vectorized(2 * u):
            acc[i, j] = xw[tt, b0 + i, p * width + j]
        for j in T.vectorized(u):
            acc[i, 2 * u + j] = rbh[0, p * u + j]


@T.inline
def gru_lbr_cell(acc, xw, h, y, t, tt, p, b0, rows, u, width, n_h, masked):
    """acc[i]: z | r pre-activations, then h @ Rh + Rbh (which the reset gate scales)."""
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
        store_h(h, y, acc, i, (t + 1) % 2, tt, b0 + i, p * u, u, n_h, masked)


@T.inline
def gru_gates(acc, h, rh, z, t, p, b0, rows, u):
    """GRU lbr=0 phase 1: z, and r * h (the candidate GEMV's input) of units ``p * u ...``."""
    for i in range(rows):
        for j in T.vectorized(u):
            z[b0 + i, p * u + j] = fast_sigmoid(acc[i, j])
            rh[0, b0 + i, p * u + j] = fast_sigmoid(acc[i, u + j]) * h[t % 2, b0 + i, p * u + j]


@T.inline
def gru_candidate(acc, h, z, y, t, tt, p, b0, rows, u, n_h, masked):
    """GRU lbr=0 phase 2: acc[i] holds the candidate pre-activations; new h."""
    for i in range(rows):
        for j in T.vectorized(u):
            acc[i, j] = fast_tanh(acc[i, j])
        for j in T.vectorized(u):
            acc[i, j] = acc[i, j] + z[b0 + i, p * u + j] * (h[t % 2, b0 + i, p * u + j] - acc[i, j])
        store_h(h, y, acc, i, (t + 1) % 2, tt, b0 + i, p * u, u, n_h, masked)


@T.inline
def rnn_cell(acc, h, y, t, tt, p, b0, rows, u, n_h, masked):
    for i in range(rows):
        for j in T.vectorized(u):
            acc[i, j] = fast_tanh(acc[i, j])
        store_h(h, y, acc, i, (t + 1) % 2, tt, b0 + i, p * u, u, n_h, masked)
