"""ONNX Runtime's int8 contrib ops, DynamicQuantizeLinear and rejected low-precision forms.

ONNX Runtime is the reference for the com.microsoft ops. Integer outputs must match it exactly
except where noted: QLinearAdd/QLinearMul/QLinearSigmoid run fixed-point or approximate
shortcuts in ORT's x86 kernels, so values close to a rounding tie may differ by one step (the
tests require such differences to be rare and at most one step; measured: QLinearMul 24 and 7
of 16384 values for uint8 and int8, the others none).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import tvm
from onnx import helper, numpy_helper
from onnx.backend.test.case.node import collect_testcases
from tvm import relax

from conftest import ort_run
from tvm_sparse.errors import UnsupportedOpError
from tvm_sparse.frontend import from_onnx
from tvm_sparse.target import resolve_target

MS = "com.microsoft"


def _model(op, inputs, runtime, n_outputs=1, domain=MS, opset=17, **attrs) -> onnx.ModelProto:
    """One node; `inputs` (name, array or None); names in `runtime` are graph inputs."""
    graph_inputs, inits = [], []
    for name, value in inputs:
        if value is None:
            continue
        if name in runtime:
            elem = helper.np_dtype_to_tensor_dtype(value.dtype)
            graph_inputs.append(helper.make_tensor_value_info(name, elem, value.shape))
        else:
            inits.append(numpy_helper.from_array(value, name))
    outs = [f"y{k}" for k in range(n_outputs)]
    names = [n if v is not None else "" for n, v in inputs]
    node = helper.make_node(op, names, outs, name=f"my_{op}", domain=domain, **attrs)
    graph = helper.make_graph(
        [node], "g", graph_inputs, [onnx.ValueInfoProto(name=o) for o in outs], inits
    )
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def _run_tvm(model, feeds) -> list[np.ndarray]:
    vm = relax.VirtualMachine(relax.build(from_onnx(model), resolve_target("host")), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(feeds[i.name]) for i in model.graph.input])
    return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]


def _compare(model, feeds, max_off_by_one: float = 0.0) -> None:
    ours, theirs = _run_tvm(model, feeds), ort_run(model, feeds)
    for got, ref in zip(ours, theirs, strict=True):
        assert got.shape == ref.shape and got.dtype == ref.dtype
        assert len(np.unique(ref)) > 8, "test data saturates or is constant"
        if np.issubdtype(ref.dtype, np.integer):
            diff = np.abs(got.astype(np.int32) - ref.astype(np.int32))
            assert diff.max() <= (1 if max_off_by_one else 0), diff.max()
            assert (diff > 0).mean() <= max_off_by_one, (diff > 0).mean()
        else:
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def _q(rng, shape, dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, shape).astype(dtype)


def _s(value) -> np.ndarray:
    return np.array(value, np.float32)


# ------------------------------------------------------------------------------------ QGemm

# fmt: off
QGEMM_CASES = {
    # id: (a dtype, b dtype, transA, transB, alpha, per-column b, bias, quantized output)
    "u8s8-transB-per-column-bias-quantized": ("uint8", "int8", 0, 1, 1.0, True, True, True),
    "u8u8-per-tensor-float-output": ("uint8", "uint8", 0, 0, 1.0, False, True, False),
    "s8s8-transA-alpha-no-bias": ("int8", "int8", 1, 0, 0.5, True, False, True),
    "u8u8-per-column-zero-points": ("uint8", "uint8", 0, 1, 1.0, "zp", True, True),
}
# fmt: on


@pytest.mark.parametrize("case", QGEMM_CASES.values(), ids=QGEMM_CASES.keys())
def test_qgemm(case):
    a_dtype, b_dtype, trans_a, trans_b, alpha, per_column, bias, quantized = case
    rng = np.random.default_rng(0)
    m, k, n = 6, 40, 12
    a = _q(rng, (k, m) if trans_a else (m, k), a_dtype)
    b = _q(rng, (n, k) if trans_b else (k, n), b_dtype)
    b_scale = rng.uniform(0.002, 0.01, n if per_column else ()).astype(np.float32)
    b_zp = np.zeros(b_scale.shape, b_dtype) + (128 if b_dtype == "uint8" else 0)
    if per_column == "zp":
        b_zp = _q(rng, (n,), b_dtype)
    y_dtype = a_dtype
    inputs = [
        ("A", a), ("a_scale", _s(0.02)), ("a_zero_point", np.array(3, a_dtype)),
        ("B", b), ("b_scale", b_scale), ("b_zero_point", b_zp),
        ("C", rng.integers(-5000, 5000, n).astype(np.int32) if bias else None),
        ("y_scale", _s(0.4 * alpha) if quantized else None),
        ("y_zero_point", np.array(120 if y_dtype == "uint8" else -4, y_dtype) if quantized
         else None),
    ]  # fmt: skip
    model = _model("QGemm", inputs, {"A"}, transA=trans_a, transB=trans_b, alpha=alpha)
    _compare(model, {"A": a})


# --------------------------------------------------------------- QLinearAdd / QLinearMul


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
@pytest.mark.parametrize("op", ["QLinearAdd", "QLinearMul"])
def test_qlinear_binary(op, dtype):
    rng = np.random.default_rng(1)
    a, b = _q(rng, (2, 3, 16), dtype), _q(rng, (16,), dtype)
    zp = np.array(130 if dtype == "uint8" else 2, dtype)
    c_scale = 0.05 if op == "QLinearAdd" else 0.2
    inputs = [("A", a), ("A_scale", _s(0.02)), ("A_zero_point", zp), ("B", b),
              ("B_scale", _s(0.03)), ("B_zero_point", zp), ("C_scale", _s(c_scale)),
              ("C_zero_point", zp)]  # fmt: skip
    model = _model(op, inputs, {"A", "B"})
    _compare(model, {"A": a, "B": b}, max_off_by_one=0.01)


# ------------------------------------------------------------ pool, concat, activations


@pytest.mark.parametrize("channels_last", [0, 1])
@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_qlinear_global_average_pool(dtype, channels_last):
    rng = np.random.default_rng(2)
    x = _q(rng, (2, 5, 7, 24) if channels_last else (2, 24, 5, 7), dtype)
    zp = np.array(128 if dtype == "uint8" else -1, dtype)
    inputs = [("X", x), ("x_scale", _s(0.1)), ("x_zero_point", zp), ("y_scale", _s(0.02)),
              ("y_zero_point", zp)]  # fmt: skip
    model = _model("QLinearGlobalAveragePool", inputs, {"X"}, channels_last=channels_last)
    _compare(model, {"X": x})


def test_qlinear_concat_requantizes_inputs_at_other_scales():
    rng = np.random.default_rng(3)
    x0, x1 = _q(rng, (2, 3, 4), "uint8"), _q(rng, (2, 5, 4), "uint8")
    inputs = [("y_scale", _s(0.05)), ("y_zero_point", np.array(128, np.uint8)),
              ("x0", x0), ("s0", _s(0.05)), ("z0", np.array(128, np.uint8)),  # copied
              ("x1", x1), ("s1", _s(0.031)), ("z1", np.array(100, np.uint8))]  # fmt: skip
    model = _model("QLinearConcat", inputs, {"x0", "x1"}, axis=1)
    _compare(model, {"x0": x0, "x1": x1})


@pytest.mark.parametrize("op", ["QLinearLeakyRelu", "QLinearSigmoid"])
def test_qlinear_activation(op):
    x = np.arange(256, dtype=np.int32).astype(np.uint8).reshape(4, 64)  # every byte value
    inputs = [
        ("X", x),
        ("X_scale", _s(0.05)),
        ("X_zero_point", np.array(120, np.uint8)),
        ("Y_scale", _s(0.03 if op == "QLinearLeakyRelu" else 1 / 256)),
        ("Y_zero_point", np.array(100 if op == "QLinearLeakyRelu" else 0, np.uint8)),
    ]
    model = _model(op, inputs, {"X"}, **({"alpha": 0.1} if op == "QLinearLeakyRelu" else {}))
    _compare(model, {"X": x}, max_off_by_one=0.02)  # fmt: skip


# ----------------------------------------------------------------- DynamicQuantizeLinear


@pytest.mark.parametrize(
    "kind", ["mixed", "all-positive", "all-negative", "all-zero"], ids=lambda k: k
)
def test_dynamic_quantize_linear(kind):
    """Against ORT, including the empty range (all zeros) where ORT uses scale 1."""
    rng = np.random.default_rng(4)
    x = {
        "mixed": rng.standard_normal((4, 33)),
        "all-positive": rng.uniform(0.5, 3, (4, 33)),
        "all-negative": -rng.uniform(0.5, 3, (4, 33)),
        "all-zero": np.zeros((4, 33)),
    }[kind].astype(np.float32)
    model = _model("DynamicQuantizeLinear", [("x", x)], {"x"}, n_outputs=3, domain="")
    ours, theirs = _run_tvm(model, {"x": x}), ort_run(model, {"x": x})
    for got, ref, name in zip(ours, theirs, ("y", "y_scale", "y_zero_point"), strict=True):
        assert got.shape == ref.shape and got.dtype == ref.dtype, name
        np.testing.assert_array_equal(got, ref, err_msg=name)


# -------------------------------------------------------------- forms we do not compile

LOW_PRECISION = ("int4", "uint4", "int2", "uint2", "e4m3fn", "e5m2", "float4e2m1")
LOW_CASES = [
    c
    for c in collect_testcases(None)
    if c.name.removeprefix("test_").split("_")[0] in ("quantizelinear", "dequantizelinear")
    and any(form in c.name for form in LOW_PRECISION)
]


@pytest.mark.parametrize("case", LOW_CASES, ids=lambda c: c.name.removeprefix("test_"))
def test_low_precision_forms_are_rejected_by_name(case):
    """ONNX's own int4/int2/float8/float4 Q/DQ cases: a clear error, never a crash."""
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    model.graph.node[0].name = "qdq"
    with pytest.raises(UnsupportedOpError) as info:
        from_onnx(model)
    message = str(info.value)
    assert info.value.node == "qdq"
    form = next(f for f in LOW_PRECISION if f in case.name).replace("e4m3fn", "float8e4m3fn")
    assert f"{form.replace('e5m2', 'float8e5m2')} quantization" in message, message


def test_low_precision_count():
    assert len(LOW_CASES) == 16, [c.name for c in LOW_CASES]


def test_cli_rejects_int4_model_cleanly(tmp_path):
    case = next(c for c in LOW_CASES if c.name == "test_dequantizelinear_int4")
    onnx.save(case.model, tmp_path / "int4.onnx")
    result = subprocess.run(
        [sys.executable, "-m", "tvm_sparse", "compile", tmp_path / "int4.onnx", "-o", tmp_path],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("tvm-sparse: error:")]
    assert len(lines) == 1 and "int4 quantization" in lines[0] and "DequantizeLinear" in lines[0]


def test_contrib_op_we_lack_names_domain_and_node():
    x = np.zeros((1, 2, 4, 4), np.uint8)
    inputs = [("X", x), ("x_scale", _s(0.1)), ("x_zero_point", np.array(0, np.uint8)),
              ("y_scale", _s(0.1)), ("y_zero_point", np.array(0, np.uint8))]  # fmt: skip
    model = _model("QLinearAveragePool", inputs, {"X"}, kernel_shape=[2, 2])
    with pytest.raises(UnsupportedOpError, match="com.microsoft.QLinearAveragePool") as info:
        from_onnx(model)
    assert info.value.node == "my_QLinearAveragePool"
