"""RewriteConvToBSR: which convs and epilogues it takes, leaves the rest alone, and whole
ResNet-like nets match ONNX Runtime at every sparsity with both kernels."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from conftest import MODEL_TOLERANCE, assert_close, ort_run
from tvm_sparse import examples
from tvm_sparse.frontend.onnx import from_onnx
from tvm_sparse.passes import lowering_pipeline, optimize
from tvm_sparse.passes.rewrite_conv_to_bsr import (
    DENSE,
    RewriteConvToBSR,
    collect_conv_layers,
    conv_candidates,
    time_conv_candidate,
)
from tvm_sparse.sparsity import as_out_in

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver5", "num-cores": 2})


def conv_module(k=3, stride=1, groups=1, bias=True, residual=False, relu=True, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 8 // groups, k, k)).astype(np.float32)
    w[:, :, 0] = 0  # some sparsity
    b = rng.standard_normal((1, 8, 1, 1)).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 6, 7), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(
                relax.op.nn.conv2d(x, relax.const(w), strides=stride, padding=k // 2, groups=groups)
            )
            if bias:
                y = bb.emit(relax.op.add(y, relax.const(b)))
            if residual:
                y = bb.emit(relax.op.add(y, relax.op.nn.avg_pool2d(x, 1, stride)))
            if relu:
                y = bb.emit(relax.op.nn.relu(y))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def ops_of(mod) -> list[str]:
    names = []

    def visit(e):
        if isinstance(e, relax.Call):
            names.append(e.op.name if isinstance(e.op, tvm.ir.Op) else e.args[0].name_hint)

    relax.analysis.post_order_visit(mod["main"], visit)
    return names


def plan_all(mod, name):
    return {layer.key: name for layer in collect_conv_layers(mod)}


def build(mod):
    mod = optimize(mod, TARGET, phases=("legalize", "schedule"))
    return relax.VirtualMachine(
        relax.build(mod, TARGET, relax_pipeline=lowering_pipeline(TARGET)), tvm.cpu()
    )


@pytest.mark.parametrize(
    "kwargs, facts",
    [
        (dict(), dict(bias=True, residual=False, relu=True)),
        (dict(residual=True), dict(bias=True, residual=True, relu=True)),
        (dict(bias=False, relu=False), dict(bias=False, residual=False, relu=False)),
        (dict(k=1, stride=2, bias=False), dict(bias=False, residual=False, relu=True)),
    ],
)
def test_collect_epilogue(kwargs, facts):
    (layer,) = collect_conv_layers(conv_module(**kwargs))
    got = dict(bias=layer.bias is not None, residual=layer.residual, relu=layer.relu)
    assert got == facts
    assert layer.view.shape == layer.shape == (8, layer.geometry.reduction)


def test_key_joins_onnx_view():
    """The layer key is the weight key of the ONNX [O, kh*kw*I] view (the report's key)."""
    from tvm_sparse.passes.collect_sparse_layers import weight_key

    mod = conv_module()
    (layer,) = collect_conv_layers(mod)
    assert layer.key == weight_key(as_out_in("Conv", layer.weight)[0])


@pytest.mark.parametrize("kwargs", [dict(k=1), dict(groups=2), dict(groups=8)])
def test_not_applicable_is_unchanged(kwargs):
    """Pointwise stride-1 and grouped convs are not conv layers of this pass."""
    before = conv_module(**kwargs)
    assert collect_conv_layers(before) == []
    after = RewriteConvToBSR({"8x72:0123456789abcdef": "bsr_conv2d_4x1_f32"})(before)
    tvm.ir.assert_structural_equal(after, before)


@pytest.mark.parametrize("plan", [{}, "dense", "other keys"])
def test_unplanned_layer_is_unchanged(plan):
    before = conv_module()
    if plan == "dense":
        plan = plan_all(before, DENSE)
    elif plan == "other keys":
        plan = {"8x72:0123456789abcdef": "bsr_conv2d_4x1_f32"}
    tvm.ir.assert_structural_equal(RewriteConvToBSR(plan)(before), before)


@pytest.mark.parametrize("residual", [False, True])
def test_rewrite_fuses_chain_and_is_idempotent(residual):
    before = conv_module(residual=residual)
    plan = plan_all(before, "bsr_conv2d_4x1_f32")
    after = RewriteConvToBSR(plan)(before)
    assert relax.analysis.check_well_formed(after)
    ops = ops_of(after)
    assert "relax.nn.conv2d" not in ops and "relax.nn.relu" not in ops
    assert ops.count("relax.add") == 0
    kernels = [
        gv.name_hint for gv, f in after.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
    ]
    assert any(k.startswith("bsr_conv2d_4x1_f32_") for k in kernels)
    assert any(k.startswith("bsr_conv2d_prepare_") for k in kernels)
    tvm.ir.assert_structural_equal(RewriteConvToBSR(plan)(after), after)
    x = np.random.default_rng(1).standard_normal((1, 8, 6, 7)).astype(np.float32)
    got = build(after)["main"](tvm.runtime.tensor(x)).numpy()
    want = build(before)["main"](tvm.runtime.tensor(x)).numpy()
    assert_close(got, want)


def test_unknown_kernel_name_is_an_error():
    before = conv_module()
    with pytest.raises(ValueError, match="unknown conv kernel"):
        RewriteConvToBSR(plan_all(before, "bsr_conv2d_3x3_f32"))(before)


def test_candidates_follow_the_pattern():
    model = examples.resnet(size=16, stages=(16,), blocks_per_stage=1, sparsity=0.9, block=(4, 1))
    mod = optimize(from_onnx(model, {"input": [1, 3, 16, 16]}), TARGET, phases=("simplify",))
    layers = collect_conv_layers(mod)
    stem, *body = layers
    assert conv_candidates(stem) == [DENSE]  # the stem is not pruned
    for layer in body:
        names = conv_candidates(layer)
        assert names[0] == DENSE and "bsr_conv2d_4x1_f32" in names
        assert "bsr_conv2d_1x4_f32" not in names  # 4x1 pruning leaves few 1x4 zero blocks
    assert time_conv_candidate(body[0], "bsr_conv2d_4x1_f32", TARGET) > 0


@pytest.mark.parametrize("block", [(1, 1), (4, 1)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.9, 0.95])
def test_resnet_matches_onnxruntime(sparsity, block):
    """Every conv layer forced onto the sparse kernel of the pruning's block shape."""
    model = examples.resnet(
        size=32, stages=(16, 32), blocks_per_stage=1, sparsity=sparsity, block=block
    )
    mod = optimize(from_onnx(model, {"input": [1, 3, 32, 32]}), TARGET, phases=("simplify",))
    plan = plan_all(mod, f"bsr_conv2d_{block[0]}x{block[1]}_f32")
    after = RewriteConvToBSR(plan)(mod)
    assert "relax.nn.conv2d" not in ops_of(after)
    x = np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)
    got = build(after)["main"](tvm.runtime.tensor(x)).numpy()
    (want,) = ort_run(model, {"input": x})
    scale = max(1.0, float(np.abs(want).max()))
    assert_close(got / scale, want / scale, "resnet logits (scaled)", MODEL_TOLERANCE)
