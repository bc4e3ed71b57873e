"""compile(): ONNX model in, CompiledModel out (import, optimise, schedule, build)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import onnx
from tvm import relax

from .errors import TvmSparseError
from .frontend.onnx import from_onnx, input_specs, load_model
from .report import weight_layers
from .runtime import CompiledModel
from .target import resolve_target
from .tuning import open_database, selection_cache, using_database

SPARSE_MODES = ("auto", "off", "force")
POLICIES = ("measured", "threshold")


def _join_key(decision) -> str:
    """The weight key a decision joins ONNX rows by (recurrent layers key by their R)."""
    return getattr(decision.layer, "weight_key", decision.layer.key)


def _layer_report(proto: onnx.ModelProto, decisions: list) -> list[dict]:
    """ONNX weight layers joined (by weight content) with the kernel chosen for each."""
    from tvm_sparse.schedules.int8_recurrent import KIND as INT8_KIND

    by_key = {_join_key(d): d for d in decisions}
    rows = weight_layers(proto)
    matched = set()
    for row in rows:
        found = [by_key[k] for k in row.pop("keys", []) if k in by_key]
        matched.update(_join_key(d) for d in found)
        if len(found) > 1:  # one decision per direction of a recurrent layer
            row.update(
                kernel=" | ".join(d.kernel for d in found),
                why=found[0].why,
                times_us={
                    f"{d.layer.key} {k}": round(v * 1e6, 2)
                    for d in found
                    for k, v in d.times.items()
                },
            )
        elif found:
            d = found[0]
            row.update(
                kernel=d.kernel,
                why=d.why,
                times_us={k: round(v * 1e6, 2) for k, v in d.times.items()},
            )
        elif row["op"] in ("LSTM", "GRU", "RNN"):
            row.update(kernel="dense recurrent", why="fused recurrent kernel (dense)")
        else:
            row.update(kernel="dense", why="not in matmul form (dense conv schedule)")
    for d in decisions:  # layers the importer created (e.g. recurrent input projections)
        if _join_key(d) not in matched:
            times = {k_: round(v * 1e6, 2) for k_, v in d.times.items()}
            if hasattr(d.layer, "kernel_kind"):  # a recurrent node the rows do not list
                op = "DynamicQuantizeLSTM" if d.layer.kernel_kind == INT8_KIND else d.layer.kind
                name = f"{d.layer.node} ({d.layer.direction})"
                rows.append(
                    {"op": op, "name": name, "weights": {}, "kernel": d.kernel, "why": d.why,
                     "times_us": times}
                )  # fmt: skip
                continue
            if not hasattr(d.layer, "view") and not hasattr(d.layer, "shape"):
                continue
            n, k = d.layer.view.shape if hasattr(d.layer, "view") else d.layer.shape
            rows.append(
                {
                    "op": "MatMul",
                    "name": f"(internal {n}x{k})",
                    "weights": {},
                    "kernel": d.kernel,
                    "why": d.why,
                    "times_us": {k_: round(v * 1e6, 2) for k_, v in d.times.items()},
                }
            )
    return rows


def _rewrite_quantized(mod, sparse, policy, tgt, on_phase=None, cache=None):
    """QDQ-quantized layers -> int8 VNNI kernels, dense or sparse per layer (before constant
    folding, which would turn their DequantizeLinear weights into float constants)."""
    from tvm_sparse.passes.rewrite_quantized import RewriteQuantized, collect_quantized_layers

    from .selection import select_int8

    layers = collect_quantized_layers(mod)
    if not layers:
        return mod, []
    if on_phase:
        on_phase(f"select int8 kernels for {len(layers)} quantized layers")
    decisions = select_int8(layers, sparse, policy, tgt, cache=cache)
    return RewriteQuantized({d.layer.key: d.variant for d in decisions})(mod), decisions


def _select(
    model, target, shapes, sparse, policy, dump_ir=None, on_phase=None, calibration=None, db=None
):
    """Import, simplify, collect the weight layers and choose a kernel for each."""
    from tvm_sparse.passes import optimize
    from tvm_sparse.passes.collect_sparse_layers import collect_layers
    from tvm_sparse.passes.rewrite_conv1x1_to_matmul import RewriteConv1x1ToMatmul, pointwise_convs
    from tvm_sparse.passes.rewrite_conv_to_bsr import collect_conv_layers
    from tvm_sparse.passes.rewrite_recurrent_to_sparse import collect_recurrent_layers

    from .selection import select, select_convs, select_recurrent

    if sparse not in SPARSE_MODES:
        raise TvmSparseError(f"sparse: expected one of {SPARSE_MODES}, got {sparse!r}")
    if policy not in POLICIES:
        raise TvmSparseError(f"policy: expected one of {POLICIES}, got {policy!r}")
    proto = load_model(model)
    specs = input_specs(proto, shapes)
    tgt = resolve_target(target)
    if on_phase:
        on_phase("import")
    mod = from_onnx(proto, {s.name: list(s.shape) for s in specs})
    cache = selection_cache(db, tgt) if db is not None else None
    mod, int8_decisions = _rewrite_quantized(mod, sparse, policy, tgt, on_phase, cache)
    mod = optimize(mod, tgt, dump_dir=dump_ir, on_phase=on_phase, phases=("simplify",))
    # Pointwise convs are candidates in their matmul form, but stay convs unless they go sparse.
    convs = pointwise_convs(mod)
    layers = collect_layers(RewriteConv1x1ToMatmul()(mod))
    for layer in layers:
        layer.conv_hw = convs.get(layer.key)
    if on_phase:
        on_phase(f"select kernels for {len(layers)} layers (sparse={sparse}, policy={policy})")
    progress = None
    if on_phase and policy == "measured" and sparse != "off":

        def progress(i, n):
            on_phase(f"  timing candidates of layer {i + 1}/{n}")

    inputs = None
    if calibration is not None:
        from .calibration import input_sparsity_by_key, measure_input_sparsity

        if on_phase:
            on_phase("calibrate: measuring input sparsity")
        inputs = input_sparsity_by_key(proto, measure_input_sparsity(proto, calibration))
    decisions = int8_decisions
    decisions += select(layers, sparse, policy, tgt, progress, cache, input_sparsity=inputs)
    decisions += select_convs(collect_conv_layers(mod), sparse, policy, tgt, progress, cache)
    decisions += select_recurrent(
        collect_recurrent_layers(mod), sparse, policy, tgt, progress, cache
    )
    return proto, specs, tgt, mod, decisions


def _prepare(
    model, target, shapes, sparse, policy, calibration=None, dump_ir=None, on_phase=None, db=None
):
    """Import, choose a kernel per layer, rewrite, legalize: the module the schedule phase (and
    the tuner) starts from. With a tuning database `db` (entered as the current MetaSchedule
    database by the caller) the measured selection times tuned kernels and reuses the
    selection timings stored with it."""
    from tvm_sparse.passes import optimize
    from tvm_sparse.passes.collect_sparse_layers import MatmulLayer
    from tvm_sparse.passes.convert_layout import ConvertConvLayoutNHWC
    from tvm_sparse.passes.rewrite_conv1x1_to_matmul import RewriteConv1x1ToMatmul
    from tvm_sparse.passes.rewrite_conv_to_bsr import ConvLayer, RewriteConvToBSR
    from tvm_sparse.passes.rewrite_dense_to_bsr import RewriteDenseToBSR
    from tvm_sparse.passes.rewrite_input_sparse import RewriteInputSparse
    from tvm_sparse.passes.rewrite_recurrent_to_sparse import (
        RecurrentLayer,
        RewriteRecurrentToSparse,
    )

    proto, specs, tgt, mod, decisions = _select(
        model, target, shapes, sparse, policy, dump_ir, on_phase, calibration, db
    )
    chosen = [d for d in decisions if d.kernel != "dense"]
    matmuls = [d for d in chosen if isinstance(d.layer, MatmulLayer)]
    bsr_plan = {d.layer.key: d.variant for d in matmuls if d.variant is not None}
    input_plan = {d.layer.key: d.kernel for d in matmuls if d.variant is None}
    conv_plan = {d.layer.key: d.kernel for d in chosen if isinstance(d.layer, ConvLayer)}
    rnn_plan = {d.layer.key: d.kernel for d in chosen if isinstance(d.layer, RecurrentLayer)}
    pointwise = {d.layer.key for d in matmuls if d.layer.conv_hw is not None}
    mod = RewriteRecurrentToSparse(rnn_plan)(mod)
    mod = RewriteConvToBSR(conv_plan)(mod)
    mod = RewriteConv1x1ToMatmul(only=pointwise)(mod)
    mod = RewriteInputSparse(input_plan)(mod)
    mod = RewriteDenseToBSR(bsr_plan)(mod)
    mod = ConvertConvLayoutNHWC(mod)
    mod = optimize(mod, tgt, dump_dir=dump_ir, on_phase=on_phase, phases=("legalize",))
    return proto, specs, tgt, mod, decisions


def plan_layers(
    model, target="host", shapes=None, sparse="auto", policy="threshold", calibration=None
):
    """The report rows compile() would produce (kernel choice per layer), without building."""
    proto, _, _, _, decisions = _select(
        model, target, shapes, sparse, policy, calibration=calibration
    )
    return _layer_report(proto, decisions)


def compile(  # noqa: A001 - the public name the API promises
    model: str | os.PathLike | onnx.ModelProto,
    target: str | dict = "host",
    shapes: dict[str, list[int]] | None = None,
    *,
    sparse: str = "auto",
    policy: str = "measured",
    calibration: dict | None = None,
    database: str | os.PathLike | None = None,
    dump_ir: str | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> CompiledModel:
    """Compile an ONNX model for a CPU target.

    Parameters
    ----------
    model
        Path to an ``.onnx`` file or an ``onnx.ModelProto``.
    target
        ``"host"`` (this CPU, all cores), an LLVM CPU name, or a TVM target dict.
    shapes
        Static shapes for inputs with dynamic dims, e.g. ``{"x": [1, 3, 224, 224]}``.
    sparse
        ``"auto"``: each layer gets a block-sparse kernel when `policy` says it is faster;
        ``"off"``: dense kernels only; ``"force"``: the best sparse kernel wherever the weight
        has zero blocks, even if dense is faster.
    policy
        ``"measured"``: time every candidate kernel on the target (cached per layer signature);
        ``"threshold"``: seed 004's rule on the zero-block fraction, no timing.
    calibration
        Sample inputs ({input name: array}, samples stacked on a new first axis or one
        sample) to measure each layer's input (activation) sparsity; batch-1 layers whose
        inputs are mostly zeros then also try input-sparse kernels (seed 004).
    database
        A tuning database directory written by :func:`tvm_sparse.tune`: its records schedule
        the kernels they cover (the others keep their default schedules), and the measured
        selection reuses the candidate timings stored with it, so builds with the same model
        and database choose the same kernels.
    dump_ir
        Directory to write the IR after each pipeline phase to.
    on_phase
        Progress callback, called with each phase name.

    Returns
    -------
    CompiledModel
        ``.run(inputs)`` -> list of arrays in graph-output order; ``.report`` per layer.
    """
    from tvm_sparse.passes import lowering_pipeline, optimize

    db = open_database(database) if database is not None else None
    with _remembered_presses() as check_pressed:
        with using_database(db):
            proto, specs, tgt, mod, decisions = _prepare(
                model, target, shapes, sparse, policy, calibration, dump_ir, on_phase, db
            )
            mod = optimize(mod, tgt, dump_dir=dump_ir, on_phase=on_phase, phases=("schedule",))
        check_pressed()
        if on_phase:
            on_phase("build")
        executable = relax.build(mod, tgt, relax_pipeline=lowering_pipeline(tgt))
        check_pressed()
    outputs = [o.name for o in proto.graph.output]
    return CompiledModel(executable, specs, outputs, _layer_report(proto, decisions), str(tgt))


@contextlib.contextmanager
def _remembered_presses():
    """Yield a check that raises KeyboardInterrupt if Ctrl-C was pressed inside the block, even
    when the KeyboardInterrupt it raised was swallowed on the way: TVM code that catches
    everything around a build (Relax's FoldConstant builds each constant expression in a
    try/catch and leaves it unfolded on any error) would otherwise let an interrupted compile
    finish with a worse model. The SIGINT handler in force is wrapped, not replaced; nothing
    happens off the main thread or when SIGINT is ignored or at its default."""
    import signal
    import threading

    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield lambda: None
        return
    pressed = []

    def handler(signum, frame):
        pressed.append(signum)
        previous(signum, frame)

    def check() -> None:
        if pressed:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous)
