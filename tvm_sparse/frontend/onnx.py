"""Load ONNX models and import them into Relax with tvm-sparse's extra converters in scope."""

from __future__ import annotations

import contextlib
import io
import os
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import tvm

from .._compat import onnx_frontend
from ..errors import ModelLoadError, ShapeError, TvmSparseError, UnsupportedOpError
from .quant_forms import check_forms

_STANDARD_DOMAINS = ("", "ai.onnx")
_scope = threading.local()
_install_lock = threading.Lock()


def _extra_converters() -> dict:
    # Imported lazily: the converter modules import TVM's frontend and our kernel factories.
    from . import quant, quant_contrib, rnn

    return {**rnn.CONVERTERS, **quant.CONVERTERS, **quant_contrib.CONVERTERS}


def _extra_domain_ops() -> dict[str, tuple[str, ...]]:
    """Ops of other domains we convert (ONNX Runtime's ``com.microsoft`` int8 ops)."""
    from . import quant_contrib

    return quant_contrib.DOMAIN_OPS


def _install_hook() -> None:
    """Wrap the importer's table lookup once; the wrapper adds our table only inside `_scoped`."""
    with _install_lock:
        current = onnx_frontend._get_convert_map
        if getattr(current, "_tvm_sparse_hook", False):
            return

        def _get_convert_map():
            table = current()
            extra = getattr(_scope, "table", None)
            return {**table, **extra} if extra is not None else table

        _get_convert_map._tvm_sparse_hook = True
        onnx_frontend._get_convert_map = _get_convert_map


@contextlib.contextmanager
def _scoped(table: dict):
    """Make `table` visible to the importer in this thread, for the duration of the block."""
    _install_hook()
    previous = getattr(_scope, "table", None)
    _scope.table = table
    try:
        yield
    finally:
        _scope.table = previous


def _guard(op_type: str, converter_cls, opset: int):
    """Wrap a converter so any failure names the ONNX node, op type and opset."""

    class Guarded:
        @classmethod
        def get_converter(cls, opset_):
            impl = converter_cls.get_converter(opset_)

            def convert(bb, inputs, attr, params):
                name = attr.get("tvm_custom", {}).get("name") or "<unnamed>"
                try:
                    out = impl(bb, inputs, attr, params)
                    # Normalising here makes type errors of this node's result name the node.
                    return bb.normalize(out) if isinstance(out, tvm.relax.Expr) else out
                except TvmSparseError:
                    raise
                except Exception as err:  # TVM raises many types; all mean "cannot convert"
                    msg = (
                        str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                    )
                    raise UnsupportedOpError(name, op_type, opset, msg) from err

            return convert

    Guarded.__name__ = f"Guarded{op_type}"
    return Guarded


def load_model(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Read an ONNX model from a path (or pass a ModelProto through), with a clear error."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = os.fspath(model)
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file")
    try:
        proto = onnx.load(path)
    except Exception as err:
        raise ModelLoadError(f"{path}: not an ONNX model ({type(err).__name__})") from err
    if not proto.graph.node:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph nodes)")
    return proto


def model_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in _STANDARD_DOMAINS:
            return entry.version
    return 1


@dataclass(frozen=True)
class InputSpec:
    """A graph input as the compiled model expects it."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def input_specs(
    model: onnx.ModelProto, shapes: dict[str, list[int]] | None = None
) -> list[InputSpec]:
    """The real (non-initializer) inputs with static shapes, or a ShapeError naming the gap."""
    shapes = dict(shapes or {})
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        ttype = value.type.tensor_type
        dtype = str(onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        if value.name in shapes:
            shape = tuple(int(d) for d in shapes.pop(value.name))
        else:
            dims = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
            if not ttype.HasField("shape") or any(d is None for d in dims):
                shown = (
                    [
                        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                        for d in ttype.shape.dim
                    ]
                    if ttype.HasField("shape")
                    else "unknown rank"
                )
                raise ShapeError(
                    f"input '{value.name}' has dynamic dims {shown}: give its shape, e.g. "
                    f"shapes={{'{value.name}': [...]}} (CLI: --shape {value.name}=d0,d1,...)"
                )
            shape = tuple(dims)
        specs.append(InputSpec(value.name, shape, dtype))
    if shapes:
        known = [s.name for s in specs]
        raise ShapeError(f"shapes given for unknown input(s) {sorted(shapes)}; inputs are {known}")
    return specs


def _check_supported(model: onnx.ModelProto, table: dict, opset: int) -> None:
    domain_ops = _extra_domain_ops()
    for i, node in enumerate(model.graph.node):
        if node.op_type in ("Constant", "If"):
            continue
        if node.op_type in domain_ops.get(node.domain, ()):
            continue
        if node.domain not in _STANDARD_DOMAINS or node.op_type not in table:
            op = (
                node.op_type
                if node.domain in _STANDARD_DOMAINS
                else f"{node.domain}.{node.op_type}"
            )
            name = node.name or f"#{i}"
            raise UnsupportedOpError(name, op, opset, "no converter for this op")


def from_onnx(
    model: str | os.PathLike | onnx.ModelProto, shapes: dict[str, list[int]] | None = None
) -> tvm.IRModule:
    """Import an ONNX model into a Relax IRModule.

    Parameters
    ----------
    model
        Path to an ``.onnx`` file, or a loaded ``onnx.ModelProto``.
    shapes
        Static shapes for inputs with dynamic dims, by input name.

    Returns
    -------
    tvm.IRModule
        ``main`` takes the graph inputs in order and returns the graph outputs (a tuple when
        there are several). LSTM/GRU/RNN layers appear as one recurrent ``call_tir`` each, whose
        PrimFunc carries ``tvm_sparse.layer`` attributes.
    """
    proto = load_model(model)
    opset = model_opset(proto)
    specs = input_specs(proto, shapes)
    for node in proto.graph.node:
        if not node.name:  # the importer and our errors refer to nodes by name
            first = next((o for o in node.output if o), str(len(proto.graph.node)))
            node.name = f"{node.op_type}_{first}"
    table = {**onnx_frontend._get_convert_map(), **_extra_converters()}
    _check_supported(proto, table, opset)
    check_forms(proto, opset)
    guarded = {op: _guard(op, cls, opset) for op, cls in table.items()}
    shape_dict = {s.name: list(s.shape) for s in specs}
    dtype_dict = {s.name: s.dtype for s in specs}
    with _scoped(guarded), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return onnx_frontend.from_onnx(
            proto, shape_dict=shape_dict, dtype_dict=dtype_dict, sanitize_input_names=False
        )


def random_inputs(specs: list[InputSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the right shape and dtype, reproducible from `seed` (for demos and benchmarks)."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in specs:
        if np.issubdtype(np.dtype(spec.dtype), np.integer):
            info = np.iinfo(spec.dtype)
            out[spec.name] = rng.integers(max(info.min, -64), min(info.max, 64), spec.shape).astype(
                spec.dtype
            )
        else:
            out[spec.name] = rng.standard_normal(spec.shape).astype(spec.dtype)
    return out
