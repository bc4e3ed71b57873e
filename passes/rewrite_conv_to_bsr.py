"""RewriteConvToBSR: run planned KxK / strided convolutions with the block-sparse direct kernel.

A layer is a constant-weight conv2d (NCHW, OIHW, batch 1, groups 1, float32) whose kernel is
larger than 1x1 or whose stride exceeds 1 (pointwise stride-1 convs are matmul-form layers,
see `rewrite_conv1x1_to_matmul`), together with what follows it with a single use each: a
per-channel constant bias add, a residual add of another tensor of the output's shape, and
a ReLU. The rewrite replaces the whole chain by two `call_tir`s: `bsr_conv2d.prepare` (the
zero-padded, stride-phase input) and `bsr_conv2d.bsr_conv2d` (the sparse product with the
epilogue fused). Layers without a plan entry are left untouched.

Public interface (all keys are `collect_sparse_layers.weight_key` of the [O, kh*kw*I] view,
I innermost, the view `tvm_sparse.sparsity.as_out_in` gives an ONNX Conv weight):

``collect_conv_layers(mod) -> list[ConvLayer]``
    The candidate layers of ``mod["main"]`` (after the "simplify" phase), one per key.
``conv_candidates(layer) -> list[str]``
    Kernel names worth timing, ``"dense"`` first, then ``bsr_conv2d_RxC_f32`` per block shape
    whose zero blocks keep most of the weight's zeros.
``time_conv_candidate(layer, name, target, cache=None) -> float``
    Seconds per call of that kernel on random input; "dense" is the conv as the Conv2d rule
    schedules it with the same fused epilogue.
``emit_conv(bb, layer, name, data, residual=None) -> relax.Expr``
    The kernel calls for one layer (used by the pass and by the timing).
``RewriteConvToBSR(plan)``
    The module pass; ``plan`` maps a layer key to a kernel name ("dense" entries are ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_sparse._compat import Constant, constant_value
from tvm_sparse.schedules import bsr_conv2d
from tvm_sparse.sparsity import element_sparsity, zero_block_fraction

from .collect_sparse_layers import binding_graph, weight_key

DENSE = "dense"
# Block shapes offered for convs, best first (the selection's table: selection.CANDIDATE_BLOCKS).
CONV_BLOCKS = ((16, 1), (8, 1), (4, 1), (8, 8), (4, 4), (1, 4), (1, 1))
KEEP_ZEROS = 0.9  # a block is offered if its zero blocks keep this share of the zeros


def kernel_name(block: tuple[int, int]) -> str:
    return f"bsr_conv2d_{block[0]}x{block[1]}_f32"


KERNELS: dict[str, tuple[int, int]] = {kernel_name(b): b for b in CONV_BLOCKS}


@dataclass
class ConvLayer:
    """One conv layer and the epilogue it absorbs. `weight` is the ONNX/Relax [O, I, kh, kw]."""

    key: str
    weight: np.ndarray = field(repr=False)
    geometry: bsr_conv2d.ConvGeometry
    bias: np.ndarray | None = field(default=None, repr=False)
    residual: bool = False
    relu: bool = False

    @property
    def view(self) -> np.ndarray:
        """The [O, kh*kw*I] view (I innermost), the matrix the block shapes refer to."""
        return conv_view(self.weight)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.geometry.out_channels, self.geometry.reduction)


def conv_view(weight: np.ndarray) -> np.ndarray:
    return np.moveaxis(weight, 1, -1).reshape(weight.shape[0], -1)


def _static(shape) -> list[int] | None:
    dims = getattr(shape, "values", None)
    if dims is None or any(not isinstance(d, tvm.tirx.IntImm) for d in dims):
        return None
    return [int(d) for d in dims]


def conv_geometry(call: relax.Call) -> bsr_conv2d.ConvGeometry | None:
    """The geometry of a conv2d call this pass can run, else None."""
    if not (isinstance(call, relax.Call) and call.op == tvm.ir.Op.get("relax.nn.conv2d")):
        return None
    data, weight = call.args
    attrs = call.attrs
    dshape = _static(data.ty.shape)
    if not isinstance(weight, Constant) or dshape is None or len(dshape) != 4:
        return None
    wshape = [int(d) for d in weight.ty.shape]
    strides = tuple(int(s) for s in attrs.strides)
    if not (
        attrs.data_layout == "NCHW"
        and attrs.kernel_layout == "OIHW"
        and attrs.out_layout in ("", "NCHW")
        and attrs.groups == 1
        and dshape[0] == 1
        and str(data.ty.dtype) == "float32"
        and str(weight.ty.dtype) == "float32"
        and (not attrs.out_dtype or attrs.out_dtype == "float32")
        and (wshape[2:] != [1, 1] or max(strides) > 1)
    ):
        return None
    pads = [int(p) for p in attrs.padding]
    if len(pads) == 2:  # (vertical, horizontal)
        pads = pads * 2
    return bsr_conv2d.ConvGeometry(
        in_channels=dshape[1],
        out_channels=wshape[0],
        height=dshape[2],
        width=dshape[3],
        kernel=(wshape[2], wshape[3]),
        stride=strides,
        padding=tuple(pads),
        dilation=tuple(int(d) for d in attrs.dilation),
    )


def _channel_bias(const, channels: int) -> np.ndarray | None:
    if not isinstance(const, Constant):
        return None
    value = constant_value(const)
    if value.dtype != np.float32 or value.size != channels:
        return None
    if tuple(value.shape) in ((1, channels, 1, 1), (channels, 1, 1)):
        return value.reshape(channels)
    return None


def _is_op(expr, name: str) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


@dataclass
class _Chain:
    layer: ConvLayer
    conv: relax.Call  # the original conv2d call
    residual: relax.Expr | None  # the residual operand (original expression)


def _chains(func: relax.Function) -> dict[relax.Call, _Chain]:
    """{original value bound to the chain's last var: chain} for every conv layer of `func`."""
    bindings, value_of, users, counts = binding_graph(func)
    claimed: set[relax.Var] = set()  # residual adds already fused into an earlier conv
    chains = {}
    for b in bindings:
        geom = conv_geometry(b.value)
        if geom is None:
            continue
        weight = constant_value(b.value.args[1])
        layer = ConvLayer(weight_key(conv_view(weight)), weight, geom)
        var, residual = b.var, None
        out_shape = [1, geom.out_channels, *geom.out_hw]

        def next_op(v, name):
            nxt = users.get(v)
            ok = counts.get(v) == 1 and _is_op(value_of.get(nxt), name)
            return nxt if ok else None

        nxt = next_op(var, "relax.add")
        if nxt is not None:
            other = [a for a in value_of[nxt].args if not a.same_as(var)]
            bias = _channel_bias(other[0], geom.out_channels) if len(other) == 1 else None
            if bias is not None:
                layer.bias, var = bias, nxt
        nxt = next_op(var, "relax.add")
        if nxt is not None and nxt not in claimed:
            args = value_of[nxt].args
            other = args[1] if args[0].same_as(var) else args[0]
            if (
                isinstance(other, relax.Var)
                and not other.same_as(var)
                and _static(other.ty.shape) == out_shape
                and str(other.ty.dtype) == "float32"
            ):
                layer.residual, residual, var = True, other, nxt
                claimed.add(nxt)
        nxt = next_op(var, "relax.nn.relu")
        if nxt is not None:
            layer.relu, var = True, nxt
        chains[value_of[var]] = _Chain(layer, b.value, residual)
    return chains


def collect_conv_layers(mod: tvm.IRModule) -> list[ConvLayer]:
    """Every KxK or strided conv layer of `main` with the epilogue it can absorb (one per key).

    A residual add is absorbed by the first conv chain that reaches it in binding order.
    """
    layers: dict[str, ConvLayer] = {}
    for chain in _chains(mod["main"]).values():
        layers.setdefault(chain.layer.key, chain.layer)
    return list(layers.values())


def conv_candidates(layer: ConvLayer) -> list[str]:
    """ "dense", then the BSR kernels worth timing for this weight (best block shapes first)."""
    view = layer.view
    sparsity = element_sparsity(view)
    names = [DENSE]
    if sparsity == 0:
        return names
    for block in CONV_BLOCKS:
        if layer.geometry.out_channels % block[0]:
            continue
        zeros = zero_block_fraction(view, block)
        if zeros > 0 and zeros >= KEEP_ZEROS * sparsity:
            names.append(kernel_name(block))
    return names


def emit_conv(
    bb: relax.BlockBuilder,
    layer: ConvLayer,
    name: str,
    data: relax.Expr,
    residual: relax.Expr | None = None,
) -> relax.Expr:
    """Emit the prepare call and return the sparse kernel call ([1, O, OH, OW]) for `layer`."""
    if name not in KERNELS:
        raise ValueError(f"unknown conv kernel {name!r}; expected one of {sorted(KERNELS)}")
    geom = layer.geometry
    kernel = bsr_conv2d.default_kernel(geom, KERNELS[name])
    packed = bsr_conv2d.pack(layer.view, geom, kernel)
    tag = layer.key.split(":")[1][:8]
    prep = bb.add_func(bsr_conv2d.prepare(geom), f"bsr_conv2d_prepare_{tag}")
    func = bsr_conv2d.bsr_conv2d(geom, kernel, layer.relu, layer.residual)
    gv = bb.add_func(func.with_attr("tvm_sparse.layer_key", layer.key), f"{name}_{tag}")
    xq = bb.emit(relax.call_tir(prep, [data], relax.TensorType([geom.buffer_size], "float32")))
    bias = layer.bias if layer.bias is not None else np.zeros(geom.out_channels, np.float32)
    args = [
        xq,
        relax.const(packed.data),
        relax.const(packed.offsets, "int32"),
        relax.const(packed.chunkptr, "int32"),
        relax.const(bias.astype(np.float32)),
    ]
    if layer.residual:
        if residual is None:
            raise ValueError(f"layer {layer.key} fuses a residual add: pass its operand")
        args.append(residual)
    out = relax.TensorType([1, geom.out_channels, *geom.out_hw], "float32")
    return relax.call_tir(gv, args, out)


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, plan: dict[str, str], chains: dict):
        super().__init__(mod)
        self.plan, self.chains = plan, chains

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        chain = self.chains.get(call)
        name = self.plan.get(chain.layer.key) if chain is not None else None
        if name is None or name == DENSE:
            return super().visit_call_(call)
        data = self.visit_expr(chain.conv.args[0])
        residual = self.visit_expr(chain.residual) if chain.residual is not None else None
        return emit_conv(self.builder_, chain.layer, name, data, residual)


@tvm.transform.module_pass(opt_level=0, name="RewriteConvToBSR")
class RewriteConvToBSR:
    """Rewrite the conv layers of `plan` ({layer key: kernel name}) into block-sparse kernels.

    Keys not in the module and "dense" entries are ignored; the conv, bias add, residual add
    and ReLU a rewritten layer absorbed become dead and are removed.
    """

    def __init__(self, plan: dict[str, str]):
        self.plan = dict(plan)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not any(v != DENSE for v in self.plan.values()):
            return mod
        chains = _chains(mod["main"])
        if not any(self.plan.get(c.layer.key, DENSE) != DENSE for c in chains.values()):
            return mod
        rewriter = _Rewriter(mod, self.plan, chains)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return relax.transform.DeadCodeElimination()(rewriter.builder_.get())


def layer_module(layer: ConvLayer, name: str) -> tvm.IRModule:
    """A one-layer Relax module ``main(x[, res])`` running `layer` with kernel `name`."""
    geom = layer.geometry
    out_shape = [1, geom.out_channels, *geom.out_hw]
    x = relax.Var("x", relax.TensorType([1, geom.in_channels, geom.height, geom.width], "float32"))
    params = [x]
    if layer.residual:
        params.append(relax.Var("res", relax.TensorType(out_shape, "float32")))
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            if name == DENSE:
                y = bb.emit(
                    relax.op.nn.conv2d(
                        x,
                        relax.const(layer.weight),
                        strides=geom.stride,
                        padding=geom.padding,
                        dilation=geom.dilation,
                    )
                )
                if layer.bias is not None:
                    bias = layer.bias.reshape(1, -1, 1, 1)
                    y = bb.emit(relax.op.add(y, relax.const(bias)))
                if layer.residual:
                    y = bb.emit(relax.op.add(y, params[1]))
                if layer.relu:
                    y = bb.emit(relax.op.nn.relu(y))
            else:
                y = bb.emit(emit_conv(bb, layer, name, x, params[1] if layer.residual else None))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def time_conv_candidate(
    layer: ConvLayer, name: str, target: tvm.target.Target, cache: dict | None = None
) -> float:
    """Median seconds per call of `layer` run by kernel `name` on `target` (random input).

    Parameters
    ----------
    layer
        A layer from :func:`collect_conv_layers`.
    name
        "dense" or a name from :func:`conv_candidates`.
    target
        The build target; timed on this machine's CPU with TVM's thread pool as configured.
    cache
        Optional dict of earlier results, keyed by kernel, geometry, epilogue and the weight.
    """
    key = f"{name}|{layer.geometry}|{layer.key}|bias={layer.bias is not None}"
    key += f"|res={layer.residual}|relu={layer.relu}"
    if cache is not None and key in cache:
        return cache[key]
    from . import lowering_pipeline, optimize

    mod = optimize(layer_module(layer, name), target)
    ex = relax.build(mod, target, relax_pipeline=lowering_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(0)
    args = [
        tvm.runtime.tensor(rng.standard_normal([int(d) for d in p.ty.shape]).astype(np.float32))
        for p in mod["main"].params
    ]
    vm["main"](*args)
    timer = vm.time_evaluator("main", tvm.cpu(), number=10, repeat=3, min_repeat_ms=20)
    seconds = float(timer(*args).median)
    if cache is not None:
        cache[key] = seconds
    return seconds
