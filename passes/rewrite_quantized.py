"""RewriteQuantized: run QDQ-quantized MatMul/Gemm and pointwise convs as int8 VNNI kernels.

ONNX Runtime's ``quantize_static`` (QDQ format) leaves each layer as
``QuantizeLinear(Conv|MatMul(DequantizeLinear(x_q), DequantizeLinear(W_q)) [+ bias] [ReLU])``,
which TVM's importer turns into float arithmetic between ``R.dequantize`` and ``R.quantize``.
This pass runs on the imported module (before constant folding turns ``DequantizeLinear(W_q)``
into a float constant) and replaces each such group by an activation pack and one integer
kernel of `tvm_sparse.schedules.int8_matmul` that reads ``x_q`` and writes the quantized output,
so consecutive integer layers exchange (u)int8 tensors with no float round trip (the now unused
dequantize/quantize ops are removed by DeadCodeElimination).

Requantization follows ONNX Runtime's integer kernels: ``acc`` = int32 sum of
``(x_q - x_zp) * W_q`` plus the int32 bias (DequantizeLinear(bias_q) with scale
``x_scale * w_scale`` is taken as is; a float bias is rounded to that scale), then
``clamp(rint(acc * (x_scale * w_scale[n] / y_scale)) + y_zp)`` in float32. The float graph
instead rounds ``x_scale * w_scale * acc`` and divides by y_scale; the two can differ by one
quantisation step where the product lands next to a .5 boundary.

QOperator files are matched too: QLinearMatMul and QLinearConv as `tvm_sparse.frontend.quant`
imports them (int32 matmul/conv of the shifted activation and the folded constant weight,
requantized in float64 as the ONNX reference does); the kernels requantize in float32 as ONNX
Runtime does, so a result next to a .5 boundary may differ by one step from the float64 form.

Matched: 2-D MatMul (and Gemm after import), batch-1 pointwise NCHW convs (1x1, stride 1, no
padding, one group) with symmetric int8 weights (per tensor or per output channel) and per-tensor
activation parameters, reduction length a multiple of 4; and (QDQ only) batch-1 3x3 depthwise
NCHW convs, stride 1 or 2, as `tvm_sparse.schedules.int8_depthwise` kernels. Everything else
stays as imported.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_sparse._compat import Constant, constant_value
from tvm_sparse.formats import to_bsr, to_column_quads
from tvm_sparse.schedules import int8_depthwise, int8_matmul, int8_pack, int8_rows3
from tvm_sparse.schedules.int8_matmul import Int8Variant
from tvm_sparse.schedules.int8_vnni import GROUP

_OPS = {
    name: tvm.ir.Op.get(f"relax.{name}")
    for name in (
        "quantize",
        "dequantize",
        "matmul",
        "add",
        "reshape",
        "permute_dims",
        "nn.conv2d",
        "nn.relu",
        "astype",
        "subtract",
        "multiply",
        "clip",
        "round",
    )
}


@dataclass
class QuantLayer:
    """One integer layer: weight [N, K] int8 ([out, in] view) and its quantization parameters."""

    key: str
    # "matmul" (x [M, K]); "conv1x1", "depthwise" (3x3) or "rows3" (3x3, few input channels,
    # weight as `int8_rows3.weight_matrix`): x [1, C, H, W]
    kind: str
    weight: np.ndarray = field(repr=False)  # depthwise: [C, 9]
    columns: int  # M rows (matmul) or H*W pixels (conv)
    x_dtype: str
    x_zp: int
    bias: np.ndarray = field(repr=False)  # int32 [N], in units of x_scale * w_scale[n]
    scale: np.ndarray = field(repr=False)  # float32 [N]: x_scale * w_scale[n] / y_scale
    y_dtype: str
    y_zp: int
    relu: bool = False
    hw: tuple[int, int] | None = None  # conv input (H, W)
    stride: int = 1  # depthwise / rows3
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # depthwise / rows3: top, left, bottom, right

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def out_hw(self) -> tuple[int, int] | None:
        """The conv output (H, W) (None for a MatMul)."""
        if self.hw is None or self.kind == "conv1x1":
            return self.hw
        return int8_depthwise.geometry(self.hw, self.stride, self.pads)[:2]


def _bound(expr, bindings):
    if isinstance(expr, relax.Var) and expr in bindings:
        return bindings[expr]
    return expr


def _const_value(expr, bindings) -> np.ndarray | None:
    """A constant subgraph's value (constants, dequantize, reshape), or None."""
    expr = _bound(expr, bindings)
    if isinstance(expr, Constant):
        return constant_value(expr)
    if not isinstance(expr, relax.Call):
        return None
    if expr.op == _OPS["reshape"]:
        value = _const_value(expr.args[0], bindings)
        shape = [int(d) for d in expr.ty.shape.values]
        return None if value is None else value.reshape(shape)
    if expr.op == _OPS["astype"]:
        value = _const_value(expr.args[0], bindings)
        return None if value is None else value.astype(str(expr.ty.dtype))
    if expr.op == _OPS["dequantize"]:
        parts = [_const_value(a, bindings) for a in expr.args[:3]]
        if any(p is None for p in parts):
            return None
        q, s, zp = parts
        shape = [1] * q.ndim
        if s.size > 1:
            shape[int(expr.attrs.axis) % q.ndim] = -1
        s, zp = s.reshape(shape), zp.reshape(shape)
        return ((q.astype(np.float32) - zp.astype(np.float32)) * s).astype(np.float32)
    return None


def _dequantized(expr, bindings):
    """(q, scale, zero point) when `expr` is R.dequantize with constant parameters."""
    call = _bound(expr, bindings)
    if not (isinstance(call, relax.Call) and call.op == _OPS["dequantize"]):
        return None
    scale, zp = (_const_value(a, bindings) for a in call.args[1:3])
    if scale is None or zp is None:
        return None
    return call.args[0], scale, zp, int(call.attrs.axis)


def _int_bias(expr, bindings, unit: np.ndarray) -> np.ndarray | None:
    """The bias as int32 in units of x_scale * w_scale[n] (exact for ORT's quantized bias)."""
    inner = _bound(expr, bindings)
    while isinstance(inner, relax.Call) and inner.op == _OPS["reshape"]:
        inner = _bound(inner.args[0], bindings)
    dq = _dequantized(inner, bindings)
    if dq is not None:
        q = _const_value(dq[0], bindings)
        if q is not None and q.dtype == np.int32 and not dq[2].any():
            if np.allclose(dq[1].astype(np.float32).reshape(-1), unit, rtol=1e-6, atol=0):
                return q.reshape(-1).astype(np.int32)
    value = _const_value(expr, bindings)
    if value is None or value.size != unit.size:
        return None
    return np.rint(value.reshape(-1).astype(np.float64) / unit).astype(np.int32)


def _pointwise(call) -> bool:
    a = call.attrs
    return (
        int(a.groups) == 1
        and [int(v) for v in a.strides] == [1, 1]
        and [int(v) for v in a.padding] == [0, 0, 0, 0]
        and [int(v) for v in a.dilation] == [1, 1]
        and a.data_layout == "NCHW"
        and a.kernel_layout == "OIHW"
    )


def _strided_conv(call, groups: int) -> bool:
    """An NCHW conv of `groups` groups, equal strides of 1 or 2, no dilation (the depthwise
    and stem kernels' forms; the kernel shape is checked by the caller)."""
    a = call.attrs
    strides = [int(v) for v in a.strides]
    return (
        int(a.groups) == groups
        and strides[0] == strides[1]
        and strides[0] in (1, 2)
        and [int(v) for v in a.dilation] == [1, 1]
        and a.data_layout == "NCHW"
        and a.kernel_layout == "OIHW"
    )


def match(q_call: relax.Call, bindings: dict) -> tuple[QuantLayer, relax.Expr] | None:
    """The layer of a ``R.quantize`` call and its quantized activation, or None."""
    if not (isinstance(q_call, relax.Call) and q_call.op == _OPS["quantize"]):
        return None
    y_scale, y_zp = (_const_value(a, bindings) for a in q_call.args[1:3])
    if y_scale is None or y_zp is None or y_scale.size != 1 or y_zp.size != 1:
        return None
    node, relu, bias_expr = _bound(q_call.args[0], bindings), False, None
    if isinstance(node, relax.Call) and node.op == _OPS["nn.relu"]:
        node, relu = _bound(node.args[0], bindings), True
    if isinstance(node, relax.Call) and node.op == _OPS["add"]:
        bias_expr, node = node.args[1], _bound(node.args[0], bindings)
    if not isinstance(node, relax.Call) or node.op not in (_OPS["matmul"], _OPS["nn.conv2d"]):
        return None
    conv = node.op == _OPS["nn.conv2d"]
    w_expr, transposed = _bound(node.args[1], bindings), False
    if not conv and isinstance(w_expr, relax.Call) and w_expr.op == _OPS["permute_dims"]:
        w_expr, transposed = w_expr.args[0], True  # Gemm transB=1: the weight is [N, K]
    x_dq, w_dq = _dequantized(node.args[0], bindings), _dequantized(w_expr, bindings)
    if x_dq is None or w_dq is None:
        return None
    x_q, x_scale, x_zp, _ = x_dq
    w_q = _const_value(w_dq[0], bindings)
    w_scale, w_zp = w_dq[1].astype(np.float32).reshape(-1), w_dq[2].reshape(-1)
    x_dtype = str(x_q.ty.dtype)
    if (
        w_q is None
        or w_q.dtype != np.int8
        or w_zp.any()
        or x_dtype not in ("uint8", "int8")
        or x_scale.size != 1
        or x_zp.size != 1
    ):
        return None
    x_shape = [int(d) for d in x_q.ty.shape.values]
    stride, pads = 1, (0, 0, 0, 0)
    if conv:
        if x_shape[0] != 1:
            return None
        if w_q.shape[1:] == (1, 3, 3) and _strided_conv(node, x_shape[1]):
            if w_q.shape[0] != x_shape[1]:
                return None
            weight, kind = w_q.reshape(w_q.shape[0], 9), "depthwise"
        elif (
            w_q.shape[1:] == (x_shape[1], 3, 3)
            and x_shape[1] <= int8_rows3.MAX_CHANNELS
            and _strided_conv(node, 1)  # one group: a full 3x3 conv over few channels (a stem)
        ):
            weight, kind = int8_rows3.weight_matrix(w_q), "rows3"
        elif _pointwise(node) and w_q.shape[2:] == (1, 1):
            weight, kind = w_q[:, :, 0, 0], "conv1x1"
        else:
            return None
        if kind != "conv1x1":
            stride, pads = int(node.attrs.strides[0]), tuple(int(v) for v in node.attrs.padding)
        hw = (x_shape[2], x_shape[3])
        out_h, out_w = [int(d) for d in node.ty.shape.values][2:]
        columns = out_h * out_w
        axis_ok = w_scale.size == 1 or w_dq[3] % 4 == 0
    else:
        if len(x_shape) != 2 or w_q.ndim != 2:
            return None
        weight = w_q if transposed else np.ascontiguousarray(w_q.T)
        hw, columns, kind = None, x_shape[0], "matmul"
        axis_ok = w_scale.size == 1 or w_dq[3] % 2 == (0 if transposed else 1)
    n, k = weight.shape
    if not axis_ok or (k % GROUP and kind != "depthwise") or w_scale.size not in (1, n):
        return None
    unit = (np.float32(x_scale.reshape(())) * np.broadcast_to(w_scale, (n,))).astype(np.float32)
    bias = np.zeros(n, np.int32)
    if bias_expr is not None:
        bias = _int_bias(bias_expr, bindings, unit)
        if bias is None:
            return None
    y_dtype = str(q_call.ty.dtype)
    scale = (unit / np.float32(y_scale.reshape(()))).astype(np.float32)
    digest = hashlib.sha1(weight.tobytes() + scale.tobytes()).hexdigest()[:16]
    layer = QuantLayer(
        key=f"q{n}x{k}:{digest}",
        kind=kind,
        weight=weight,
        columns=columns,
        x_dtype=x_dtype,
        x_zp=int(x_zp.reshape(())),
        bias=bias,
        scale=scale,
        y_dtype=y_dtype,
        y_zp=int(y_zp.reshape(())),
        relu=relu,
        hw=hw,
        stride=stride,
        pads=pads,
    )
    return layer, x_q


def _call_of(expr, bindings, op: str):
    """`expr` (through its binding) if it is a call to relax op `op`, else None."""
    expr = _bound(expr, bindings)
    return expr if isinstance(expr, relax.Call) and expr.op == _OPS[op] else None


def _int32_activation(expr, bindings):
    """(x_q, x_zp) for ``astype(x_q, int32)`` or ``astype(x_q, int32) - zp`` (QLinear* import)."""
    zp = np.zeros(1, np.int64)
    sub = _call_of(expr, bindings, "subtract")
    if sub is not None:
        zp = _const_value(sub.args[1], bindings)
        if zp is None or zp.size != 1:
            return None
        expr = sub.args[0]
    cast = _call_of(expr, bindings, "astype")
    if cast is None or str(cast.ty.dtype) != "int32":
        return None
    x_q = cast.args[0]
    if isinstance(_bound(x_q, bindings), Constant) or str(x_q.ty.dtype) not in ("uint8", "int8"):
        return None
    return x_q, int(zp.reshape(()))


def match_qlinear(out: relax.Call, bindings: dict) -> tuple[QuantLayer, relax.Expr] | None:
    """The layer of an imported QLinearMatMul / QLinearConv (`tvm_sparse.frontend.quant`):
    ``astype(clip(round(float64(acc) * mult [+ y_zp])), (u)int8)``, acc an int32 matmul or
    conv of the shifted activation and a constant weight (plus an int32 bias for convs)."""
    if not (isinstance(out, relax.Call) and out.op == _OPS["astype"]):
        return None
    y_dtype = str(out.ty.dtype)
    clip = _call_of(out.args[0], bindings, "clip")
    rounded = None if clip is None else _call_of(clip.args[0], bindings, "round")
    if y_dtype not in ("uint8", "int8") or rounded is None:
        return None
    real, y_zp = rounded.args[0], np.zeros(1)
    add = _call_of(real, bindings, "add")
    if add is not None:
        real, y_zp = add.args[0], _const_value(add.args[1], bindings)
    mul = _call_of(real, bindings, "multiply")
    if mul is None:
        return None
    acc64 = _call_of(mul.args[0], bindings, "astype")
    mult = _const_value(mul.args[1], bindings)
    if acc64 is None or mult is None or y_zp is None or y_zp.size != 1:
        return None
    acc, bias = _bound(acc64.args[0], bindings), None
    if isinstance(acc, relax.Call) and acc.op == _OPS["add"]:
        bias, acc = _const_value(acc.args[1], bindings), _bound(acc.args[0], bindings)
        if bias is None:
            return None
    if not isinstance(acc, relax.Call) or acc.op not in (_OPS["matmul"], _OPS["nn.conv2d"]):
        return None
    found = _int32_activation(acc.args[0], bindings)
    w = _const_value(acc.args[1], bindings)
    if found is None or w is None or w.min() < -128 or w.max() > 127:
        return None
    x_q, x_zp = found
    x_shape = [int(d) for d in x_q.ty.shape.values]
    if acc.op == _OPS["nn.conv2d"]:
        if not _pointwise(acc) or w.shape[2:] != (1, 1) or x_shape[0] != 1:
            return None
        weight, hw, kind = w[:, :, 0, 0], (x_shape[2], x_shape[3]), "conv1x1"
    else:
        if len(x_shape) != 2 or w.ndim != 2:
            return None
        weight, hw, kind = np.ascontiguousarray(w.T), None, "matmul"
    weight = weight.astype(np.int8)
    n, k = weight.shape
    if k % GROUP or mult.size not in (1, n) or (bias is not None and bias.size != n):
        return None
    scale = np.broadcast_to(mult.reshape(-1), (n,)).astype(np.float32)
    bias = np.zeros(n, np.int32) if bias is None else bias.reshape(-1).astype(np.int32)
    digest = hashlib.sha1(weight.tobytes() + scale.tobytes()).hexdigest()[:16]
    layer = QuantLayer(
        key=f"q{n}x{k}:{digest}",
        kind=kind,
        weight=weight,
        columns=hw[0] * hw[1] if hw else x_shape[0],
        x_dtype=str(x_q.ty.dtype),
        x_zp=x_zp,
        bias=bias,
        scale=scale,
        y_dtype=y_dtype,
        y_zp=int(y_zp.reshape(())),
        hw=hw,
    )
    return layer, x_q


def match_any(call, bindings):
    """A QDQ group or an imported QLinearMatMul/QLinearConv ending at `call`, or None."""
    return match(call, bindings) or match_qlinear(call, bindings)


def _collect_bindings(func: relax.Function) -> dict:
    bindings = {}
    for block in func.body.blocks:
        for b in block.bindings:
            if isinstance(b, relax.VarBinding):
                bindings[b.var] = b.value
    return bindings


def collect_quantized_layers(mod: tvm.IRModule) -> list[QuantLayer]:
    """Every layer RewriteQuantized can rewrite, once per weight key, in graph order."""
    out = {}
    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        bindings = _collect_bindings(func)
        for value in bindings.values():
            found = match_any(value, bindings)
            if found is not None:
                out.setdefault(found[0].key, found[0])
    return list(out.values())


def weight_operands(layer: QuantLayer, variant: Int8Variant) -> tuple[list[np.ndarray], int, int]:
    """(weight arrays for the kernel, padded N, nnzb) for `variant`."""
    n, k = layer.shape
    r = variant.rows
    npad = -(-n // r) * r
    w = np.zeros((npad, k), np.int8)
    w[:n] = layer.weight
    if not variant.sparse:
        packed = w.reshape(npad // r, r, k // GROUP, GROUP).transpose(0, 2, 1, 3)
        return [np.ascontiguousarray(packed)], npad, 0
    if variant.gather:
        quads = to_column_quads(w, r)
        if quads.nnzb == 0:
            empty = [np.zeros((1, r, GROUP), np.int8), np.zeros((1, GROUP), np.int32)]
            return [*empty, quads.indptr], npad, 0
        return [quads.data, quads.cols, quads.indptr], npad, quads.nnzb
    bsr = to_bsr(w, (r, GROUP))
    if bsr.nnzb == 0:  # kernels take at least one (never read) block
        return [np.zeros((1, r, GROUP), np.int8), np.zeros(1, np.int32), bsr.indptr], npad, 0
    return [bsr.data, bsr.indices.astype(np.int32), bsr.indptr.astype(np.int32)], npad, bsr.nnzb


def epilogue_operands(layer: QuantLayer, npad: int) -> tuple[np.ndarray, np.ndarray]:
    """(bias with the activation zero-point correction, scale), padded to `npad` rows."""
    n = layer.shape[0]
    x_zp = layer.x_zp + (128 if layer.x_dtype == "int8" else 0)  # packers shift int8 by +128
    wsum = layer.weight.astype(np.int64).sum(axis=1)
    bias = np.zeros(npad, np.int32)
    bias[:n] = (layer.bias.astype(np.int64) - x_zp * wsum).astype(np.int32)
    scale = np.zeros(npad, np.float32)
    scale[:n] = layer.scale
    return bias, scale


def _emit_pack(bb, layer: QuantLayer, variant: Int8Variant, operand, quant, pp: int, tag: str):
    """Emit the activation pack `variant`'s kernel reads (quantizing a float `operand` with
    `quant` = (scale, zero point)); returns the packed tensor."""
    k, p = layer.shape[1], layer.columns
    if layer.kind == "rows3":  # zero-point padded planes, then kernel-row lanes
        c = k // (GROUP * int8_rows3.KERNEL)
        geo = int8_depthwise.geometry(layer.hw, layer.stride, layer.pads)
        pad = int8_rows3.pad(
            c, layer.hw, layer.stride, layer.pads, layer.x_dtype, layer.x_zp, quant
        )
        pad_gv = bb.add_func(pad, f"{pad.attrs['tvm_sparse.kernel']}_{tag}")
        planes = bb.emit(
            relax.call_tir(pad_gv, [operand], relax.TensorType([c, *geo[2:]], "uint8"))
        )
        pack = int8_rows3.lanes(c, layer.hw, layer.stride, layer.pads, pp)
        operand = planes
        packed_type = relax.TensorType([k // GROUP, pp, GROUP], "uint8")
    elif variant.gather:  # plain K-major bytes Xk[K, P]
        if layer.kind == "matmul":
            pack = int8_pack.bytes_rowmajor(p, k, layer.x_dtype, columns=pp, quantize=quant)
        else:
            pack = int8_pack.bytes_kmajor(
                k, p, layer.x_dtype, hw=layer.hw, columns=pp, quantize=quant
            )
        packed_type = relax.TensorType([-(-k // GROUP) * GROUP, pp], "uint8")
    elif layer.kind == "matmul":
        if quant is None:
            pack = int8_pack.from_rowmajor(p, k, layer.x_dtype, columns=pp)
        else:
            pack = int8_pack.quantize_rowmajor(p, k, *quant, layer.x_dtype, columns=pp)
        packed_type = relax.TensorType([k // GROUP, pp, GROUP], "uint8")
    else:  # reads and writes NCHW directly: a reshape here would cost a copy
        pack = int8_pack.from_kmajor(k, p, layer.x_dtype, hw=layer.hw, columns=pp, quantize=quant)
        packed_type = relax.TensorType([k // GROUP, pp, GROUP], "uint8")
    pack_gv = bb.add_func(pack, f"{pack.attrs['tvm_sparse.kernel']}_{tag}")
    return bb.emit(relax.call_tir(pack_gv, [operand], packed_type))


def emit_int8(
    bb: relax.BlockBuilder,
    layer: QuantLayer,
    variant: Int8Variant,
    x_q: relax.Expr,
    quantized_from: tuple[relax.Expr, float, int] | None = None,
    dequantize: float | None = None,
    packed: relax.Expr | None = None,
):
    """Emit pack + kernel for `layer` on its quantized input; returns the quantized output.

    `quantized_from` = (float input, scale, zero point) when `x_q` is a per-tensor
    QuantizeLinear of a float tensor: the pack then quantizes (one pass, `x_q` unused).
    `dequantize` = the scale of the output's only consumer, a DequantizeLinear: the kernel then
    writes its float32 value. `packed` = the input already packed (`packed_columns`), by the
    depthwise kernel producing it: no pack."""
    n, k = layer.shape
    p = layer.columns
    pp = int8_matmul.padded_columns(p, variant, conv=layer.kind != "matmul")
    tag = layer.key.split(":")[1][:8]
    operand = x_q if quantized_from is None else quantized_from[0]
    quant = None if quantized_from is None else quantized_from[1:]
    if layer.kind == "rows3" and variant.gather:  # its lanes are the [K/4, P, 4] layout
        variant = Int8Variant(variant.rows, sparse=False)
    if packed is None:
        xp = _emit_pack(bb, layer, variant, operand, quant, pp, tag)
    elif packed_columns(layer, variant) is None:
        raise ValueError(f"layer {layer.key}: a packed input needs a pointwise BSR/dense kernel")
    else:
        xp = packed
    weights, npad, nnzb = weight_operands(layer, variant)
    bias, scale = epilogue_operands(layer, npad)
    rows_out = p if layer.kind == "matmul" else None
    func = int8_matmul.int8_wx(
        npad,
        k // GROUP,
        pp,
        variant,
        nnzb,
        layer.y_dtype,
        layer.y_zp,
        layer.relu,
        rows_out=rows_out,
        conv_hw=layer.out_hw,
        dequantize=dequantize,
    )
    func = func.with_attr("tvm_sparse.layer_key", layer.key)
    gv = bb.add_func(func, f"{variant.name}_{tag}")
    args = [xp] + [relax.const(w, str(w.dtype)) for w in weights]
    args += [relax.const(bias, "int32"), relax.const(scale, "float32")]
    out_shape = [p, npad] if rows_out is not None else [1, npad, *layer.out_hw]
    y_dtype = layer.y_dtype if dequantize is None else "float32"
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType(out_shape, y_dtype)))
    if npad != n:  # rows padded to the block height (columns of a MatMul, channels of a conv)
        y = bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[n]))
    return y


def packed_columns(layer: QuantLayer, variant: Int8Variant) -> int | None:
    """The activation columns of `layer`'s packed input when a depthwise kernel can write it
    (a pointwise conv with a BSR or dense kernel, `int8_pack.from_kmajor`'s layout), else
    None."""
    if layer.kind != "conv1x1" or variant.gather or layer.shape[1] % GROUP:
        return None
    return int8_matmul.padded_columns(layer.columns, variant, conv=True)


def emit_depthwise(
    bb: relax.BlockBuilder, layer: QuantLayer, x_q: relax.Expr, columns: int | None = None
):
    """Emit the int8 depthwise kernel for `layer` on its quantized NCHW input (its output
    packed for a pointwise kernel over `columns` columns, when given)."""
    c = layer.shape[0]
    func = int8_depthwise.depthwise3x3(
        c,
        layer.hw,
        layer.stride,
        layer.pads,
        layer.x_dtype,
        layer.x_zp,
        layer.y_dtype,
        layer.y_zp,
        layer.relu,
        columns,
    )
    func = func.with_attr("tvm_sparse.layer_key", layer.key)
    gv = bb.add_func(func, f"dw3x3_u8s8_{layer.key.split(':')[1][:8]}")
    bias, scale = epilogue_operands(layer, c)
    words = int8_depthwise.weight_words(layer.weight.reshape(c, 3, 3))
    args = [x_q, relax.const(words, "int32"), relax.const(bias, "int32")]
    args.append(relax.const(scale, "float32"))
    if columns is None:
        out = relax.TensorType([1, c, *layer.out_hw], layer.y_dtype)
    else:
        out = relax.TensorType([c // GROUP, columns, GROUP], "uint8")
    return bb.emit(relax.call_tir(gv, args, out))


def _use_counts(func: relax.Function) -> dict:
    """How many times each variable of `func` is used."""
    counts: dict = {}

    def visit(node):
        if isinstance(node, relax.Var):
            counts[node] = counts.get(node, 0) + 1

    relax.analysis.post_order_visit(func.body, visit)
    return counts


def _float_source(x_q, bindings, dtype: str) -> tuple[relax.Expr, float, int] | None:
    """(float input, scale, zero point) when `x_q` is a per-tensor QuantizeLinear to `dtype`
    of a float32 tensor."""
    call = _call_of(x_q, bindings, "quantize")
    if call is None or str(call.ty.dtype) != dtype or str(call.args[0].ty.dtype) != "float32":
        return None
    scale, zp = (_const_value(a, bindings) for a in call.args[1:3])
    if scale is None or zp is None or scale.size != 1 or zp.size != 1:
        return None
    return call.args[0], float(scale.reshape(())), int(zp.reshape(()))


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, plan: dict, bindings: dict, uses: dict):
        super().__init__(mod)
        self.plan, self.bindings, self.uses = plan, bindings, uses

    def _planned(self, expr) -> bool:
        found = match_any(_bound(expr, self.bindings), self.bindings)
        return found is not None and found[0].key in self.plan

    def _emit(
        self, layer: QuantLayer, x_q, dequantize: float | None = None, columns: int | None = None
    ) -> relax.Expr:
        # a QuantizeLinear of a float tensor is fused into the pack (or, for a depthwise conv,
        # which reads its input as is, becomes a flat quantize kernel); not when an integer
        # layer (e.g. a depthwise conv) produces x_q
        source = None if self._planned(x_q) else _float_source(x_q, self.bindings, layer.x_dtype)
        if layer.kind == "matmul" and layer.shape[1] < int8_pack.QUANTIZE_ROWMAJOR_MIN_K:
            source = None
        if source is not None:
            source = (self.visit_expr(source[0]), *source[1:])
        if layer.kind == "depthwise":
            x = self.visit_expr(x_q) if source is None else self._quantize(layer.x_dtype, *source)
            return emit_depthwise(self.builder_, layer, x, columns)
        x = self.visit_expr(x_q) if source is None else x_q
        variant = self.plan[layer.key]
        packed = None if source is not None else self._packed_input(layer, variant, x_q)
        return emit_int8(self.builder_, layer, variant, x, source, dequantize, packed)

    def _packed_input(self, layer: QuantLayer, variant, x_q) -> relax.Expr | None:
        """`layer`'s input packed by the depthwise kernel producing it, when it is that
        kernel's only consumer: one pass and one kernel call fewer than a separate pack (the
        depthwise kernel's plain output, emitted on its own, is then dead code)."""
        columns = packed_columns(layer, variant)
        if columns is None or self.uses.get(x_q, 0) != 1:
            return None
        found = match_any(_bound(x_q, self.bindings), self.bindings)
        if found is None or found[0].kind != "depthwise" or found[0].key not in self.plan:
            return None
        return self._emit(found[0], found[1], columns=columns)

    def _quantize(self, dtype: str, x: relax.Expr, scale: float, zp: int) -> relax.Expr:
        """Our flat per-tensor QuantizeLinear of float `x` (TVM's legalized one indexes 4-D
        tensors with div/mod: ~250 us for 32x112x112)."""
        shape = [int(d) for d in x.ty.shape.values]
        gv = self.builder_.add_func(
            int8_pack.quantize_flat(tuple(shape), dtype, scale, zp), f"quantize_{dtype}"
        )
        return self.builder_.emit(relax.call_tir(gv, [x], relax.TensorType(shape, dtype)))

    def _dequantize(self, call: relax.Call) -> relax.Expr | None:
        """A per-tensor DequantizeLinear of an int8 kernel's output: fused into the kernel when
        it is the output's only consumer, else a fast flat dequantize."""
        scale, zp = (_const_value(a, self.bindings) for a in call.args[1:3])
        if scale is None or zp is None or scale.size != 1 or zp.size != 1:
            return None
        if not self._planned(call.args[0]) or str(call.ty.dtype) != "float32":
            return None
        arg = call.args[0]
        layer, x_q = match_any(_bound(arg, self.bindings), self.bindings)
        # Not for MatMuls: their transposed row-major store with a float32 epilogue measured
        # 224 us against 5 us for kernel + flat dequantize (64x1024x1024, 90 % 1x4).
        sole = self.uses.get(arg, 0) == 1 and layer.kind == "conv1x1"
        if sole and int(zp.reshape(())) == layer.y_zp:
            return self._emit(layer, x_q, float(scale.reshape(())))
        q = self.visit_expr(call.args[0])
        shape = [int(d) for d in q.ty.shape.values]
        func = int8_pack.dequantize_flat(
            tuple(shape), str(q.ty.dtype), float(scale.reshape(())), int(zp.reshape(()))
        )
        gv = self.builder_.add_func(func, f"dequantize_{str(q.ty.dtype)}")
        return relax.call_tir(gv, [q], relax.TensorType(shape, "float32"))

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        if call.op == _OPS["dequantize"]:
            fast = self._dequantize(call)
            if fast is not None:
                return fast
        found = match_any(call, self.bindings)
        if found is None or found[0].key not in self.plan:
            return super().visit_call_(call)
        return self._emit(*found)


@tvm.transform.module_pass(opt_level=0, name="RewriteQuantized")
class RewriteQuantized:
    """Rewrite the layers of `plan` ({layer key: Int8Variant}) into int8 kernel calls."""

    def __init__(self, plan: dict):
        self.plan = dict(plan)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not self.plan:
            return mod
        funcs = [(gv, f) for gv, f in mod.functions_items() if isinstance(f, relax.Function)]
        for gv, func in funcs:
            rewriter = _Rewriter(mod, self.plan, _collect_bindings(func), _use_counts(func))
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
            mod = rewriter.builder_.get()
        return relax.transform.DeadCodeElimination()(mod)
