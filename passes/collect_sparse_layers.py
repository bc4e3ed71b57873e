"""Find the layers a sparse kernel could run: matmuls with a constant weight, and their epilogues.

After the "simplify" phase every weight layer is a Relax matmul with one constant operand:
``matmul(W[O, I], X[I, P])`` ("wx": pointwise convs) or ``matmul(X[M, K], W[K, N])`` ("xw":
MatMul, Gemm, recurrent input projections). A per-row bias add and a ReLU that follow with a
single use are part of the layer, so a sparse kernel can fuse them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from tvm_sparse._compat import Constant, constant_value


@dataclass
class MatmulLayer:
    """One weight layer in matmul form. `weight` is the [out, in] view ([N, K])."""

    key: str
    form: str  # "wx" or "xw"
    weight: np.ndarray = field(repr=False)
    columns: int  # P of the W . X[K, P] product the kernels compute (M for "xw")
    bias: np.ndarray | None = field(default=None, repr=False)
    relu: bool = False
    # (H, W) when the layer is a pointwise NCHW conv (batch 1) seen in matmul form.
    conv_hw: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)


def weight_key(view: np.ndarray) -> str:
    """Identity of a weight by content, shared by the ONNX-side report and the Relax rewrite."""
    digest = hashlib.sha1(np.ascontiguousarray(view, dtype=np.float32).tobytes())
    return f"{view.shape[0]}x{view.shape[1]}:{digest.hexdigest()[:16]}"


def _static(shape) -> list[int] | None:
    dims = getattr(shape, "values", None)
    if dims is None or any(not isinstance(d, tvm.tirx.IntImm) for d in dims):
        return None
    return [int(d) for d in dims]


def matmul_form(call: relax.Call) -> tuple[str, np.ndarray, int] | None:
    """("wx" | "xw", [out, in] view, columns) if `call` is a 2-D fp32 matmul with a const weight."""
    if not (isinstance(call, relax.Call) and call.op == tvm.ir.Op.get("relax.matmul")):
        return None
    a, b = call.args
    if str(call.ty.dtype) != "float32":
        return None
    sa, sb = _static(a.ty.shape), _static(b.ty.shape)
    if sa is None or sb is None or len(sa) != 2 or len(sb) != 2:
        return None
    if isinstance(a, Constant) and not isinstance(b, Constant):
        return "wx", constant_value(a), sb[1]
    if isinstance(b, Constant) and not isinstance(a, Constant):
        return "xw", constant_value(b).T, sa[0]
    return None


def per_row_bias(const, form: str, n: int) -> np.ndarray | None:
    """A bias constant adding one value per output row of the [N, K] view, flattened to [N]."""
    if not isinstance(const, Constant):
        return None
    value = constant_value(const)
    wanted = {"wx": [(n, 1)], "xw": [(n,), (1, n)]}[form]
    if value.dtype == np.float32 and tuple(value.shape) in wanted:
        return value.reshape(n)
    return None


def use_counts(func: relax.Function) -> dict[relax.Var, int]:
    counts: dict[relax.Var, int] = {}

    def visit(expr):
        if isinstance(expr, relax.Call):
            for arg in expr.args:
                if isinstance(arg, relax.Var):
                    counts[arg] = counts.get(arg, 0) + 1
        elif isinstance(expr, relax.Tuple):
            for f in expr.fields:
                if isinstance(f, relax.Var):
                    counts[f] = counts.get(f, 0) + 1

    relax.analysis.post_order_visit(func, visit)
    return counts


def _is_op(expr, name: str) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


def binding_graph(func: relax.Function):
    """(bindings in order, {var: bound value}, {var: first var bound to a call using it},
    {var: number of uses}) of `func`: what the layer matchers walk to find epilogue chains
    (a user is only followed when the use count is 1)."""
    counts = use_counts(func)
    bindings = [b for block in func.body.blocks for b in block.bindings]
    value_of = {b.var: b.value for b in bindings}
    users: dict[relax.Var, relax.Var] = {}
    for b in bindings:
        if isinstance(b.value, relax.Call):
            for arg in b.value.args:
                if isinstance(arg, relax.Var):
                    users.setdefault(arg, b.var)
    return bindings, value_of, users, counts


def collect_layers(mod: tvm.IRModule) -> list[MatmulLayer]:
    """Every matmul-form weight layer of `main`, with the bias/ReLU it can absorb."""
    bindings, value_of, users, counts = binding_graph(mod["main"])
    layers: dict[str, MatmulLayer] = {}
    for b in bindings:
        form = matmul_form(b.value)
        if form is None:
            continue
        kind, view, columns = form
        layer = MatmulLayer(weight_key(view), kind, view, columns)
        var = b.var
        nxt = users.get(var)
        if _is_op(value_of.get(nxt), "relax.add") and counts.get(var) == 1:
            other = [a for a in value_of[nxt].args if not a.same_as(var)]
            bias = per_row_bias(other[0], kind, view.shape[0]) if len(other) == 1 else None
            if bias is not None:
                layer.bias, var = bias, nxt
                nxt = users.get(var)
        if _is_op(value_of.get(nxt), "relax.nn.relu") and counts.get(var) == 1:
            layer.relu = True
        layers.setdefault(layer.key, layer)
    return list(layers.values())
