"""int8 ONNX models as people ship them, end to end against ONNX Runtime on the same file.

Files come from ONNX Runtime's own quantizer: ``quantize_static`` in QDQ and QOperator format
(uint8 or int8 activations, per-tensor or per-channel int8 weights, symmetric or not) and
``quantize_dynamic`` (MatMulInteger / ConvInteger with DynamicQuantizeLinear, and
com.microsoft.DynamicQuantizeLSTM). Each is compiled with ``tvm_sparse.compile`` and must give
ORT's outputs within one quantisation step of the output: the scale of the DequantizeLinear
that produces it, or for float outputs of dynamic models the step ``range / 255`` ORT's
dynamic quantization would give that tensor. Where results differ at all, the cause is a
rounding tie decided differently (ORT requantizes in float32 with fused scales, the ONNX
formulas we follow for QDQ and QLinearConv/MatMul in float64); the measured maxima are 0
steps for every case here (LSTM: 6e-8 absolute).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

import tvm_sparse
from conftest import ort_run
from tvm_sparse import examples


def _mlp() -> onnx.ModelProto:
    """MatMul + Add + ReLU, then Gemm: both weight-op forms ORT's quantizer handles."""
    rng = np.random.default_rng(0)
    inits = {
        "w1": (rng.standard_normal((32, 64)) / 6).astype(np.float32),
        "b1": (rng.standard_normal(64) * 0.1).astype(np.float32),
        "w2": (rng.standard_normal((10, 64)) / 8).astype(np.float32),
        "b2": (rng.standard_normal(10) * 0.1).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["h2"], name="bias1"),
        helper.make_node("Relu", ["h2"], ["h3"], name="relu1"),
        helper.make_node("Gemm", ["h3", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 10])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


MODELS = {
    "mlp": _mlp,
    # Residual Adds (QLinearAdd in QOperator form), strided convs, global pool, Gemm.
    "cnn": lambda: examples.resnet(size=16, stages=(8, 16), blocks_per_stage=1, classes=10),
    "lstm": lambda: examples.lstm(seq_len=6, batch=2, input_size=16, hidden=32),
}


def _feeds(model: onnx.ModelProto, rng) -> dict[str, np.ndarray]:
    return {
        i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(
            np.float32
        )
        for i in model.graph.input
    }


class _Reader(CalibrationDataReader):
    def __init__(self, samples):
        self.samples = iter(samples)

    def get_next(self):
        return next(self.samples, None)


def _output_step(model: onnx.ModelProto, reference: np.ndarray) -> float:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = model.graph.output[0].name
    producer = next(n for n in model.graph.node if out in n.output)
    if producer.op_type == "DequantizeLinear":
        return float(np.max(inits[producer.input[1]]))
    return float(max(reference.max(), 0) - min(reference.min(), 0)) / 255


def _check_against_ort(model: onnx.ModelProto, rng) -> float:
    """Max |ours - ORT| in output quantisation steps, over two random inputs."""
    run = tvm_sparse.compile(model, target="host", sparse="off").run
    worst = 0.0
    for _ in range(2):
        feeds = _feeds(model, rng)
        ours, theirs = run(feeds)[0], ort_run(model, feeds)[0]
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        assert len(np.unique(theirs)) > 8, "degenerate output: the test would prove little"
        worst = max(worst, float(np.abs(ours - theirs).max()) / _output_step(model, theirs))
    return worst


# fmt: off
STATIC_CASES = {
    # id: (format, activations, per_channel, extra_options)
    "qdq-u8-per-tensor": ("QDQ", "QUInt8", False, {}),
    "qdq-u8-per-channel": ("QDQ", "QUInt8", True, {}),
    "qdq-s8-per-tensor": ("QDQ", "QInt8", False, {}),
    "qdq-s8-per-channel-symmetric-activations": ("QDQ", "QInt8", True,
                                                 {"ActivationSymmetric": True}),
    "qdq-u8-asymmetric-weights": ("QDQ", "QUInt8", True, {"WeightSymmetric": False}),
    "qoperator-u8-per-tensor": ("QOperator", "QUInt8", False, {}),
    "qoperator-u8-per-channel": ("QOperator", "QUInt8", True, {}),
    "qoperator-s8-per-channel": ("QOperator", "QInt8", True, {}),
}
# fmt: on


@pytest.mark.parametrize("case", STATIC_CASES.values(), ids=STATIC_CASES.keys())
@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_quantize_static(tmp_path, which, case):
    fmt, activations, per_channel, extra = case
    rng = np.random.default_rng(1)
    model = MODELS[which]()
    onnx.save(model, tmp_path / "fp32.onnx")
    quantize_static(
        tmp_path / "fp32.onnx",
        tmp_path / "int8.onnx",
        _Reader([_feeds(model, rng) for _ in range(8)]),
        quant_format=getattr(QuantFormat, fmt),
        activation_type=getattr(QuantType, activations),
        weight_type=QuantType.QInt8,
        per_channel=per_channel,
        extra_options=extra,
    )
    quantized = onnx.load(tmp_path / "int8.onnx")
    expected_ops = {"QDQ": "DequantizeLinear", "QOperator": "QLinearMatMul"}[fmt]
    if which == "cnn" and fmt == "QOperator":
        expected_ops = "QLinearConv"
    assert expected_ops in {n.op_type for n in quantized.graph.node}
    assert _check_against_ort(quantized, rng) <= 1.0


@pytest.mark.parametrize("weights", ["QInt8", "QUInt8"])
@pytest.mark.parametrize("which", ["mlp", "cnn", "lstm"])
def test_quantize_dynamic(tmp_path, which, weights):
    rng = np.random.default_rng(2)
    onnx.save(MODELS[which](), tmp_path / "fp32.onnx")
    quantize_dynamic(
        tmp_path / "fp32.onnx", tmp_path / "int8.onnx", weight_type=getattr(QuantType, weights)
    )
    quantized = onnx.load(tmp_path / "int8.onnx")
    ops = {n.op_type for n in quantized.graph.node}
    expected = {"mlp": "MatMulInteger", "cnn": "ConvInteger", "lstm": "DynamicQuantizeLSTM"}
    assert expected[which] in ops, ops
    assert _check_against_ort(quantized, rng) <= 1.0


def test_dynamic_quantize_lstm_bidirectional_peepholes_initial_state(tmp_path):
    """DynamicQuantizeLSTM with everything optional given: both directions, P, h0, c0."""
    rng = np.random.default_rng(4)
    t, b, i, h = 5, 2, 8, 16
    w = rng.integers(-127, 128, (2, i, 4 * h)).astype(np.int8)
    r = rng.integers(-127, 128, (2, h, 4 * h)).astype(np.int8)
    inits = {
        "W": w,
        "R": r,
        "B": (rng.standard_normal((2, 8 * h)) * 0.1).astype(np.float32),
        "P": (rng.standard_normal((2, 3 * h)) * 0.1).astype(np.float32),
        "W_scale": rng.uniform(0.002, 0.01, (2, 4 * h)).astype(np.float32),  # per column
        "W_zero_point": np.zeros((2, 4 * h), np.int8),
        "R_scale": np.array([0.004, 0.006], np.float32),
        "R_zero_point": np.zeros(2, np.int8),
    }
    names = ["X", "W", "R", "B", "", "h0", "c0", "P", "W_scale", "W_zero_point", "R_scale",
             "R_zero_point"]  # fmt: skip
    node = helper.make_node(
        "DynamicQuantizeLSTM", names, ["Y", "Y_h", "Y_c"], name="qlstm", domain="com.microsoft",
        hidden_size=h, direction="bidirectional",
    )  # fmt: skip
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, [t, b, i]),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, [2, b, h]),
            helper.make_tensor_value_info("c0", TensorProto.FLOAT, [2, b, h]),
        ],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("Y", "Y_h", "Y_c")],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    feeds = _feeds(model, rng)
    ours = tvm_sparse.compile(model, target="host", sparse="off").run(feeds)
    theirs = ort_run(model, feeds)
    for k, (a, e) in enumerate(zip(ours, theirs)):
        assert a.shape == e.shape, k
        step = (max(e.max(), 0) - min(e.min(), 0)) / 255
        assert np.abs(a - e).max() <= step, (k, np.abs(a - e).max() / step)


@pytest.mark.parametrize("sparse", ["off", "force"])
def test_dynamic_quantize_lstm_runs_the_int8_kernels(tmp_path, sparse):
    """quantize_dynamic of an LSTM whose R was pruned in 16x4 blocks: the direction runs as
    one fused int8 kernel, the 16x4 block-sparse one when sparsity is asked for, and the
    outputs stay within one step of ORT's."""
    from onnx import numpy_helper

    model = examples.lstm(seq_len=8, batch=2, input_size=32, hidden=64)
    rng = np.random.default_rng(5)
    for init in model.graph.initializer:
        value = numpy_helper.to_array(init)
        if value.shape == (1, 256, 64):  # R [D, 4H, H]: zero 16 units x 4 inputs at a time
            keep = rng.random((1, 16, 16)) < 0.2
            value = value * np.repeat(np.repeat(keep, 16, 1), 4, 2)
            init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), init.name))
    onnx.save(model, tmp_path / "fp32.onnx")
    quantize_dynamic(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", weight_type=QuantType.QInt8)
    quantized = onnx.load(tmp_path / "int8.onnx")
    compiled = tvm_sparse.compile(quantized, sparse=sparse, policy="measured")
    kernels = [row["kernel"] for row in compiled.report if row["op"] == "DynamicQuantizeLSTM"]
    assert kernels == (["lstm_int8bsr16x4_iofc"] if sparse == "force" else ["dense"]), (
        compiled.report
    )
    feeds = _feeds(quantized, rng)
    ours, theirs = compiled.run(feeds), ort_run(quantized, feeds)
    for a, e in zip(ours, theirs):
        step = (max(e.max(), 0) - min(e.min(), 0)) / 255
        assert np.abs(a - e).max() <= step
