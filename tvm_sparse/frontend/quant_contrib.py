"""Relax converters for ONNX Runtime's int8 contrib ops (domain ``com.microsoft``).

ONNX Runtime's quantizer writes these in QOperator format (QGemm, QLinearAdd, QLinearMul,
QLinearGlobalAveragePool, QLinearConcat, QLinearLeakyRelu, QLinearSigmoid) and in
``quantize_dynamic`` output (DynamicQuantizeLSTM). ONNX Runtime is their only reference, so
each converter computes what its CPU kernels compute: float32 requantization
(``saturate(round_half_even(float32(acc) * multiplier) + zero_point)``) with the multiplier
formed in float32 in the kernel's order. Where ORT's x86 kernels use a fixed-point shortcut
(QLinearAdd) or an approximate activation table (QLinearSigmoid), the result can differ by
one quantisation step at values within ~2^-13 of a rounding tie.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from .quant import (
    _QRANGE,
    _check_dtype,
    _check_quantized,
    _const,
    _Converter,
    _dtype,
    _FormError,
    _minus_zero_point,
    _np_const,
    _param,
    _shape,
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
    )
}
DOMAIN_OPS = {_DOMAIN: tuple(CONVERTERS)}
