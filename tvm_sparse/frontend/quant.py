"""Relax converters for ONNX QLinearConv, QLinearMatMul and ConvInteger (exact int32 arithmetic).

Integer products accumulate in int32 after the zero points are subtracted; requantization then
follows the ONNX reference implementation step by step: the multiplier
``a_scale * b_scale / y_scale`` in the scales' own dtype (float32 or float16), the product with
the accumulator in float64 (NumPy promotes int32 x float to float64), plus the output zero
point, rounded half to even and saturated. Constant parameters (the usual case: initializers)
are folded with NumPy at import time.

Also here: QuantizeLinear/DequantizeLinear overrides that add blocked quantization, which TVM's
converters reject (ONNX node tests ``test_quantizelinear_blocked_asymmetric`` and
``test_dequantizelinear_blocked``), and DynamicQuantizeLinear as ONNX Runtime computes it
(``quantize_dynamic`` output). ONNX Runtime's contrib ops are in :mod:`.quant_contrib`; the
forms rejected before import (int4, float8, ...) in :mod:`.quant_forms`.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .._compat import onnx_frontend
from ..errors import UnsupportedOpError

_QRANGE = {"int8": (-128, 127), "uint8": (0, 255)}
_SCALE_DTYPES = ("float32", "float16")


class _FormError(Exception):
    """A form of an op we do not compile; re-raised as UnsupportedOpError naming the node."""


class _Converter(onnx_frontend.OnnxOpConverter):
    """Base class: binds the opset so unsupported forms raise UnsupportedOpError with it.

    The result is normalized here so TVM's type inference fails inside the converter, where
    ``from_onnx`` attributes the failure to this node, rather than later in the importer.
    """

    op_type = ""

    @classmethod
    def get_converter(cls, opset):
        impl = super().get_converter(opset)

        def convert(bb, inputs, attr, params):
            try:
                return bb.normalize(impl(bb, inputs, attr, params))
            except _FormError as err:
                name = attr.get("tvm_custom", {}).get("name") or "<unnamed>"
                raise UnsupportedOpError(name, cls.op_type, opset, f"{err} not supported") from None

        return convert


# ----------------------------------------------------------------------------- helpers


def _dtype(e: relax.Expr) -> str:
    return str(e.ty.dtype)


def _shape(e: relax.Expr) -> list[int]:
    dims = e.ty.shape.values
    if any(not isinstance(d, tvm.tirx.IntImm) for d in dims):
        raise _FormError("dynamic shape")
    return [int(d) for d in dims]


def _const(e: relax.Expr | None) -> np.ndarray | None:
    """The value of a constant expression, or None when it is only known at run time."""
    return e.value.numpy() if isinstance(e, tvm.ir.GenericConst) else None


def _np_const(value: np.ndarray) -> relax.Expr:
    # relax.const silently narrows float64 to float32 and int64 to int32 unless told the dtype.
    value = np.asarray(value)
    return relax.const(value, str(value.dtype))


def _check_dtype(e: relax.Expr | None, allowed: tuple[str, ...], what: str) -> None:
    if e is not None and _dtype(e) not in allowed:
        raise _FormError(f"{_dtype(e)} {what}")


def _check_quantized(t: relax.Expr, zp: relax.Expr | None, name: str) -> None:
    """A quantized input is (u)int8 and its zero point has the same dtype."""
    _check_dtype(t, tuple(_QRANGE), f"input {name}")
    _check_dtype(zp, (_dtype(t),), f"{name}_zero_point for {_dtype(t)} input {name}")


def _reshape(e: relax.Expr, shape: list[int]) -> relax.Expr:
    value = _const(e)
    if value is not None:
        return _np_const(value.reshape(shape))
    return relax.op.reshape(e, shape)


def _param(
    e: relax.Expr, target: list[int], axis: int | None, what: str, batched: bool = False
) -> relax.Expr:
    """Reshape a scale or zero point to broadcast against `target`.

    A single element is per-tensor. With `axis`, a 1-D tensor of size ``target[axis]`` is
    per-axis; with `batched` too, so is a tensor of the target's rank that broadcasts to it and
    varies only along `axis` and the batch dims (QLinearMatMul's ``[D1, D2, M, 1]`` form).
    """
    shape = _shape(e)
    if int(np.prod(shape)) == 1:
        return _reshape(e, [])
    if axis is not None and len(target) > 0:
        axis = axis % len(target)
        if len(shape) == 1 and shape[0] == target[axis]:
            return _reshape(e, [target[axis] if i == axis else 1 for i in range(len(target))])
        if batched and len(shape) == len(target):
            batch = len(target) - 2
            if all(
                s == 1 or (s == t and (i == axis or i < batch))
                for i, (s, t) in enumerate(zip(shape, target, strict=True))
            ):
                return e
    expected = "one value" if axis is None else f"one value or {target[axis]}"
    raise _FormError(f"{what} of shape {shape} (expected {expected})")


def _minus_zero_point(t: relax.Expr, zp: relax.Expr | None) -> relax.Expr:
    """``int32(t) - int32(zp)``, folded when both are constants, skipped when zp is all zero."""
    t_val, zp_val = _const(t), _const(zp)
    if zp is not None and zp_val is not None and not zp_val.any():
        zp = None
    if zp is None:
        return _np_const(t_val.astype("int32")) if t_val is not None else _int32(t)
    if t_val is not None and zp_val is not None:
        return _np_const(t_val.astype("int32") - zp_val.astype("int32"))
    return relax.op.subtract(_int32(t), _int32(zp))


def _int32(e: relax.Expr) -> relax.Expr:
    return relax.op.astype(e, "int32")


def _check_scales(*scales: relax.Expr) -> None:
    dtypes = sorted({_dtype(s) for s in scales})
    if len(dtypes) != 1 or dtypes[0] not in _SCALE_DTYPES:
        raise _FormError(f"scales of dtype {' and '.join(dtypes)}")


def _multiplier(scales: list[relax.Expr], y_scale: relax.Expr) -> relax.Expr:
    """``s0 * s1 / y_scale`` in the scales' dtype, then float64, as NumPy evaluates it."""
    values = [_const(s) for s in [*scales, y_scale]]
    if all(v is not None for v in values):
        *factors, y = values
        return _np_const(np.asarray(factors[0] * factors[1] / y, dtype="float64"))
    product = relax.op.multiply(scales[0], scales[1])
    return relax.op.astype(relax.op.divide(product, y_scale), "float64")


def _requantize(acc: relax.Expr, mult: relax.Expr, y_zp: relax.Expr | None, out_dtype: str):
    """``saturate(round_half_even(acc * mult + y_zp))`` computed in float64."""
    real = relax.op.multiply(relax.op.astype(acc, "float64"), mult)
    if y_zp is not None:
        real = relax.op.add(real, relax.op.astype(y_zp, "float64"))
    lo, hi = _QRANGE[out_dtype]
    return relax.op.astype(relax.op.clip(relax.op.round(real), lo, hi), out_dtype)


def _conv_pads(attr: dict, spatial: list[int], kernel: list[int], strides, dilations) -> list[int]:
    """Explicit ONNX-order pads (all begins, then all ends), resolving auto_pad as ONNX does."""
    auto_pad = attr.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    nd = len(spatial)
    if auto_pad == "VALID":
        return [0] * (2 * nd)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        head, tail = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
            needed = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
            begin = (needed + 1) // 2 if auto_pad == "SAME_LOWER" else needed // 2
            head.append(begin)
            tail.append(needed - begin)
        return head + tail
    if auto_pad != "NOTSET":
        raise _FormError(f"auto_pad={auto_pad}")
    return list(attr.get("pads", [0] * (2 * nd)))


def _conv_int32(x32: relax.Expr, w32: relax.Expr, attr: dict, x_shape, w_shape) -> relax.Expr:
    """Integer convolution of already zero-point-shifted int32 operands, int32 accumulation."""
    nd = len(x_shape) - 2
    if nd not in (1, 2, 3):
        raise _FormError(f"{nd}-D convolution")
    kernel = list(w_shape[2:])
    if list(attr.get("kernel_shape", kernel)) != kernel:
        raise _FormError(f"kernel_shape {list(attr['kernel_shape'])} differing from w {kernel}")
    strides = list(attr.get("strides", [1] * nd))
    dilations = list(attr.get("dilations", [1] * nd))
    pads = _conv_pads(attr, list(x_shape[2:]), kernel, strides, dilations)
    op, data_layout, kernel_layout = {
        1: (relax.op.nn.conv1d, "NCW", "OIW"),
        2: (relax.op.nn.conv2d, "NCHW", "OIHW"),
        3: (relax.op.nn.conv3d, "NCDHW", "OIDHW"),
    }[nd]
    return op(
        x32,
        w32,
        strides=strides,
        padding=pads,
        dilation=dilations,
        groups=int(attr.get("group", 1)),
        data_layout=data_layout,
        kernel_layout=kernel_layout,
        out_dtype="int32",
    )


# ----------------------------------------------------------------------------- converters


class QLinearConv(_Converter):
    """``y = saturate(round((conv(x - x_zp, w - w_zp) + B) * x_scale * w_scale / y_scale + y_zp))``.

    x_scale, x_zero_point, y_scale and y_zero_point per tensor; w_scale and w_zero_point per
    tensor or per output channel.
    """

    op_type = "QLinearConv"

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, bias = (inputs[i] for i in range(9))
        _check_quantized(x, x_zp, "x")
        _check_quantized(w, w_zp, "w")
        _check_dtype(y_zp, tuple(_QRANGE), "zero point y_zero_point")
        _check_dtype(bias, ("int32",), "bias B")
        _check_scales(x_scale, w_scale, y_scale)
        out_dtype = _dtype(y_zp) if y_zp is not None else _dtype(x)
        x_shape, w_shape = _shape(x), _shape(w)
        out_channels = w_shape[0]
        x_zp = None if x_zp is None else _param(x_zp, x_shape, None, "x_zero_point")
        w_zp = None if w_zp is None else _param(w_zp, w_shape, 0, "w_zero_point")
        acc = _conv_int32(
            _minus_zero_point(x, x_zp), _minus_zero_point(w, w_zp), attr, x_shape, w_shape
        )
        per_channel = [1, out_channels] + [1] * (len(x_shape) - 2)
        if bias is not None:
            if _shape(bias) != [out_channels]:
                raise _FormError(f"bias B of shape {_shape(bias)}")
            acc = relax.op.add(acc, _reshape(bias, per_channel))
        x_scale = _param(x_scale, x_shape, None, "x_scale")
        w_scale = _param(w_scale, per_channel, 1, "w_scale")
        mult = _multiplier([x_scale, w_scale], _param(y_scale, [], None, "y_scale"))
        y_zp = None if y_zp is None else _param(y_zp, [], None, "y_zero_point")
        return _requantize(acc, mult, y_zp, out_dtype)


class QLinearMatMul(_Converter):
    """NumPy-matmul semantics; a per-tensor or per-row, b per-tensor or per-column, y per-tensor."""

    op_type = "QLinearMatMul"

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp = (inputs[i] for i in range(8))
        _check_quantized(a, a_zp, "a")
        _check_quantized(b, b_zp, "b")
        _check_dtype(y_zp, tuple(_QRANGE), "zero point y_zero_point")
        _check_scales(a_scale, b_scale, y_scale)
        out_dtype = _dtype(y_zp) if y_zp is not None else _dtype(a)
        a_shape, b_shape = _shape(a), _shape(b)
        # Per-row of a varies along axis -2, per-column of b along axis -1; 1-D operands of
        # numpy.matmul have no row/column to vary along.
        a_axis = -2 if len(a_shape) >= 2 else None
        b_axis = -1 if len(b_shape) >= 2 else None
        a_zp = None if a_zp is None else _param(a_zp, a_shape, a_axis, "a_zero_point", batched=True)
        b_zp = None if b_zp is None else _param(b_zp, b_shape, b_axis, "b_zero_point", batched=True)
        acc = relax.op.matmul(
            _minus_zero_point(a, a_zp), _minus_zero_point(b, b_zp), out_dtype="int32"
        )
        # The scales broadcast against the output, where a's rows are axis -2 and b's columns -1.
        a_scale = _param(a_scale, a_shape, a_axis, "a_scale", batched=True)
        b_scale = _param(b_scale, b_shape, b_axis, "b_scale", batched=True)
        mult = _multiplier([a_scale, b_scale], _param(y_scale, [], None, "y_scale"))
        y_zp = None if y_zp is None else _param(y_zp, [], None, "y_zero_point")
        return _requantize(acc, mult, y_zp, out_dtype)

    @classmethod
    def _impl_v21(cls, bb, inputs, attr, params):
        # Opset 21 only widens the type constraints (float16/bfloat16 scales, float8 tensors);
        # the dtype checks in v10 reject the forms we do not compile.
        return cls._impl_v10(bb, inputs, attr, params)


class ConvInteger(_Converter):
    """``y = conv(x - x_zero_point, w - w_zero_point)`` in int32.

    x_zero_point per tensor, w_zero_point per tensor or per output channel.
    """

    op_type = "ConvInteger"

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        x, w, x_zp, w_zp = (inputs[i] for i in range(4))
        _check_quantized(x, x_zp, "x")
        _check_quantized(w, w_zp, "w")
        x_shape, w_shape = _shape(x), _shape(w)
        x_zp = None if x_zp is None else _param(x_zp, x_shape, None, "x_zero_point")
        w_zp = None if w_zp is None else _param(w_zp, w_shape, 0, "w_zero_point")
        return _conv_int32(
            _minus_zero_point(x, x_zp), _minus_zero_point(w, w_zp), attr, x_shape, w_shape
        )


# ------------------------------------------------------------------ DynamicQuantizeLinear


def dynamic_quantize(x: relax.Expr) -> tuple[relax.Expr, relax.Expr, relax.Expr]:
    """uint8 ``(q, scale, zero_point)`` of a float32 tensor from its own range, as ONNX Runtime.

    ``scale = (max(x, 0) - min(x, 0)) / 255`` in float32 (1 when that range is empty, where the
    ONNX formula would divide by zero), ``zero_point = round(saturate(-min / scale))``,
    ``q = saturate(round(x / scale) + zero_point)``, rounding half to even. Scale and zero point
    keep x's rank (all dims 1): 0-d kernels trip the project's transpose schedule rule.
    """
    zero, one = _np_const(np.float32(0)), _np_const(np.float32(1))
    lo = relax.op.minimum(relax.op.min(x, keepdims=True), zero)
    hi = relax.op.maximum(relax.op.max(x, keepdims=True), zero)
    span = relax.op.subtract(hi, lo)
    scale = relax.op.where(
        relax.op.equal(span, zero), one, relax.op.divide(span, _np_const(np.float32(255)))
    )
    zp = relax.op.round(relax.op.clip(relax.op.negative(relax.op.divide(lo, scale)), 0, 255))
    q = relax.op.clip(relax.op.add(relax.op.round(relax.op.divide(x, scale)), zp), 0, 255)
    return relax.op.astype(q, "uint8"), scale, relax.op.astype(zp, "uint8")


class DynamicQuantizeLinear(_Converter):
    """ONNX DynamicQuantizeLinear (uint8), see :func:`dynamic_quantize`."""

    op_type = "DynamicQuantizeLinear"

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        _check_dtype(inputs[0], ("float32",), "input x")
        q, scale, zp = (bb.emit(e) for e in dynamic_quantize(inputs[0]))
        return relax.Tuple(
            [q, bb.emit(relax.op.reshape(scale, [])), bb.emit(relax.op.reshape(zp, []))]
        )


# ------------------------------------------------- QuantizeLinear / DequantizeLinear, blocked


def _blocked_param(e: relax.Expr, x_shape: list[int], axis: int, block: int, what: str):
    """Repeat a blocked scale or zero point to the shape of x (ONNX ``reshape_input``)."""
    shape = _shape(e)
    expected = list(x_shape)
    expected[axis] = -(-x_shape[axis] // block)
    if shape != expected:
        raise _FormError(f"blocked {what} of shape {shape} (expected {expected})")
    value = _const(e)
    if value is not None:
        full = np.repeat(value, block, axis=axis).take(range(x_shape[axis]), axis=axis)
        return _np_const(full)
    full = relax.op.repeat(e, block, axis=axis)
    if shape[axis] * block != x_shape[axis]:
        full = relax.op.strided_slice(full, [axis], [0], [x_shape[axis]])
    return full


def _blocked_setup(inputs, attr, x_dtypes: tuple[str, ...]):
    x, scale, zp = inputs[0], inputs[1], inputs[2]
    _check_dtype(scale, _SCALE_DTYPES, "scale with blocked quantization")
    x_shape = _shape(x)
    axis = attr.get("axis", 1) % len(x_shape)
    block = int(attr["block_size"])
    if block <= 0:
        raise _FormError(f"block_size={block}")
    scale = _blocked_param(scale, x_shape, axis, block, "scale")
    if zp is not None:
        _check_dtype(zp, x_dtypes, "zero point with blocked quantization")
        zp = _blocked_param(zp, x_shape, axis, block, "zero point")
    return x, scale, zp


class QuantizeLinear(_Converter, onnx_frontend.QuantizeLinear):
    """TVM's converter, plus blocked quantization to (u)int8.

    TVM raises on ``block_size`` != 0: fixes ``test_quantizelinear_blocked_asymmetric``.
    """

    op_type = "QuantizeLinear"

    @classmethod
    def _blocked(cls, bb, inputs, attr):
        if attr.get("precision", 0):
            raise _FormError("precision attribute")
        zp = inputs[2]
        out_dtype = _dtype(zp) if zp is not None else "uint8"
        if attr.get("output_dtype", 0):
            out_dtype = onnx_frontend.get_type(attr["output_dtype"])
        if out_dtype not in _QRANGE or (zp is not None and _dtype(zp) != out_dtype):
            raise _FormError(f"blocked quantization to {out_dtype}")
        _check_dtype(inputs[0], _SCALE_DTYPES, "input x with blocked quantization")
        x, scale, zp = _blocked_setup(inputs, attr, (out_dtype,))
        # ONNX: saturate(rint(x / scale) + zp), the division in NumPy's promoted dtype.
        work = str(np.result_type(_dtype(inputs[0]), _dtype(inputs[1])))
        q = relax.op.divide(relax.op.astype(x, work), relax.op.astype(scale, work))
        q = relax.op.round(q)
        if zp is not None:
            q = relax.op.add(q, relax.op.astype(zp, work))
        lo, hi = _QRANGE[out_dtype]
        return relax.op.astype(relax.op.clip(q, lo, hi), out_dtype)

    @classmethod
    def _impl_v21(cls, bb, inputs, attr, params):
        if attr.get("block_size", 0):
            return cls._blocked(bb, inputs, attr)
        return super()._impl_v21(bb, inputs, attr, params)

    @classmethod
    def _impl_v23(cls, bb, inputs, attr, params):
        if attr.get("block_size", 0):
            return cls._blocked(bb, inputs, attr)
        return super()._impl_v23(bb, inputs, attr, params)


class DequantizeLinear(_Converter, onnx_frontend.DequantizeLinear):
    """TVM's converter, plus blocked dequantization of (u)int8.

    TVM raises on ``block_size`` != 0: fixes ``test_dequantizelinear_blocked``.
    """

    op_type = "DequantizeLinear"

    @classmethod
    def _blocked(cls, bb, inputs, attr):
        x_dtype = _dtype(inputs[0])
        if x_dtype not in _QRANGE:
            raise _FormError(f"blocked dequantization of {x_dtype}")
        out_dtype = _dtype(inputs[1])
        if attr.get("output_dtype", 0):
            out_dtype = onnx_frontend.get_type(attr["output_dtype"])
        x, scale, zp = _blocked_setup(inputs, attr, (x_dtype,))
        # ONNX: (float32(x) - zp) * scale in float32, then cast to the output dtype.
        y = relax.op.astype(x, "float32")
        if zp is not None:
            y = relax.op.subtract(y, relax.op.astype(zp, "float32"))
        y = relax.op.multiply(y, relax.op.astype(scale, "float32"))
        return relax.op.astype(y, out_dtype) if out_dtype != "float32" else y

    @classmethod
    def _impl_v21(cls, bb, inputs, attr, params):
        if attr.get("block_size", 0):
            return cls._blocked(bb, inputs, attr)
        return super()._impl_v21(bb, inputs, attr, params)

    @classmethod
    def _impl_v23(cls, bb, inputs, attr, params):
        if attr.get("block_size", 0):
            return cls._blocked(bb, inputs, attr)
        return super()._impl_v23(bb, inputs, attr, params)


CONVERTERS: dict[str, type] = {
    "QLinearConv": QLinearConv,
    "QLinearMatMul": QLinearMatMul,
    "ConvInteger": ConvInteger,
    "DynamicQuantizeLinear": DynamicQuantizeLinear,
    "QuantizeLinear": QuantizeLinear,
    "DequantizeLinear": DequantizeLinear,
}
