"""Fused recurrent kernels against the NumPy references; packing layout; activation accuracy."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm.script import tirx as T

from tvm_sparse.schedules import recurrent as rc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reference_rnn import gru_reference, lstm_reference, rnn_reference  # noqa: E402

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver5", "num-cores": 2})
# float32 kernel vs float64 reference: fp32 rounding of H-long dot products over T steps.
TOL = {"float32": {"rtol": 1e-5, "atol": 1e-5}}


def _run(func, args, out_shapes):
    """Build and call; outputs are pre-filled with NaN so unwritten elements fail."""
    lib = tvm.compile(func, TARGET)
    dev = tvm.cpu()
    ins = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in args]
    outs = [tvm.runtime.tensor(np.full(s, np.nan, np.float32), dev) for s in out_shapes]
    lib(*ins, *outs)
    return [o.numpy() for o in outs]


def _problem(kind, steps, batch, n_in, hidden, seed):
    rng = np.random.default_rng(seed)
    n_g, scale = rc.GATES[kind], 1.0 / np.sqrt(hidden)

    def rand(*shape, s=scale):
        return rng.uniform(-s, s, shape).astype(np.float32)

    x = rand(steps, batch, n_in, s=1.0)
    w, r, b = rand(n_g * hidden, n_in), rand(n_g * hidden, hidden), rand(2 * n_g * hidden)
    h0, c0, p = rand(batch, hidden, s=1.0), rand(batch, hidden, s=1.0), rand(3 * hidden, s=0.5)
    packed = rc.pack_weights(kind, hidden, w, r, b, batch=batch)
    xw = (x.reshape(steps * batch, n_in) @ packed.w + packed.bias).reshape(steps, batch, -1)
    return x, w, r, b, h0, c0, p, packed, xw


def _compare(got, want, what):
    for name, g, w in zip(("y", "h_n", "c_n"), got, want, strict=False):
        assert g.shape == w.shape, f"{what} {name}: shape {g.shape} != {w.shape}"
        bad = ~np.isclose(g, w, **TOL["float32"])
        if bad.any():
            idx = tuple(int(i[0]) for i in np.nonzero(bad))
            pytest.fail(
                f"{what} {name}: {bad.sum()} mismatches, first at {idx}: {g[idx]} vs {w[idx]}"
            )


# (steps, batch, input, hidden): padded panels (20, 70), a single small panel (3), several
# whole panels (64, 128); batch 1; batch 10 = whole tiles plus a partial one; batch 4 at
# H = 48, a 1024-byte accumulator tile (kept on the stack by annotation).
SHAPES = [
    (5, 2, 7, 20),
    (4, 1, 9, 64),
    (3, 3, 2, 3),
    (6, 2, 16, 128),
    (3, 10, 4, 32),
    (3, 2, 4, 70),
    (2, 4, 5, 48),
]


@pytest.mark.parametrize("shape", SHAPES[:5] + SHAPES[6:])
@pytest.mark.parametrize("peephole, reverse", [(False, False), (True, True)])
def test_lstm_recurrence(shape, peephole, reverse):
    steps, batch, n_in, hidden = shape
    x, w, r, b, h0, c0, p, packed, xw = _problem("LSTM", *shape, seed=hidden)
    func = rc.lstm_recurrence(steps, batch, hidden, peephole=peephole, reverse=reverse)
    peep = [rc.pack_vector(p, rc.panel_layout("LSTM", hidden, batch))] if peephole else []
    outs = [(steps, batch, hidden), (batch, hidden), (batch, hidden)]
    got = _run(func, [xw, *packed.r, *peep, h0, c0], outs)
    want = lstm_reference(x, w, r, b, p if peephole else None, h0, c0, reverse=reverse)
    _compare(got, want, f"LSTM {shape} peephole={peephole} reverse={reverse}")


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3], SHAPES[4], SHAPES[5]])
@pytest.mark.parametrize("linear_before_reset", [False, True])
def test_gru_recurrence(shape, linear_before_reset):
    steps, batch, n_in, hidden = shape
    kind = rc.kernel_kind("GRU", linear_before_reset)
    x, w, r, b, h0, _, _, packed, xw = _problem(kind, *shape, seed=hidden)
    reverse = not linear_before_reset
    func = rc.gru_recurrence(
        steps, batch, hidden, linear_before_reset=linear_before_reset, reverse=reverse
    )
    extra = [packed.rbh] if linear_before_reset else []
    got = _run(func, [xw, *packed.r, *extra, h0], [(steps, batch, hidden), (batch, hidden)])
    want = gru_reference(x, w, r, b, h0, linear_before_reset=linear_before_reset, reverse=reverse)
    _compare(got, want, f"GRU {shape} lbr={linear_before_reset}")


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[4], SHAPES[5]])
def test_rnn_recurrence(shape):
    steps, batch, n_in, hidden = shape
    x, w, r, b, h0, _, _, packed, xw = _problem("RNN", *shape, seed=hidden)
    func = rc.rnn_recurrence(steps, batch, hidden, reverse=True)
    got = _run(func, [xw, *packed.r, h0], [(steps, batch, hidden), (batch, hidden)])
    _compare(got, rnn_reference(x, w, r, b, h0, reverse=True), f"RNN {shape}")


def test_check_lengths_rejects_short_sequences():
    steps, batch, hidden = 3, 2, 16
    func = rc.rnn_recurrence(steps, batch, hidden, check_lengths=True)
    assert [p.name for p in func.params][-3] == "lens"
    _, _, _, _, h0, _, _, packed, xw = _problem("RNN", steps, batch, 4, hidden, seed=0)
    outs = [(steps, batch, hidden), (batch, hidden)]
    _run(func, [xw, *packed.r, h0, np.array([3, 3], np.int32)], outs)
    with pytest.raises(RuntimeError, match="sequence_lens"):
        _run(func, [xw, *packed.r, h0, np.array([3, 1], np.int32)], outs)


def test_kernel_attributes_and_signature():
    func = rc.lstm_recurrence(4, 1, 32, reverse=True)
    assert func.attrs["tvm_sparse.layer"] == "LSTM" and func.attrs["tvm_sparse.kind"] == "LSTM"
    gru0 = rc.gru_recurrence(4, 1, 32, linear_before_reset=False)
    assert (gru0.attrs["tvm_sparse.layer"], gru0.attrs["tvm_sparse.kind"]) == ("GRU", "GRU0")
    assert func.attrs["tvm_sparse.direction"] == "reverse"
    assert func.attrs["tirx.noalias"] and func.attrs["tirx.is_scheduled"]
    assert [p.name for p in func.params] == ["xw", "r", "h0", "c0", "y", "hn", "cn"]


def test_lstm_hot_loop_is_avx512_fma_without_libm_calls():
    asm = tvm.compile(rc.lstm_recurrence(2, 1, 256), TARGET).mod.inspect_source("asm")
    fma = [line for line in asm.splitlines() if "vfmadd" in line and "zmm" in line]
    assert len(fma) >= 4, "the recurrent GEMV should be 512-bit FMAs"
    for libm in ("expf", "tanhf", "exp@", "tanh@"):
        assert libm not in asm, f"{libm} call: the activations were not vectorised"


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "GRU0", "RNN"])
@settings(max_examples=25, deadline=None, derandomize=True)
@given(hidden=st.integers(1, 150), batch=st.sampled_from([1, 8]))
def test_packed_recurrent_weight_layout(kind, hidden, batch):
    """Every R entry lands at [panel, k, gate * unit + j] of its group; padding is zero."""
    lay = rc.panel_layout(kind, hidden, batch)
    n_g = rc.GATES[kind]
    r = np.arange(n_g * hidden * hidden, dtype=np.float32).reshape(n_g * hidden, hidden) + 1
    packed = rc.pack_recurrent_weight(r, lay)
    assert len(packed) == len(lay.groups)
    total = 0
    for grp, panels in zip(lay.groups, packed, strict=True):
        assert panels.shape == (lay.padded // grp.unit, hidden, grp.width)
        for g in range(grp.start, grp.stop):
            for unit in (0, hidden - 1):
                p, j = divmod(unit, grp.unit)
                col = (g - grp.start) * grp.unit + j
                np.testing.assert_array_equal(panels[p, :, col], r[g * hidden + unit])
        total += np.count_nonzero(panels)
    assert total == r.size


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "GRU0", "RNN"])
@settings(max_examples=25, deadline=None, derandomize=True)
@given(hidden=st.integers(1, 150), batch=st.sampled_from([1, 8]))
def test_unpack_inverts_pack_and_onnx_rows_name_the_outputs(kind, hidden, batch):
    """unpack(pack(R)) == R; onnx_rows gives each kernel output's ONNX row (-1: padding)."""
    lay = rc.panel_layout(kind, hidden, batch)
    n_g = rc.GATES[kind]
    r = np.arange(n_g * hidden * hidden, dtype=np.float32).reshape(n_g * hidden, hidden) + 1
    np.testing.assert_array_equal(
        rc.unpack_recurrent_weight(rc.pack_recurrent_weight(r, lay), lay), r
    )
    w = rc.pack_input_weight(r, lay)  # R as if it were W: columns in kernel order
    for gi, grp in enumerate(lay.groups):
        rows = rc.onnx_rows(lay, gi)
        assert rows.shape == ((grp.stop - grp.start) * lay.padded,)
        cols = w[:, lay.column_offset(gi) : lay.column_offset(gi) + rows.size]
        np.testing.assert_array_equal(cols[:, rows >= 0], r[rows[rows >= 0]].T)
        assert not cols[:, rows < 0].any()


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "GRU0", "RNN"])
@settings(max_examples=25, deadline=None, derandomize=True)
@given(hidden=st.integers(1, 150), batch=st.sampled_from([1, 8]))
def test_packed_projection_matches_kernel_columns(kind, hidden, batch):
    """Column p * width + g * unit + j of a group holds unit p * unit + j of gate g."""
    lay = rc.panel_layout(kind, hidden, batch)
    n_g, n_in = rc.GATES[kind], 3
    w = np.random.default_rng(hidden).standard_normal((n_g * hidden, n_in)).astype(np.float32)
    wt = rc.pack_input_weight(w, lay)
    assert wt.shape == (n_in, n_g * lay.padded)
    for gi, grp in enumerate(lay.groups):
        for g in range(grp.start, grp.stop):
            for unit in {0, hidden // 2, hidden - 1}:
                p, j = divmod(unit, grp.unit)
                col = lay.column_offset(gi) + p * grp.width + (g - grp.start) * grp.unit + j
                np.testing.assert_array_equal(wt[:, col], w[g * hidden + unit])
    assert np.count_nonzero(wt) == np.count_nonzero(w)


def test_activation_accuracy():
    n = 1 << 16

    @T.prim_func(s_tir=True)
    def act(
        x: T.Buffer((n,), "float32"), th: T.Buffer((n,), "float32"), sg: T.Buffer((n,), "float32")
    ):
        for i, j in T.grid(n // 16, 16):
            with T.sblock("act"):
                vi = T.axis.spatial(n // 16, i)
                vj = T.axis.spatial(16, j)
                th[vi * 16 + vj] = rc.fast_tanh(x[vi * 16 + vj])
                sg[vi * 16 + vj] = rc.fast_sigmoid(x[vi * 16 + vj])

    sch = tvm.s_tir.Schedule(act)
    sch.vectorize(sch.get_loops(sch.get_sblock("act"))[1])
    extremes = np.float32([0, 1e-30, -1e-30, 1e-4, 30, -30, 1e6, -1e6, 88.5, -88.5])
    x = np.concatenate([np.linspace(-20, 20, n - extremes.size, dtype=np.float32), extremes])
    th, sg = _run(sch.mod["main"], [x], [(n,), (n,)])
    x64 = x.astype(np.float64)
    tanh_err = np.abs(th - np.tanh(x64))
    assert (
        tanh_err.max() < 4e-7 and (tanh_err / np.maximum(np.abs(np.tanh(x64)), 1e-30)).max() < 4e-7
    )
    sig = np.exp(-np.logaddexp(0.0, -x64))
    inside = x64 > -87  # fast_exp clamps there: below, sigmoid is a denormal or zero anyway
    assert (np.abs(sg - sig)[inside] / sig[inside]).max() < 3e-7
    assert np.abs(sg - sig)[~inside].max() < 1e-37
    assert np.all(np.isfinite(th)) and np.all(np.isfinite(sg))


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    kind=st.sampled_from(["LSTM", "GRU", "GRU0", "RNN"]),
    steps=st.integers(1, 4),
    batch=st.integers(1, 5),
    hidden=st.integers(1, 90),
    reverse=st.booleans(),
)
def test_random_shapes(kind, steps, batch, hidden, reverse):
    x, w, r, b, h0, c0, _, packed, xw = _problem(kind, steps, batch, 3, hidden, seed=steps)
    outs = [(steps, batch, hidden), (batch, hidden)]
    if kind == "LSTM":
        func = rc.lstm_recurrence(steps, batch, hidden, reverse=reverse)
        got = _run(func, [xw, *packed.r, h0, c0], outs + [(batch, hidden)])
        want = lstm_reference(x, w, r, b, None, h0, c0, reverse=reverse)
    elif kind == "RNN":
        got = _run(
            rc.rnn_recurrence(steps, batch, hidden, reverse=reverse), [xw, *packed.r, h0], outs
        )
        want = rnn_reference(x, w, r, b, h0, reverse=reverse)
    else:
        lbr = kind == "GRU"
        func = rc.gru_recurrence(steps, batch, hidden, linear_before_reset=lbr, reverse=reverse)
        extra = [packed.rbh] if lbr else []
        got = _run(func, [xw, *packed.r, *extra, h0], outs)
        want = gru_reference(x, w, r, b, h0, linear_before_reset=lbr, reverse=reverse)
    _compare(got, want, f"{kind} T={steps} B={batch} H={hidden} reverse={reverse}")


def test_thread_chunks_only_change_the_walk_order():
    """Panels split for 1, 2 or 4 threads (zig-zag walks) give bit-identical results."""
    steps, batch, hidden = 5, 2, 64
    _, _, _, _, h0, c0, _, packed, xw = _problem("LSTM", steps, batch, 4, hidden, seed=1)
    outs = [(steps, batch, hidden), (batch, hidden), (batch, hidden)]
    results = [
        _run(rc.lstm_recurrence(steps, batch, hidden, threads=n), [xw, *packed.r, h0, c0], outs)
        for n in (1, 2, 4)
    ]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
