"""compile(): ONNX model in, CompiledModel out (import, optimise, schedule, build)."""

from __future__ import annotations

import os
from collections.abc import Callable

import onnx
from tvm import relax

from .frontend.onnx import from_onnx, input_specs, load_model
from .report import weight_layers
from .runtime import CompiledModel
from .target import resolve_target


def _layer_report(proto: onnx.ModelProto) -> list[dict]:
    rows = weight_layers(proto)
    for row in rows:
        row["kernel"] = "dense"
        row["why"] = "default dense schedule (no sparse candidate evaluated)"
    return rows


def compile(  # noqa: A001 - the public name the API promises
    model: str | os.PathLike | onnx.ModelProto,
    target: str | dict = "host",
    shapes: dict[str, list[int]] | None = None,
    *,
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

    proto = load_model(model)
    specs = input_specs(proto, shapes)
    tgt = resolve_target(target)
    if on_phase:
        on_phase("import")
    mod = from_onnx(proto, {s.name: list(s.shape) for s in specs})
    mod = optimize(mod, tgt, dump_dir=dump_ir, on_phase=on_phase)
    if on_phase:
        on_phase("build")
    executable = relax.build(mod, tgt, relax_pipeline=lowering_pipeline(tgt))
    outputs = [o.name for o in proto.graph.output]
    return CompiledModel(executable, specs, outputs, _layer_report(proto), str(tgt))
