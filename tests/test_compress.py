"""compress.quantize and `tvm-sparse quantize`: QDQ that ONNX Runtime runs, zeros kept, bias
correction (seed 001) measured on a model trained here with NumPy."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import tvm_sparse
from conftest import ort_run
from tvm_sparse import examples
from tvm_sparse.compress import _find_layers, _mean_patch, output_shift, quantize
from tvm_sparse.errors import TvmSparseError

# ------------------------------------------------------------- a classifier trained in the suite


def bars(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """8x8 images in [0, 1.6]: a bar in one of 4 orientations (the label) over uniform noise."""
    labels = rng.integers(0, 4, n)
    pos = rng.integers(1, 7, n)
    img = rng.uniform(0, 0.6, (n, 8, 8)).astype(np.float32)
    for i in range(n):
        bar = np.zeros((8, 8), dtype=bool)
        if labels[i] == 0:
            bar[pos[i], :] = True
        elif labels[i] == 1:
            bar[:, pos[i]] = True
        else:
            bar = np.eye(8, k=int(pos[i]) - 4, dtype=bool)
            bar = bar if labels[i] == 2 else np.fliplr(bar)
        img[i][bar] += 1
    return img.reshape(n, 64), labels


def train_mlp(seed: int = 0, steps: int = 600) -> onnx.ModelProto:
    """64-64-32-4 ReLU MLP, minibatch SGD on softmax cross-entropy (~0.1 s), as MatMul + Add."""
    rng = np.random.default_rng(seed)
    x, y = bars(2000, rng)
    sizes = [64, 64, 32, 4]
    ws = [
        rng.standard_normal((a, b)).astype(np.float32) * np.float32(np.sqrt(2 / a))
        for a, b in zip(sizes, sizes[1:])
    ]
    bs = [np.zeros(b, np.float32) for b in sizes[1:]]
    for _ in range(steps):
        batch = rng.integers(0, len(y), 64)  # small batches: BLAS stays single-threaded
        acts = [x[batch]]
        for k, (w, b) in enumerate(zip(ws, bs)):
            z = acts[-1] @ w + b
            acts.append(np.maximum(z, 0) if k < len(ws) - 1 else z)
        p = np.exp(acts[-1] - acts[-1].max(1, keepdims=True))
        grad = p / p.sum(1, keepdims=True)
        grad[np.arange(len(batch)), y[batch]] -= 1
        grad /= len(batch)
        for k in reversed(range(len(ws))):
            gw, gb = acts[k].T @ grad, grad.sum(0)
            if k:
                grad = (grad @ ws[k].T) * (acts[k] > 0)
            ws[k] -= np.float32(0.1) * gw
            bs[k] -= np.float32(0.1) * gb
    nodes, inits, t = [], [], "x"
    for k, (w, b) in enumerate(zip(ws, bs)):
        inits += [numpy_helper.from_array(w, f"w{k}"), numpy_helper.from_array(b, f"b{k}")]
        nodes.append(helper.make_node("MatMul", [t, f"w{k}"], [f"mm{k}"], name=f"fc{k}"))
        nodes.append(helper.make_node("Add", [f"mm{k}", f"b{k}"], [f"z{k}"], name=f"bias{k}"))
        t = f"z{k}"
        if k < len(ws) - 1:
            nodes.append(helper.make_node("Relu", [t], [f"h{k}"], name=f"relu{k}"))
            t = f"h{k}"
    graph = helper.make_graph(
        nodes,
        "bars_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info(t, TensorProto.FLOAT, ["n", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def mlp():
    return train_mlp()


@pytest.fixture(scope="module")
def bars_data():
    rng = np.random.default_rng(5)
    calib, _ = bars(256, rng)
    test_x, test_y = bars(2000, rng)
    return calib[:, None, :], test_x, test_y  # calibration: 256 samples of shape [1, 64]


def logit_errors(mlp, bars_data, per_channel: bool) -> dict[bool, dict[str, float]]:
    """Errors of the quantized model's logits vs fp32 on held-out data, without/with correction."""
    calib, test_x, test_y = bars_data
    ref = ort_run(mlp, {"x": test_x})[0]
    out = {}
    for correct in (False, True):
        q = quantize(mlp, {"x": calib}, per_channel=per_channel, bias_correction=correct)
        got = ort_run(q, {"x": test_x})[0]
        err = got - ref
        out[correct] = {
            "mean_abs": float(np.abs(err).mean()),
            "mean_shift": float(np.abs(err.mean(axis=0)).mean()),
            "rms": float(np.sqrt((err**2).mean())),
            "accuracy": float((got.argmax(1) == test_y).mean()),
            "fp32_accuracy": float((ref.argmax(1) == test_y).mean()),
        }
    return out


def test_trained_model_is_a_real_classifier(mlp, bars_data):
    _, test_x, test_y = bars_data
    assert (ort_run(mlp, {"x": test_x})[0].argmax(1) == test_y).mean() > 0.98


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_bias_correction_lowers_output_error(mlp, bars_data, per_channel):
    """Seed 001: subtracting E[(W_q - W) x] removes the systematic output shift.

    Measured (held-out 2000 images, ONNX Runtime): per-channel mean |logit error| 0.0410 ->
    0.0336, mean shift 0.0172 -> 0.0037; per-tensor 0.0419 -> 0.0355, 0.0186 -> 0.0056.
    """
    errors = logit_errors(mlp, bars_data, per_channel)
    plain, corrected = errors[False], errors[True]
    assert corrected["mean_abs"] < 0.9 * plain["mean_abs"], errors
    assert corrected["mean_shift"] < 0.5 * plain["mean_shift"], errors
    assert corrected["rms"] < plain["rms"], errors
    assert corrected["accuracy"] >= corrected["fp32_accuracy"] - 0.002, errors


# ------------------------------------------------------------------------- the QDQ it writes


def _output_step(model: onnx.ModelProto) -> float:
    """Scale of the DequantizeLinear that produces the graph output: one quantisation step."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = model.graph.output[0].name
    node = next(n for n in model.graph.node if out in n.output)
    assert node.op_type == "DequantizeLinear"
    return float(inits[node.input[1]])


def _small_cnn() -> onnx.ModelProto:
    return examples.resnet(size=16, stages=(8, 16), blocks_per_stage=1, classes=10)


@pytest.mark.parametrize("activations", ["uint8", "int8"])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_ort_runs_qdq_and_matches_ours(mlp, bars_data, which, per_channel, activations):
    """ONNX Runtime (integer kernels after its QDQ fusion) and tvm-sparse agree within one
    quantisation step of the output: both round x / scale half to even in float32."""
    rng = np.random.default_rng(3)
    if which == "mlp":
        model, name = mlp, "x"
        calib, test_x, _ = bars_data
        feeds = {"x": test_x[:8]}
    else:
        model, name = _small_cnn(), "input"
        calib = rng.standard_normal((8, 1, 3, 16, 16)).astype(np.float32)
        feeds = {"input": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)}
    q = quantize(model, {name: calib}, per_channel=per_channel, activation_type=activations)
    shapes = {"x": [8, 64]} if which == "mlp" else None
    ours = tvm_sparse.compile(q, sparse="off", shapes=shapes).run(feeds)[0]
    theirs = ort_run(q, feeds)[0]
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.float32
    step = _output_step(q)
    assert np.abs(ours - theirs).max() <= step * 1.001, np.abs(ours - theirs).max() / step
    # And it still approximates the fp32 model (outputs beyond the calibrated range saturate).
    ref = ort_run(model, feeds)[0]
    assert np.abs(theirs - ref).mean() < 0.05 * np.abs(ref).max()


def test_zeros_stay_zeros():
    model = examples.mobilenet_v1(size=32, width=0.25, classes=10, sparsity=0.8, block=(4, 1))
    calib = np.random.default_rng(0).standard_normal((2, 1, 3, 32, 32)).astype(np.float32)
    q = quantize(model, {"input": calib})
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    checked = 0
    for node in q.graph.node:
        if node.op_type != "DequantizeLinear" or not node.input[0].endswith("_quantized"):
            continue
        source = node.input[0][: -len("_quantized")]
        if source not in before or before[source].ndim < 2:
            continue  # biases and activations
        w, wq = before[source], after[node.input[0]]
        assert wq.dtype == np.int8 and not after[node.input[2]].any()  # symmetric: zp 0
        assert wq.min() >= -127
        assert not wq[w == 0].any()
        checked += 1
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert checked == len(_find_layers(model.graph, inits)) == 28  # stem, 13 x 2 convs, FC


# ------------------------------------------------------------------- bias correction itself


@pytest.mark.parametrize(
    "attrs",
    [
        {"strides": [2, 1], "pads": [1, 0, 2, 1]},
        {"group": 2, "dilations": [2, 1], "pads": [1, 1, 1, 1]},
        {"group": 4, "auto_pad": "VALID"},
        {"strides": [2, 2], "auto_pad": "SAME_UPPER"},
        {"dilations": [1, 2], "auto_pad": "SAME_LOWER"},
    ],
    ids=["strided-padded", "grouped-dilated", "depthwise-valid", "same-upper", "same-lower"],
)
def test_conv_output_shift_is_mean_of_conv_with_weight_error(attrs):
    """E[conv(x, dW)] per channel from the mean input patch equals the brute-force mean."""
    rng = np.random.default_rng(1)
    groups = attrs.get("group", 1)
    x = rng.uniform(0, 2, (3, 4, 9, 7)).astype(np.float32)
    dw = rng.standard_normal((8, 4 // groups, 3, 2)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(dw, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    expected = ReferenceEvaluator(model).run(None, {"x": x})[0].mean(axis=(0, 2, 3))
    got = output_shift("Conv", dw, _mean_patch(x, node, [3, 2]), 0)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_corrected_bias_is_bias_minus_expected_shift():
    """One MatMul + Add layer: the int32 bias dequantizes to b - (W_q - W)^T E[x]."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 6)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"),
        helper.make_node("Add", ["m", "b"], ["y"], name="bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calib = rng.uniform(0, 3, (5, 4, 16)).astype(np.float32)
    q = quantize(model, {"x": calib}, per_channel=False)
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    w_deq = inits["w_quantized"].astype(np.float32) * inits["w_scale"]
    b_deq = inits["b_quantized"].astype(np.float64) * inits["b_scale"]
    expected = b - calib.reshape(-1, 16).astype(np.float64).mean(0) @ (w_deq - w)
    assert inits["b_quantized"].dtype == np.int32
    np.testing.assert_allclose(b_deq, expected, rtol=0, atol=0.5 * inits["b_scale"].max())
    assert np.abs(expected - b).max() > 10 * inits["b_scale"].max()  # the correction is visible


def test_layer_without_bias_gets_one_only_with_correction(matmul_model, rng):
    calib = rng.standard_normal((3, 4, 32)).astype(np.float32)
    plain = quantize(matmul_model, {"x": calib}, bias_correction=False)
    corrected = quantize(matmul_model, {"x": calib})
    assert "Add" not in {n.op_type for n in plain.graph.node}
    add = [n for n in corrected.graph.node if n.op_type == "Add"]
    assert len(add) == 1 and add[0].output[0] != "y"  # the output is still quantized after it
    feeds = {"x": calib[0]}
    step = _output_step(corrected)
    assert np.abs(ort_run(corrected, feeds)[0] - ort_run(plain, feeds)[0]).max() < 20 * step


def test_gemm_with_row_bias_and_untransposed_weight(rng):
    """Gemm transB=0 (weight [K, N], channels on axis 1) with a [1, N] bias: quantized, and
    ORT and tvm-sparse agree within one output step."""
    w = rng.standard_normal((24, 8)).astype(np.float32)
    c = rng.standard_normal((1, 8)).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 24])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(c, "c")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calib = rng.standard_normal((4, 5, 24)).astype(np.float32)
    q = quantize(model, {"x": calib})
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    assert inits["w_scale"].shape == (8,) and inits["c_quantized"].shape == (8,)
    feeds = {"x": calib[0]}
    ours = tvm_sparse.compile(q, sparse="off").run(feeds)[0]
    assert np.abs(ours - ort_run(q, feeds)[0]).max() <= _output_step(q) * 1.001


# ------------------------------------------------------------------------------------ LSTM


@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
def test_lstm_weights_int8_with_corrected_biases(bidirectional):
    """Two stacked pruned LSTMs: int8 W/R (zeros kept), float activations; ORT runs the file,
    our import matches it, and bias correction lowers the error on held-out inputs.

    Measured (32 held-out sequences, per-channel): mean |error| 3.7e-5 -> 0.9e-5 forward,
    6.2e-5 -> 1.7e-5 bidirectional.
    """
    model = examples.lstm(
        seq_len=8, input_size=16, hidden=32, layers=2, bidirectional=bidirectional,
        sparsity=0.8, block=(16, 1),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    calib = (rng.standard_normal((16, 8, 1, 16)) * 0.5 + 0.8).astype(np.float32)
    tests = [(rng.standard_normal((8, 1, 16)) * 0.5 + 0.8).astype(np.float32) for _ in range(16)]
    ref = np.stack([ort_run(model, {"input": t})[0] for t in tests])
    errors = {}
    for correct in (False, True):
        q = quantize(model, {"input": calib}, bias_correction=correct)
        errors[correct] = np.abs(np.stack([ort_run(q, {"input": t})[0] for t in tests]) - ref)
    assert errors[True].mean() < 0.5 * errors[False].mean(), errors
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    quantized = [n for n in after if n.endswith("_quantized")]
    assert len(quantized) == 4  # W and R of both layers
    for name in quantized:
        assert after[name].dtype == np.int8
        assert not after[name][before[name.removesuffix("_quantized")] == 0].any()
    assert {n.op_type for n in q.graph.node} >= {"DequantizeLinear", "LSTM"}
    (ours,) = tvm_sparse.compile(q, sparse="off").run({"input": tests[0]})
    np.testing.assert_allclose(ours, ort_run(q, {"input": tests[0]})[0], rtol=1e-4, atol=1e-5)


def test_several_bias_free_layers_all_quantized(rng):
    """Two MatMuls without bias: each gets a corrected bias Add and an int8 weight."""
    w1 = rng.standard_normal((16, 12)).astype(np.float32)
    w2 = rng.standard_normal((12, 6)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calib = rng.uniform(0, 2, (6, 4, 16)).astype(np.float32)
    q = quantize(model, {"x": calib})
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    assert inits["w1_quantized"].dtype == inits["w2_quantized"].dtype == np.int8
    assert "w1" not in inits and "w2" not in inits
    assert [n.op_type for n in q.graph.node].count("Add") == 2
    feeds = {"x": calib[0]}
    ours = tvm_sparse.compile(q, sparse="off").run(feeds)[0]
    assert np.abs(ours - ort_run(q, feeds)[0]).max() <= _output_step(q) * 1.001


# ------------------------------------------------------------------------------ bad input


def test_bad_input_names_the_problem(matmul_model, rng):
    calib = {"x": rng.standard_normal((2, 4, 32)).astype(np.float32)}
    old = onnx.ModelProto()
    old.CopyFrom(matmul_model)
    old.opset_import[0].version = 11
    with pytest.raises(TvmSparseError, match="opset 11"):
        quantize(old, calib)
    with pytest.raises(TvmSparseError, match="no data for model input"):
        quantize(matmul_model, {"z": calib["x"]})
    with pytest.raises(TvmSparseError, match="input 'x' has shape"):
        quantize(matmul_model, {"x": calib["x"][:, :, :5]})
    with pytest.raises(TvmSparseError, match="activation_type 'int4'"):
        quantize(matmul_model, calib, activation_type="int4")
    relu = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    no_layers = helper.make_model(relu, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(TvmSparseError, match="no MatMul, Gemm, Conv or LSTM"):
        quantize(no_layers, {"x": np.ones((1, 2), np.float32)})


# ------------------------------------------------------------------------------------ CLI


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tvm_sparse", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_quantize(tmp_path, mlp, bars_data):
    calib, test_x, _ = bars_data
    onnx.save(mlp, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=calib)
    out = tmp_path / "m.int8.onnx"
    result = cli("quantize", tmp_path / "m.onnx", "--calib", tmp_path / "calib.npz", "-o", out)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "m.int8.onnx", "m.onnx"]
    expected = quantize(mlp, {"x": calib})
    np.testing.assert_array_equal(
        ort_run(onnx.load(out), {"x": test_x})[0], ort_run(expected, {"x": test_x})[0]
    )
    assert "--no-bias-correction" in cli("quantize", "--help").stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--calib", "{tmp}/missing.npz"], "--calib {tmp}/missing.npz: no such file"),
        ([], "quantize needs --calib"),
        (["--calib", "{tmp}/m.onnx"], "not a .npz file"),
        (["--calib", "{tmp}/wrong.npz"], "no data for model input(s) ['x']"),
    ],
    ids=["missing-calib-file", "no-calib", "calib-not-npz", "calib-wrong-input"],
)
def test_cli_quantize_bad_input(tmp_path, matmul_model, args, fragment):
    onnx.save(matmul_model, tmp_path / "m.onnx")
    np.savez(tmp_path / "wrong.npz", y=np.zeros((1, 4, 32), np.float32))
    args = [a.format(tmp=tmp_path) for a in args]
    result = cli("quantize", tmp_path / "m.onnx", *args, "-o", tmp_path / "q.onnx")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("tvm-sparse: error:")]
    assert len(lines) == 1 and fragment.format(tmp=tmp_path) in lines[0], result.stderr
    assert not (tmp_path / "q.onnx").exists()
