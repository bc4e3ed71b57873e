"""RewriteQuantized: QDQ layers of ORT's quantize_static run as int8 kernels, matching ORT."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from tvm import relax

from tvm_sparse import examples
from tvm_sparse.frontend import from_onnx
from tvm_sparse.passes import lowering_pipeline, optimize
from tvm_sparse.passes.rewrite_quantized import RewriteQuantized, collect_quantized_layers
from tvm_sparse.schedules.int8_matmul import Int8Variant

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver5", "num-cores": 2})
DENSE, BSR4 = Int8Variant(4, sparse=False), Int8Variant(4)
QUADS = Int8Variant(4, gather=True)  # column quads


class _Reader(CalibrationDataReader):
    def __init__(self, name, shape, samples=3):
        rng = np.random.default_rng(0)
        self._it = iter(
            [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(samples)]
        )

    def get_next(self):
        return next(self._it, None)


def quantize(
    model: onnx.ModelProto,
    activation=QuantType.QUInt8,
    per_channel=True,
    quant_format=QuantFormat.QDQ,
):
    """ORT quantize_static (QDQ format unless told): the files users ship."""
    inp = model.graph.input[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "a.onnx"), os.path.join(tmp, "b.onnx")
        onnx.save(model, src)
        quantize_static(
            src,
            dst,
            _Reader(inp.name, shape),
            quant_format=quant_format,
            per_channel=per_channel,
            activation_type=activation,
            weight_type=QuantType.QInt8,
        )
        return onnx.load(dst)


def mlp(m=24, k=64, n=40, sparsity=0.0, relu=True, seed=0) -> onnx.ModelProto:
    """MatMul + bias + ReLU, then Gemm(transB) + bias: two integer layers in a row."""
    rng = np.random.default_rng(seed)
    w1 = examples.prune_weight("MatMul", rng.standard_normal((k, n)).astype(np.float32), sparsity)
    w2 = rng.standard_normal((n - 8, n)).astype(np.float32)
    b1 = rng.standard_normal(n).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu" if relu else "Identity", ["hb"], ["hr"]),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n - 8])],
        [
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(rng.standard_normal(n - 8).astype(np.float32), "b2"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def build(mod):
    mod = optimize(mod, TARGET)
    ex = relax.build(mod, TARGET, relax_pipeline=lowering_pipeline(TARGET))
    return relax.VirtualMachine(ex, tvm.cpu())


def run_both(qdq: onnx.ModelProto, variant, seed=1):
    """(ours after the rewrite, ORT) on the same random input; and the rewritten module."""
    import onnxruntime as ort

    mod = from_onnx(qdq, None)
    layers = collect_quantized_layers(mod)
    rewritten = RewriteQuantized({layer.key: variant for layer in layers})(mod)
    inp = qdq.graph.input[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    ours = build(rewritten)["main"](tvm.runtime.tensor(x)).numpy()
    sess = ort.InferenceSession(qdq.SerializeToString(), providers=["CPUExecutionProvider"])
    return ours, sess.run(None, {inp.name: x})[0], rewritten, layers


def output_step(qdq: onnx.ModelProto) -> float:
    consts = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    node = next(n for n in qdq.graph.node if qdq.graph.output[0].name in n.output)
    assert node.op_type == "DequantizeLinear"
    return float(consts[node.input[1]].reshape(-1)[0])


def kernels(mod) -> list[str]:
    return sorted(
        str(f.attrs["tvm_sparse.kernel"])
        for _, f in mod.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and "tvm_sparse.kernel" in f.attrs
    )


def assert_within_one_step(ours, ref, qdq):
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    steps = np.abs(ours - ref) / output_step(qdq)
    # Identical integer arithmetic to ORT's: any difference must stay within one step.
    assert steps.max() <= 1.0 + 1e-4, f"max {steps.max():.2f} steps"
    return steps


@pytest.mark.parametrize("variant", [DENSE, BSR4, Int8Variant(1), QUADS], ids=lambda v: v.name)
@pytest.mark.parametrize("sparsity", [0.0, 0.9])
def test_mlp_matches_ort(variant, sparsity):
    qdq = quantize(mlp(sparsity=sparsity))
    ours, ref, rewritten, layers = run_both(qdq, variant)
    assert [layer.kind for layer in layers] == ["matmul", "matmul"]
    assert kernels(rewritten).count(variant.name) == 2
    # ORT quantizes MatMul's output before the bias Add (its QLinearAdd), so that Add stays
    # float as in ORT; no float matmul is left and the weights are never dequantized.
    text = rewritten.script(show_meta=False)
    assert "R.matmul" not in text and "R.permute_dims" not in text
    assert_within_one_step(ours, ref, qdq)


@pytest.mark.parametrize("variant", [BSR4, QUADS], ids=lambda v: v.name)
def test_signed_activations_match_ort(variant):
    qdq = quantize(mlp(sparsity=0.5), activation=QuantType.QInt8)
    ours, ref, rewritten, layers = run_both(qdq, variant)
    assert {layer.x_dtype for layer in layers} == {"int8"}
    pack = "bytes_rowmajor_int8" if variant.gather else "pack_rowmajor_int8"
    assert pack in kernels(rewritten)
    assert_within_one_step(ours, ref, qdq)


def test_per_tensor_weights_match_ort():
    qdq = quantize(mlp(sparsity=0.5), per_channel=False)
    ours, ref, _, layers = run_both(qdq, DENSE)
    assert len(layers) == 2
    assert_within_one_step(ours, ref, qdq)


@pytest.mark.parametrize("variant", [DENSE, BSR4, QUADS], ids=lambda v: v.name)
def test_small_mobilenet_matches_ort(variant):
    model = examples.mobilenet_v1(size=32, width=0.25, classes=10, sparsity=0.9, block=(4, 1))
    qdq = quantize(model)
    ours, ref, rewritten, layers = run_both(qdq, variant)
    kinds = ["rows3"] + ["depthwise", "conv1x1"] * 13 + ["matmul"]
    assert [layer.kind for layer in layers] == kinds
    assert kernels(rewritten).count("dw3x3_u8s8") == 13
    assert kernels(rewritten).count("rows3_lanes") == 1
    # the depthwise kernels write the BSR / dense pointwise kernels' packed input themselves
    # (their plain outputs, emitted first, are dead code); column quads read plain bytes
    packs = [k for k in kernels(rewritten) if k.startswith(("pack_kmajor", "bytes_kmajor"))]
    assert bool(packs) == variant.gather
    # every conv runs in int8, the stem (3 input channels) as a matmul over kernel rows
    assert "R.nn.conv2d(" not in rewritten.script(show_meta=False)
    assert_within_one_step(ours, ref, qdq)


def test_float_model_is_not_rewritten():
    mod = from_onnx(mlp(), None)
    assert collect_quantized_layers(mod) == []
    tvm.ir.assert_structural_equal(RewriteQuantized({})(mod), mod)


def test_unplanned_layers_stay_float():
    qdq = quantize(mlp())
    mod = from_onnx(qdq, None)
    layers = collect_quantized_layers(mod)
    rewritten = RewriteQuantized({layers[1].key: DENSE})(mod)
    # the graph output's DequantizeLinear of the int8 kernel's result becomes a flat kernel
    # (MatMul outputs; a pointwise conv's sole DequantizeLinear is fused into its kernel)
    assert kernels(rewritten) == ["dense_wx_4x4_u8s8", "dequantize_uint8", "pack_rowmajor_uint8"]
    assert relax.analysis.check_well_formed(rewritten)
    again = RewriteQuantized({layers[1].key: DENSE})(rewritten)  # idempotent: nothing left
    tvm.ir.assert_structural_equal(again, rewritten)


def test_reduction_not_multiple_of_4_stays_float():
    qdq = quantize(mlp(k=30))
    layers = collect_quantized_layers(from_onnx(qdq, None))
    assert [layer.shape for layer in layers] == [(32, 40)]  # only the Gemm (K = 40)


def conv_chain(seed=0) -> onnx.ModelProto:
    """1x1 conv -> 3x3 conv -> 1x1 conv -> MatMul (flattened pixels), biases, no pooling: every
    op has a standard QOperator form (ORT writes com.microsoft ops for pooling and Add)."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return examples.prune_out_in(
            rng.standard_normal((shape[0], int(np.prod(shape[1:])))).astype(np.float32), 0.9, (1, 4)
        ).reshape(shape)

    inits = {
        "w1": w(16, 8, 1, 1),
        "b1": rng.standard_normal(16).astype(np.float32),
        "w2": rng.standard_normal((16, 16, 3, 3)).astype(np.float32) * 0.2,
        "w3": w(24, 16, 1, 1),
        "b3": rng.standard_normal(24).astype(np.float32),
        "wm": rng.standard_normal((36, 20)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c2", "w3", "b3"], ["c3"]),
        helper.make_node("Reshape", ["c3", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "wm"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [24, 20])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()]
        + [numpy_helper.from_array(np.array([24, 36], np.int64), "shape")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("variant", [DENSE, BSR4, QUADS], ids=lambda v: v.name)
def test_qoperator_models_match_ort(variant):
    """QOperator files: QLinearConv / QLinearMatMul as our importer builds them, too."""
    qop = quantize(conv_chain(), quant_format=QuantFormat.QOperator)
    assert {"QLinearConv", "QLinearMatMul"} <= {n.op_type for n in qop.graph.node}
    ours, ref, rewritten, layers = run_both(qop, variant)
    assert [layer.kind for layer in layers] == ["conv1x1", "conv1x1", "matmul"]
    assert "R.nn.conv2d" in rewritten.script(show_meta=False)  # the 3x3 conv stays
    assert_within_one_step(ours, ref, qop)
