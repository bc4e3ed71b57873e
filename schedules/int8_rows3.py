"""3x3 convs with few input channels (a network's stem) as int8 matmuls over kernel rows.

The reduction of a 3x3 conv is grouped by kernel row: group ``(c, dy)`` holds the 3 taps
``(c, dy, 0..2)`` and a zero, the 4 bytes of one ``vpdpbusd`` lane. For 16 output pixels of
one row, a group's activation bytes ``[x[s l], x[s l + 1], x[s l + 2], x[s l + 3]]`` (the
4th meets the zero weight) come from one 64-byte load of a padded input row and the byte
permute of `int8_depthwise` (its `llvm_ir`).
So the conv becomes: `pad` (quantize the float input into zero-point padded planes), `lanes`
(write ``Xp[C * 3, P, 4]``, the activation layout of `int8_matmul`) and the dense
`int8_matmul.int8_wx` kernel in its NCHW form over ``K = 12 C`` (a quarter of it zero).
"""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from tvm_sparse._compat import ATTR_NOALIAS, ATTR_SCHEDULED

from . import int8_depthwise as dw
from .int8_pack import OPAQUE, activation_byte
from .int8_vnni import GROUP, LANES
from .shuffles import IMPORT

KERNEL = dw.KERNEL
MAX_CHANNELS = 8  # input channels up to which a 3x3 conv goes this way (stems)


def _attrs(func: tirx.PrimFunc, name: str) -> tirx.PrimFunc:
    func = func.without_attr("global_symbol")
    return func.with_attrs(
        {ATTR_NOALIAS: True, ATTR_SCHEDULED: True, "tvm_sparse.kernel": name, "op_pattern": OPAQUE}
    )


def weight_matrix(weight: np.ndarray) -> np.ndarray:
    """[N, C, 3, 3] -> [N, 12 C]: column ``4 (3 c + dy) + dx`` = w[n, c, dy, dx], every 4th 0."""
    n, c = weight.shape[:2]
    out = np.zeros((n, c * KERNEL, GROUP), weight.dtype)
    out[:, :, :KERNEL] = weight.reshape(n, c * KERNEL, KERNEL)
    return out.reshape(n, c * KERNEL * GROUP)


def pad(
    channels: int,
    hw: tuple[int, int],
    stride: int,
    pads: tuple[int, int, int, int],
    x_dtype: str,
    x_zp: int,
    quantize: tuple[float, int] | None = None,
) -> tirx.PrimFunc:
    """X [1, C, H, W] ((u)int8, or float32 quantized with ``quantize=(scale, zp)``) ->
    planes [C, rows, row_len] uint8 (int8 shifted by +128), the zero point around."""
    h, w = hw
    _, _, rows, row_len = dw.geometry(hw, stride, pads)
    top, left = pads[0], pads[1]
    zp_in = x_zp + (128 if x_dtype == "int8" else 0)
    src_dtype = "float32" if quantize else x_dtype

    @T.prim_func(s_tir=True)
    def kernel(
        X: T.Buffer((1, channels, h, w), src_dtype),
        P: T.Buffer((channels, rows, row_len), "uint8"),
    ):
        with T.sblock("root"):
            T.reads(X[0, 0:channels, 0:h, 0:w])
            T.writes(P[0:channels, 0:rows, 0:row_len])
            for cr in T.parallel(channels * rows):
                for j64 in range(row_len // 64):
                    for j in T.vectorized(64):
                        P[cr // rows, cr % rows, j64 * 64 + j] = T.uint8(zp_in)
                if top <= cr % rows and cr % rows < top + h:
                    for j16 in range(w // LANES):
                        for j in T.vectorized(LANES):
                            P[cr // rows, cr % rows, left + j16 * LANES + j] = activation_byte(
                                X[0, cr // rows, cr % rows - top, j16 * LANES + j],
                                x_dtype,
                                quantize,
                            )
                    for j in range(w % LANES):
                        P[cr // rows, cr % rows, left + w // LANES * LANES + j] = activation_byte(
                            X[0, cr // rows, cr % rows - top, w // LANES * LANES + j],
                            x_dtype,
                            quantize,
                        )

    return _attrs(kernel, f"rows3_pad_{'quantize_' if quantize else ''}{x_dtype}")


def lanes(
    channels: int,
    hw: tuple[int, int],
    stride: int,
    pads: tuple[int, int, int, int],
    columns: int,
) -> tirx.PrimFunc:
    """planes [C, rows, row_len] -> Xp [3 C, columns, 4]: group (c, dy), output pixel p =
    oy Wo + ox: ``x[oy s + dy, ox s + 0..3]`` (the 4th byte meets a zero weight; padding
    columns past Ho Wo zero)."""
    ho, wo, rows, row_len = dw.geometry(hw, stride, pads)
    vectors, full = -(-wo // LANES), wo // LANES
    groups = channels * KERNEL
    p = ho * wo

    def permute(P, go, v):
        # lanes of group go // ho = (c, dy) for output row go % ho, pixels 16 v ..
        c, dy, oy = go // ho // KERNEL, go // ho % KERNEL, go % ho
        return dw.kernel_row_lanes(
            stride, P.vload([c, oy * stride + dy, stride * v * LANES], "uint8x64")
        )

    @T.prim_func(s_tir=True)
    def kernel(
        P: T.Buffer((channels, rows, row_len), "uint8"),
        Xp: T.Buffer((groups, columns, GROUP), "uint8"),
    ):
        with T.sblock("root"):
            T.reads(P[0:channels, 0:rows, 0:row_len])
            T.writes(Xp[0:groups, 0:columns, 0:GROUP])
            flat = T.decl_buffer((groups, columns * GROUP), "uint8", data=Xp.data)
            with T.attr(0, IMPORT, dw.llvm_ir(stride)):
                for go in T.parallel(groups * ho):
                    tail = T.alloc_buffer((LANES * GROUP,), "uint8")
                    for v in range(vectors):
                        row: T.let = permute(P, go, v)
                        if v < full:
                            flat[
                                go // ho,
                                ((go % ho) * wo + v * LANES) * GROUP : (
                                    (go % ho) * wo + v * LANES + LANES
                                )
                                * GROUP,
                            ] = row
                        else:
                            tail[0 : LANES * GROUP] = row
                            for j in range((wo - full * LANES) * GROUP):
                                flat[go // ho, ((go % ho) * wo + full * LANES) * GROUP + j] = tail[
                                    j
                                ]
                for g, j in T.grid(groups, (columns - p) * GROUP):  # padding columns
                    flat[g, p * GROUP + j] = T.uint8(0)

    return _attrs(kernel, "rows3_lanes")
