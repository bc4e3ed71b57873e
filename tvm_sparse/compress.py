"""Post-training static int8 quantization of fp32 ONNX models to standard QDQ, with bias correction.

:func:`quantize` writes the graph ONNX Runtime's ``quantize_static`` would write in QDQ format:
every MatMul, Gemm and Conv with a constant fp32 weight gets

- its weight as a symmetric int8 initializer (range [-127, 127], zero point 0, so a pruned zero
  stays exactly zero) with a ``DequantizeLinear`` in front, per output channel or per tensor;
- ``QuantizeLinear -> DequantizeLinear`` on its data input and on its output (after a ReLU or
  bias ``Add`` that follows it alone), with min/max ranges measured on calibration data;
- its bias as int32 at scale ``x_scale * w_scale`` (what integer kernels add to the
  accumulator), corrected as in seed 001: the expected output shift ``E[(W_q - W) x]`` that
  quantizing the weight causes is measured on the calibration data (per output channel) and
  subtracted from the bias. A layer without a bias gets one when the correction is non-zero.

LSTMs get int8 W and R with corrected float biases, activations left float
(:mod:`tvm_sparse.compress_lstm`).

Only ``onnx`` and NumPy are needed: the fp32 model runs on ONNX's reference evaluator.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import compress_lstm
from .calibration import _samples
from .errors import TvmSparseError

_WEIGHT_OPS = ("MatMul", "Gemm", "Conv")
_ACT_RANGES = {"uint8": (0, 255), "int8": (-128, 127)}
_MIN_OPSET = 13  # per-axis DequantizeLinear


@dataclass
class _Layer:
    """One weight layer: the tensors that quantization rewires."""

    node: onnx.NodeProto
    weight: str  # initializer name
    axis: int  # output-channel axis of the weight
    data: str  # data input tensor
    bias: str | None  # bias initializer (Conv B, Gemm C, or the following Add's constant)
    bias_node: onnx.NodeProto | None  # the Add holding a MatMul's bias
    out: str  # the tensor that leaves the layer (after its bias Add / ReLU)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _find_layers(graph: onnx.GraphProto, inits: dict[str, np.ndarray]) -> list[_Layer]:
    """Weight layers whose form we quantize; others (e.g. Gemm with alpha != 1) stay fp32."""
    consumers = _consumers(graph)
    outputs = {o.name for o in graph.output}

    def sole_consumer(tensor: str, op_type: str) -> onnx.NodeProto | None:
        users = consumers.get(tensor, [])
        if len(users) == 1 and users[0].op_type == op_type and tensor not in outputs:
            return users[0]
        return None

    layers = []
    for node in graph.node:
        if node.op_type not in _WEIGHT_OPS or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.input) < 2 or node.input[1] not in inits or node.input[0] in inits:
            continue
        w = inits[node.input[1]]
        if w.dtype != np.float32:
            continue
        bias, bias_node, out = None, None, node.output[0]
        if node.op_type == "MatMul":
            if w.ndim != 2:
                continue
            axis, n_out = 1, w.shape[1]
            add = sole_consumer(out, "Add")
            if add is not None:
                other = add.input[1] if add.input[0] == out else add.input[0]
                if other in inits and inits[other].shape == (n_out,):
                    bias, bias_node, out = other, add, add.output[0]
        elif node.op_type == "Gemm":
            plain = _attr(node, "alpha", 1.0) == 1.0 and _attr(node, "beta", 1.0) == 1.0
            if not plain or _attr(node, "transA", 0):
                continue
            axis = 0 if _attr(node, "transB", 0) else 1
            c = node.input[2] if len(node.input) > 2 and node.input[2] else None
            # A bias that broadcasts along rows (scalar, [N], [1, N]) becomes a per-channel [N].
            if c is not None and (c not in inits or inits[c].size not in (1, w.shape[axis])):
                continue
            bias = c
        else:
            axis = 0
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            if bias is not None and bias not in inits:
                continue
        relu = sole_consumer(out, "Relu")
        if relu is not None:
            out = relu.output[0]
        layers.append(_Layer(node, node.input[1], axis, node.input[0], bias, bias_node, out))
    return layers


# ------------------------------------------------------------------------- quantization params


def quantize_weight(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 weights: ``(q, scale)`` with ``w ~ q * scale``, zero exactly zero.

    `axis` None means one scale for the whole tensor; otherwise one per index along `axis`.
    An all-zero channel gets scale 1 (DequantizeLinear needs a positive scale).
    """
    reduce = None if axis is None else tuple(i for i in range(w.ndim) if i != axis)
    scale = (np.abs(w).max(axis=reduce) / 127.0).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def activation_params(lo: float, hi: float, dtype: str) -> tuple[np.float32, np.ndarray]:
    """Asymmetric ``(scale, zero_point)`` covering [lo, hi] extended to contain 0."""
    qmin, qmax = _ACT_RANGES[dtype]
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = np.float32((hi - lo) / (qmax - qmin)) if hi > lo else np.float32(1.0)
    zp = np.clip(np.rint(qmin - lo / float(scale)), qmin, qmax)
    return scale, np.array(zp, dtype=dtype)


def _conv_pads(node, spatial: list[int], kernel, strides, dilations) -> list[int]:
    """Explicit pads (all begins, then all ends), resolving auto_pad as ONNX does."""
    nd = len(spatial)
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad == "VALID":
        return [0] * (2 * nd)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        head, tail = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            needed = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
            begin = (needed + 1) // 2 if auto_pad == "SAME_LOWER" else needed // 2
            head.append(begin)
            tail.append(needed - begin)
        return head + tail
    return list(_attr(node, "pads", [0] * (2 * nd)))


def _mean_patch(x: np.ndarray, node: onnx.NodeProto, kernel: list[int]) -> np.ndarray:
    """Mean over batch and output positions of the conv's input patch, as [C, *kernel].

    ``E[conv(x, dW)][o] = sum(dW[o] * mean_patch[group(o)])``: padding zeros included, as the
    conv sees them.
    """
    nd = len(kernel)
    strides = list(_attr(node, "strides", [1] * nd))
    dilations = list(_attr(node, "dilations", [1] * nd))
    pads = _conv_pads(node, list(x.shape[2:]), kernel, strides, dilations)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    sizes = [
        (xp.shape[2 + i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1 for i in range(nd)
    ]
    patch = np.empty((x.shape[1], *kernel), np.float64)
    spatial = tuple(range(2, 2 + nd))
    for offs in itertools.product(*[range(k) for k in kernel]):
        window = tuple(
            slice(o * d, o * d + (n - 1) * s + 1, s)
            for o, d, s, n in zip(offs, dilations, strides, sizes)
        )
        patch[(slice(None), *offs)] = xp[(slice(None), slice(None), *window)].mean(
            axis=(0, *spatial)
        )
    return patch


def _input_mean(layer: _Layer, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """What ``E[(W_q - W) x]`` needs of x: the mean input row (linear) or patch (conv)."""
    if layer.node.op_type == "Conv":
        return _mean_patch(x.astype(np.float64), layer.node, list(w.shape[2:]))
    return x.reshape(-1, x.shape[-1]).astype(np.float64).mean(axis=0)


def output_shift(layer_op: str, dw: np.ndarray, mean: np.ndarray, axis: int) -> np.ndarray:
    """``E[(W_q - W) x]`` per output channel from the weight error and the input mean."""
    dw = dw.astype(np.float64)
    if layer_op == "Conv":
        out, per_group = dw.shape[0], dw.shape[1]
        groups = mean.shape[0] // per_group
        dw_g = dw.reshape(groups, out // groups, per_group, -1)
        mean_g = mean.reshape(groups, per_group, -1)
        return np.einsum("gocs,gcs->go", dw_g, mean_g).reshape(out)
    return mean @ dw if axis == 1 else dw @ mean


# ----------------------------------------------------------------------------------- calibrate


def _calibrate(model, layers, lstms, calibration, watched) -> tuple[dict, dict]:
    """Run the fp32 model on every sample: min/max of `watched` tensors, input means of layers
    (keyed by node identity; an LSTM's are its x and h_{t-1} means)."""
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(model)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    ranges = {t: [np.inf, -np.inf] for t in watched}
    means = {id(node): [] for node in [layer.node for layer in layers] + lstms}
    samples = _samples(model, calibration)
    for feeds in samples:
        feeds = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()}
        values = evaluator.run(None, feeds, intermediate=True)
        values.update(feeds)
        for t in watched:
            v = np.asarray(values[t])
            ranges[t] = [min(ranges[t][0], float(v.min())), max(ranges[t][1], float(v.max()))]
        for layer in layers:
            x = np.asarray(values[layer.data])
            means[id(layer.node)].append(_input_mean(layer, x, inits[layer.weight]))
        for node in lstms:
            means[id(node)].append(compress_lstm.input_means(node, values))
    averaged = {}
    for key, samples_ in means.items():
        if samples_ and isinstance(samples_[0], tuple):  # LSTM: (mean x, mean h or None)
            averaged[key] = tuple(
                None if part[0] is None else np.mean(part, axis=0) for part in zip(*samples_)
            )
        else:
            averaged[key] = np.mean(samples_, axis=0)
    return ranges, averaged


# ---------------------------------------------------------------------------------- graph edit


class _Builder:
    """Collects the new initializers and Q/DQ nodes while the graph is rewritten."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.names = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
        self.names |= {i.name for i in graph.input}
        self.inits: list[onnx.TensorProto] = []
        self.head: list[onnx.NodeProto] = []  # constant DequantizeLinear nodes
        # Nodes to insert after a node (by id): the graph's node list is rebuilt only once, at
        # the end, because rebuilding it detaches the node objects the layers still edit.
        self.after: dict[int, list[onnx.NodeProto]] = {}

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def dequantized_const(self, base, q, scale, zp, axis) -> str:
        """``DequantizeLinear(q, scale, zp)`` of a constant: the float tensor's new name."""
        q_name = self.const(f"{base}_quantized", q)
        s_name = self.const(f"{base}_scale", scale)
        z_name = self.const(f"{base}_zero_point", zp)
        out = self.fresh(f"{base}_dequantized")
        attrs = {"axis": axis} if np.ndim(scale) else {}
        self.head.append(
            helper.make_node(
                "DequantizeLinear", [q_name, s_name, z_name], [out], name=f"{out}_node", **attrs
            )
        )
        return out


def _check_model(model: onnx.ModelProto) -> None:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    if opset < _MIN_OPSET:
        raise TvmSparseError(
            f"quantize: the model has opset {opset}; QDQ output needs opset >= {_MIN_OPSET} "
            "(convert it first, e.g. onnx.version_converter.convert_version)"
        )


def quantize(
    model: str | os.PathLike | onnx.ModelProto,
    calibration: dict[str, np.ndarray],
    per_channel: bool = True,
    bias_correction: bool = True,
    activation_type: str = "uint8",
) -> onnx.ModelProto:
    """Post-training static int8 quantization to QDQ ONNX (see the module docstring).

    Parameters
    ----------
    model
        fp32 ONNX model (path or ModelProto; not modified), opset >= 13.
    calibration
        Sample inputs by graph input name, samples stacked on a new first axis (or along a
        batch axis of 1), as for ``tvm-sparse compile --calib``.
    per_channel
        One weight scale per output channel (else one per weight tensor).
    bias_correction
        Subtract the measured ``E[(W_q - W) x]`` from each layer's bias (seed 001).
    activation_type
        ``"uint8"`` (ONNX Runtime's default) or ``"int8"`` activations, asymmetric.

    Returns
    -------
    onnx.ModelProto
        The QDQ model; graph inputs and outputs keep their names and float types.
    """
    from .frontend.onnx import load_model

    if activation_type not in _ACT_RANGES:
        raise TvmSparseError(
            f"quantize: activation_type {activation_type!r} is not one of {sorted(_ACT_RANGES)}"
        )
    source = load_model(model)
    _check_model(source)
    proto = onnx.ModelProto()
    proto.CopyFrom(source)
    graph = proto.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    layers = _find_layers(graph, inits)
    lstms = compress_lstm.find_lstms(graph, inits)
    if not layers and not lstms:
        raise TvmSparseError("quantize: no MatMul, Gemm, Conv or LSTM with a constant fp32 weight")
    watched = list(dict.fromkeys(t for layer in layers for t in (layer.data, layer.out)))
    ranges, means = _calibrate(source, layers, lstms, calibration, watched)
    params = {t: activation_params(*ranges[t], activation_type) for t in watched}

    b = _Builder(graph)
    for layer in layers:
        _rewrite_layer(b, layer, inits, params[layer.data][0], means[id(layer.node)], per_channel,
                       bias_correction)  # fmt: skip
    for node in lstms:
        compress_lstm.rewrite_lstm(b, node, inits, means[id(node)], per_channel, bias_correction)
    _insert_qdq(b, graph, params)
    used = {n for node in graph.node for n in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + b.inits)
    onnx.checker.check_model(proto)
    return proto


def _rewrite_layer(b, layer, inits, x_scale, mean, per_channel, bias_correction) -> None:
    """Weight -> int8 + DQ; bias -> corrected int32 + DQ (added when the correction needs it)."""
    node, w = layer.node, inits[layer.weight]
    axis = layer.axis if per_channel else None
    q, w_scale = quantize_weight(w, axis)
    node.input[1] = b.dequantized_const(layer.weight, q, w_scale, np.zeros_like(w_scale, np.int8),
                                        layer.axis)  # fmt: skip
    n_out = w.shape[layer.axis]
    bias = np.zeros(n_out)
    if layer.bias:
        bias = bias + inits[layer.bias].astype(np.float64).reshape(-1)
    if bias_correction:
        shape = [1] * w.ndim
        if axis is not None:
            shape[axis] = -1
        dw = q.astype(np.float32) * w_scale.reshape(shape) - w
        bias = bias - output_shift(node.op_type, dw, mean, layer.axis)
    if layer.bias is None and not bias_correction:
        return
    b_scale = (np.float64(x_scale) * np.broadcast_to(w_scale, (n_out,))).astype(np.float32)
    b_q = np.clip(np.rint(bias / b_scale), -(2**31), 2**31 - 1).astype(np.int32)
    base = layer.bias or f"{node.name or layer.weight}_bias"
    b_dq = b.dequantized_const(base, b_q, b_scale, np.zeros(n_out, np.int32), 0)
    if layer.bias_node is not None:
        add = layer.bias_node
        add.input[list(add.input).index(layer.bias)] = b_dq
    elif node.op_type in ("Conv", "Gemm"):
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = b_dq
    else:  # a MatMul without bias: y = MatMul + bias, the Add taking over its output name
        mm_out = b.fresh(f"{node.output[0]}_matmul")
        add = helper.make_node("Add", [mm_out, b_dq], [node.output[0]], name=f"{mm_out}_bias")
        node.output[0] = mm_out
        b.after.setdefault(id(node), []).append(add)  # inserted when the node list is rebuilt


def _insert_qdq(b: _Builder, graph: onnx.GraphProto, params: dict) -> None:
    """``t -> QuantizeLinear -> DequantizeLinear`` on each tensor of `params`, consumers rewired.

    A node output is renamed (``<t>_float``) so the DequantizeLinear can produce ``t`` itself:
    consumers and graph outputs keep their names. A graph input keeps its name and its
    consumers read ``<t>_dequantized``.
    """
    graph_inputs = {i.name for i in graph.input}
    nodes = [n for node in graph.node for n in [node, *b.after.get(id(node), [])]]
    new_nodes = list(b.head)

    def qdq(t: str, src: str, dst: str) -> list[onnx.NodeProto]:
        scale, zp = params[t]
        s_name, z_name = b.const(f"{t}_scale", scale), b.const(f"{t}_zero_point", zp)
        q_name = b.fresh(f"{t}_quantized")
        return [
            helper.make_node("QuantizeLinear", [src, s_name, z_name], [q_name], name=f"{q_name}_q"),
            helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dst],
                             name=f"{q_name}_dq"),
        ]  # fmt: skip

    renamed = {}
    for t in params:
        if t in graph_inputs:
            renamed[t] = b.fresh(f"{t}_dequantized")
            new_nodes += qdq(t, t, renamed[t])
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        new_nodes.append(node)
        for i, name in enumerate(node.output):
            if name in params and name not in graph_inputs:
                src = b.fresh(f"{name}_float")
                node.output[i] = src
                new_nodes += qdq(name, src, name)
    del graph.node[:]
    graph.node.extend(new_nodes)
