"""Example models built with onnx.helper, optionally magnitude-pruned: demo, tests, benchmarks."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def prune_out_in(
    view: np.ndarray, sparsity: float, block: tuple[int, int] = (1, 1), rescale: bool = False
) -> np.ndarray:
    """Zero the `sparsity` fraction of RxC blocks with the smallest L1 norm of an [out, in] view.

    `rescale` multiplies the kept weights by 1/sqrt(1 - sparsity), as retraining would restore
    the layer's output scale; without it, deep pruned nets shrink their activations to ~0.
    """
    if sparsity <= 0:
        return view.copy()
    r, c = block
    rows, cols = view.shape
    pr, pc = -rows % r, -cols % c
    padded = np.pad(view, ((0, pr), (0, pc)))
    blocks = padded.reshape((rows + pr) // r, r, (cols + pc) // c, c)
    norms = np.abs(blocks).sum(axis=(1, 3))
    n_zero = int(round(sparsity * norms.size))
    keep = np.ones(norms.size, dtype=bool)
    keep[np.argsort(norms, axis=None, kind="stable")[:n_zero]] = False
    mask = np.repeat(np.repeat(keep.reshape(norms.shape), r, axis=0), c, axis=1)
    scale = 1.0 / np.sqrt(1.0 - min(sparsity, 0.99)) if rescale else 1.0
    return (padded * mask * scale)[:rows, :cols].astype(view.dtype)


def prune_weight(
    op_type: str, w: np.ndarray, sparsity: float, block=(1, 1), rescale: bool = False
) -> np.ndarray:
    """Prune an ONNX weight in its own layout, blocks taken in the [out, in] view."""
    if op_type == "MatMul":
        return prune_out_in(w.T, sparsity, block, rescale).T
    if op_type == "Conv":
        o, i, kh, kw = w.shape
        view = np.moveaxis(w, 1, -1).reshape(o, -1)
        pruned = prune_out_in(view, sparsity, block, rescale)
        return np.moveaxis(pruned.reshape(o, kh, kw, i), -1, 1)
    if op_type in ("LSTM", "GRU", "RNN"):  # [dirs, gates*H, in]
        return np.stack([prune_out_in(w[d], sparsity, block, rescale) for d in range(w.shape[0])])
    raise ValueError(op_type)


class _Graph:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, array: np.ndarray, prefix: str) -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], prefix: str, **attrs) -> str:
        out = self.name(prefix)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x, cin, cout, k, stride=1, group=1, relu=True, sparsity=0.0, block=(1, 1)):
        fan_in = cin // group * k * k
        w = self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / fan_in)
        w = w.astype(np.float32)
        if sparsity and group == 1:
            w = prune_weight("Conv", w, sparsity, block, rescale=True)
        b = (self.rng.standard_normal(cout) * 0.05).astype(np.float32)
        y = self.node(
            "Conv",
            [x, self.const(w, "w"), self.const(b, "b")],
            "conv",
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[k // 2] * 4,
            group=group,
        )
        return self.node("Relu", [y], "relu") if relu else y

    def model(self, inputs, outputs, name: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


MOBILENET_V1 = (
    [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)]
    + [(512, 1)] * 5
    + [(1024, 2), (1024, 1)]
)


def mobilenet_v1(
    size: int = 224,
    width: float = 1.0,
    classes: int = 1000,
    sparsity: float = 0.0,
    block=(1, 1),
    seed: int = 0,
) -> onnx.ModelProto:
    """MobileNet-v1 topology (3x3 stem, 13 depthwise-separable blocks, pool, FC).

    `sparsity` prunes the pointwise (1x1) convs and the FC, the layers that carry ~95 % of the
    MACs; the stem and depthwise convs stay dense, as pruning tools usually leave them.
    """
    g = _Graph(seed)
    ch = max(8, int(32 * width))
    y = g.conv("input", 3, ch, 3, stride=2)
    for cout, stride in MOBILENET_V1:
        cout = max(8, int(cout * width))
        y = g.conv(y, ch, ch, 3, stride=stride, group=ch)
        y = g.conv(y, ch, cout, 1, sparsity=sparsity, block=block)
        ch = cout
    y = g.node("GlobalAveragePool", [y], "pool")
    y = g.node("Flatten", [y], "flatten", axis=1)
    w = (g.rng.standard_normal((classes, ch)) / np.sqrt(ch)).astype(np.float32)
    if sparsity:
        w = prune_out_in(w, sparsity, block, rescale=True)
    b = np.zeros(classes, np.float32)
    y = g.node("Gemm", [y, g.const(w, "w"), g.const(b, "b")], "fc", transB=1)
    x_info = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])
    y_info = helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, classes])
    return g.model([x_info], [y_info], "mobilenet_v1_like")


def resnet(
    size: int = 224,
    stages=(64, 128, 256, 512),
    blocks_per_stage: int = 2,
    classes: int = 1000,
    sparsity: float = 0.0,
    block=(1, 1),
    seed: int = 0,
) -> onnx.ModelProto:
    """ResNet-18-like topology (7x7 stem without max-pool, basic blocks with residual Add)."""
    g = _Graph(seed)
    ch = stages[0]
    y = g.conv("input", 3, ch, 7, stride=2)
    for s, cout in enumerate(stages):
        for b in range(blocks_per_stage):
            stride = 2 if (b == 0 and s > 0) else 1
            h = g.conv(y, ch, cout, 3, stride=stride, sparsity=sparsity, block=block)
            h = g.conv(h, cout, cout, 3, relu=False, sparsity=sparsity, block=block)
            skip = (
                y
                if (stride == 1 and ch == cout)
                else g.conv(
                    y, ch, cout, 1, stride=stride, relu=False, sparsity=sparsity, block=block
                )
            )
            y = g.node("Relu", [g.node("Add", [h, skip], "add")], "relu")
            ch = cout
    y = g.node("GlobalAveragePool", [y], "pool")
    y = g.node("Flatten", [y], "flatten", axis=1)
    w = (g.rng.standard_normal((classes, ch)) / np.sqrt(ch)).astype(np.float32)
    y = g.node(
        "Gemm", [y, g.const(w, "w"), g.const(np.zeros(classes, np.float32), "b")], "fc", transB=1
    )
    x_info = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])
    y_info = helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, classes])
    return g.model([x_info], [y_info], "resnet_like")


def lstm(
    seq_len: int = 100,
    batch: int = 1,
    input_size: int = 512,
    hidden: int = 1024,
    layers: int = 1,
    bidirectional: bool = False,
    sparsity: float = 0.0,
    block=(1, 1),
    gate_sparsity: dict[str, float] | None = None,
    seed: int = 0,
) -> onnx.ModelProto:
    """Stacked ONNX LSTM layers (layout 0: X is [T, B, I]); Y of the last layer is the output.

    `gate_sparsity` prunes gates selectively (keys i, o, f, c) and overrides `sparsity`: seed
    000's selective pruning is ``{"i": .9, "o": .9, "f": .9, "c": 0}``.
    """
    g = _Graph(seed)
    dirs = 2 if bidirectional else 1
    gates = gate_sparsity or {k: sparsity for k in "iofc"}
    x, size = "input", input_size
    for _ in range(layers):
        scale = 1.0 / np.sqrt(hidden)
        w = g.rng.uniform(-scale, scale, (dirs, 4 * hidden, size)).astype(np.float32)
        r = g.rng.uniform(-scale, scale, (dirs, 4 * hidden, hidden)).astype(np.float32)
        for k, gate in enumerate("iofc"):  # ONNX gate order i, o, f, c
            rows = slice(k * hidden, (k + 1) * hidden)
            w[:, rows] = prune_weight("LSTM", w[:, rows], gates[gate], block)
            r[:, rows] = prune_weight("LSTM", r[:, rows], gates[gate], block)
        b = g.rng.uniform(-scale, scale, (dirs, 8 * hidden)).astype(np.float32)
        y = g.name("lstm")
        g.nodes.append(
            helper.make_node(
                "LSTM",
                [x, g.const(w, "W"), g.const(r, "R"), g.const(b, "B")],
                [y],
                name=y,
                hidden_size=hidden,
                direction="bidirectional" if bidirectional else "forward",
            )
        )
        # Y is [T, dirs, B, H]: fold directions into features for the next layer.
        y = g.node("Transpose", [y], "tr", perm=[0, 2, 1, 3])
        shape = g.const(np.array([seq_len, batch, dirs * hidden], np.int64), "shape")
        x, size = g.node("Reshape", [y, shape], "flat"), dirs * hidden
    x_info = helper.make_tensor_value_info("input", TensorProto.FLOAT, [seq_len, batch, input_size])
    y_info = helper.make_tensor_value_info(x, TensorProto.FLOAT, [seq_len, batch, size])
    return g.model([x_info], [y_info], "lstm")
