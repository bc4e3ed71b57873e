"""Pruned models end to end against ONNX Runtime: sparsities 0-95 %, unstructured and blocks."""

from __future__ import annotations

import pytest

import tvm_sparse
from conftest import MODEL_TOLERANCE, assert_close, ort_run
from tvm_sparse import examples
from tvm_sparse.frontend.onnx import input_specs, random_inputs

SPARSITIES = [0.0, 0.5, 0.8, 0.9, 0.95]
PATTERNS = [(1, 1), (4, 1), (16, 1)]


def run_and_compare(model, **kwargs):
    inputs = random_inputs(input_specs(model), seed=5)
    cm = tvm_sparse.compile(model, **kwargs)
    for i, (a, b) in enumerate(zip(cm.run(inputs), ort_run(model, inputs))):
        assert_close(a, b, f"output {i}", MODEL_TOLERANCE)
    return cm


@pytest.mark.parametrize("block", PATTERNS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_mobilenet(sparsity, block):
    model = examples.mobilenet_v1(size=64, width=0.5, sparsity=sparsity, block=block, seed=1)
    cm = run_and_compare(model, sparse="force", policy="threshold")
    kernels = {r["kernel"] for r in cm.report}
    assert (sparsity > 0) == any(k.startswith("bsr_") for k in kernels), kernels


@pytest.mark.parametrize("block", PATTERNS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("sparsity", [0.0, 0.8, 0.95])
def test_resnet(sparsity, block):
    model = examples.resnet(
        size=32,
        stages=(16, 32),
        blocks_per_stage=1,
        classes=64,
        sparsity=sparsity,
        block=block,
        seed=2,
    )
    run_and_compare(model, sparse="force", policy="threshold")


@pytest.mark.parametrize("kind", ["uni", "bidirectional", "selective", "stacked"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_lstm(kind, sparsity):
    gates = {"i": sparsity, "o": sparsity, "f": sparsity, "c": 0.0} if kind == "selective" else None
    model = examples.lstm(
        seq_len=12,
        batch=1,
        input_size=64,
        hidden=128,
        layers=2 if kind == "stacked" else 1,
        bidirectional=kind == "bidirectional",
        sparsity=sparsity,
        block=(16, 1),
        gate_sparsity=gates,
        seed=3,
    )
    run_and_compare(model, sparse="force", policy="threshold")


def test_measured_auto_on_a_pruned_net():
    model = examples.mobilenet_v1(size=64, width=0.5, sparsity=0.9, block=(4, 1), seed=4)
    cm = run_and_compare(model)  # sparse="auto", policy="measured"
    for row in cm.report:
        times = row.get("times_us")
        if times:
            assert times[row["kernel"]] == min(times.values()), row
