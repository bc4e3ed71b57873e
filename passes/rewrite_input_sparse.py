"""RewriteInputSparse: run planned batch-1 matmul layers with the input-sparse GEMV kernel.

A layer is a matmul-form layer (`collect_sparse_layers`: ``W[N, K] . X[K, 1]`` or
``X[1, K] . W[K, N]``, constant W) with one activation column, plus the per-row bias add
and ReLU it absorbs. The kernel (`schedules.input_sparse`) skips the zero activations at run
time, so it pays when the layer's input is sparse (after a ReLU); how sparse it is comes from
calibration (`tvm_sparse.calibration.measure_input_sparsity`).

Public interface (keys are `collect_sparse_layers.weight_key` of the [N, K] view):

``input_sparse_candidates(layer, input_sparsity) -> list[str]``
    Extra kernel names to time for a `MatmulLayer` (not "dense": the caller times that), empty
    unless the layer has one activation column and ``input_sparsity >= MIN_INPUT_SPARSITY``.
``time_input_sparse(layer, name, target, input_sparsity, cache=None) -> float``
    Median seconds per call on an input with that fraction of zeros (real weight).
``emit_input_sparse(bb, layer, name, x) -> relax.Expr``
    The kernel call for one layer, shaped like the matmul it replaces.
``RewriteInputSparse(plan)``
    The module pass; ``plan`` maps a layer key to a kernel name (other names are ignored, so
    one plan can hold every kernel kind).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_sparse.schedules import input_sparse

from .collect_sparse_layers import (
    MatmulLayer,
    binding_graph,
    matmul_form,
    per_row_bias,
    weight_key,
)

# Below this measured zero fraction the kernel is not offered (it then only matches a dense
# GEMV, at the price of a data-dependent run time).
MIN_INPUT_SPARSITY = 0.2
KERNELS: dict[str, input_sparse.Variant] = {v.name: v for v in input_sparse.VARIANTS}


def input_sparse_candidates(layer: MatmulLayer, input_sparsity: float) -> list[str]:
    """Input-sparse kernel names worth timing for `layer` at this measured input sparsity."""
    if layer.columns != 1 or input_sparsity < MIN_INPUT_SPARSITY:
        return []
    return [v.name for v in input_sparse.variants_for(layer.shape[0])][:2]


def emit_input_sparse(
    bb: relax.BlockBuilder, layer: MatmulLayer, name: str, x: relax.Expr
) -> relax.Expr:
    """The kernel call for `layer` on its activation operand `x` ([K, 1] or [1, K]); returns
    the matmul's output shape ([N, 1] for "wx", [1, N] for "xw") with bias/ReLU applied."""
    if name not in KERNELS:
        raise ValueError(f"unknown input-sparse kernel {name!r}; expected one of {sorted(KERNELS)}")
    if layer.columns != 1:
        raise ValueError(f"layer {layer.key}: the input-sparse kernel needs one column")
    variant = KERNELS[name]
    n, k = layer.shape
    npad = input_sparse.padded_n(n, variant)
    bias = np.zeros(npad, np.float32)
    if layer.bias is not None:
        bias[:n] = layer.bias
    func = input_sparse.input_sparse_gemv(n, k, variant, relu=layer.relu)
    func = func.with_attr("tvm_sparse.layer_key", layer.key)
    gv = bb.add_func(func, f"{name}_{layer.key.split(':')[1][:8]}")
    flat = bb.emit(relax.op.reshape(x, [k]))
    y = bb.emit(
        relax.call_tir(
            gv,
            [flat, relax.const(input_sparse.pack(layer.weight, variant)), relax.const(bias)],
            relax.TensorType([n], "float32"),
        )
    )
    return relax.op.reshape(y, [n, 1] if layer.form == "wx" else [1, n])


def _is_op(expr, name: str) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


def _chains(func: relax.Function) -> dict[relax.Call, tuple[MatmulLayer, relax.Expr]]:
    """{original value bound to the layer's last var: (layer, activation operand)} for every
    one-column matmul-form layer (matmul, then single-use bias add, then single-use ReLU)."""
    bindings, value_of, users, counts = binding_graph(func)
    chains = {}
    for b in bindings:
        form = matmul_form(b.value)
        if form is None or form[2] != 1:
            continue
        kind, view, columns = form
        layer = MatmulLayer(weight_key(view), kind, view, columns)
        x = b.value.args[1] if kind == "wx" else b.value.args[0]
        var = b.var
        nxt = users.get(var)
        if counts.get(var) == 1 and _is_op(value_of.get(nxt), "relax.add"):
            other = [a for a in value_of[nxt].args if not a.same_as(var)]
            bias = per_row_bias(other[0], kind, view.shape[0]) if len(other) == 1 else None
            if bias is not None:
                layer.bias, var = bias, nxt
        nxt = users.get(var)
        if counts.get(var) == 1 and _is_op(value_of.get(nxt), "relax.nn.relu"):
            layer.relu, var = True, nxt
        chains[value_of[var]] = (layer, x)
    return chains


def time_input_sparse(
    layer: MatmulLayer,
    name: str,
    target: tvm.target.Target,
    input_sparsity: float,
    cache: dict | None = None,
) -> float:
    """Median seconds per call of kernel `name` for `layer` on `target`.

    The input has ``round(input_sparsity * K)`` zeros at random positions (fixed seed) and
    positive values elsewhere, as after a ReLU; the weight is the layer's own.
    """
    n, k = layer.shape
    key = f"{name}|{n}x{k}|{layer.form}|{layer.key}|relu={layer.relu}|zeros={input_sparsity:.3f}"
    if cache is not None and key in cache:
        return cache[key]
    from . import lowering_pipeline, optimize

    shape = [k, 1] if layer.form == "wx" else [1, k]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(emit_input_sparse(bb, layer, name, x))
        bb.emit_func_output(out)
    mod = optimize(bb.get(), target)
    ex = relax.build(mod, target, relax_pipeline=lowering_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(0)
    value = np.abs(rng.standard_normal(k)).astype(np.float32) + np.float32(0.01)
    value[rng.permutation(k)[: int(round(input_sparsity * k))]] = 0
    arg = tvm.runtime.tensor(value.reshape(shape))
    vm["main"](arg)
    timer = vm.time_evaluator("main", tvm.cpu(), number=20, repeat=5, min_repeat_ms=20)
    seconds = float(timer(arg).median)
    if cache is not None:
        cache[key] = seconds
    return seconds


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, plan: dict[str, str], chains: dict):
        super().__init__(mod)
        self.plan, self.chains = plan, chains

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        found = self.chains.get(call)
        name = self.plan.get(found[0].key) if found is not None else None
        if name not in KERNELS:
            return super().visit_call_(call)
        layer, x = found
        return emit_input_sparse(self.builder_, layer, name, self.visit_expr(x))


@tvm.transform.module_pass(opt_level=0, name="RewriteInputSparse")
class RewriteInputSparse:
    """Rewrite the layers of `plan` ({layer key: input-sparse kernel name}) into kernel calls.

    Entries naming other kernels, and keys not in the module, are ignored; the matmul, bias
    add and ReLU a rewritten layer absorbed become dead and are removed.
    """

    def __init__(self, plan: dict[str, str]):
        self.plan = dict(plan)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not any(isinstance(v, str) and v in KERNELS for v in self.plan.values()):
            return mod
        chains = _chains(mod["main"])
        if not any(self.plan.get(layer.key) in KERNELS for layer, _ in chains.values()):
            return mod
        rewriter = _Rewriter(mod, self.plan, chains)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return relax.transform.DeadCodeElimination()(rewriter.builder_.get())
