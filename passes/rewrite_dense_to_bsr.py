"""RewriteDenseToBSR: replace the matmul (+ bias, + ReLU) of each planned layer by a BSR kernel.

The plan maps a layer key (see `collect_sparse_layers.weight_key`) to a kernel variant of
`tvm_sparse.schedules.bsr_matmul`; layers without an entry stay dense. The bias add and ReLU
that `collect_layers` attached to a layer are fused into the kernel; the dense ops they replace
become dead and are removed by DeadCodeElimination.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_sparse.formats import bucket, to_bsr
from tvm_sparse.schedules import bsr_matmul, bsr_matmul_rowmajor
from tvm_sparse.target import num_cores

from .collect_sparse_layers import MatmulLayer, collect_layers, matmul_form, weight_key

LANES = 16  # fp32 lanes of an AVX-512 register


def _call(bb, func, arrays, bias, operand, out_shape) -> relax.Var:
    # No layer-specific attribute or name: BlockBuilder.add_func reuses a structurally equal
    # PrimFunc, so layers of equal shapes (and nnz bucket) share one kernel and tuning task.
    gv = bb.add_func(func, str(func.attrs[bsr_matmul.KERNEL_ATTR]))
    data, indices, indptr = arrays
    args = [
        bb.emit(operand) if not isinstance(operand, relax.Var) else operand,
        relax.const(data),
        relax.const(indices, "int32"),
        relax.const(indptr, "int32"),
        relax.const(bias, "float32"),
    ]
    return bb.emit(relax.call_tir(gv, args, relax.TensorType(out_shape, "float32")))


def emit_bsr(
    bb: relax.BlockBuilder, layer: MatmulLayer, variant: bsr_matmul.Variant, x: relax.Expr
) -> relax.Expr:
    """Emit the kernel call for `layer` on activation `x` (its matmul operand); returns the
    value with the matmul's output shape ([N, P] for "wx", [M, N] for "xw")."""
    n, k = layer.shape
    bsr = to_bsr(layer.weight, (variant.rows, variant.cols))
    bias = layer.bias if layer.bias is not None else np.zeros(n, np.float32)
    p = layer.columns
    if variant.form == bsr_matmul_rowmajor.FORM:  # row-major X and Y, transposes inside
        padded = bucket(bsr)  # at least one (never read) block
        func = bsr_matmul_rowmajor.bsr_rm(
            p, n, k, variant, padded.stored, relu=layer.relu, threads=num_cores()
        )
        arrays = (bsr_matmul_rowmajor.pack(padded), padded.indices, padded.indptr)
        return _call(bb, func, arrays, bias, x, [p, n])
    if variant.form == "xw":  # row-major X and Y: no transposes
        arrays = bsr_matmul.kernel_arrays(bsr, variant)
        func = bsr_matmul.bsr_xw(p, n, k, variant, len(arrays[1]), relu=layer.relu)
        return _call(bb, func, arrays, bias, x, [p, n])
    if p == 1:
        gemv = bsr_matmul.Variant(variant.rows, variant.cols, "gemv")  # same blocks, P = 1
        arrays = bsr_matmul.kernel_arrays(bsr, gemv)
        func = bsr_matmul.bsr_gemv(n, k, gemv, len(arrays[1]), relu=layer.relu)
        y = _call(bb, func, arrays, bias, relax.op.reshape(x, [k]), [n])
        return relax.op.reshape(y, [n, 1] if layer.form == "wx" else [1, n])
    operand = x if layer.form == "wx" else bb.emit(relax.op.permute_dims(x))
    padded = -(-p // LANES) * LANES if p > LANES else p
    if padded != p:  # whole vectors per tile; the extra columns are sliced off below
        operand = relax.op.nn.pad(operand, [0, 0, 0, padded - p])
    arrays = bsr_matmul.kernel_arrays(bsr, variant)
    func = bsr_matmul.bsr_wx(n, k, padded, variant, len(arrays[1]), relu=layer.relu)
    y = _call(bb, func, arrays, bias, operand, [n, padded])
    if padded != p:
        y = bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[p]))
    return y if layer.form == "wx" else relax.op.permute_dims(y)


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, plan: dict, layers: dict[str, MatmulLayer]):
        super().__init__(mod)
        self.plan, self.layers = plan, layers
        self.relu = tvm.ir.Op.get("relax.nn.relu")
        self.add = tvm.ir.Op.get("relax.add")

    def _bound(self, expr):
        return self.lookup_binding(expr) if isinstance(expr, relax.Var) else None

    def _planned(self, call) -> tuple[MatmulLayer, object] | None:
        form = matmul_form(call) if isinstance(call, relax.Call) else None
        if form is None:
            return None
        key = weight_key(form[1])
        if key in self.plan and key in self.layers:
            return self.layers[key], self.plan[key]
        return None

    def _activation(self, mm: relax.Call, layer: MatmulLayer) -> relax.Expr:
        return mm.args[1] if layer.form == "wx" else mm.args[0]

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        chain = [call]
        while len(chain) < 3 and chain[-1].op in (self.relu, self.add):
            below = self._bound(chain[-1].args[0])
            if not isinstance(below, relax.Call):
                break
            chain.append(below)
        for depth, node in enumerate(chain):
            found = self._planned(node)
            if found is None:
                continue
            layer, variant = found
            ops = [c.op for c in chain[:depth]]
            fused = ([self.relu] if layer.relu else []) + (
                [self.add] if layer.bias is not None else []
            )
            if ops == fused:
                return emit_bsr(self.builder_, layer, variant, self._activation(node, layer))
            return call
        return call


@tvm.transform.module_pass(opt_level=0, name="RewriteDenseToBSR")
class RewriteDenseToBSR:
    """Rewrite the layers of `plan` ({layer key: bsr_matmul.Variant}) into BSR kernel calls."""

    def __init__(self, plan: dict):
        self.plan = dict(plan)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not self.plan:
            return mod
        layers = {layer.key: layer for layer in collect_layers(mod)}
        rewriter = _Rewriter(mod, self.plan, layers)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return relax.transform.DeadCodeElimination()(rewriter.builder_.get())
