"""Calibration: zero fractions of every weight layer's data input, checked against NumPy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tvm_sparse import examples
from tvm_sparse.calibration import data_inputs, input_sparsity_by_key, measure_input_sparsity
from tvm_sparse.errors import TvmSparseError
from tvm_sparse.passes.collect_sparse_layers import weight_key


def small_net(seed=0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x -> Conv3x3 -> Relu -> Conv1x1 -> Relu -> Flatten -> MatMul(W first: W . x^T) and Gemm."""
    rng = np.random.default_rng(seed)
    w = {
        "wc1": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
        "wc2": rng.standard_normal((4, 4, 1, 1)).astype(np.float32),
        "wm": rng.standard_normal((6, 64)).astype(np.float32),
        "wg": rng.standard_normal((5, 6)).astype(np.float32),
        "shape": np.array([64, 1], np.int64),
    }
    nodes = [
        helper.make_node("Conv", ["x", "wc1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "wc2"], ["c2"]),  # unnamed: "Conv_2"
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Reshape", ["r2", "shape"], ["flat"], name="flat"),
        helper.make_node("MatMul", ["wm", "flat"], ["m"], name="mm"),  # weight is input 0
        helper.make_node("Relu", ["m"], ["mr"], name="relu3"),
        helper.make_node("Gemm", ["mr", "wg"], ["y"], name="gemm", transA=1, transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, w


def numpy_inputs(x: np.ndarray, w: dict) -> dict[str, np.ndarray]:
    """The data input of every weight layer, computed with NumPy (float64)."""

    def conv(a, k, pad):
        ap = np.pad(a, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        o, _, kh, kw = k.shape
        out = np.zeros((1, o, a.shape[2], a.shape[3]))
        for dy in range(kh):
            for dx in range(kw):
                win = ap[0, :, dy : dy + a.shape[2], dx : dx + a.shape[3]]
                out[0] += np.einsum("oi,ihw->ohw", k[:, :, dy, dx], win)
        return out

    r1 = np.maximum(conv(x.astype(np.float64), w["wc1"], 1), 0)
    r2 = np.maximum(conv(r1, w["wc2"], 0), 0)
    mr = np.maximum(w["wm"] @ r2.reshape(64, 1), 0)
    return {"conv1": x, "Conv_2": r1, "mm": r2.reshape(64, 1), "gemm": mr}


def zero_fraction(arrays: list[np.ndarray]) -> float:
    return sum(int(np.sum(a == 0)) for a in arrays) / sum(a.size for a in arrays)


def test_data_inputs_skip_weights_and_constants():
    model, _ = small_net()
    assert data_inputs(model) == {"conv1": "x", "Conv_2": "r1", "mm": "flat", "gemm": "mr"}


@pytest.mark.parametrize("layout", ["single", "new axis", "batch axis"])
def test_matches_numpy(layout):
    model, w = small_net()
    rng = np.random.default_rng(1)
    samples = [rng.standard_normal((1, 2, 4, 4)).astype(np.float32) for _ in range(3)]
    samples[0][0, 0, :2] = 0  # exact zeros in the graph input too
    if layout == "single":
        samples = samples[:1]
        feed = samples[0]
    elif layout == "new axis":
        feed = np.stack(samples)  # [3, 1, 2, 4, 4]
    else:
        feed = np.concatenate(samples)  # [3, 2, 4, 4] along the batch-1 axis
    got = measure_input_sparsity(model, {"x": feed})
    per_sample = [numpy_inputs(s, w) for s in samples]
    want = {name: zero_fraction([p[name] for p in per_sample]) for name in per_sample[0]}
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-12), name
    assert 0.3 < got["Conv_2"] < 0.8  # a ReLU output: about half zeros


def test_bad_calibration_shapes():
    model, _ = small_net()
    with pytest.raises(TvmSparseError, match="no data for model input"):
        measure_input_sparsity(model, {})
    with pytest.raises(TvmSparseError, match="has shape"):
        measure_input_sparsity(model, {"x": np.zeros((1, 3, 4, 4), np.float32)})


def test_by_key_joins_layer_keys():
    model, w = small_net()
    sparsity = measure_input_sparsity(model, {"x": np.ones((1, 2, 4, 4), np.float32)})
    by_key = input_sparsity_by_key(model, sparsity)
    conv_view = np.moveaxis(w["wc1"], 1, -1).reshape(4, -1)
    assert by_key[weight_key(conv_view)] == sparsity["conv1"] == 0.0
    assert by_key[weight_key(w["wg"])] == sparsity["gemm"]  # Gemm transB: [N, K] as stored


def test_mobilenet_is_quick_and_relu_inputs_are_half_zero():
    model = examples.mobilenet_v1(size=64, width=0.25, classes=10)
    x = np.random.default_rng(0).standard_normal((2, 1, 3, 64, 64)).astype(np.float32)
    got = measure_input_sparsity(model, {"input": x})
    assert len(got) == 28  # stem, 13 x (depthwise, pointwise), FC
    first, *rest = got.values()
    assert first == 0.0
    assert all(0.2 < v < 0.8 for v in rest[:-1])
