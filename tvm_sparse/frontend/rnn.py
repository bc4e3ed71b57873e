"""Relax converters for ONNX LSTM, GRU and RNN: one recurrent kernel call per layer and direction.

Each direction becomes an input projection for all time steps (``reshape``, ``matmul`` with
the packed ``Wᵀ`` and ``add`` of the folded biases: ordinary Relax ops, left to the dense
matmul schedule) and one ``call_tir`` to a fused recurrent kernel from
:mod:`tvm_sparse.schedules.recurrent`, named ``<layer>_recurrence_<node>_<fwd|rev>`` and
tagged with ``tvm_sparse.layer`` / ``tvm_sparse.kind`` / ``tvm_sparse.node`` /
``tvm_sparse.direction``. When the weights are constants, R reaches the kernel as one packed
constant per gate group: :class:`tvm_sparse.passes.rewrite_recurrent_to_sparse.
RewriteRecurrentToSparse` unpacks it from there to swap in a sparse kernel.
"""

from __future__ import annotations

import re

import numpy as np
import tvm
from tvm import relax

from .._compat import onnx_frontend
from ..errors import UnsupportedOpError
from ..schedules import recurrent

_DEFAULT_ACTIVATIONS = {
    "LSTM": ("Sigmoid", "Tanh", "Tanh"),
    "GRU": ("Sigmoid", "Tanh"),
    "RNN": ("Tanh",),
}
_DIRECTIONS = {"forward": (False,), "reverse": (True,), "bidirectional": (False, True)}
# Attributes that change the maths and that the kernels do not implement (value: allowed value).
_REJECTED = {"clip": None, "input_forget": 0}


class _RelaxOps:
    """:class:`recurrent.NumpyOps`' steps as Relax ops, for weights that are graph values."""

    def __init__(self, bb: relax.BlockBuilder):
        self.bb = bb

    def reshape(self, x, shape):
        return self.bb.emit(relax.op.reshape(x, shape))

    def transpose(self, x, axes):
        return self.bb.emit(relax.op.permute_dims(x, axes))

    def add(self, a, b):
        return self.bb.emit(relax.op.add(a, b))

    def take(self, x, start, stop):
        return self.bb.emit(relax.op.strided_slice(x, axes=[0], begin=[start], end=[stop]))

    def pad(self, x, axis, amount):
        if amount == 0:
            return x
        width = [0] * (2 * x.ty.ndim)
        width[2 * axis + 1] = amount
        return self.bb.emit(relax.op.nn.pad(x, width))

    def concat(self, arrays, axis):
        return arrays[0] if len(arrays) == 1 else self.bb.emit(relax.op.concat(arrays, axis))

    def zeros(self, shape, dtype):
        return relax.const(np.zeros(shape, dtype))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _static_shape(expr: relax.Expr) -> list[int]:
    dims = list(expr.ty.shape)
    if not all(isinstance(d, tvm.tirx.IntImm) for d in dims):
        raise ValueError(f"needs static shapes, got {dims}")
    return [int(d) for d in dims]


class _Recurrent(onnx_frontend.OnnxOpConverter):
    """Shared conversion; subclasses set LAYER. Opsets 7, 14 (``layout``) and 22 are the same
    maths, so one implementation serves them all; ``get_converter`` binds the model's opset
    so errors name it."""

    LAYER = ""

    @classmethod
    def get_converter(cls, opset):
        def convert(bb, inputs, attr, params):
            return _Converter(cls.LAYER, bb, inputs, attr, params, opset).run()

        return convert


class LSTM(_Recurrent):
    """ONNX LSTM: forward, reverse, bidirectional; layout 0/1; B, initial_h/c and P optional.

    ``sequence_lens`` must equal the sequence length everywhere: checked at import when it is
    a constant, by the kernel at run time (an error, not a wrong answer) when it is an input.
    """

    LAYER = "LSTM"


class GRU(_Recurrent):
    """ONNX GRU with linear_before_reset 0 or 1 (otherwise as :class:`LSTM`, no peepholes)."""

    LAYER = "GRU"


class RNN(_Recurrent):
    """ONNX RNN with the default Tanh activation (otherwise as :class:`LSTM`)."""

    LAYER = "RNN"


CONVERTERS: dict[str, type] = {"LSTM": LSTM, "GRU": GRU, "RNN": RNN}


class _Converter:
    """One ONNX recurrent node to Relax; ``run`` returns the (Y, Y_h[, Y_c]) tuple."""

    def __init__(self, layer, bb, inputs, attr, params, opset):
        self.layer, self.bb, self.inputs, self.params, self.opset = layer, bb, inputs, params, opset
        self.name = attr.get("tvm_custom", {}).get("name") or "<unnamed>"
        self.attr = attr

    def fail(self, detail: str) -> UnsupportedOpError:
        return UnsupportedOpError(self.name, self.layer, self.opset, detail)

    def check_attributes(self) -> None:
        attr, layer = self.attr, self.layer
        for key, allowed in _REJECTED.items():
            if key in attr and attr[key] != allowed:
                raise self.fail(f"{key}={attr[key]} not supported")
        self.direction = _text(attr.get("direction", "forward"))
        if self.direction not in _DIRECTIONS:
            raise self.fail(f"direction='{self.direction}' is not one of {sorted(_DIRECTIONS)}")
        default = _DEFAULT_ACTIVATIONS[layer] * len(_DIRECTIONS[self.direction])
        acts = tuple(_text(a) for a in attr.get("activations", default))
        if acts != default:
            raise self.fail(
                f"activations={list(acts)} not supported (only the defaults {list(default)})"
            )
        self.layout = int(attr.get("layout", 0))
        self.lbr = bool(attr.get("linear_before_reset", 0)) if layer == "GRU" else False
        if self.layout not in (0, 1):
            raise self.fail(f"layout={self.layout} is not 0 or 1")

    def run(self) -> relax.Tuple:
        self.check_attributes()
        x = self.inputs[0]
        dtype = str(x.ty.dtype)
        if dtype != "float32":
            raise self.fail(f"dtype {dtype} not supported (float32 only)")
        if self.layout == 1:
            x = self.bb.emit(relax.op.permute_dims(x, [1, 0, 2]))
        n_t, n_b, n_in = _static_shape(x)
        kind = recurrent.kernel_kind(self.layer, self.lbr)
        n_dir = len(_DIRECTIONS[self.direction])
        w, r, b = (onnx_frontend.get_constant(self.inputs[i], self.params) for i in (1, 2, 3))
        hidden = _static_shape(r)[-1]
        if "hidden_size" in self.attr and int(self.attr["hidden_size"]) != hidden:
            raise self.fail(f"hidden_size={self.attr['hidden_size']} but R has {hidden} columns")
        expected = [n_dir, recurrent.GATES[kind] * hidden, n_in]
        if _static_shape(w) != expected:
            raise self.fail(f"W has shape {_static_shape(w)}, expected {expected}")
        lens = self.sequence_lens(n_t)
        states = [self.initial(i) for i in (5, 6)]
        peep = self.inputs[7] if self.layer == "LSTM" else None
        x_rows = self.bb.emit(relax.op.reshape(x, [n_t * n_b, n_in]))
        results = []
        for d, reverse in enumerate(_DIRECTIONS[self.direction]):
            pick = [
                None if v is None else self.direction_slice(v, d) for v in (w, r, b, peep, *states)
            ]
            results.append(
                self.direction_call(kind, x_rows, (n_t, n_b), hidden, reverse, lens, *pick)
            )
        return self.assemble(results)

    def sequence_lens(self, n_t: int) -> relax.Expr | None:
        """None if absent or a constant all equal to T; the input if the kernel must check it."""
        lens = onnx_frontend.get_constant(self.inputs[4], self.params)
        if lens is None:
            return None
        if isinstance(lens, tvm.ir.GenericConst):
            values = lens.value.numpy()
            if not np.all(values == n_t):
                raise self.fail(
                    f"sequence_lens={values.tolist()} not supported (only all equal to {n_t})"
                )
            return None
        if str(lens.ty.dtype) != "int32":
            lens = self.bb.emit(relax.op.astype(lens, "int32"))
        return lens

    def initial(self, index: int) -> relax.Expr | None:
        """initial_h / initial_c as [num_directions, B, H] (they are [B, D, H] in layout 1)."""
        value = self.inputs[index] if (index == 5 or self.layer == "LSTM") else None
        if value is not None and self.layout == 1:
            value = self.bb.emit(relax.op.permute_dims(value, [1, 0, 2]))
        return value

    def direction_slice(self, value, d: int):
        if isinstance(value, tvm.ir.GenericConst):
            return value.value.numpy()[d]
        part = self.bb.emit(relax.op.strided_slice(value, axes=[0], begin=[d], end=[d + 1]))
        return self.bb.emit(relax.op.squeeze(part, [0]))

    def pack(self, kind, hidden, batch, w, r, b, peep, dtype):
        """Weights in kernel order: by NumPy at import time when all are constants."""
        values = [v for v in (w, r, b, peep) if v is not None]
        if all(isinstance(v, np.ndarray) for v in values):
            ops, wrap = recurrent.NumpyOps, relax.const
        else:
            ops = _RelaxOps(self.bb)
            w, r, b, peep = (
                relax.const(v) if isinstance(v, np.ndarray) else v for v in (w, r, b, peep)
            )

            def wrap(v):
                return v

        packed = recurrent.pack_weights(kind, hidden, w, r, b, batch=batch, dtype=dtype, ops=ops)
        lay = recurrent.panel_layout(kind, hidden, batch)
        peep = None if peep is None else wrap(recurrent.pack_vector(peep, lay, ops))
        rbh = None if packed.rbh is None else wrap(packed.rbh)
        bias = None if packed.bias is None else wrap(packed.bias)
        return wrap(packed.w), bias, [wrap(p) for p in packed.r], peep, rbh

    def direction_call(self, kind, x_rows, steps, hidden, reverse, lens, w, r, b, peep, h0, c0):
        """One direction: projection (matmul + add on x as [T * B, I]), then the kernel call."""
        bb, dtype, (n_t, n_b) = self.bb, "float32", steps
        w, bias, r_panels, peep, rbh = self.pack(kind, hidden, n_b, w, r, b, peep, dtype)
        xw = bb.emit(relax.op.matmul(x_rows, w))
        if bias is not None:
            xw = bb.emit(relax.op.add(xw, bias))
        xw = bb.emit(relax.op.reshape(xw, [n_t, n_b, -1]))
        zeros = relax.const(np.zeros((n_b, hidden), dtype))
        state = [zeros if h0 is None else self.as_expr(h0)]
        opts = {"reverse": reverse, "check_lengths": lens is not None, "dtype": dtype}
        if self.layer == "LSTM":
            func = recurrent.lstm_recurrence(n_t, n_b, hidden, peephole=peep is not None, **opts)
            state.append(zeros if c0 is None else self.as_expr(c0))
        elif self.layer == "GRU":
            func = recurrent.gru_recurrence(n_t, n_b, hidden, linear_before_reset=self.lbr, **opts)
        else:
            func = recurrent.rnn_recurrence(n_t, n_b, hidden, **opts)
        args = [xw, *r_panels, *[v for v in (peep, rbh) if v is not None], *state]
        args += [lens] if lens is not None else []
        outs = [relax.TensorType((n_t, n_b, hidden), dtype)] + [
            relax.TensorType((n_b, hidden), dtype)
        ] * len(state)
        func = func.with_attr("tvm_sparse.node", self.name).without_attr("global_symbol")
        node = re.sub(r"\W", "_", self.name).strip("_") or "node"
        gvar = bb.add_func(
            func, f"{self.layer.lower()}_recurrence_{node}_{'rev' if reverse else 'fwd'}"
        )
        call = bb.emit(relax.call_tir(gvar, args, outs))
        return [bb.emit(relax.TupleGetItem(call, i)) for i in range(len(outs))]

    def as_expr(self, value):
        return relax.const(value) if isinstance(value, np.ndarray) else value

    def assemble(self, results: list[list[relax.Expr]]) -> relax.Tuple:
        """Per-direction (y [T, B, H], h [B, H], ...) to ONNX's Y [T, D, B, H], Y_h [D, B, H]."""
        bb = self.bb

        def stack(values, axis):
            if len(values) == 1:  # a reshape is a view, expand_dims would be a copy kernel
                shape = _static_shape(values[0])
                return bb.emit(relax.op.reshape(values[0], shape[:axis] + [1] + shape[axis:]))
            return bb.emit(relax.op.stack(values, axis))

        y = stack([res[0] for res in results], 1)
        finals = [stack([res[i] for res in results], 0) for i in range(1, len(results[0]))]
        if self.layout == 1:
            y = bb.emit(relax.op.permute_dims(y, [2, 0, 1, 3]))
            finals = [bb.emit(relax.op.permute_dims(f, [1, 0, 2])) for f in finals]
        return relax.Tuple([y, *finals])
