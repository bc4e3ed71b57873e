"""The Python API: compile / run / report / save / load, and its errors."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

import tvm_sparse
from conftest import assert_close, ort_run, single_node_model
from tvm_sparse.errors import InputError, ShapeError, UnsupportedOpError


def test_compile_run_matches_ort(matmul_model, rng):
    cm = tvm_sparse.compile(matmul_model, target="host")
    x = rng.standard_normal((4, 32)).astype(np.float32)
    (y,) = cm.run({"x": x})
    assert_close(y, ort_run(matmul_model, {"x": x})[0])


def test_report_lists_weight_layers(matmul_model):
    cm = tvm_sparse.compile(matmul_model)
    (row,) = cm.report
    assert row["op"] == "MatMul" and row["name"] == "fc"
    assert row["weights"]["W"]["shape"] == [32, 24]
    assert row["weights"]["W"]["sparsity"] == 0.0
    assert row["kernel"] == "dense" and row["why"]


def test_save_load_roundtrip(tmp_path, matmul_model, rng):
    cm = tvm_sparse.compile(matmul_model)
    out = cm.save(tmp_path / "build")
    loaded = tvm_sparse.load(out)
    x = rng.standard_normal((4, 32)).astype(np.float32)
    assert_close(loaded.run({"x": x})[0], cm.run({"x": x})[0])
    assert loaded.report == cm.report
    assert sorted(p.name for p in (tmp_path / "build").iterdir()) == [
        "model.json",
        "model.so",
        "report.json",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tvm-sparse")]


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"nope": np.zeros((4, 32), np.float32)}, "missing \\['x'\\], unknown \\['nope'\\]"),
        (
            {"x": np.zeros((4, 31), np.float32)},
            "input 'x': expected float32 \\[4, 32\\], got float32 \\[4, 31\\]",
        ),
        (
            {"x": np.zeros((4, 32), np.float64)},
            "input 'x': expected float32 \\[4, 32\\], got float64",
        ),
    ],
)
def test_run_rejects_bad_inputs(matmul_model, inputs, message):
    cm = tvm_sparse.compile(matmul_model)
    with pytest.raises(InputError, match=message):
        cm.run(inputs)


def test_dynamic_dims_need_shapes(rng):
    w = rng.standard_normal((8, 3)).astype(np.float32)
    model = single_node_model(
        "MatMul",
        [("x", TensorProto.FLOAT, ["batch", 8])],
        ("y", TensorProto.FLOAT, ["batch", 3]),
        {"w": w},
    )
    with pytest.raises(ShapeError, match="input 'x' has dynamic dims \\['batch', 8\\]"):
        tvm_sparse.compile(model)
    cm = tvm_sparse.compile(model, shapes={"x": [5, 8]})
    x = rng.standard_normal((5, 8)).astype(np.float32)
    assert_close(cm.run({"x": x})[0], x @ w)


def test_shapes_for_unknown_input_is_an_error(matmul_model):
    with pytest.raises(ShapeError, match="unknown input"):
        tvm_sparse.compile(matmul_model, shapes={"z": [1]})


def test_unsupported_op_names_node_op_and_opset():
    model = single_node_model(
        "Hardmax",
        [("x", TensorProto.FLOAT, [2, 3])],
        ("y", TensorProto.FLOAT, [2, 3]),
        name="hm",
        opset=13,
    )
    model.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(UnsupportedOpError, match="node 'hm' \\(NoSuchOp, opset 13\\)"):
        tvm_sparse.compile(model)


def test_other_importer_users_do_not_see_our_converters():
    """Our converters are scoped to our import call (no global change to TVM's table)."""
    from tvm.relax.frontend.onnx import onnx_frontend

    from tvm_sparse.frontend.onnx import _extra_converters

    tvm_sparse.compile(
        single_node_model("Relu", [("x", TensorProto.FLOAT, [2])], ("y", TensorProto.FLOAT, [2]))
    )
    ours = _extra_converters()
    assert {"LSTM", "GRU", "RNN", "QLinearConv", "QLinearMatMul", "ConvInteger"} <= set(ours)
    table = onnx_frontend._get_convert_map()
    for op, converter in ours.items():
        assert table.get(op) is not converter, f"{op}: our converter leaked into TVM's table"
    assert "LSTM" not in table


def test_ctrl_c_inside_a_tvm_callback_stays_a_keyboard_interrupt():
    """A press that lands in a Python callback TVM runs from C++ (our passes, schedule rules)
    leaves the FFI as KeyboardInterrupt, not as a bare RuntimeError that an `except Exception`
    around a schedule primitive would swallow (the build then went on, kernel unscheduled)."""
    import tvm

    import tvm_sparse._compat  # noqa: F401 - registers KeyboardInterrupt with the FFI

    @tvm.transform.module_pass(opt_level=0)
    def pressed(mod, ctx):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tvm.transform.Sequential([pressed])(tvm.IRModule())


def test_ctrl_c_swallowed_inside_the_build_still_stops_compile(matmul_model, monkeypatch):
    """TVM code that catches everything around a build (Relax's FoldConstant does) swallows the
    KeyboardInterrupt a press raised inside it; compile still stops with KeyboardInterrupt
    instead of finishing with what the interrupted step left."""
    import signal

    from tvm_sparse import compiler

    real_build = compiler.relax.build

    def build(*args, **kwargs):
        try:
            signal.raise_signal(signal.SIGINT)  # the handler raises KeyboardInterrupt here...
        except KeyboardInterrupt:
            pass  # ...and native code catches it
        return real_build(*args, **kwargs)

    monkeypatch.setattr(compiler.relax, "build", build)
    with pytest.raises(KeyboardInterrupt):
        tvm_sparse.compile(matmul_model, sparse="off")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
