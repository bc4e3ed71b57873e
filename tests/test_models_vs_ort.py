"""Whole random models (fixed seeds) through tvm_sparse.compile, matching ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest

import tvm_sparse
from conftest import MODEL_TOLERANCE, assert_close, ort_run
from tvm_sparse import examples
from tvm_sparse.frontend.onnx import input_specs, random_inputs

MODELS = {
    "mobilenet_v1_w0.5_96": lambda: examples.mobilenet_v1(size=96, width=0.5, seed=3),
    "mobilenet_v1_224": lambda: examples.mobilenet_v1(size=224, seed=4),
    "resnet_small_64": lambda: examples.resnet(size=64, stages=(16, 32, 64, 128), seed=5),
    "resnet18_like_112": lambda: examples.resnet(size=112, seed=6),
    "lstm_T50_I256_H512": lambda: examples.lstm(50, 1, 256, 512, seed=7),
    "lstm_bidir_T30_B2_I128_H256": lambda: examples.lstm(
        30, 2, 128, 256, bidirectional=True, seed=8
    ),
    "lstm_stacked_bidir_2x": lambda: examples.lstm(
        20, 1, 128, 256, layers=2, bidirectional=True, seed=9
    ),
    "lstm_stacked_3x_H512": lambda: examples.lstm(25, 1, 256, 512, layers=3, seed=10),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_model_matches_onnxruntime(name):
    model = MODELS[name]()
    inputs = random_inputs(input_specs(model), seed=11)
    compiled = tvm_sparse.compile(model, target="host")
    ours = compiled.run(inputs)
    ref = ort_run(model, inputs)
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert_close(a, b, f"{name} output {i}", MODEL_TOLERANCE)
    assert np.abs(ref[0]).max() > 1e-3, "degenerate model: outputs are all ~0"
