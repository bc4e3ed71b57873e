"""LSTM layers for :func:`tvm_sparse.compress.quantize`: int8 W and R, corrected biases.

An LSTM keeps float activations (ONNX has no quantized LSTM; ONNX Runtime's QDQ quantizer also
leaves it float): W and R become symmetric int8 behind a ``DequantizeLinear`` (per gate row
when per-channel, shared by the directions since DequantizeLinear has one axis), and the
biases absorb the expected shifts of both projections (seed 001): ``E[(W_q - W) x_t]`` from
the layer input and ``E[(R_q - R) h_{t-1}]`` from its previous hidden states (the initial
state, then Y without its last step), measured on the calibration data.
"""

from __future__ import annotations

import numpy as np
import onnx

_STANDARD = ("", "ai.onnx")


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _optional(node: onnx.NodeProto, index: int) -> str | None:
    return node.input[index] if len(node.input) > index and node.input[index] else None


def find_lstms(graph: onnx.GraphProto, inits: dict[str, np.ndarray]) -> list[onnx.NodeProto]:
    """LSTM nodes whose W, R (and B, if any) are fp32 initializers."""
    found = []
    for node in graph.node:
        if node.op_type != "LSTM" or node.domain not in _STANDARD:
            continue
        names = [node.input[1], node.input[2], _optional(node, 3)]
        if all(n is None or (n in inits and inits[n].dtype == np.float32) for n in names):
            found.append(node)
    return found


def input_means(node: onnx.NodeProto, values: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean of x_t over steps and batch ([I]) and of h_{t-1} per direction ([D, H] or None)."""
    layout = int(_attr(node, "layout", 0))
    x = np.asarray(values[node.input[0]], np.float64)
    x = x.transpose(1, 0, 2) if layout else x  # [T, B, I]
    mean_x = x.reshape(-1, x.shape[-1]).mean(axis=0)
    y_name = node.output[0] if node.output else ""
    if not y_name:
        return mean_x, None  # no Y: the hidden states are not observable
    y = np.asarray(values[y_name], np.float64)
    y = y.transpose(1, 2, 0, 3) if layout else y  # [T, D, B, H]
    n_t, n_dir, n_b, hidden = y.shape
    h0_name = _optional(node, 5)
    h0 = np.zeros((n_dir, n_b, hidden))
    if h0_name:
        h0 = np.asarray(values[h0_name], np.float64)
        h0 = h0.transpose(1, 0, 2) if layout else h0
    reverse = _attr(node, "direction", b"forward") in (b"reverse", "reverse")
    means = []
    for d in range(n_dir):
        backwards = reverse or d == 1
        earlier = y[1:, d] if backwards else y[:-1, d]  # states some step reads as h_{t-1}
        total = h0[d].sum(axis=0) + earlier.sum(axis=(0, 1))
        means.append(total / (n_t * n_b))
    return mean_x, np.stack(means)


def rewrite_lstm(builder, node, inits, means, per_channel: bool, bias_correction: bool) -> None:
    """W, R -> int8 + DequantizeLinear; B -> B minus the measured shifts (added if absent)."""
    from .compress import quantize_weight

    w, r = inits[node.input[1]], inits[node.input[2]]
    axis = 1 if per_channel else None
    shifts = []
    for index, weight, mean in ((1, w, means[0]), (2, r, means[1])):
        q, scale = quantize_weight(weight, axis)
        zero = np.zeros_like(scale, np.int8)
        node.input[index] = builder.dequantized_const(node.input[index], q, scale, zero, 1)
        if mean is None:
            shifts.append(np.zeros(weight.shape[:2]))
            continue
        shape = (1, -1, 1) if axis is not None else (1, 1, 1)
        dw = (q.astype(np.float32) * scale.reshape(shape) - weight).astype(np.float64)
        mean = np.broadcast_to(mean, (weight.shape[0], weight.shape[2]))
        shifts.append(np.einsum("dgk,dk->dg", dw, mean))
    if not bias_correction:
        return
    b_name = _optional(node, 3)
    bias = inits[b_name].astype(np.float64) if b_name else np.zeros((w.shape[0], 2 * w.shape[1]))
    bias = bias - np.concatenate(shifts, axis=1)
    while len(node.input) < 4:
        node.input.append("")
    node.input[3] = builder.const(f"{b_name or node.name or 'lstm'}_corrected", bias.astype("f4"))
