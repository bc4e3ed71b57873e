"""Sparsity measurement conventions ([out, in] views, RxC blocks) and magnitude pruning."""

from __future__ import annotations

import numpy as np
import pytest

from tvm_sparse.examples import prune_out_in, prune_weight
from tvm_sparse.sparsity import as_out_in, element_sparsity, weight_stats, zero_block_fraction


def test_views_follow_the_out_in_convention(rng):
    w = rng.standard_normal((5, 7)).astype(np.float32)  # MatMul weight [K, N]
    (view,) = as_out_in("MatMul", w)
    assert view.shape == (7, 5)
    conv = rng.standard_normal((4, 3, 2, 2))
    (cview,) = as_out_in("Conv", conv)
    assert cview.shape == (4, 12)
    assert cview[1, 3 * (1 * 2 + 0) + 2] == conv[1, 2, 1, 0]  # I innermost after (kh, kw)
    assert len(as_out_in("LSTM", rng.standard_normal((2, 8, 3)))) == 2


def test_zero_block_fraction_counts_partial_blocks():
    w = np.ones((5, 6))
    w[:4, :4] = 0
    assert zero_block_fraction(w, (4, 4)) == pytest.approx(1 / 4)  # 2x2 padded blocks
    assert zero_block_fraction(np.zeros((3, 3)), (2, 2)) == 1.0
    assert zero_block_fraction(np.ones((3, 3)), (1, 1)) == 0.0


@pytest.mark.parametrize("block", [(1, 1), (4, 1), (16, 1), (1, 4), (8, 8)])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_pruning_produces_the_requested_block_pattern(rng, block, sparsity):
    w = rng.standard_normal((64, 48)).astype(np.float32)
    pruned = prune_out_in(w, sparsity, block)
    assert zero_block_fraction(pruned, block) == pytest.approx(sparsity, abs=0.02)
    assert element_sparsity(pruned) == pytest.approx(sparsity, abs=0.02)
    kept = pruned != 0
    np.testing.assert_array_equal(pruned[kept], w[kept])


def test_prune_weight_in_onnx_layouts(rng):
    conv = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    pruned = prune_weight("Conv", conv, 0.75, (4, 1))
    (view,) = as_out_in("Conv", pruned)
    assert zero_block_fraction(view, (4, 1)) == pytest.approx(0.75)
    mm = rng.standard_normal((32, 16)).astype(np.float32)  # [K, N]
    stats = weight_stats(as_out_in("MatMul", prune_weight("MatMul", mm, 0.5, (16, 1))))
    assert stats["zero_blocks"]["16x1"] == pytest.approx(0.5)


def test_gate_sparsity_follows_onnx_gate_order(rng):
    from tvm_sparse.sparsity import gate_sparsity

    w = rng.standard_normal((2, 4 * 8, 5)).astype(np.float32)
    w[:, 8:16] = 0  # gate "o" (order i, o, f, c)
    stats = gate_sparsity("LSTM", w)
    assert stats == {"i": 0.0, "o": 1.0, "f": 0.0, "c": 0.0}


def test_report_has_per_gate_sparsity_for_selective_pruning():
    from tvm_sparse.examples import lstm
    from tvm_sparse.report import weight_layers

    model = lstm(4, 1, 32, 64, gate_sparsity={"i": 0.9, "o": 0.9, "f": 0.9, "c": 0.0})
    (row,) = weight_layers(model)
    gates = row["weights"]["R"]["gates"]
    assert gates["c"] == 0.0 and all(gates[g] == pytest.approx(0.9, abs=0.01) for g in "iof")
