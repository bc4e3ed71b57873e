"""Calibration: how sparse each weight layer's *input* is on sample data (seed 004's input side).

Runs the model on calibration samples with ONNX's reference evaluator (every intermediate
tensor kept; a MobileNet-v1 at 224x224 takes about 0.3 s per sample) and counts exact zeros
in the data input of every weight layer. The selection uses these fractions to time the
input-sparse kernels on inputs as sparse as the real ones.

Public functions
----------------
``measure_input_sparsity(model, calibration) -> dict[str, float]``
    ONNX node name -> fraction of exact zeros in its data input, over all samples.
``input_sparsity_by_key(model, sparsity) -> dict[str, float]``
    The same fractions keyed by the weight keys of each node's [out, in] view(s), the keys
    the Relax-side layers carry (`collect_sparse_layers.weight_key`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import TvmSparseError

# Weight-layer ops and the inputs that may hold the constant weight; the data input is the
# first non-constant of those positions (input 0 for Conv, Gemm and the recurrent ops).
DATA_OPS: dict[str, tuple[int, ...]] = {
    "MatMul": (0, 1),
    "Gemm": (0, 1),
    "Conv": (0,),
    "LSTM": (0,),
    "GRU": (0,),
    "RNN": (0,),
}
WEIGHT_POSITIONS: dict[str, tuple[int, ...]] = {
    "MatMul": (0, 1),
    "Gemm": (0, 1),
    "Conv": (1,),
    "LSTM": (1, 2),
    "GRU": (1, 2),
    "RNN": (1, 2),
}


def _constant_names(model: onnx.ModelProto) -> set[str]:
    names = {t.name for t in model.graph.initializer}
    names |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return names


def node_name(node: onnx.NodeProto, index: int) -> str:
    """The name a node goes by in reports (its own, else ``<op>_<index>``)."""
    return node.name or f"{node.op_type}_{index}"


def data_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """{node name: tensor name of its data input} for every weight layer of `model`."""
    consts = _constant_names(model)
    out = {}
    for i, node in enumerate(model.graph.node):
        if node.op_type not in DATA_OPS:
            continue
        weights = [p for p in WEIGHT_POSITIONS[node.op_type] if p < len(node.input)]
        if not any(node.input[p] in consts for p in weights):
            continue  # no constant weight: not a weight layer
        data = [node.input[p] for p in DATA_OPS[node.op_type] if node.input[p] not in consts]
        if data:
            out[node_name(node, i)] = data[0]
    return out


def _fits(shape: tuple[int, ...], dims: list[int | None]) -> bool:
    return len(shape) == len(dims) and all(d is None or d == s for d, s in zip(dims, shape))


def _samples(model: onnx.ModelProto, calibration: dict[str, np.ndarray]) -> list[dict]:
    """Split the calibration arrays into per-run feeds (see `measure_input_sparsity`)."""
    inits = {t.name for t in model.graph.initializer}
    declared = {
        v.name: [
            d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim
        ]
        for v in model.graph.input
        if v.name not in inits
    }
    missing = set(declared) - set(calibration)
    if missing:
        raise TvmSparseError(f"calibration: no data for model input(s) {sorted(missing)}")
    per_input = {}
    for name, dims in declared.items():
        arr = np.asarray(calibration[name])
        if _fits(arr.shape, dims):
            per_input[name] = [arr]
        elif arr.ndim == len(dims) + 1 and _fits(arr.shape[1:], dims):
            per_input[name] = list(arr)
        elif dims and dims[0] == 1 and _fits((1,) + arr.shape[1:], dims):
            per_input[name] = [arr[i : i + 1] for i in range(arr.shape[0])]
        else:
            raise TvmSparseError(
                f"calibration: input {name!r} has shape {list(arr.shape)}, expected {dims} "
                "or samples of it stacked along a new or the batch axis"
            )
    counts = {len(v) for v in per_input.values()} - {1}
    if len(counts) > 1:
        raise TvmSparseError(f"calibration: inputs disagree on the number of samples {counts}")
    n = counts.pop() if counts else 1
    return [{k: v[i] if len(v) > 1 else v[0] for k, v in per_input.items()} for i in range(n)]


def measure_input_sparsity(
    model: onnx.ModelProto, calibration: dict[str, np.ndarray]
) -> dict[str, float]:
    """Fraction of exact zeros in the data input of every weight layer over the samples.

    Parameters
    ----------
    model
        The ONNX model (MatMul, Gemm, Conv, LSTM, GRU and RNN nodes with a constant weight
        count as weight layers; quantized ops are not measured).
    calibration
        Per graph input, either one input of the declared shape, or samples stacked along a
        new leading axis, or (batch-1 inputs) along the batch axis; every sample is one run.

    Returns
    -------
    dict[str, float]
        Node name (its ``name``, else ``<op>_<index>``) -> zeros / elements of its data input,
        summed over all runs.
    """
    from onnx.reference import ReferenceEvaluator

    wanted = data_inputs(model)
    if not wanted:
        return {}
    evaluator = ReferenceEvaluator(model)
    zeros = {name: 0 for name in wanted}
    total = {name: 0 for name in wanted}
    for feeds in _samples(model, calibration):
        feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        results = evaluator.run(None, feeds, intermediate=True)
        results.update(feeds)
        for name, tensor in wanted.items():
            value = results.get(tensor)
            if value is None:
                raise TvmSparseError(
                    f"calibration: tensor {tensor!r} of node {name!r} not computed"
                )
            value = np.asarray(value)
            zeros[name] += int(value.size - np.count_nonzero(value))
            total[name] += int(value.size)
    return {name: zeros[name] / total[name] if total[name] else 0.0 for name in wanted}


def input_sparsity_by_key(model: onnx.ModelProto, sparsity: dict[str, float]) -> dict[str, float]:
    """Re-key `measure_input_sparsity` results by the weight keys of each node's view(s)."""
    from .passes.collect_sparse_layers import weight_key
    from .sparsity import as_out_in

    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    out = {}
    for i, node in enumerate(model.graph.node):
        name = node_name(node, i)
        if name not in sparsity:
            continue
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        # Input 1 is the weight the data input multiplies (W for recurrent ops: R sees h).
        w = consts.get(node.input[1]) if len(node.input) > 1 else None
        if w is None or w.ndim < 2:
            continue
        for view in as_out_in(node.op_type, w, trans_b):
            out[weight_key(view)] = sparsity[name]
    return out
