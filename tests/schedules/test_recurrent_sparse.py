"""Sparse fused recurrent kernels against the float64 NumPy references; sparse packing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st

from tvm_sparse.examples import prune_out_in
from tvm_sparse.schedules import recurrent as rc
from tvm_sparse.schedules.recurrent_sparse import sparse_recurrence
from tvm_sparse.schedules.recurrent_sparse_pack import FORMATS, pack_sparse, sparse_pattern_r

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reference_rnn import gru_reference, lstm_reference, rnn_reference  # noqa: E402

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver5", "num-cores": 2})
# float32 kernel vs float64 reference: fp32 rounding of H-long dot products over T steps.
TOL = {"float32": {"rtol": 1e-5, "atol": 1e-5}}


def _r(kind: str, hidden: int, masks: list, rng) -> np.ndarray:
    """R [gates * H, H] with gate g's rows pruned by masks[g] ("dense", "zero", a sparsity
    for random pruning, or ("16x1", sparsity) for 16x1 blocks)."""
    n_g, scale = rc.GATES[kind], 1.0 / np.sqrt(hidden)
    r = rng.uniform(-scale, scale, (n_g * hidden, hidden)).astype(np.float32)
    for g, mask in enumerate(masks):
        rows = slice(g * hidden, (g + 1) * hidden)
        if mask == "zero":
            r[rows] = 0
        elif isinstance(mask, tuple):
            r[rows] = prune_out_in(r[rows], mask[1], (16, 1))
        elif mask != "dense":
            r[rows] = prune_out_in(r[rows], mask)
    return r


def _run_case(kind, fmt, sparse, masks, shape, *, reverse=False, peephole=False, threads=2):
    """Build and run the sparse kernel, compare y, h_n (c_n) with the reference."""
    steps, batch, n_in, hidden = shape
    rng = np.random.default_rng(hidden * 7 + steps)
    n_g, scale = rc.GATES[kind], 1.0 / np.sqrt(hidden)

    def rand(*s, lim=scale):
        return rng.uniform(-lim, lim, s).astype(np.float32)

    x, w = rand(steps, batch, n_in, lim=1.0), rand(n_g * hidden, n_in)
    r, b = _r(kind, hidden, masks, rng), rand(2 * n_g * hidden)
    h0, c0 = rand(batch, hidden, lim=1.0), rand(batch, hidden, lim=1.0)
    p = rand(3 * hidden, lim=0.5)
    packed = rc.pack_weights(kind, hidden, w, r, b, batch=batch)
    xw = (x.reshape(steps * batch, n_in) @ packed.w + packed.bias).reshape(steps, batch, -1)
    weights = pack_sparse(kind, r, fmt, sparse, batch=batch, threads=threads)
    func = sparse_recurrence(weights, steps, batch, hidden, reverse=reverse, peephole=peephole)
    lay = rc.panel_layout(kind, hidden, batch)
    extra = [rc.pack_vector(p, lay)] if peephole else []
    extra += [packed.rbh] if kind == "GRU" else []
    states = [h0, c0] if kind == "LSTM" else [h0]
    outs = [(steps, batch, hidden)] + [(batch, hidden)] * len(states)
    got = _run(func, [xw, *weights.arrays(), *extra, *states], outs)
    if kind == "LSTM":
        want = lstm_reference(x, w, r, b, p if peephole else None, h0, c0, reverse=reverse)
    elif kind == "RNN":
        want = rnn_reference(x, w, r, b, h0, reverse=reverse)
    else:
        lbr = kind == "GRU"
        want = gru_reference(x, w, r, b, h0, linear_before_reset=lbr, reverse=reverse)
    _compare(got, want, f"{kind} {fmt} sparse={sparse} masks={masks} shape={shape}")
    return got


def _run(func, args, out_shapes):
    """Build and call; outputs are pre-filled with NaN so unwritten elements fail."""
    lib = tvm.compile(func, TARGET)
    dev = tvm.cpu()
    ins = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in args]
    outs = [tvm.runtime.tensor(np.full(s, np.nan, np.float32), dev) for s in out_shapes]
    lib(*ins, *outs)
    return [o.numpy() for o in outs]


def _compare(got, want, what):
    for name, g, w in zip(("y", "h_n", "c_n"), got, want, strict=False):
        assert g.shape == w.shape, f"{what} {name}: shape {g.shape} != {w.shape}"
        bad = ~np.isclose(g, w, **TOL["float32"])
        if bad.any():
            idx = tuple(int(i[0]) for i in np.nonzero(bad))
            pytest.fail(
                f"{what} {name}: {bad.sum()} mismatches, first at {idx}: {g[idx]} vs {w[idx]}"
            )


# (kind, format, sparse flags, gate masks, (T, B, I, H), reverse, peephole). H = 40 pads the
# last LSTM/GRU panel (unit 16); batch 3 takes whole tiles of several rows; batch 10 LSTM has
# 8-unit panels (8x1 blocks only).
CASES = [
    ("LSTM", "bsr16x1", (1, 1, 1, 0), [("16x1", 0.9)] * 3 + ["dense"], (5, 1, 7, 48), 0, 1),
    ("LSTM", "bsr16x1", (1, 1, 1, 1), [0.7, "zero", ("16x1", 0.5), "dense"], (4, 3, 5, 40), 1, 0),
    ("LSTM", "bsr8x1", (1, 0, 1, 1), [0.8, "dense", "zero", 0.5], (3, 10, 4, 32), 0, 1),
    ("LSTM", "sell16", (1, 1, 1, 0), [0.9, 0.95, 0.6, "dense"], (5, 1, 6, 64), 1, 0),
    ("LSTM", "sell16", (0, 1, 1, 1), ["dense", "zero", 0.9, "dense"], (3, 2, 3, 40), 0, 0),
    ("LSTM", "win16x32", (1, 1, 1, 0), [0.9, 0.97, 0.5, "dense"], (5, 1, 6, 80), 0, 1),
    ("LSTM", "win16x32", (1, 0, 1, 1), ["zero", "dense", 0.9, 0.3], (3, 3, 4, 40), 1, 0),
    ("GRU", "bsr16x1", (1, 1, 0), [("16x1", 0.9), 0.8, "dense"], (4, 1, 5, 48), 1, 0),
    ("GRU", "sell16", (1, 1, 1), [0.9, "zero", "dense"], (3, 3, 4, 40), 0, 0),
    ("GRU0", "bsr16x1", (1, 0, 1), [0.9, "dense", ("16x1", 0.7)], (4, 1, 5, 48), 0, 0),
    ("GRU0", "sell16", (0, 1, 1), ["dense", 0.9, 0.5], (3, 3, 4, 40), 1, 0),
    ("GRU0", "bsr8x1", (1, 1, 1), ["zero", 0.9, "dense"], (3, 10, 4, 32), 1, 0),
    ("GRU0", "win16x32", (1, 1, 0), [0.9, 0.9, "dense"], (4, 2, 3, 48), 0, 0),
    ("GRU", "win16x32", (1, 1, 1), [0.9, "dense", 0.95], (3, 1, 4, 40), 1, 0),
    ("RNN", "bsr16x1", (1,), [("16x1", 0.8)], (5, 2, 4, 128), 1, 0),
    ("RNN", "sell16", (1,), [0.9], (4, 1, 3, 48), 0, 0),
    ("RNN", "bsr8x1", (1,), [0.5], (3, 10, 4, 40), 0, 0),
    ("RNN", "win16x32", (1,), [0.9], (3, 2, 4, 64), 1, 0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[4]}")
def test_sparse_recurrence(case):
    kind, fmt, flags, masks, shape, reverse, peephole = case
    sparse = tuple(bool(f) for f in flags)
    _run_case(kind, fmt, sparse, masks, shape, reverse=bool(reverse), peephole=bool(peephole))


def test_thread_chunks_only_change_the_split():
    """Packed for 1, 2 or 3 threads (different panel ranges): bit-identical results."""
    case = ("LSTM", "bsr16x1", (True, True, True, False), [0.9, 0.9, 0.5, "dense"], (4, 2, 3, 80))
    results = [_run_case(*case, threads=n) for n in (1, 2, 3)]
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    kind=st.sampled_from(["LSTM", "GRU", "GRU0", "RNN"]),
    hidden=st.integers(8, 70),
    batch=st.sampled_from([1, 2]),
    data=st.data(),
)
def test_random_patterns(kind, hidden, batch, data):
    """Random gate masks: empty slices, all-zero and fully dense gates, H not a block multiple."""
    lay = rc.panel_layout(kind, hidden, batch)
    fits = [f for f in sorted(FORMATS) if all(g.unit % FORMATS[f].rows == 0 for g in lay.groups)]
    if not fits:
        return  # no format fits these panels; candidates() offers only "dense"
    fmt = data.draw(st.sampled_from(fits))
    n_g = rc.GATES[kind]
    masks = data.draw(
        st.lists(
            st.sampled_from(["dense", "zero", 0.5, 0.97, ("16x1", 0.8)]), min_size=n_g, max_size=n_g
        )
    )
    sparse = tuple(data.draw(st.lists(st.booleans(), min_size=n_g, max_size=n_g)))
    _run_case(kind, fmt, sparse, masks, (3, batch, 2, hidden), reverse=data.draw(st.booleans()))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@settings(max_examples=15, deadline=None, derandomize=True)
@given(hidden=st.integers(1, 90), batch=st.sampled_from([1, 3]), seed=st.integers(0, 3))
def test_pack_round_trip(fmt, hidden, batch, seed):
    """Every entry of R is stored exactly once (sparse slices plus dense panels)."""
    rng = np.random.default_rng(seed)
    for kind in ("LSTM", "GRU0"):
        lay = rc.panel_layout(kind, hidden, batch)
        if any(g.unit % FORMATS[fmt].rows for g in lay.groups):
            continue
        n_g = rc.GATES[kind]
        choices = ["dense", "zero", 0.9, 0.3]
        r = _r(kind, hidden, [choices[i] for i in rng.integers(0, 4, n_g)], rng)
        sparse = tuple(bool(v) for v in rng.integers(0, 2, n_g))
        weights = pack_sparse(kind, r, fmt, sparse, batch=batch, threads=3)
        np.testing.assert_array_equal(sparse_pattern_r(weights, hidden), r)
        ptr = [g.indptr for g in weights.groups if g.indptr is not None]
        assert all(np.all(np.diff(p) % weights.chains == 0) for p in ptr)
        assert np.all(np.diff(weights.bounds, axis=1) >= 0)
        assert np.all(weights.bounds[:, -1] == [lay.panels(i) for i in range(len(lay.groups))])


def test_formats_must_fit_the_panels():
    r = np.zeros((4 * 32, 32), np.float32)
    with pytest.raises(ValueError, match="do not divide"):
        pack_sparse("LSTM", r, "bsr16x1", (True,) * 4, batch=10)  # 8-unit panels
    with pytest.raises(ValueError, match="gates"):
        pack_sparse("LSTM", r, "bsr16x1", (True,) * 3)


def test_kernel_attributes_and_signature():
    r = _r("LSTM", 32, [0.9, 0.9, 0.9, "dense"], np.random.default_rng(0))
    weights = pack_sparse("LSTM", r, "bsr16x1", (True, True, True, False))
    func = sparse_recurrence(weights, 3, 1, 32, reverse=True, check_lengths=True)
    assert func.attrs["tvm_sparse.layer"] == "LSTM" and func.attrs["tvm_sparse.kind"] == "LSTM"
    assert func.attrs["tvm_sparse.format"] == "bsr16x1"
    assert func.attrs["tvm_sparse.direction"] == "reverse"
    assert func.attrs["tirx.noalias"] and func.attrs["tirx.is_scheduled"]
    names = [p.name for p in func.params]
    assert names == ["xw", "sd", "si", "sp", "rd", "bounds", "h0", "c0", "lens", "y", "hn", "cn"]


@pytest.mark.parametrize(
    "fmt, instruction",
    [("bsr16x1", "{1to16}"), ("sell16", "vgatherdps"), ("win16x32", "vpermt2ps")],
)
def test_hot_loop_instructions(fmt, instruction):
    """BSR: one broadcast-FMA per block; SELL: hardware gathers; windows: two-register
    permutes (vpermt2ps or vpermi2ps); no libm calls anywhere."""
    r = _r("LSTM", 256, [0.9] * 4, np.random.default_rng(0))
    weights = pack_sparse("LSTM", r, fmt, (True,) * 4)
    asm = tvm.compile(sparse_recurrence(weights, 2, 1, 256), TARGET).mod.inspect_source("asm")
    fma = [line for line in asm.splitlines() if "vfmadd" in line and "zmm" in line]
    lines = fma if fmt == "bsr16x1" else asm.splitlines()
    alternatives = {"vpermt2ps": ("vpermt2ps", "vpermi2ps")}.get(instruction, (instruction,))
    assert any(a in line for line in lines for a in alternatives), f"no {instruction}"
    assert "pause" in asm, "the spin barrier should poll with pause"
    for libm in ("expf", "tanhf", "exp@", "tanh@"):
        assert libm not in asm, f"{libm} call: the activations were not vectorised"
