"""ConvertConvLayoutNHWC: which functions it converts, what the converted graph holds, and
that a converted model still matches ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import tvm
from tvm import relax

import tvm_sparse
from tvm_sparse import examples
from tvm_sparse._compat import Constant
from tvm_sparse.frontend.onnx import from_onnx
from tvm_sparse.passes import optimize
from tvm_sparse.passes.convert_layout import ConvertConvLayoutNHWC

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver5", "num-cores": 2})


def _simplified(model, size):
    mod = from_onnx(model, {"input": [1, 3, size, size]})
    return optimize(mod, TARGET, phases=("simplify",))


def _calls(mod, op_name):
    found = []
    relax.analysis.post_order_visit(
        mod["main"],
        lambda e: (
            found.append(e)
            if isinstance(e, relax.Call) and getattr(e.op, "name", "") == op_name
            else None
        ),
    )
    return found


def test_mobilenet_chain_runs_in_nhwc_from_its_nchw_input():
    mod = ConvertConvLayoutNHWC(_simplified(examples.mobilenet_v1(size=32, width=0.5), 32))
    convs = _calls(mod, "relax.nn.conv2d")
    assert len(convs) == 27
    layouts = [(c.attrs.data_layout, c.attrs.kernel_layout, c.attrs.out_layout) for c in convs]
    # The first conv reads the model's NCHW input (no transpose of its own), the rest NHWC.
    assert layouts[0] == ("NCHW", "OHWI", "NHWC")
    assert set(layouts[1:]) == {("NHWC", "OHWI", "NHWC")}
    # Transposes of activations are only left at the chain's end (pooled [1, 1, 1, C]).
    activations = [
        c for c in _calls(mod, "relax.permute_dims") if not isinstance(c.args[0], Constant)
    ]
    assert all(int(np.prod([int(d) for d in c.ty.shape])) <= 512 for c in activations)


def test_converted_model_matches_onnxruntime():
    model = examples.mobilenet_v1(size=32, width=0.5, classes=10)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    compiled = tvm_sparse.compile(model, sparse="off")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        compiled.run({"input": x})[0], sess.run(None, {"input": x})[0], rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("width", [0.25, 0.3])  # 8 channels; 9 (not multiples of 16)
def test_convs_without_channel_tiles_keep_nchw(width):
    mod = _simplified(examples.mobilenet_v1(size=32, width=width), 32)
    out = ConvertConvLayoutNHWC(mod)
    tvm.ir.assert_structural_equal(out["main"], mod["main"])


def test_kernel_calls_on_4d_tensors_keep_nchw():
    """A conv next to one of our kernels on a 4-D tensor (which reads NCHW) is not converted:
    it would put a transpose on each side of that kernel."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 8, 8), "float32"))
    w = relax.const(np.ones((16, 16, 3, 3), np.float32))

    def twice(t):
        return tvm.te.compute(t.shape, lambda *i: t(*i) * 2.0, name="twice")

    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_te(twice, x)
            out = bb.emit_output(bb.emit(relax.op.nn.conv2d(y, w, padding=1)))
        bb.emit_func_output(out)
    mod = bb.get()
    tvm.ir.assert_structural_equal(ConvertConvLayoutNHWC(mod)["main"], mod["main"])


def _conv_layouts(model, sparse):
    """The layout of every conv PrimFunc compile() would schedule (threshold policy)."""
    from tvm import s_tir

    from tvm_sparse.compiler import _prepare
    from tvm_sparse.schedules.conv2d import match_conv2d

    mod = _prepare(model, "host", None, sparse, "threshold")[3]
    layouts = []
    for func in mod.functions.values():
        if isinstance(func, tvm.tirx.PrimFunc):
            conv = match_conv2d(s_tir.Schedule(func))
            if conv is not None:
                layouts.append(conv.layout)
    return layouts


def test_sparse_pointwise_convs_keep_the_chain_nchw():
    """Pruned pointwise convs run as BSR matmuls over the NCHW input viewed as [C, H*W]: the
    depthwise convs between them stay NCHW (no transposes around every sparse layer), while
    the same model built dense runs in NHWC."""
    model = examples.mobilenet_v1(size=32, width=0.5, classes=10, sparsity=0.9, block=(4, 1))
    assert set(_conv_layouts(model, "force")) == {"NCHW"}
    assert set(_conv_layouts(model, "off")) == {"NHWC", "NCHW>NHWC"}
