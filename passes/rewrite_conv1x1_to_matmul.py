"""RewriteConv1x1ToMatmul: a pointwise NCHW conv with a constant weight becomes W[O, I] @ X[I, H*W].

In NCHW a 1x1, stride-1, ungrouped conv is exactly a matmul whose right operand is the input
viewed as [C, H*W] (a free reshape) and whose columns are contiguous, which the matmul rule
tiles at near peak. Later sparse passes see the same matmul form as MatMul/Gemm layers.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_sparse._compat import Constant, constant_value


def _is_pointwise(call: relax.Call) -> bool:
    attrs = call.attrs
    data, weight = call.args
    if not isinstance(weight, Constant):
        return False
    wshape = [int(d) for d in weight.ty.shape]
    dshape = data.ty.shape
    if dshape is None or any(not isinstance(d, tvm.tirx.IntImm) for d in dshape.values):
        return False
    return (
        attrs.data_layout == "NCHW"
        and attrs.kernel_layout == "OIHW"
        and attrs.out_layout in ("", "NCHW")
        and wshape[2:] == [1, 1]
        and attrs.groups == 1
        and all(int(s) == 1 for s in attrs.strides)
        and all(int(p) == 0 for p in attrs.padding)
        and all(int(d) == 1 for d in attrs.dilation)
        and (not attrs.out_dtype or attrs.out_dtype == data.ty.dtype)
    )


# fp32 lanes of an AVX-512 register: spatial sizes are padded to a multiple (7x7 = 49 -> 64).
LANES = 16

# Elementwise ops that commute with the [1, C, H, W] <-> [C, H*W] reshape when their other
# operand is a per-channel or scalar constant; sinking them lets FuseOps fuse them into the matmul.
_SINKABLE = (
    "relax.add",
    "relax.subtract",
    "relax.multiply",
    "relax.divide",
    "relax.maximum",
    "relax.minimum",
    "relax.nn.relu",
    "relax.clip",
    "relax.sigmoid",
    "relax.tanh",
)


def _per_channel(const, channels: int) -> relax.Expr | None:
    """A constant broadcastable as [1, C, 1, 1], reshaped to [C, 1] (scalars pass as they are)."""
    value = constant_value(const)
    if value.size == 1:
        return const
    if (
        value.size == channels
        and value.ndim >= 3
        and value.shape[-2:] == (1, 1)
        and (value.ndim == 3 or value.shape[0] == 1)
    ):
        return relax.const(value.reshape(channels, 1))
    return None


def pointwise_key(call: relax.Call) -> str:
    """The weight key of a pointwise conv: its [O, I] view, as the matmul form will have it."""
    from .collect_sparse_layers import weight_key

    weight = constant_value(call.args[1])
    return weight_key(weight.reshape(weight.shape[0], weight.shape[1]))


def pointwise_convs(mod: tvm.IRModule) -> dict[str, tuple[int, int]]:
    """{weight key: (H, W)} of every pointwise conv `RewriteConv1x1ToMatmul` would rewrite."""
    found = {}
    conv2d = tvm.ir.Op.get("relax.nn.conv2d")

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op == conv2d and _is_pointwise(expr):
            shape = [int(d) for d in expr.args[0].ty.shape.values]
            if shape[0] == 1:
                found[pointwise_key(expr)] = (shape[2], shape[3])

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, only: set[str] | None = None):
        super().__init__(mod)
        self.only = only
        self.conv2d = tvm.ir.Op.get("relax.nn.conv2d")
        self.reshape = tvm.ir.Op.get("relax.reshape")
        self.slice = tvm.ir.Op.get("relax.strided_slice")
        self.sinkable = {tvm.ir.Op.get(name) for name in _SINKABLE}

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op in self.sinkable:
            return self._sink(call)
        if call.op != self.conv2d or not _is_pointwise(call):
            return call
        if self.only is not None and pointwise_key(call) not in self.only:
            return call
        data, weight = call.args
        n, c, h, w = (int(d) for d in data.ty.shape.values)
        out_c = int(weight.ty.shape[0])
        w2d = relax.const(constant_value(weight).reshape(out_c, c))
        if n != 1:
            x = relax.op.reshape(data, [n, c, h * w])
            return relax.op.reshape(self.builder_.emit(relax.op.matmul(w2d, x)), [n, out_c, h, w])
        cols = h * w
        padded = -(-cols // LANES) * LANES if cols > LANES else cols
        x = self.builder_.emit(relax.op.reshape(data, [c, cols]))
        if padded != cols:  # whole vectors for the kernels; the pad columns are sliced off
            x = relax.op.nn.pad(x, [0, 0, 0, padded - cols])
        y = self.builder_.emit(relax.op.matmul(w2d, x))
        return self._to_nchw(y, [n, out_c, h, w])

    def _to_nchw(self, y2d: relax.Expr, shape: list[int]) -> relax.Expr:
        cols = shape[2] * shape[3]
        if int(y2d.ty.shape[1]) != cols:
            y2d = self.builder_.emit(relax.op.strided_slice(y2d, axes=[1], begin=[0], end=[cols]))
        return relax.op.reshape(y2d, shape)

    def _bound(self, expr):
        return self.lookup_binding(expr) if isinstance(expr, relax.Var) else None

    def _unreshaped(self, expr: relax.Expr):
        """(2-D matmul-domain value, NCHW shape) if `expr` is our reshape back to [1, C, H, W]."""
        if not isinstance(expr, relax.Var):
            return None
        bound = self._bound(expr)
        if not (isinstance(bound, relax.Call) and bound.op == self.reshape):
            return None
        src = bound.args[0]
        sliced = self._bound(src)
        if isinstance(sliced, relax.Call) and sliced.op == self.slice:
            src = sliced.args[0]
        shape = [int(d) for d in bound.ty.shape.values]
        if len(shape) != 4 or shape[0] != 1 or src.ty.ndim != 2:
            return None
        rows, cols = (int(d) for d in src.ty.shape.values)
        if rows != shape[1] or cols < shape[2] * shape[3]:
            return None
        return src, shape

    def _sink(self, call: relax.Call) -> relax.Expr:
        found = self._unreshaped(call.args[0])
        if found is None:
            return call
        src, shape = found
        args = [src]
        for other in call.args[1:]:
            if not isinstance(other, Constant):
                return call
            other = _per_channel(other, shape[1])
            if other is None:
                return call
            args.append(other)
        moved = self.builder_.emit(relax.Call(call.op, args, call.attrs))
        return self._to_nchw(moved, shape)


@tvm.transform.module_pass(opt_level=0, name="RewriteConv1x1ToMatmul")
class RewriteConv1x1ToMatmul:
    """Replace pointwise NCHW conv2d (constant weight, stride 1, no padding) by a matmul.

    Parameters
    ----------
    only
        Weight keys (`collect_sparse_layers.weight_key` of the [O, I] view) to rewrite; None
        rewrites every pointwise conv. Dense 1x1 convs are faster through the conv rule, so
        compile() rewrites just the layers that get a sparse kernel.
    """

    def __init__(self, only: set[str] | None = None):
        self.only = None if only is None else set(only)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _Rewriter(mod, self.only)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        # The NCHW ops the epilogues were sunk out of are dead now.
        return relax.transform.DeadCodeElimination()(rewriter.builder_.get())
