"""RewriteRecurrentToSparse: run planned recurrent layers with a sparse fused kernel.

After the "simplify" phase each LSTM/GRU/RNN direction is one ``call_tir`` to a dense fused
kernel of :mod:`tvm_sparse.schedules.recurrent` whose packed R is a constant argument. This
module finds those calls (:func:`collect_recurrent_layers`, R unpacked back to ONNX order),
names the sparse kernels worth trying for each (:func:`candidates`: one sparse format for the
sparse gates, dense panels for the others, e.g. ``lstm_bsr16x1_iof+dense_c``), times them
(:func:`time_candidate`), and swaps the call of every layer in a plan for its sparse kernel
(:class:`RewriteRecurrentToSparse`). The input projection is not touched: the sparse kernels
read the same projection as the dense one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_sparse._compat import Constant, constant_value
from tvm_sparse.passes.collect_sparse_layers import weight_key
from tvm_sparse.schedules import int8_recurrent as ir
from tvm_sparse.schedules import recurrent as rc
from tvm_sparse.schedules.recurrent_sparse import sparse_recurrence
from tvm_sparse.schedules.recurrent_sparse_pack import FORMATS, pack_sparse
from tvm_sparse.sparsity import GATES, element_sparsity, zero_block_fraction
from tvm_sparse.target import num_cores

DENSE = "dense"
#: A gate is stored sparse in the "sparse-only-if-worth-it" candidate from this sparsity on.
MOSTLY_SPARSE = 0.5
#: The per-lane formats (SELL-16, 32-column windows) are offered when 16x1 blocks keep less
#: than this share of the zeros (unstructured patterns).
PER_LANE_BELOW = 0.9
#: 8x1 blocks are offered when they keep this many more zeros than 16x1 blocks.
BSR8_GAIN = 0.05


@dataclass
class RecurrentLayer:
    """One recurrent ``call_tir`` (one layer and direction) and what its kernels need."""

    key: str  #: "<node>:<direction>" (with "#n" appended if a node name repeats)
    node: str  #: ONNX node name
    kind: str  #: "LSTM" | "GRU" | "RNN"
    gate_sparsity: dict[str, float]  #: element sparsity of each gate's rows of R
    kernel_kind: str  #: "LSTM" | "GRU" (linear_before_reset=1) | "GRU0" | "RNN"
    direction: str  #: "forward" | "reverse"
    seq_len: int
    batch: int
    hidden: int
    peephole: bool
    check_lengths: bool
    r: np.ndarray = field(repr=False)  #: dense R of this direction, ONNX order [gates * H, H]
    function: str = ""  #: name of the dense kernel's PrimFunc in the module

    @property
    def weight_key(self) -> str:
        """Content key of R (as the report's weight rows use)."""
        return weight_key(self.r)

    @property
    def reverse(self) -> bool:
        return self.direction == "reverse"


def _recurrent_calls(mod: tvm.IRModule):
    """(call, PrimFunc) for every call_tir of ``main`` to a recurrent kernel, in program order."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op.same_as(call_tir):
            func = mod[expr.args[0]]
            if isinstance(func, tvm.tirx.PrimFunc) and "tvm_sparse.kind" in (func.attrs or {}):
                found.append((expr, func))

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def _layer(call: relax.Call, func: tvm.tirx.PrimFunc) -> RecurrentLayer | None:
    """The layer behind one dense kernel call, or None if R is not a constant (or the call is
    already sparse)."""
    attrs, names = func.attrs, [p.name for p in func.params]
    if "tvm_sparse.format" in attrs:
        return None
    kind = str(attrs["tvm_sparse.kind"])
    xw, h0 = (func.params[i].ty for i in (0, names.index("h0")))
    (n_t, n_b, _), n_h = (int(d) for d in xw.shape), int(h0.shape[1])
    groups = 1 if kind == ir.KIND else len(rc.panel_layout(kind, n_h, n_b).groups)
    panels = list(call.args[1].fields[1 : 1 + groups])
    if not all(isinstance(p, Constant) for p in panels):
        return None
    values = [constant_value(p) for p in panels]
    if kind == ir.KIND:  # int8 R [H, 4H] -> [4H, H] as the float layers hold it
        r = ir.unpack_r(values[0], n_h).T
    else:
        r = rc.unpack_recurrent_weight(values, rc.panel_layout(kind, n_h, n_b))
    layer = str(attrs["tvm_sparse.layer"])
    gate_rows = np.split(r, len(GATES[layer]))
    return RecurrentLayer(
        key="",
        node="",
        kind=layer,
        gate_sparsity={g: element_sparsity(w) for g, w in zip(GATES[layer], gate_rows)},
        kernel_kind=kind,
        direction=str(attrs["tvm_sparse.direction"]),
        seq_len=n_t,
        batch=n_b,
        hidden=n_h,
        peephole="peep" in names,
        check_lengths="lens" in names,
        r=r,
        function=call.args[0].name_hint,
    )


def _collect(mod: tvm.IRModule) -> list[tuple[relax.Call, RecurrentLayer]]:
    """(call, layer) of each dense kernel call with a constant R. Keys are numbered over all
    recurrent calls, sparse ones included, so they survive a partial rewrite."""
    out, seen = [], {}
    for call, func in _recurrent_calls(mod):
        node = str(func.attrs.get("tvm_sparse.node", "<unnamed>"))
        base = f"{node}:{func.attrs['tvm_sparse.direction']}"
        seen[base] = seen.get(base, 0) + 1
        layer = _layer(call, func)
        if layer is not None:
            layer.node = node
            layer.key = base if seen[base] == 1 else f"{base}#{seen[base]}"
            out.append((call, layer))
    return out


def collect_recurrent_layers(mod: tvm.IRModule) -> list[RecurrentLayer]:
    """Every dense recurrent kernel call of ``main`` whose R is a constant, in program order.

    Parameters
    ----------
    mod
        The Relax module after the "simplify" phase.

    Returns
    -------
    list[RecurrentLayer]
        One per layer and direction; layers whose R is a graph input, and calls already
        rewritten to a sparse kernel, are left out.
    """
    return [layer for _, layer in _collect(mod)]


def candidate_name(layer: RecurrentLayer, fmt: str, sparse: tuple[bool, ...]) -> str:
    """``<kind>_<format>_<sparse gates>[+dense_<dense gates>]``, gates in ONNX order (int8
    LSTMs: ``lstm_int8bsr16x4_iofc``, every gate in one block list)."""
    names = GATES[layer.kind]
    on = "".join(g for g, s in zip(names, sparse) if s)
    off = "".join(g for g, s in zip(names, sparse) if not s)
    return f"{layer.kind.lower()}_{fmt}_{on}" + (f"+dense_{off}" if off else "")


def parse_candidate(layer: RecurrentLayer, name: str) -> tuple[str, tuple[bool, ...]]:
    """(format, sparse flag per gate) of a candidate name; ValueError if it is not one."""
    prefix, fmt, gates = name.split("_", 2)
    on = gates.split("+dense_")[0]
    names = GATES[layer.kind]
    formats = [ir.SPARSE_FORMAT] if layer.kernel_kind == ir.KIND else FORMATS
    if prefix != layer.kind.lower() or fmt not in formats or not set(on) <= set(names) or not on:
        raise ValueError(f"{name!r} is not a sparse kernel of {layer.kind} layer {layer.key}")
    sparse = tuple(g in on for g in names)
    if candidate_name(layer, fmt, sparse) != name:
        raise ValueError(f"{name!r} is not a sparse kernel of {layer.kind} layer {layer.key}")
    return fmt, sparse


def _formats(layer: RecurrentLayer, sparse: tuple[bool, ...]) -> list[str]:
    """Formats worth timing for the gates flagged ``sparse``, judged by their zero blocks."""
    lay = rc.panel_layout(layer.kernel_kind, layer.hidden, layer.batch)
    rows = np.split(layer.r, len(sparse))
    chosen = np.concatenate([w for w, s in zip(rows, sparse) if s])
    zeros = element_sparsity(chosen)
    z16, z8 = zero_block_fraction(chosen, (16, 1)), zero_block_fraction(chosen, (8, 1))
    unstructured = z16 < PER_LANE_BELOW * zeros
    wanted = {
        "bsr16x1": True,
        "bsr8x1": z8 > z16 + BSR8_GAIN * zeros,
        "sell16": unstructured,
        "win16x32": unstructured,
    }
    fits = {f: all(g.unit % FORMATS[f].rows == 0 for g in lay.groups) for f in FORMATS}
    out = [f for f in FORMATS if wanted[f] and fits[f]]
    if not out and fits["bsr8x1"]:
        out = ["bsr8x1"]
    return out


def supported(target: tvm.target.Target | None) -> bool:
    """Whether the sparse kernels build for ``target``: x86 with AVX-512F (the spin barrier
    polls with ``pause``, the lookups are 512-bit). None: assume the host (this project's
    targets)."""
    if target is None:
        return True
    return target.kind.name == "llvm" and bool(
        tvm.target.codegen.target_has_features("avx512f", target)
    )


def candidates(layer: RecurrentLayer, target: tvm.target.Target | None = None) -> list[str]:
    """Kernel names for ``layer``: "dense" first, then per format the variant with every gate
    that has zeros stored sparse and, if different, the one with only gates at least
    ``MOSTLY_SPARSE`` sparse (seed 000's selective pruning: i, o, f sparse, c dense). Only
    "dense" for a ``target`` the sparse kernels do not support (default: the current one)."""
    if not supported(target or tvm.target.Target.current(allow_none=True)):
        return [DENSE]
    names = GATES[layer.kind]
    if layer.kernel_kind == ir.KIND:  # int8: one 16x4 BSR kernel over all gates
        zeros = ir.block_fraction(layer.r.T, ir.panel_unit(layer.hidden))
        every = (True,) * len(names)
        return [DENSE] + ([candidate_name(layer, ir.SPARSE_FORMAT, every)] if zeros > 0 else [])
    sparsity = [layer.gate_sparsity[g] for g in names]
    sets = []
    for threshold in (1e-12, MOSTLY_SPARSE):
        flags = tuple(s >= threshold for s in sparsity)
        if any(flags) and flags not in sets:
            sets.append(flags)
    out = [DENSE]
    for flags in sets:
        out += [candidate_name(layer, f, flags) for f in _formats(layer, flags)]
    return out


def build_kernel(layer: RecurrentLayer, name: str, threads: int | None = None):
    """(PrimFunc, weight arrays) of candidate ``name`` for ``layer``; the arrays replace the
    dense kernel's packed R arguments."""
    opts = {"reverse": layer.reverse, "check_lengths": layer.check_lengths}
    n_t, n_b, n_h = layer.seq_len, layer.batch, layer.hidden
    if layer.kernel_kind == ir.KIND:
        if name != DENSE:
            parse_candidate(layer, name)  # ValueError for a name that is not a candidate
        packed = ir.pack_r(layer.r.T, ir.panel_unit(n_h), sparse=name != DENSE)
        blocks = packed.blocks if name != DENSE else None
        func = ir.lstm_int8_recurrence(
            n_t, n_b, n_h, blocks=blocks, peephole=layer.peephole, reverse=layer.reverse,
            threads=threads,
        )  # fmt: skip
        arrays = (
            [packed.values] if name == DENSE else [packed.values, packed.indptr, packed.indices]
        )
        return func.with_attr("tvm_sparse.kernel", name), arrays
    if name == DENSE:
        lay = rc.panel_layout(layer.kernel_kind, n_h, n_b)
        arrays = rc.pack_recurrent_weight(layer.r, lay)
        if layer.kind == "LSTM":
            func = rc.lstm_recurrence(n_t, n_b, n_h, peephole=layer.peephole, **opts)
        elif layer.kind == "GRU":
            lbr = layer.kernel_kind == "GRU"
            func = rc.gru_recurrence(n_t, n_b, n_h, linear_before_reset=lbr, **opts)
        else:
            func = rc.rnn_recurrence(n_t, n_b, n_h, **opts)
        return func, arrays
    fmt, sparse = parse_candidate(layer, name)
    weights = pack_sparse(
        layer.kernel_kind, layer.r, fmt, sparse, batch=n_b, threads=threads or num_cores()
    )
    func = sparse_recurrence(weights, n_t, n_b, n_h, peephole=layer.peephole, **opts)
    return func.with_attr("tvm_sparse.kernel", name), weights.arrays()


def _arguments(layer: RecurrentLayer, func: tvm.tirx.PrimFunc, weights: list) -> list:
    """All kernel arguments: random activations and states around the weights, full-length
    ``lens``, zeroed outputs."""
    rng = np.random.default_rng(0)
    n_out = 3 if layer.kind == "LSTM" else 2
    values = []
    for i, param in enumerate(func.params):
        buf = param.ty
        shape = [int(d) for d in buf.shape]
        if 1 <= i <= len(weights):
            values.append(weights[i - 1])
        elif i >= len(func.params) - n_out:
            values.append(np.zeros(shape, str(buf.dtype)))
        elif param.name == "lens":
            values.append(np.full(shape, layer.seq_len, np.int32))
        else:
            values.append(rng.uniform(-1, 1, shape).astype(str(buf.dtype)))
    return values


_TIMES: dict[str, float] = {}


def time_candidate(
    layer: RecurrentLayer, name: str, target: tvm.target.Target, cache: dict | None = None
) -> float:
    """Seconds per call of kernel ``name`` (from :func:`candidates`) on ``target``.

    The kernel is built for the layer's real shapes and R and run on random activations and
    states; the result is the median of 5 repeats of at least 20 ms, cached per (kernel,
    shapes, options, R digest, target) in `cache` (default: for the life of the process).
    """
    cache = _TIMES if cache is None else cache
    digest = hashlib.sha1(np.ascontiguousarray(layer.r).tobytes()).hexdigest()[:16]
    sig = (
        f"{name}|{layer.kernel_kind}|{layer.seq_len}x{layer.batch}x{layer.hidden}|"
        f"p={layer.peephole}|l={layer.check_lengths}|{layer.direction}|{digest}|{target}"
    )
    if sig not in cache:
        func, weights = build_kernel(layer, name)
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
        dev = tvm.cpu()
        args = [
            tvm.runtime.tensor(np.ascontiguousarray(a), dev)
            for a in _arguments(layer, func, weights)
        ]
        lib(*args)
        timer = lib.mod.time_evaluator("main", dev, number=1, repeat=5, min_repeat_ms=20)
        cache[sig] = float(timer(*args).median)
    return cache[sig]


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, plan: dict[str, str], layers: dict, threads):
        super().__init__(mod)
        self.plan, self.layers, self.threads = plan, layers, threads

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        new = super().visit_call_(call)
        layer = self.layers.get(call)
        name = self.plan.get(layer.key, DENSE) if layer is not None else DENSE
        if name == DENSE:
            return new
        func, weights = build_kernel(layer, name, self.threads)
        func = func.with_attr("tvm_sparse.node", layer.node).without_attr("global_symbol")
        fmt = name.split("_")[1]
        gvar = self.builder_.add_func(func, f"{layer.function}_{fmt}")
        args = list(new.args[1].fields)
        n_dense = (
            1
            if layer.kernel_kind == ir.KIND
            else len(rc.panel_layout(layer.kernel_kind, layer.hidden, layer.batch).groups)
        )
        args = [args[0], *[relax.const(w) for w in weights], *args[1 + n_dense :]]
        out = new.ty_args[0]
        outs = list(out.fields) if isinstance(out, relax.TupleType) else out
        return relax.call_tir(gvar, args, outs)


@tvm.transform.module_pass(opt_level=0, name="RewriteRecurrentToSparse")
class RewriteRecurrentToSparse:
    """Replace the recurrent kernel of every layer in ``plan`` ({layer key: kernel name from
    :func:`candidates`}) by that sparse kernel; layers not in the plan, or planned "dense",
    keep their dense kernel. ``threads``: chunks the work is split into (default: this
    machine's cores; any run-time thread count gives the same results)."""

    def __init__(self, plan: dict[str, str], threads: int | None = None):
        self.plan = dict(plan)
        self.threads = threads

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        layers = {
            call: layer for call, layer in _collect(mod) if self.plan.get(layer.key, DENSE) != DENSE
        }
        if not layers:
            return mod
        rewriter = _Rewriter(mod, self.plan, layers, self.threads)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return relax.transform.DeadCodeElimination()(rewriter.builder_.get())
