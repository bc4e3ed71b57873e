"""Relax converters for ONNX Runtime's int8 contrib ops (domain ``com.microsoft``).

ONNX Runtime's quantizer writes these in QOperator format (QGemm, QLinearAdd, QLinearMul,
QLinearGlobalAveragePool, QLinearConcat, QLinearLeakyRelu, QLinearSigmoid) and in
``quantize_dynamic`` output (DynamicQuantizeLSTM). ONNX Runtime is their only reference, so
each converter computes what its CPU kernels compute: float32 requantization
(``saturate(round_half_even(float32(acc) * multiplier) + zero_point)``) with the multiplier
formed in float32 in the kernel's order. Where ORT's x86 kernels use a fixed-point shortcut
(QLinearMul, QLinearAdd) or an approximate activation (QLinearSigmoid), the result can differ
by one quantisation step at values close to a rounding tie: measured on 16384 random values,
QLinearMul differs on 24 (uint8) and 7 (int8), QLinearAdd and the activations on none.
"""

from __future__ import annotations

import re

import numpy as np
from tvm import relax

from tvm_sparse.schedules import int8_recurrent
from tvm_sparse.schedules.int8_recurrent import fits_int8

from .quant import (
    _QRANGE,
    _check_dtype,
    _check_quantized,
    _const,
    _Converter,
    _dtype,
    _FormError,
    _int32,
    _minus_zero_point,
    _np_const,
    _param,
    _shape,
    dynamic_quantize,
)

_DOMAIN = "com.microsoft"


def _f32(e: relax.Expr) -> relax.Expr:
    try:
        known = _dtype(e)
    except AttributeError:  # not normalized yet: its type is not inferred
        known = None
    return e if known == "float32" else relax.op.astype(e, "float32")


def _scalar(e: relax.Expr, what: str) -> relax.Expr:
    return _param(e, [], None, what)


def _saturate(real: relax.Expr, zp: relax.Expr | None, out_dtype: str) -> relax.Expr:
    """``saturate(round_half_even(real) + zp)`` of a float32 value, as MLAS requantizes."""
    q = relax.op.round(real)
    if zp is not None:
        q = relax.op.add(q, _f32(zp))
    lo, hi = _QRANGE[out_dtype]
    return relax.op.astype(relax.op.clip(q, lo, hi), out_dtype)


def _dequantize(x, scale, zp) -> relax.Expr:
    """``float32(x - zp) * scale``: exact integer difference, one float32 rounding."""
    return relax.op.multiply(_f32(_minus_zero_point(x, zp)), _f32(scale))


def _quantize(real, scale, zp, out_dtype) -> relax.Expr:
    """MlasQuantizeLinear: ``saturate(round(real / scale) + zp)``, a true float32 division."""
    return _saturate(relax.op.divide(real, _f32(scale)), zp, out_dtype)


def _qlinear_unary(inputs, fn) -> relax.Expr:
    """x, x_scale, x_zp, y_scale, y_zp: ORT tabulates quantize(fn(dequantize(v))) per byte."""
    x, x_scale, x_zp, y_scale, y_zp = (inputs[i] for i in range(5))
    _check_quantized(x, x_zp, "X")
    _check_dtype(y_zp, (_dtype(x),), "Y_zero_point")
    x_scale, y_scale = _scalar(x_scale, "X_scale"), _scalar(y_scale, "Y_scale")
    x_zp = None if x_zp is None else _scalar(x_zp, "X_zero_point")
    y_zp = None if y_zp is None else _scalar(y_zp, "Y_zero_point")
    return _quantize(fn(_dequantize(x, x_scale, x_zp)), y_scale, y_zp, _dtype(x))


class QGemm(_Converter):
    """``Y = alpha * (A - a_zp)(B - b_zp) + C`` (C int32 at scale a_scale * b_scale).

    Quantized Y when y_zero_point is given, float32 otherwise (scaled by
    ``alpha * a_scale * b_scale [/ y_scale]``); b_scale / b_zero_point per tensor or column.
    """

    op_type = "QGemm"

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        a, a_scale, a_zp, b, b_scale, b_zp = (inputs[i] for i in range(6))
        c, y_scale, y_zp = (inputs[i] if len(inputs) > i else None for i in (6, 7, 8))
        _check_quantized(a, a_zp, "A")
        _check_dtype(b, tuple(_QRANGE), "input B")
        _check_dtype(c, ("int32",), "bias C")
        trans_a, trans_b = int(attr.get("transA", 0)), int(attr.get("transB", 0))
        a_shape, b_shape = _shape(a), _shape(b)
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise _FormError(f"A of shape {a_shape} and B of shape {b_shape} (2-D only)")
        n = b_shape[0] if trans_b else b_shape[1]
        column = [n, 1] if trans_b else [1, n]
        a32 = _minus_zero_point(a, None if a_zp is None else _scalar(a_zp, "a_zero_point"))
        b_zp = None if b_zp is None else _param(b_zp, [n], 0, "b_zero_point")
        if b_zp is not None and _shape(b_zp) == [n]:  # per column: along B's N axis
            b_zp = _reshape_to(b_zp, column)
        b32 = _minus_zero_point(b, b_zp)
        if trans_a:
            a32 = relax.op.permute_dims(a32, [1, 0])
        if trans_b:
            b32 = relax.op.permute_dims(b32, [1, 0])
        acc = relax.op.matmul(a32, b32, out_dtype="int32")
        if c is not None:
            acc = relax.op.add(acc, c)
        mult = relax.op.multiply(
            _np_const(np.float32(attr.get("alpha", 1.0))), _f32(_scalar(a_scale, "a_scale"))
        )
        mult = relax.op.multiply(mult, _f32(_param(b_scale, [n], 0, "b_scale")))
        if y_scale is not None:
            mult = relax.op.divide(mult, _f32(_scalar(y_scale, "y_scale")))
        real = relax.op.multiply(_f32(acc), mult)
        if y_zp is None:
            return real
        _check_dtype(y_zp, tuple(_QRANGE), "y_zero_point")
        return _saturate(real, _scalar(y_zp, "y_zero_point"), _dtype(y_zp))


def _reshape_to(e: relax.Expr, shape: list[int]) -> relax.Expr:
    value = _const(e)
    return _np_const(value.reshape(shape)) if value is not None else relax.op.reshape(e, shape)


class _QLinearBinary(_Converter):
    """A, A_scale, A_zp, B, B_scale, B_zp, C_scale, C_zp with NumPy broadcasting."""

    @classmethod
    def _operands(cls, inputs):
        a, a_scale, a_zp, b, b_scale, b_zp, c_scale, c_zp = (inputs[i] for i in range(8))
        _check_quantized(a, a_zp, "A")
        _check_quantized(b, b_zp, "B")
        _check_dtype(b, (_dtype(a),), f"input B with {_dtype(a)} A")
        _check_dtype(c_zp, (_dtype(a),), "C_zero_point")
        a_zp, b_zp, c_zp = (
            None if z is None else _scalar(z, name)
            for z, name in ((a_zp, "A_zero_point"), (b_zp, "B_zero_point"), (c_zp, "C_zero_point"))
        )
        scales = [_f32(_scalar(s, n)) for s, n in ((a_scale, "A_scale"), (b_scale, "B_scale"))]
        return a, a_zp, b, b_zp, scales, _f32(_scalar(c_scale, "C_scale")), c_zp


class QLinearAdd(_QLinearBinary):
    """``C = saturate(round((a_scale (A - a_zp) + b_scale (B - b_zp)) / c_scale) + c_zp)``."""

    op_type = "QLinearAdd"

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        a, a_zp, b, b_zp, (sa, sb), sc, c_zp = cls._operands(inputs)
        total = relax.op.add(_dequantize(a, sa, a_zp), _dequantize(b, sb, b_zp))
        return _quantize(total, sc, c_zp, _dtype(a))


class QLinearMul(_QLinearBinary):
    """``C = saturate(round(a_scale (A - a_zp) * b_scale (B - b_zp) / c_scale) + c_zp)``."""

    op_type = "QLinearMul"

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        a, a_zp, b, b_zp, (sa, sb), sc, c_zp = cls._operands(inputs)
        product = relax.op.multiply(_dequantize(a, sa, a_zp), _dequantize(b, sb, b_zp))
        return _quantize(product, sc, c_zp, _dtype(a))


class QLinearGlobalAveragePool(_Converter):
    """Integer sum over the image minus ``x_zp * size``, requantized by
    ``x_scale / (y_scale * size)`` in float32; ``channels_last`` 0 (NCHW) or 1 (NHWC)."""

    op_type = "QLinearGlobalAveragePool"

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x, x_scale, x_zp, y_scale, y_zp = (inputs[i] for i in range(5))
        _check_quantized(x, x_zp, "X")
        _check_dtype(y_zp, (_dtype(x),), "y_zero_point")
        shape = _shape(x)
        if len(shape) < 3:
            raise _FormError(f"input X of shape {shape}")
        axes = list(range(1, len(shape) - 1)) if attr.get("channels_last", 0) else None
        axes = axes or list(range(2, len(shape)))
        size = int(np.prod([shape[i] for i in axes]))
        x_zp = None if x_zp is None else _scalar(x_zp, "x_zero_point")
        acc = relax.op.sum(_minus_zero_point(x, x_zp), axis=axes, keepdims=True)
        denominator = relax.op.multiply(
            _f32(_scalar(y_scale, "y_scale")), _np_const(np.float32(size))
        )
        mult = relax.op.divide(_f32(_scalar(x_scale, "x_scale")), denominator)
        y_zp = None if y_zp is None else _scalar(y_zp, "y_zero_point")
        return _saturate(relax.op.multiply(_f32(acc), mult), y_zp, _dtype(x))


class QLinearConcat(_Converter):
    """Y_scale, Y_zp, then (X, X_scale, X_zp) per input; inputs already at Y's scale and zero
    point are copied, the others requantized as ORT's lookup table does."""

    op_type = "QLinearConcat"

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        y_scale, y_zp = _scalar(inputs[0], "Y_scale"), inputs[1]
        if (len(inputs) - 2) % 3 or len(inputs) < 5:
            raise _FormError(f"{len(inputs)} inputs (expected 2 + 3 per tensor)")
        out_dtype = _dtype(inputs[2])
        _check_dtype(y_zp, (out_dtype,), "Y_zero_point")
        y_zp = _scalar(y_zp, "Y_zero_point")
        parts = []
        for k in range(2, len(inputs), 3):
            x, scale, zp = inputs[k], _scalar(inputs[k + 1], "scale"), inputs[k + 2]
            _check_quantized(x, zp, f"input {k // 3}")
            _check_dtype(x, (out_dtype,), f"input {k // 3} with {out_dtype} Y")
            zp = _scalar(zp, "zero point")
            same = [_const(v) for v in (scale, zp, y_scale, y_zp)]
            if all(v is not None for v in same) and same[0] == same[2] and same[1] == same[3]:
                parts.append(x)
            else:
                parts.append(_quantize(_dequantize(x, scale, zp), y_scale, y_zp, out_dtype))
        return relax.op.concat(parts, axis=int(attr["axis"]))


class QLinearLeakyRelu(_Converter):
    op_type = "QLinearLeakyRelu"

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        alpha = _np_const(np.float32(attr.get("alpha", 0.01)))
        return _qlinear_unary(
            inputs,
            lambda v: relax.op.where(
                relax.op.greater_equal(v, _np_const(np.float32(0))), v, relax.op.multiply(v, alpha)
            ),
        )


class QLinearSigmoid(_Converter):
    op_type = "QLinearSigmoid"

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        return _qlinear_unary(inputs, relax.op.sigmoid)


class DynamicQuantizeLSTM(_Converter):
    """ONNX Runtime's LSTM with int8/uint8 W [D, I, 4H] and R [D, H, 4H] (gates i, o, f, c).

    As ORT's CPU kernel: X (all steps of a direction at once) and then h of every step are
    quantized to uint8 from their own range (:func:`quant.dynamic_quantize`), multiplied with
    the weights in int32 (one weight zero point per direction: ORT reads the first), scaled by
    ``x_scale * w_scale`` (per tensor or per gate column) in float32; the bias W_b + R_b and
    the gate activations then run in float32. With H a multiple of 16 and R minus its zero
    point in int8 range, each direction is one fused VNNI kernel over the time steps
    (:mod:`tvm_sparse.schedules.int8_recurrent`, which the measured selection may swap for its
    16x4 block-sparse form); otherwise it is unrolled here in Relax ops, each step's
    quantization needing the previous step's h. Default activations only; no clip,
    input_forget or sequence_lens shorter than the sequence.
    """

    op_type = "DynamicQuantizeLSTM"

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x, w, r, bias, lens, h0, c0, peep = (inputs[i] for i in range(8))
        w_scale, w_zp, r_scale, r_zp = (inputs[i] for i in range(8, 12))
        direction = attr.get("direction", b"forward")
        direction = direction.decode() if isinstance(direction, bytes) else direction
        reverse = {"forward": (False,), "reverse": (True,), "bidirectional": (False, True)}
        if direction not in reverse:
            raise _FormError(f"direction={direction}")
        for key, default in (("clip", None), ("input_forget", 0), ("activations", None)):
            if key in attr and attr[key] != default:
                raise _FormError(f"{key}={attr[key]}")
        _check_dtype(x, ("float32",), "input X")
        n_t, n_b, _ = _shape(x)
        hidden = _shape(r)[1]
        if lens is not None:
            values = _const(lens)
            if values is None or not np.all(values == n_t):
                raise _FormError("sequence_lens other than the sequence length")
        outs = [[], [], []]
        name = attr.get("tvm_custom", {}).get("name") or "<unnamed>"
        for d, rev in enumerate(reverse[direction]):
            pick = [None if v is None else _direction(bb, v, d) for v in (h0, c0, peep, bias)]
            w_values, r_values = (
                _weight_values(v, s, z, d) for v, s, z in ((w, w_scale, w_zp), (r, r_scale, r_zp))
            )
            dims = (n_t, n_b, hidden)
            if int8_recurrent.panel_unit(hidden) is not None and fits_int8(r_values[0]):
                y, h, c = _fused_direction(bb, x, dims, rev, w_values, r_values, *pick, name)
            else:
                weights = [_as_consts(w_values), _as_consts(r_values)]
                y, h, c = _lstm_direction(bb, x, dims, rev, weights, *pick)
            for k, value in enumerate((y, h, c)):
                outs[k].append(value)
        y = relax.op.stack(outs[0], axis=1)  # [T, D, B, H]
        return relax.Tuple([y, relax.op.stack(outs[1], 0), relax.op.stack(outs[2], 0)])


def _direction(bb, value: relax.Expr, d: int) -> relax.Expr:
    folded = _const(value)
    if folded is not None:
        return _np_const(folded[d])
    return bb.emit(relax.op.squeeze(relax.op.strided_slice(value, [0], [d], [d + 1]), [0]))


def _weight_values(w, scale, zp, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Direction d of a quantized weight as ``int32(w - zp[d][0])`` and its float32 scale
    (per column, or a scalar)."""
    _check_dtype(w, tuple(_QRANGE), "quantized weight")
    values = [_const(v) for v in (w, scale, zp)]
    if any(v is None for v in values):
        raise _FormError("weights, scales or zero points that are not constants")
    w_val, s_val, z_val = values
    w32 = w_val[d].astype(np.int32) - np.int32(np.asarray(z_val).reshape(w_val.shape[0], -1)[d, 0])
    s_val = np.asarray(s_val, np.float32).reshape(w_val.shape[0], -1)[d]
    return w32, s_val if s_val.size > 1 else s_val.reshape(())


def _as_consts(values) -> tuple[relax.Expr, ...]:
    return tuple(_np_const(v) for v in values)


def _quantized_matmul(bb, a: relax.Expr, weight) -> relax.Expr:
    """ORT's quantized GEMM: a quantized from its own range, int32 product, float32 scale."""
    w32, w_scale = weight
    q, scale, zp = (bb.emit(e) for e in dynamic_quantize(a))
    a32 = relax.op.subtract(_int32(q), _int32(zp))
    acc = bb.emit(relax.op.matmul(a32, w32, out_dtype="int32"))
    return bb.emit(relax.op.multiply(_f32(acc), relax.op.multiply(scale, w_scale)))


def _projection(bb, x, n_t: int, n_b: int, w_weight) -> relax.Expr:
    """X (all steps at once) through ORT's quantized GEMM: [T, B, 4H]."""
    rows = bb.emit(relax.op.reshape(x, [n_t * n_b, _shape(x)[2]]))
    return bb.emit(relax.op.reshape(_quantized_matmul(bb, rows, w_weight), [n_t, n_b, -1]))


def _summed_bias(bb, bias, hidden: int) -> relax.Expr | None:
    """ORT adds W_b + R_b (summed once) after the two products."""
    if bias is None:
        return None
    b_val = _const(bias)
    if b_val is not None:
        return _np_const(b_val[: 4 * hidden] + b_val[4 * hidden :])
    return bb.emit(relax.op.add(*relax.op.split(bias, 2)))


def _int8_projection(bb, x, n_t: int, n_b: int, w_values) -> relax.Expr:
    """:func:`_projection` as one VNNI kernel (W minus its zero point in int8 range, the
    input size a multiple of 4); the same float32 arithmetic."""
    w32, w_scale = w_values
    n_in, n_out = w32.shape
    rows = bb.emit(relax.op.reshape(x, [n_t * n_b, n_in]))
    q, scale, zp = (bb.emit(e) for e in dynamic_quantize(rows))
    func = int8_recurrent.int8_projection(n_t * n_b, n_in, n_out)
    gvar = bb.add_func(func.without_attr("global_symbol"), "lstm_int8_projection")
    w_scale = np.broadcast_to(np.asarray(w_scale, np.float32), (n_out,))
    args = [
        q,
        bb.emit(relax.op.reshape(scale, [1])),
        bb.emit(relax.op.reshape(zp, [1])),
        _np_const(int8_recurrent.pack_projection(w32.astype(np.int8))),
        _np_const(w32.astype(np.int64).sum(axis=0).astype(np.int32)),
        _np_const(np.ascontiguousarray(w_scale)),
    ]
    y = bb.emit(relax.call_tir(gvar, args, relax.TensorType((n_t * n_b, n_out), "float32")))
    return bb.emit(relax.op.reshape(y, [n_t, n_b, n_out]))


def _fused_direction(bb, x, dims, reverse, w_values, r_values, h0, c0, peep, bias, name):
    """One direction as one int8 recurrent kernel call: returns (Y [T, B, H], h_T, c_T)."""
    n_t, n_b, hidden = dims
    if _shape(x)[2] % 4 == 0 and fits_int8(w_values[0]):
        xw = _int8_projection(bb, x, n_t, n_b, w_values)
    else:
        xw = _projection(bb, x, n_t, n_b, _as_consts(w_values))
    unit = int8_recurrent.panel_unit(hidden)
    r32, r_scale = r_values
    packed = int8_recurrent.pack_r(r32.astype(np.int8), unit)
    zeros = _np_const(np.zeros((n_b, hidden), np.float32))
    bias = _summed_bias(bb, bias, hidden)
    args = [
        xw,
        _np_const(packed.values),
        _np_const(packed.colsum),
        _np_const(int8_recurrent.pack_columns(r_scale, hidden, unit)),
        bias if bias is not None else _np_const(np.zeros(4 * hidden, np.float32)),
    ]
    if peep is not None:
        args.append(bb.emit(relax.op.reshape(peep, [3, hidden])))
    args += [zeros if h0 is None else h0, zeros if c0 is None else c0]
    func = int8_recurrent.lstm_int8_recurrence(
        n_t, n_b, hidden, peephole=peep is not None, reverse=reverse
    )
    func = func.with_attr("tvm_sparse.node", name).without_attr("global_symbol")
    node = re.sub(r"\W", "_", name).strip("_") or "node"
    gvar = bb.add_func(func, f"lstm_int8_recurrence_{node}_{'rev' if reverse else 'fwd'}")
    state = relax.TensorType((n_b, hidden), "float32")
    outs = [relax.TensorType((n_t, n_b, hidden), "float32"), state, state]
    call = bb.emit(relax.call_tir(gvar, args, outs))
    return [bb.emit(relax.TupleGetItem(call, i)) for i in range(3)]


def _lstm_direction(bb, x, dims, reverse, weights, h0, c0, peep, bias):
    """One direction, unrolled: returns (Y [T, B, H], h_T, c_T)."""
    n_t, n_b, hidden = dims
    proj = _projection(bb, x, n_t, n_b, weights[0])
    bias = _summed_bias(bb, bias, hidden)
    zeros = _np_const(np.zeros((n_b, hidden), np.float32))
    h, c = h0 if h0 is not None else zeros, c0 if c0 is not None else zeros
    p = None if peep is None else [_slice(bb, peep, k, hidden, axis=0) for k in range(3)]
    ys = []
    for t in reversed(range(n_t)) if reverse else range(n_t):
        step = bb.emit(relax.op.squeeze(relax.op.strided_slice(proj, [0], [t], [t + 1]), [0]))
        gates = bb.emit(relax.op.add(step, _quantized_matmul(bb, h, weights[1])))
        gi, go, gf, gc = (_slice(bb, gates, k, hidden) for k in range(4))
        if p is not None:  # peepholes P = [p_i, p_o, p_f]
            gi = bb.emit(relax.op.add(gi, relax.op.multiply(p[0], c)))
            gf = bb.emit(relax.op.add(gf, relax.op.multiply(p[2], c)))
        if bias is not None:
            gi, go, gf, gc = (
                bb.emit(relax.op.add(g, _slice(bb, bias, k, hidden, axis=0)))
                for k, g in enumerate((gi, go, gf, gc))
            )
        i, f = bb.emit(relax.op.sigmoid(gi)), bb.emit(relax.op.sigmoid(gf))
        c = bb.emit(relax.op.add(relax.op.multiply(c, f), relax.op.multiply(i, relax.op.tanh(gc))))
        if p is not None:
            go = bb.emit(relax.op.add(go, relax.op.multiply(p[1], c)))
        h = bb.emit(relax.op.multiply(relax.op.sigmoid(go), relax.op.tanh(c)))
        ys.append(h)
    ys = ys[::-1] if reverse else ys
    return bb.emit(relax.op.stack(ys, axis=0)), h, c


def _slice(bb, value, k: int, size: int, axis: int = 1) -> relax.Expr:
    folded = _const(value)
    if folded is not None:
        return _np_const(np.take(folded, range(k * size, (k + 1) * size), axis=axis))
    return bb.emit(relax.op.strided_slice(value, [axis], [k * size], [(k + 1) * size]))


CONVERTERS: dict[str, type] = {
    cls.op_type: cls
    for cls in (
        QGemm,
        QLinearAdd,
        QLinearMul,
        QLinearGlobalAveragePool,
        QLinearConcat,
        QLinearLeakyRelu,
        QLinearSigmoid,
        DynamicQuantizeLSTM,
    )
}
DOMAIN_OPS = {_DOMAIN: tuple(CONVERTERS)}
