"""int8 LSTM kernels (DynamicQuantizeLSTM semantics): the input projection bit-exact against a
NumPy integer reference; the recurrence, dense and 16x4 block-sparse, against a NumPy model
of ONNX Runtime's step (exact dynamic quantization and integer product, float32 gates)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from tvm_sparse.schedules import int8_recurrent as ir

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver5", "num-cores": 2})


def _run(func, arrays):
    lib = tvm.compile(func.with_attr("global_symbol", "main"), target=TARGET)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
    lib(*args)
    return [a.numpy() for a in args]


def dynamic_quantize(x: np.ndarray):
    """ORT's uint8 quantization of x from its own range, in float32, half to even."""
    lo, hi = np.float32(min(x.min(), 0)), np.float32(max(x.max(), 0))
    span = np.float32(hi - lo)
    scale = np.float32(1) if span == 0 else np.float32(span / np.float32(255))
    zp = np.round(np.clip(-lo / scale, 0, 255)).astype(np.float32)
    return np.clip(np.round(x / scale) + zp, 0, 255).astype(np.int64), scale, int(zp)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def reference(xw, r, r_scale, bias, peep, h0, c0, reverse=False):
    """One direction: per step, q(h) @ R exactly, then ORT's float order."""
    hidden = r.shape[0]
    h, c, ys = h0, c0, []
    for t in reversed(range(len(xw))) if reverse else range(len(xw)):
        q, scale, zp = dynamic_quantize(h)
        acc = (q - zp) @ r.astype(np.int64)
        g = xw[t] + acc.astype(np.float32) * (scale * r_scale)
        gi, go, gf, gc = (g[:, k * hidden : (k + 1) * hidden] for k in range(4))
        if peep is not None:
            gi, gf = gi + peep[0] * c, gf + peep[2] * c
        b = [bias[k * hidden : (k + 1) * hidden] for k in range(4)]
        gi, go, gf, gc = gi + b[0], go + b[1], gf + b[2], gc + b[3]
        c = (_sigmoid(gf) * c + _sigmoid(gi) * np.tanh(gc)).astype(np.float32)
        if peep is not None:
            go = go + peep[1] * c
        h = (_sigmoid(go) * np.tanh(c)).astype(np.float32)
        ys.append(h)
    return np.stack(ys[::-1] if reverse else ys), h, c


def _pruned_r(rng, hidden, density):
    """int8 R [H, 4H] with whole 16x4 blocks (4 inputs x 16 units of one gate) zeroed."""
    r = rng.integers(-127, 128, (hidden, 4 * hidden))
    keep = rng.random((hidden // 4, 4 * hidden // 16)) < density
    return (r * np.repeat(np.repeat(keep, 4, 0), 16, 1)).astype(np.int8)


CASES = [
    # (T, B, H, sparse, peephole, reverse, density)
    (6, 1, 32, False, False, False, 1.0),
    (5, 3, 48, False, True, False, 1.0),  # panels of 16 units, batch tiles with a tail
    (5, 5, 64, False, False, True, 1.0),
    (6, 1, 64, True, True, False, 0.3),
    (5, 4, 96, True, False, True, 0.1),
    (4, 2, 64, True, False, False, 0.0),  # no block left
    (4, 1, 64, True, False, False, 1.0),  # every block kept
]


@pytest.mark.parametrize("case", CASES)
def test_recurrence_matches_reference(case):
    n_t, n_b, hidden, sparse, peephole, reverse, density = case
    rng = np.random.default_rng(hidden + n_b)
    r = _pruned_r(rng, hidden, density)
    # scales that make one unit of the integer product visible in the outputs
    r_scale = rng.uniform(0.002, 0.01, 4 * hidden).astype(np.float32) / np.sqrt(hidden / 16)
    xw = rng.standard_normal((n_t, n_b, 4 * hidden)).astype(np.float32)
    bias = (rng.standard_normal(4 * hidden) * 0.1).astype(np.float32)
    peep = (rng.standard_normal((3, hidden)) * 0.1).astype(np.float32) if peephole else None
    h0, c0 = (rng.standard_normal((2, n_b, hidden)) * 0.5).astype(np.float32)
    unit = ir.panel_unit(hidden)
    packed = ir.pack_r(r, unit, sparse=sparse)
    func = ir.lstm_int8_recurrence(
        n_t, n_b, hidden, blocks=packed.blocks if sparse else None, peephole=peephole,
        reverse=reverse,
    )  # fmt: skip
    weights = [packed.values, packed.indptr, packed.indices] if sparse else [packed.values]
    outs = [np.zeros((n_t, n_b, hidden), np.float32)] + [np.zeros((n_b, hidden), np.float32)] * 2
    arrays = [xw, *weights, packed.colsum, ir.pack_columns(r_scale, hidden, unit), bias]
    arrays += ([peep] if peephole else []) + [h0, c0, *outs]
    got = _run(func, arrays)[-3:]
    expected = reference(xw, r, r_scale, bias, peep, h0, c0, reverse)
    for name, a, e in zip(("y", "h_n", "c_n"), got, expected):
        # the kernel's sigmoid / tanh are within a few ulp of NumPy's; a wrong integer
        # product (one unit: ~1e-4 here) or a flipped quantization step would be far larger
        np.testing.assert_allclose(a, e, rtol=0, atol=2e-6, err_msg=name)


def test_packing_round_trip_and_block_count():
    rng = np.random.default_rng(3)
    r = _pruned_r(rng, 64, 0.25)
    assert np.array_equal(ir.unpack_r(ir.pack_r(r, 32).values, 64), r)
    sparse = ir.pack_r(r, 32, sparse=True)
    blocks = (r.reshape(16, 4, 16, 16) != 0).any(axis=(1, 3)).sum()
    assert sparse.blocks == blocks and sparse.values.shape == (blocks, 64)
    assert ir.block_fraction(r, 32) == pytest.approx(1 - blocks / (16 * 16))
    assert ir.panel_unit(40) is None and ir.panel_unit(48) == 16 and ir.panel_unit(64) == 32
    with pytest.raises(ValueError, match="int8"):
        ir.pack_r(r.astype(np.int32) * 2, 32)


@pytest.mark.parametrize("m,k,n", [(7, 12, 48), (10, 64, 160), (3, 1024, 512)])
def test_projection_bit_exact(m, k, n):
    rng = np.random.default_rng(m)
    q = rng.integers(0, 256, (m, k)).astype(np.uint8)
    w = rng.integers(-128, 128, (k, n)).astype(np.int8)
    x_scale, zp = np.array([0.013], np.float32), np.array([117], np.uint8)
    w_scale = rng.uniform(0.001, 0.01, n).astype(np.float32)
    colsum = w.astype(np.int64).sum(axis=0).astype(np.int32)
    arrays = [q, x_scale, zp, ir.pack_projection(w), colsum, w_scale]
    got = _run(ir.int8_projection(m, k, n), [*arrays, np.zeros((m, n), np.float32)])[-1]
    acc = (q.astype(np.int64) - 117) @ w.astype(np.int64)
    np.testing.assert_array_equal(got, acc.astype(np.float32) * (x_scale[0] * w_scale))
