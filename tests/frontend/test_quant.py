"""QLinearConv, QLinearMatMul, ConvInteger and blocked (De)QuantizeLinear: bit-exact vs oracles."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from tvm import relax

from tvm_sparse.errors import UnsupportedOpError
from tvm_sparse.frontend import from_onnx
from tvm_sparse.target import resolve_target

ALL = "all"  # `runtime=ALL`: every input is a graph input, none an initializer


@pytest.fixture(scope="module")
def target():
    return resolve_target("host")


def _elem(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _single_node(op_type, inputs, runtime, out_dtype, opset, **attrs) -> onnx.ModelProto:
    """One-node model; `inputs` are (name, array or None) in node order, None meaning omitted.

    Names in `runtime` become graph inputs, the others initializers (as in a real model).
    """
    graph_inputs, inits = [], []
    for name, value in inputs:
        if value is None:
            continue
        if runtime == ALL or name in runtime:
            info = helper.make_tensor_value_info(name, _elem(value.dtype), value.shape)
            graph_inputs.append(info)
        else:
            inits.append(numpy_helper.from_array(value, name))
    names = [n if v is not None else "" for n, v in inputs]
    node = helper.make_node(op_type, names, ["y"], name=f"my_{op_type}", **attrs)
    output = helper.make_tensor_value_info("y", _elem(out_dtype), None)
    graph = helper.make_graph([node], "g", graph_inputs, [output], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _feeds(model, inputs) -> dict[str, np.ndarray]:
    values = dict(inputs)
    return {i.name: values[i.name] for i in model.graph.input}


def _run_tvm(model, feeds, target) -> np.ndarray:
    vm = relax.VirtualMachine(relax.build(from_onnx(model), target), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(feeds[i.name]) for i in model.graph.input]).numpy()


def _run_ort(model, feeds) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _run_reference(model, feeds) -> np.ndarray:
    return ReferenceEvaluator(model).run(None, feeds)[0]


ORACLES = {"ort": _run_ort, "reference": _run_reference}


def _assert_exact(got: np.ndarray, expected: np.ndarray, min_distinct: int = 16) -> None:
    assert got.shape == expected.shape
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)
    # A test whose outputs are all saturated would prove little about the requantization.
    assert len(np.unique(expected)) > min_distinct, "test data saturates: adjust the scales"


def _ints(rng, shape, dtype, lo=None, hi=None) -> np.ndarray:
    info = np.iinfo(dtype)
    lo, hi = info.min if lo is None else lo, info.max if hi is None else hi
    return rng.integers(lo, hi + 1, size=shape).astype(dtype)


def _scalar(value, dtype) -> np.ndarray:
    return np.array(value, dtype=dtype)


# --------------------------------------------------------------------------------- QLinearConv

# onnxruntime wants y typed as x and one w_zero_point for all channels (0 for int8 weights);
# other forms are checked against the ONNX reference implementation.
# fmt: off
QLINEARCONV_CASES = {
    # id: (x, w, x shape, w shape, attrs, per-channel w_scale, w_zero_point, bias, runtime, oracle)
    "u8u8-per-tensor-bias-stride": ("uint8", "uint8", (1, 8, 10, 10), (16, 8, 3, 3),
        {"pads": [1, 1, 1, 1], "strides": [2, 2]}, False, "scalar", True, {"x"}, "ort"),
    "s8s8-per-channel-groups-dilation": ("int8", "int8", (2, 8, 9, 9), (12, 4, 3, 3),
        {"group": 2, "dilations": [2, 2], "pads": [2, 1, 0, 2]}, True, "zero", True, {"x"}, "ort"),
    "u8s8-depthwise-same-upper": ("uint8", "int8", (1, 6, 11, 7), (6, 1, 3, 3),
        {"group": 6, "auto_pad": "SAME_UPPER", "strides": [2, 2]}, True, "zero", False, {"x"},
        "ort"),
    "u8u8-conv1d-same-lower": ("uint8", "uint8", (1, 4, 12), (8, 4, 3),
        {"auto_pad": "SAME_LOWER"}, True, "scalar", True, {"x"}, "ort"),
    "s8u8-per-channel-zero-points": ("int8", "uint8", (1, 4, 8, 8), (6, 2, 2, 3),
        {"group": 2, "auto_pad": "VALID"}, True, "per-channel", True, {"x"}, "reference"),
    "u8s8-all-runtime-inputs": ("uint8", "int8", (1, 4, 6, 6), (8, 4, 3, 3),
        {"pads": [1, 1, 1, 1]}, True, "per-channel", True, ALL, "reference"),
}
# fmt: on


@pytest.mark.parametrize("case", QLINEARCONV_CASES.values(), ids=QLINEARCONV_CASES.keys())
def test_qlinearconv(target, case):
    x_dtype, w_dtype, x_shape, w_shape, attrs, per_channel, w_zp_kind, bias, runtime, oracle = case
    rng = np.random.default_rng(sum(x_shape) + sum(w_shape))
    m = w_shape[0]
    lo, hi = (-20, 20) if w_dtype == "int8" else (100, 150)
    w_zp = {
        "zero": np.zeros(m, w_dtype),
        "scalar": _scalar(3 if w_dtype == "int8" else 131, w_dtype),
        "per-channel": _ints(rng, (m,), w_dtype, lo, hi),
    }[w_zp_kind]
    w_scale = rng.uniform(0.002, 0.02, m if per_channel else ()).astype("float32")
    # One standard deviation of the accumulator (|x - x_zp| ~ |w - w_zp| ~ 74) -> ~50 steps.
    y_scale = 0.05 * float(np.mean(w_scale)) * 74 * 74 * np.sqrt(np.prod(w_shape[1:])) / 50
    y_dtype = x_dtype if oracle == "ort" else {"int8": "uint8", "uint8": "int8"}[x_dtype]
    inputs = [
        ("x", _ints(rng, x_shape, x_dtype)),
        ("x_scale", _scalar(0.05, "float32")),
        ("x_zero_point", _scalar(128 if x_dtype == "uint8" else -5, x_dtype)),
        ("w", _ints(rng, w_shape, w_dtype)),
        ("w_scale", w_scale),
        ("w_zero_point", w_zp),
        ("y_scale", _scalar(y_scale, "float32")),
        ("y_zero_point", _scalar(3 if y_dtype == "int8" else 120, y_dtype)),
        ("B", rng.integers(-20000, 20000, m).astype("int32") if bias else None),
    ]
    model = _single_node("QLinearConv", inputs, runtime, y_dtype, 10, **attrs)
    feeds = _feeds(model, inputs)
    _assert_exact(_run_tvm(model, feeds, target), ORACLES[oracle](model, feeds))


# ------------------------------------------------------------------------------- QLinearMatMul

# fmt: off
QLINEARMATMUL_CASES = {
    # id: (a, b, y, a shape, b shape, per-column b, scale dtype, runtime, oracle)
    "u8u8-2d": ("uint8", "uint8", "uint8", (8, 32), (32, 16), False, "float32", {"a"}, "ort"),
    "s8s8-3d-per-column": ("int8", "int8", "int8", (3, 8, 32), (3, 32, 16), True, "float32",
        {"a"}, "ort"),
    "u8s8-2d-per-column": ("uint8", "int8", "uint8", (8, 64), (64, 24), True, "float32",
        {"a"}, "ort"),
    "u8u8-3d-float16": ("uint8", "uint8", "uint8", (2, 8, 32), (32, 16), False, "float16",
        {"a"}, "reference"),
    "s8s8-bcast-float16-all-runtime": ("int8", "int8", "uint8", (8, 32), (2, 32, 16), True,
        "float16", ALL, "reference"),
}
# fmt: on


@pytest.mark.parametrize("case", QLINEARMATMUL_CASES.values(), ids=QLINEARMATMUL_CASES.keys())
def test_qlinearmatmul(target, case):
    a_dtype, b_dtype, y_dtype, a_shape, b_shape, per_column, scale_dtype, runtime, oracle = case
    rng = np.random.default_rng(sum(a_shape) + sum(b_shape))
    n, k = b_shape[-1], a_shape[-1]
    # Per-column: [N] for a 2-D b, the spec's [D1, 1, N] form for a batched b.
    column_shape = (n,) if len(b_shape) == 2 else (*b_shape[:-2], 1, n)
    b_scale = rng.uniform(0.002, 0.02, column_shape if per_column else ()).astype(scale_dtype)
    y_scale = 0.03 * float(np.mean(b_scale)) * 74 * 74 * np.sqrt(k) / 50
    inputs = [
        ("a", _ints(rng, a_shape, a_dtype)),
        ("a_scale", _scalar(0.03, scale_dtype)),
        ("a_zero_point", _scalar(127 if a_dtype == "uint8" else -3, a_dtype)),
        ("b", _ints(rng, b_shape, b_dtype)),
        ("b_scale", b_scale),
        # onnxruntime wants int8 per-column zero points to be 0.
        ("b_zero_point", np.full(b_scale.shape, 0 if b_dtype == "int8" else 131, b_dtype)),
        ("y_scale", _scalar(y_scale, scale_dtype)),
        ("y_zero_point", _scalar(125 if y_dtype == "uint8" else -2, y_dtype)),
    ]
    opset = 21 if scale_dtype == "float16" else 10
    model = _single_node("QLinearMatMul", inputs, runtime, y_dtype, opset)
    feeds = _feeds(model, inputs)
    _assert_exact(_run_tvm(model, feeds, target), ORACLES[oracle](model, feeds))


def test_qlinearmatmul_per_row(target):
    """Per-row a_scale/a_zero_point ([M]), against NumPy: the ONNX reference would apply them
    along the last axis (K) instead, following NumPy broadcasting rather than the spec."""
    rng = np.random.default_rng(7)
    a, b = _ints(rng, (6, 20), "uint8"), _ints(rng, (20, 9), "uint8")
    a_scale = rng.uniform(0.01, 0.05, 6).astype("float32")
    a_zp = _ints(rng, (6,), "uint8", 100, 150)
    b_scale, y_scale, zp = _scalar(0.01, "float32"), _scalar(0.2, "float32"), _scalar(128, "uint8")
    inputs = [("a", a), ("a_scale", a_scale), ("a_zero_point", a_zp), ("b", b),
              ("b_scale", b_scale), ("b_zero_point", zp), ("y_scale", y_scale),
              ("y_zero_point", zp)]  # fmt: skip
    model = _single_node("QLinearMatMul", inputs, {"a"}, "uint8", 10)
    acc = (a.astype(np.int32) - a_zp[:, None]) @ (b.astype(np.int32) - zp)
    expected = np.clip(np.rint(acc * (a_scale[:, None] * b_scale / y_scale) + zp), 0, 255)
    _assert_exact(_run_tvm(model, {"a": a}, target), expected.astype("uint8"))


def test_requantize_rounds_in_float64(target):
    """Products within half a float32 ulp of a .5 tie round as the ONNX reference does.

    With multiplier float32(1/6) = 1/6 + 5e-9, acc = 3 gives 0.500000015 in float64 (rounds to 1)
    but exactly 0.5 in float32 (rounds to 0); likewise 15, 27, 255. onnxruntime, which
    requantizes in float32, gives the float32 answers here; on random data it agreed with us on
    all of 196608 outputs.
    """
    b = np.array([[0, 1, 3, 9, 15, 27, 33, 45, 200, 255]], "uint8")
    one, zero = _scalar(1.0, "float32"), _scalar(0, "uint8")
    inputs = [("a", np.ones((1, 1), "uint8")), ("a_scale", _scalar(1 / 6, "float32")),
              ("a_zero_point", zero), ("b", b), ("b_scale", one), ("b_zero_point", zero),
              ("y_scale", one), ("y_zero_point", _scalar(100, "uint8"))]  # fmt: skip
    model = _single_node("QLinearMatMul", inputs, {"a"}, "uint8", 10)
    feeds = _feeds(model, inputs)
    expected = _run_reference(model, feeds)
    np.testing.assert_array_equal(expected[0, [2, 4, 5, 9]], [101, 103, 105, 143])
    _assert_exact(_run_tvm(model, feeds, target), expected, min_distinct=5)


# -------------------------------------------------------------------------------- ConvInteger

# fmt: off
CONVINTEGER_CASES = {
    # id: (x, w, attrs, zero points, oracle)
    "u8u8-zp": ("uint8", "uint8", {"pads": [1, 1, 1, 1], "strides": [2, 1]}, "scalar", "ort"),
    "u8u8-groups-no-zp": ("uint8", "uint8", {"group": 2, "dilations": [1, 2]}, "none", "ort"),
    "s8s8-per-channel": ("int8", "int8", {"auto_pad": "SAME_UPPER"}, "per-channel", "reference"),
}
# fmt: on


@pytest.mark.parametrize("case", CONVINTEGER_CASES.values(), ids=CONVINTEGER_CASES.keys())
def test_convinteger(target, case):
    x_dtype, w_dtype, attrs, zero_points, oracle = case
    rng = np.random.default_rng(11)
    x_zp = w_zp = None
    if zero_points != "none":
        x_zp = _scalar(120 if x_dtype == "uint8" else -4, x_dtype)
        w_zp = _scalar(130 if w_dtype == "uint8" else 2, w_dtype)
    if zero_points == "per-channel":
        w_zp = _ints(rng, (6,), w_dtype, 0, 9)
    inputs = [
        ("x", _ints(rng, (1, 4, 9, 9), x_dtype)),
        ("w", _ints(rng, (6, 4 // attrs.get("group", 1), 3, 3), w_dtype)),
        ("x_zero_point", x_zp),
        ("w_zero_point", w_zp),
    ]
    model = _single_node("ConvInteger", inputs, {"x"}, "int32", 10, **attrs)
    feeds = _feeds(model, inputs)
    _assert_exact(_run_tvm(model, feeds, target), ORACLES[oracle](model, feeds))


# ------------------------------------------------------------ blocked QuantizeLinear/Dequantize


@pytest.mark.parametrize("runtime", [{"x"}, ALL], ids=["constant-params", "runtime-params"])
@pytest.mark.parametrize("op_type", ["QuantizeLinear", "DequantizeLinear"])
def test_blocked_quantization(target, op_type, runtime):
    """Blocks of 2 along axis 1 of length 5: the last block is partial."""
    rng = np.random.default_rng(3)
    scale = rng.uniform(0.01, 0.1, (3, 3, 4)).astype("float32")
    zp = _ints(rng, (3, 3, 4), "int8", -10, 10)
    if op_type == "QuantizeLinear":
        x, y_dtype = rng.standard_normal((3, 5, 4)).astype("float32"), "int8"
    else:
        x, y_dtype = _ints(rng, (3, 5, 4), "int8"), "float32"
    inputs = [("x", x), ("scale", scale), ("zero_point", zp)]
    model = _single_node(op_type, inputs, runtime, y_dtype, 21, axis=1, block_size=2)
    feeds = _feeds(model, inputs)
    _assert_exact(_run_tvm(model, feeds, target), _run_reference(model, feeds))


# ---------------------------------------------------------------------------- unsupported forms


def _qlinearconv_inputs(**override):
    u8, f32 = _scalar(0, "uint8"), _scalar(0.1, "float32")
    base = {"x": np.zeros((1, 2, 4, 4), "uint8"), "x_scale": f32, "x_zero_point": u8,
            "w": np.zeros((2, 2, 1, 1), "uint8"), "w_scale": f32, "w_zero_point": u8,
            "y_scale": f32, "y_zero_point": u8}  # fmt: skip
    return list({**base, **override}.items())


def _qlinearmatmul_inputs(dtype="uint8", scale_dtype="float32"):
    z, s = np.zeros((), dtype), _scalar(0.1, scale_dtype)
    return [("a", np.zeros((2, 3), dtype)), ("a_scale", s), ("a_zero_point", z),
            ("b", np.zeros((3, 2), dtype)), ("b_scale", s), ("b_zero_point", z),
            ("y_scale", s), ("y_zero_point", z)]  # fmt: skip


# fmt: off
UNSUPPORTED_CASES = {
    # id: (op type, inputs, runtime, opset, text the error must contain[, attributes])
    "qlinearconv-int4-zero-point": ("QLinearConv",
        _qlinearconv_inputs(w_zero_point=np.zeros((), ml_dtypes.int4)), {"x"}, 10,
        "int4 quantization (tensor 'w_zero_point')"),
    "qlinearconv-per-channel-x": ("QLinearConv",
        _qlinearconv_inputs(x_scale=np.full(2, 0.1, "float32")), {"x"}, 10, "x_scale of shape [2]"),
    "qlinearconv-blocked-w-scale": ("QLinearConv",
        _qlinearconv_inputs(w_scale=np.full((2, 1), 0.1, "float32")), {"x"}, 10,
        "w_scale of shape [2, 1]"),
    "qlinearmatmul-float8": ("QLinearMatMul", _qlinearmatmul_inputs(ml_dtypes.float8_e4m3fn),
        ALL, 21, "float8e4m3fn quantization (tensor 'a')"),
    "qlinearmatmul-bfloat16-scales": ("QLinearMatMul",
        _qlinearmatmul_inputs(scale_dtype=ml_dtypes.bfloat16), ALL, 21, "scales of dtype bfloat16"),
    "convinteger-4d": ("ConvInteger", [("x", np.zeros((1, 2, 4, 4, 4, 4), "uint8")),
        ("w", np.zeros((2, 2, 1, 1, 1, 1), "uint8"))], {"x"}, 10, "4-D convolution"),
    "quantizelinear-blocked-int16": ("QuantizeLinear", [("x", np.zeros((2, 4), "float32")),
        ("scale", np.ones((2, 2), "float32")), ("zero_point", np.zeros((2, 2), "int16"))], {"x"},
        21, "blocked quantization to int16", {"axis": 1, "block_size": 2}),
}
# fmt: on


@pytest.mark.parametrize("case", UNSUPPORTED_CASES.values(), ids=UNSUPPORTED_CASES.keys())
def test_unsupported_form(case):
    op_type, inputs, runtime, opset, form, *attrs = case
    model = _single_node(op_type, inputs, runtime, inputs[0][1].dtype, opset, **(attrs or [{}])[0])
    with pytest.raises(UnsupportedOpError) as info:
        from_onnx(model)
    err = info.value
    assert (err.node, err.op_type, err.opset) == (f"my_{op_type}", op_type, opset)
    assert form in str(err) and str(err).endswith("not supported")
