"""Per-layer report: which layers carry weights, how sparse they are, which kernel runs them."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .passes.collect_sparse_layers import weight_key
from .sparsity import GATES, as_out_in, gate_sparsity, weight_stats

# Input positions of the weight tensors of each weight-carrying op.
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "MatMul": (1,),
    "Gemm": (1,),
    "Conv": (1,),
    "MatMulInteger": (1,),
    "ConvInteger": (1,),
    "QLinearMatMul": (3,),
    "QLinearConv": (3,),
    "LSTM": (1, 2),
    "GRU": (1, 2),
    "RNN": (1, 2),
}
_WEIGHT_NAMES = {"LSTM": ("W", "R"), "GRU": ("W", "R"), "RNN": ("W", "R")}


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return consts


def _io_shapes(model: onnx.ModelProto) -> dict[str, list]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is best-effort for the report
        inferred = model
    shapes = {}
    g = inferred.graph
    for v in list(g.input) + list(g.value_info) + list(g.output):
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims
        ]
    return shapes


def weight_layers(model: onnx.ModelProto) -> list[dict]:
    """One row per weight-carrying node: op, name, shapes and sparsity of its constant weights."""
    consts = _constants(model)
    shapes = _io_shapes(model)
    rows = []
    for i, node in enumerate(model.graph.node):
        positions = WEIGHT_INPUTS.get(node.op_type)
        if positions is None:
            continue
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        weights, keys = {}, []
        for pos, label in zip(positions, _WEIGHT_NAMES.get(node.op_type, ("W",))):
            if pos < len(node.input) and node.input[pos] in consts:
                w = consts[node.input[pos]]
                if w.ndim < 2:
                    continue
                views = as_out_in(node.op_type, w, trans_b)
                weights[label] = {"shape": list(w.shape), **weight_stats(views)}
                if node.op_type in GATES:
                    weights[label]["gates"] = gate_sparsity(node.op_type, w)
                keys += [weight_key(v) for v in views]
        rows.append(
            {
                "op": node.op_type,
                "name": node.name or f"{node.op_type}_{i}",
                "input_shape": shapes.get(node.input[0]),
                "output_shape": shapes.get(node.output[0]),
                "weights": weights,
                "keys": keys,
            }
        )
    return rows


def format_table(rows: list[dict], blocks=("1x4", "4x1", "16x1", "8x8")) -> str:
    """A fixed-width text table of layers (for the CLI and the demo)."""
    with_kernel = any("kernel" in row for row in rows)
    head = ["layer", "op", "weight", "shape", "sparsity"] + [f"zero {b}" for b in blocks]
    head += ["kernel"] if with_kernel else []
    lines = []
    for row in rows:
        for label, w in (row["weights"] or {"-": None}).items():
            cells = [row["name"], row["op"], label]
            if w is None:
                cells += ["-", "-"] + ["-"] * len(blocks)
            else:
                cells += ["x".join(map(str, w["shape"])), f"{w['sparsity']:.1%}"]
                cells += [f"{w['zero_blocks'].get(b, 0.0):.1%}" for b in blocks]
            if with_kernel:
                cells.append(row.get("kernel", "-"))
            lines.append(cells)
    widths = (
        [max(len(str(c)) for c in col) for col in zip(head, *lines)]
        if lines
        else [len(h) for h in head]
    )
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*["-" * w for w in widths])]
    out += [fmt.format(*map(str, cells)) for cells in lines]
    return "\n".join(out)
