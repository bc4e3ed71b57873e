"""RewriteDenseToBSR: every kernel form of a MatMul (+ bias + ReLU) layer, built and compared."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from conftest import assert_close, ort_run
from tvm_sparse.examples import prune_out_in
from tvm_sparse.frontend import from_onnx
from tvm_sparse.passes import lowering_pipeline, optimize
from tvm_sparse.passes.collect_sparse_layers import collect_layers
from tvm_sparse.passes.rewrite_dense_to_bsr import RewriteDenseToBSR
from tvm_sparse.schedules.bsr_matmul import Variant

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver5", "num-cores": 2})


def fc_relu(m: int, k: int, n: int, block) -> onnx.ModelProto:
    """Y = ReLU(X . W + b), W [K, N] pruned in RxC blocks of its [N, K] view."""
    rng = np.random.default_rng(7)
    w = prune_out_in(rng.standard_normal((n, k)).astype(np.float32), 0.8, block).T
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"], name="fc"),
        helper.make_node("Add", ["mm", "b"], ["pre"], name="bias"),
        helper.make_node("Relu", ["pre"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [
            numpy_helper.from_array(np.ascontiguousarray(w), "w"),
            numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def kernels(mod: tvm.IRModule) -> list[str]:
    return sorted(
        str(f.attrs["tvm_sparse.kernel"])
        for _, f in mod.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and "tvm_sparse.kernel" in f.attrs
    )


@pytest.mark.parametrize("form", ["wx", "xw", "rm"])
@pytest.mark.parametrize("block", [(4, 1), (16, 1), (8, 8)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_forms_match_onnxruntime(form, block):
    model = fc_relu(m=20, k=48, n=48, block=block)
    mod = from_onnx(model)
    (layer,) = collect_layers(mod)
    assert layer.form == "xw" and layer.relu and layer.bias is not None
    variant = Variant(*block, form)
    rewritten = RewriteDenseToBSR({layer.key: variant})(mod)
    relax.analysis.check_well_formed(rewritten)
    assert kernels(rewritten) == [variant.name]
    ex = relax.build(optimize(rewritten, TARGET), TARGET, relax_pipeline=lowering_pipeline(TARGET))
    x = np.random.default_rng(8).standard_normal((20, 48)).astype(np.float32)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))
    got = got[0] if isinstance(got, tvm.ir.Array | list | tuple) else got
    assert_close(got.numpy(), ort_run(model, {"x": x})[0])


def test_row_major_form_needs_no_transposes():
    """The "rm" kernel takes X and returns Y as they are: no permute_dims around it."""
    mod = from_onnx(fc_relu(m=32, k=64, n=64, block=(4, 1)))
    (layer,) = collect_layers(mod)
    rewritten = RewriteDenseToBSR({layer.key: Variant(4, 1, "rm")})(mod)
    text = rewritten["main"].script()
    assert "permute_dims" not in text and "matmul" not in text, text


def test_empty_plan_is_identity():
    mod = from_onnx(fc_relu(m=8, k=16, n=16, block=(4, 1)))
    tvm.ir.assert_structural_equal(RewriteDenseToBSR({})(mod), mod)


def test_two_row_major_kernels_in_one_library(tmp_path):
    """Each rm kernel links the same LLVM IR helper: two in one module build, export and load."""
    rng = np.random.default_rng(9)
    w1 = prune_out_in(rng.standard_normal((64, 48)).astype(np.float32), 0.8, (4, 1)).T
    w2 = prune_out_in(rng.standard_normal((32, 64)).astype(np.float32), 0.8, (4, 1)).T
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [20, 48])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [20, 32])],
        [
            numpy_helper.from_array(np.ascontiguousarray(w1), "w1"),
            numpy_helper.from_array(np.ascontiguousarray(w2), "w2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    mod = from_onnx(model)
    plan = {layer.key: Variant(4, 1, "rm") for layer in collect_layers(mod)}
    rewritten = RewriteDenseToBSR(plan)(mod)
    assert kernels(rewritten) == ["bsr_rm_4x1_f32"] * 2
    ex = relax.build(optimize(rewritten, TARGET), TARGET, relax_pipeline=lowering_pipeline(TARGET))
    ex.export_library(str(tmp_path / "lib.so"))
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "lib.so")), tvm.cpu())
    x = rng.standard_normal((20, 48)).astype(np.float32)
    assert_close(vm["main"](tvm.runtime.tensor(x)).numpy(), ort_run(model, {"x": x})[0])
