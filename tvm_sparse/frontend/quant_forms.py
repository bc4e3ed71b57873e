"""Quantized forms tvm-sparse does not compile, rejected on the ONNX graph before import."""

from __future__ import annotations

import onnx

from ..errors import UnsupportedOpError

# Sub-byte and 8-bit float element types: TVM cannot even load such initializers (int4 arrays
# crash its constant conversion), so they are rejected on the ONNX graph before import.
_LOW_PRECISION = {
    getattr(onnx.TensorProto, name): name.lower()
    for name in ("INT4", "UINT4", "INT2", "UINT2", "FLOAT4E2M1", "FLOAT6E2M3", "FLOAT6E3M2",
                 "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0")
    if hasattr(onnx.TensorProto, name)
}  # fmt: skip


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {t.name: t.data_type for t in graph.initializer}
    for v in (*graph.input, *graph.value_info, *graph.output):
        types.setdefault(v.name, v.type.tensor_type.elem_type)
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            types[node.output[0]] = node.attribute[0].t.data_type
    return types


def check_forms(model: onnx.ModelProto, opset: int) -> None:
    """Raise UnsupportedOpError naming the node and form for int4/int2/float8/float4 tensors.

    Covers every node (Q/DQ, QLinear*, *Integer, and any op fed such a constant); the element
    types come from initializers, declared values and the ``output_dtype`` attribute.
    """
    types = _elem_types(model.graph)
    for i, node in enumerate(model.graph.node):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        found = [(f"tensor '{n}'", types.get(n)) for n in (*node.input, *node.output) if n]
        found.append(("attribute output_dtype", attrs.get("output_dtype")))
        for what, elem in found:
            if elem not in _LOW_PRECISION:
                continue
            form = _LOW_PRECISION[elem]
            if attrs.get("block_size"):
                form = f"blocked (block_size={attrs['block_size']}) {form}"
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            detail = f"{form} quantization ({what}) not supported"
            raise UnsupportedOpError(node.name or f"#{i}", op, opset, detail)
