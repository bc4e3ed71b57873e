"""ConvertConvLayoutNHWC: run a dense fp32 conv chain in NHWC (channels innermost).

In NCHW the conv schedule keeps output channels in the vector lanes and has to transpose each
register tile on its way out, and depthwise convs vectorise along rows with unaligned taps.
In NHWC both store whole vectors of channels and read each pixel's channels contiguously
(ONNX Runtime likewise runs its convs channel-blocked, NCHWc). Relax's ``ConvertLayout``
rewrites every ``nn.conv2d`` to NHWC / OHWI and carries the layout through the elementwise
ops, pooling and reductions between them; the weights' permutations fold at compile time,
and transposes remain only where a tensor enters or leaves the chain.

The chain's first conv reads the model's NCHW input itself ("NCHW" data, "NHWC" output, a
layout pair TOPI has no legalization for: :func:`legalize_conv2d` supplies it), so the input
is not transposed in a pass of its own.

The pass applies only when every conv can keep its output channels in the vector lanes
(fp32, 16k output channels, dense or depthwise; others would fall to a generic schedule), and
when 4-D activations flow between Relax ops alone: a ``call_tir`` (a sparse or int8 kernel
of ours) reading or writing a 4-D tensor, or a reshape of one (a sparse pointwise conv in its
matmul form), expects NCHW, and converting around it would put a transpose on every such
edge.
"""

from __future__ import annotations

import tvm
from tvm import relax, te, topi
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.relax.transform.legalize_ops.nn import _nn_conv2d

from tvm_sparse.schedules.conv2d import LANES

DESIRED = {"relax.nn.conv2d": ["NHWC", "OHWI"]}
TO_NHWC = [0, 2, 3, 1]


def _is_4d(ty) -> bool:
    return isinstance(ty, relax.TensorType) and ty.ndim == 4


def _channel_tiled(call: relax.Call) -> bool:
    """Whether the conv's output channels can be the vector lanes in NHWC (schedules.conv2d):
    an fp32 NCHW conv, 16k output channels, dense or depthwise (one input per output)."""
    data, weight = call.args[0].ty, call.args[1].ty
    if call.attrs.data_layout != "NCHW" or call.attrs.kernel_layout != "OIHW":
        return False
    if getattr(data, "dtype", "") != "float32" or not _is_4d(data) or not _is_4d(weight):
        return False
    try:
        out_ch, per_group = int(weight.shape[0]), int(weight.shape[1])
    except (TypeError, ValueError):
        return False
    groups = int(call.attrs.groups)
    return out_ch % LANES == 0 and (groups == 1 or (per_group == 1 and groups == out_ch))


def _reads_4d(arg, bound: dict) -> bool:
    """Whether a kernel argument is a 4-D tensor, or a reshape / transpose of one (a sparse
    pointwise conv's matmul reads its NCHW input as [C, H*W])."""
    if _is_4d(arg.ty):
        return True
    value = bound.get(arg)
    if isinstance(value, relax.Call) and getattr(value.op, "name", "") in (
        "relax.reshape",
        "relax.permute_dims",
    ):
        return _is_4d(value.args[0].ty)
    return False


def _convertible(func: relax.Function) -> bool:
    """Whether `func` has convs, all of them channel-tiled in NHWC, and no kernel call that
    reads or writes a 4-D tensor."""
    convs = 0
    blocked = False
    bound = {}
    if isinstance(func.body, relax.SeqExpr):
        for block in func.body.blocks:
            for binding in block.bindings:
                bound[binding.var] = binding.value

    def visit(expr):
        nonlocal convs, blocked
        if not isinstance(expr, relax.Call):
            return
        name = getattr(expr.op, "name", "")
        if name == "relax.nn.conv2d":
            if _channel_tiled(expr):
                convs += 1
            else:
                blocked = True
        elif name in ("relax.call_tir", "relax.call_dps_packed"):
            tensors = [expr.ty] if not isinstance(expr.ty, relax.TupleType) else expr.ty.fields
            args = expr.args[1].fields if isinstance(expr.args[1], relax.Tuple) else []
            if any(_is_4d(t) for t in tensors) or any(_reads_4d(a, bound) for a in args):
                blocked = True

    relax.analysis.post_order_visit(func.body, visit)
    return convs > 0 and not blocked


def _to_nhwc_of(expr, lookup):
    """The NCHW tensor `expr` transposes to NHWC (``permute_dims(x, [0, 2, 3, 1])``), or None."""
    bound = lookup(expr) if isinstance(expr, relax.Var) else None
    if not (
        isinstance(bound, relax.Call) and getattr(bound.op, "name", "") == "relax.permute_dims"
    ):
        return None
    axes = bound.attrs.axes
    if axes is None or [int(a) for a in axes] != TO_NHWC:
        return None
    return bound.args[0]


@mutator
class _ReadNCHWInput(PyExprMutator):
    """conv2d(permute_dims(x -> NHWC), w) with groups 1 becomes conv2d(x, w) with NCHW data and
    NHWC output; the transpose is dropped when nothing else reads it."""

    def visit_call_(self, call):  # noqa: N802 - visitor name
        call = super().visit_call_(call)
        if getattr(call.op, "name", "") != "relax.nn.conv2d" or call.attrs.groups != 1:
            return call
        if call.attrs.data_layout != "NHWC" or call.attrs.kernel_layout != "OHWI":
            return call
        source = _to_nhwc_of(call.args[0], self.lookup_binding)
        if source is None:
            return call
        a = call.attrs
        return relax.op.nn.conv2d(
            source,
            call.args[1],
            strides=a.strides,
            padding=a.padding,
            dilation=a.dilation,
            groups=1,
            data_layout="NCHW",
            kernel_layout="OHWI",
            out_layout="NHWC",
            out_dtype=a.out_dtype or None,
        )


def _conv_nchw_to_nhwc(data, weight, strides, padding, dilation, out_dtype):
    """TE: NCHW data, OHWI weight, NHWC output (padding ``[top, left, bottom, right]``)."""
    _, _, height, width = (int(d) for d in data.shape)
    co, kh, kw, ci = (int(d) for d in weight.shape)
    (sh, sw), (dh, dw) = ([int(v) for v in strides], [int(v) for v in dilation])
    top, left, bottom, right = (int(p) for p in padding)
    padded = topi.nn.pad(data, [0, 0, top, left], [0, 0, bottom, right], name="pad_temp")
    oh = (height + top + bottom - (kh - 1) * dh - 1) // sh + 1
    ow = (width + left + right - (kw - 1) * dw - 1) // sw + 1
    rc = te.reduce_axis((0, ci), "rc")
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    return te.compute(
        (int(data.shape[0]), oh, ow, co),
        lambda n, y, x, f: te.sum(
            padded[n, rc, y * sh + ry * dh, x * sw + rx * dw].astype(out_dtype)
            * weight[f, ry, rx, rc].astype(out_dtype),
            axis=[ry, rx, rc],
        ),
        name="conv2d_nchw_nhwc",
    )


def legalize_conv2d(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """Relax's conv2d legalization, plus NCHW data with OHWI weights into an NHWC output."""
    a = call.attrs
    if (a.data_layout, a.kernel_layout, a.out_layout) != ("NCHW", "OHWI", "NHWC") or a.groups != 1:
        return _nn_conv2d(bb, call)
    return bb.call_te(
        _conv_nchw_to_nhwc,
        call.args[0],
        call.args[1],
        a.strides,
        a.padding,
        a.dilation,
        a.out_dtype or call.args[0].ty.dtype,
        primfunc_name_hint="conv2d",
    )


@tvm.transform.module_pass(opt_level=0, name="ConvertConvLayoutNHWC")
def ConvertConvLayoutNHWC(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 - a pass
    """NHWC for the conv chain of every Relax function that qualifies (see the module doc)."""
    funcs = [
        gv
        for gv, func in mod.functions.items()
        if isinstance(func, relax.Function) and _convertible(func)
    ]
    if not funcs:
        return mod
    # ConvertLayout converts every function; the others get their originals back. Building on
    # its output keeps the module's attributes and global infos.
    out = relax.transform.ConvertLayout(DESIRED)(mod)
    for gv, func in mod.functions.items():
        if gv in funcs:
            out[gv] = _ReadNCHWInput(out).visit_expr(out[gv])
        elif isinstance(func, relax.Function):
            out[gv] = func
    return relax.transform.DeadCodeElimination()(out)
