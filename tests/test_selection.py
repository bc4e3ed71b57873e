"""Kernel selection: measured choices are the fastest measured, policies behave as documented."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

import tvm_sparse
from conftest import single_node_model
from tvm_sparse.examples import prune_out_in
from tvm_sparse.passes.collect_sparse_layers import MatmulLayer, weight_key
from tvm_sparse.selection import DENSE, candidate_blocks, choose_threshold


def fc_model(sparsity: float, block=(4, 1), m: int = 16, k: int = 256, n: int = 256, seed=0):
    rng = np.random.default_rng(seed)
    w = prune_out_in(rng.standard_normal((n, k)).astype(np.float32), sparsity, block).T
    return single_node_model(
        "MatMul",
        [("x", TensorProto.FLOAT, [m, k])],
        ("y", TensorProto.FLOAT, [m, n]),
        {"w": np.ascontiguousarray(w)},
        name=f"fc{int(sparsity * 100)}",
    )


def layer(sparsity: float, block=(4, 1), shape=(64, 64)) -> MatmulLayer:
    w = prune_out_in(
        np.random.default_rng(3).standard_normal(shape).astype(np.float32), sparsity, block
    )
    return MatmulLayer(weight_key(w), "xw", w, 8)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_measured_choice_is_the_fastest_measured(sparsity):
    cm = tvm_sparse.compile(fc_model(sparsity))
    (row,) = cm.report
    times = row["times_us"]
    assert DENSE in times
    assert times[row["kernel"]] == min(times.values()), row
    if sparsity == 0.0:
        assert row["kernel"] == DENSE and set(times) == {DENSE}
    if row["kernel"] != DENSE:
        assert times[row["kernel"]] < times[DENSE]  # never a sparse kernel that measured slower


def test_candidates_follow_the_pattern():
    blocks = dict(candidate_blocks(layer(0.9, (16, 1))))
    assert (16, 1) in blocks and blocks[(16, 1)] == pytest.approx(0.9, abs=0.02)
    assert (1, 4) not in blocks  # 16x1-pruned weights have few all-zero 1x4 blocks
    assert candidate_blocks(layer(0.0)) == []


def test_threshold_policy():
    sparse = choose_threshold(layer(0.9, (8, 1)))
    assert sparse.variant is not None
    # The largest listed block whose zero fraction passes: 16x1 if pairs of 8x1 blocks align
    # often enough, else 8x1 itself; never a block that loses most of the zeros.
    assert (sparse.variant.rows, sparse.variant.cols) in ((16, 1), (8, 1))
    assert "threshold" in sparse.why
    dense = choose_threshold(layer(0.5, (8, 1)))
    assert dense.kernel == DENSE and "below threshold" in dense.why


@pytest.mark.parametrize(
    "mode, policy", [("off", "measured"), ("force", "measured"), ("auto", "threshold")]
)
def test_modes_compile_and_match(mode, policy):
    model = fc_model(0.9)
    cm = tvm_sparse.compile(model, sparse=mode, policy=policy)
    x = np.random.default_rng(4).standard_normal((16, 256)).astype(np.float32)
    w = np.frombuffer(model.graph.initializer[0].raw_data, np.float32).reshape(256, 256)
    np.testing.assert_allclose(cm.run({"x": x})[0], x @ w, rtol=1e-4, atol=1e-4)
    (row,) = cm.report
    assert (row["kernel"] == DENSE) == (mode == "off")


def test_bad_mode_is_a_clear_error():
    with pytest.raises(tvm_sparse.TvmSparseError, match="sparse: expected one of"):
        tvm_sparse.compile(fc_model(0.5), sparse="maybe")


def test_timing_signature_tells_pointwise_convs_of_different_spatial_shape_apart():
    """7x7 and 8x8 pointwise convs both pad to 64 columns, but are timed as different convs."""
    from tvm_sparse.selection import Timer

    a, b = layer(0.5, shape=(64, 64)), layer(0.5, shape=(64, 64))
    a.columns = b.columns = 64
    a.form = b.form = "wx"
    a.conv_hw, b.conv_hw = (7, 7), (8, 8)
    assert Timer.signature(a, DENSE) != Timer.signature(b, DENSE)


def test_row_major_layers_also_time_the_kernel_with_transposes_inside():
    """MatMul-form layers ("xw") of 2..MAX_ROWS rows get the "rm" candidate; others do not."""
    from tvm_sparse.schedules.bsr_matmul import Variant
    from tvm_sparse.schedules.bsr_matmul_rowmajor import MAX_ROWS
    from tvm_sparse.selection import variants_for

    fc = layer(0.9, (4, 1))
    assert Variant(4, 1, "rm") in variants_for(fc, (4, 1))
    for columns, form in ((1, "xw"), (MAX_ROWS + 1, "xw"), (8, "wx")):
        fc.columns, fc.form = columns, form
        assert all(v.form != "rm" for v in variants_for(fc, (4, 1))), (columns, form)


def quant_layer(w):
    from tvm_sparse.passes.rewrite_quantized import QuantLayer

    n = w.shape[0]
    return QuantLayer(
        key="t",
        kind="matmul",
        weight=np.clip(np.rint(w * 50), -127, 127).astype(np.int8),
        columns=16,
        x_dtype="uint8",
        x_zp=0,
        bias=np.zeros(n, np.int32),
        scale=np.ones(n, np.float32),
        y_dtype="uint8",
        y_zp=0,
    )


def test_int8_candidates_include_column_quads_for_column_pruning():
    from tvm_sparse.selection import int8_candidates, quad_zero_fraction

    rng = np.random.default_rng(4)
    w = prune_out_in(rng.standard_normal((64, 256)).astype(np.float32), 0.9, (4, 1))
    assert quad_zero_fraction(w, 4) == pytest.approx(0.9, abs=0.03)
    cands = {v.name: zeros for v, zeros in int8_candidates(quant_layer(w))}
    # a 4x1 pruning keeps ~1/3 of the aligned 4x4 blocks but ~1/10 as column quads, which
    # cost about twice as much each: listed with the cost-equivalent zero fraction 1 - 2 x 0.1
    assert cands["cq_wx_4x4_u8s8"] == pytest.approx(0.8, abs=0.06)
    assert cands["bsr_wx_4x4_u8s8"] < cands["cq_wx_4x4_u8s8"]
    dense = rng.standard_normal((64, 256)).astype(np.float32)
    assert [v.name for v, _ in int8_candidates(quant_layer(dense))] == ["dense_wx_4x4_u8s8"]


def test_int8_candidates_are_timed_in_alternating_rounds(monkeypatch):
    """Each candidate is sampled once per round, rounds interleaved, and keeps its fastest
    sample (a slow phase of the host hits every candidate alike); cached times are reused."""
    import tvm

    from tvm_sparse import selection

    w = prune_out_in(np.random.default_rng(5).standard_normal((64, 256)), 0.9, (4, 1))
    layer8 = quant_layer(w.astype(np.float32))
    variants = [v for v, _ in selection.int8_candidates(layer8)]
    assert len(variants) >= 3
    order = []
    # samples: candidate i's rounds give 10 + i, then its fastest, then slower ones
    samples = {v.name: iter([10.0 + i, 1.0 + i, 50.0, 70.0, 30.0]) for i, v in enumerate(variants)}

    def sampler(layer, variant, target):
        def sample():
            order.append(variant.name)
            return next(samples[variant.name])

        return sample

    monkeypatch.setattr(selection, "_int8_sampler", sampler)
    target, cache = tvm.target.Target({"kind": "llvm"}), {}
    times = selection.time_int8_candidates(layer8, variants, target, cache)
    names = [v.name for v in variants]
    assert order == names * selection.INT8_TIMING_ROUNDS
    assert times == {name: 1.0 + i for i, name in enumerate(names)}
    order.clear()
    assert selection.time_int8_candidates(layer8, variants, target, cache) == times
    assert order == []
