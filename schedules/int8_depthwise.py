"""int8 depthwise 3x3 convolution with AVX512-VNNI: NCHW (u)int8 in, requantized (u)int8 out.

Per channel c and output row, 16 output pixels at a time: each of the 3 kernel rows
contributes one ``vpdpbusd`` whose lane l holds the input bytes under the kernel row,
``[x[s l], x[s l + 1], x[s l + 2], x[s l + 3]]`` (s the stride), times the broadcast weight
word ``[w0, w1, w2, 0]``. The lanes are built from one 64-byte load of a padded copy of the
input row by a byte permute (`llvm_ir`, an LLVM IR helper: ``vpermb``), once per input row
for `ROWS` output rows. The padded rows hold the activation zero point at the borders, so
padding contributes exactly what the zero-point correction in the bias (``-x_zp * sum(w)``)
expects.

The epilogue is `int8_matmul`'s: ``clamp(rint(float32(acc + bias[c]) * scale[c]) + zp)``
(the accumulator starts at the bias),
ReLU as a clamp at the zero point. int8 activations are shifted into uint8 (+128, their zero
point too) while the rows are copied.
"""

from __future__ import annotations

import functools

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from tvm_sparse._compat import ATTR_NOALIAS, ATTR_SCHEDULED

from .int8_matmul import QRANGE, epilogue_bounds, parallel_chunks, requantize
from .int8_pack import SIGN_FLIP, activation_byte, byte_word
from .int8_vnni import GROUP, LANES, broadcast_word, vpdpbusd
from .shuffles import IMPORT

KERNEL = 3  # kernel height and width
ROWS = 4  # output rows computed together (stride 1: 6 permutes for 4 vectors)
ROW_SLACK = 64  # bytes past a padded row that a 64-byte load may touch


@functools.cache
def llvm_ir(stride: int) -> str:
    """``tvm_sparse_dw_lanes{stride}(<64 x i8> row) -> <64 x i8>``:
    ``out[4 l + e] = row[stride l + e]``. Byte e = 3 meets the zero byte of the weight word:
    not zeroing it keeps the permute single-source (``vpermb``; a zero source made it a
    ``vpermt2b`` plus a register clear)."""
    mask = ", ".join(f"i32 {stride * lane + e}" for lane in range(LANES) for e in range(4))
    return (
        f"define <64 x i8> @tvm_sparse_dw_lanes{stride}(<64 x i8> %row) {{\n"
        f"  %out = shufflevector <64 x i8> %row, <64 x i8> poison, <64 x i32> <{mask}>\n"
        "  ret <64 x i8> %out\n}\n"
    )


def weight_words(weight: np.ndarray) -> np.ndarray:
    """[C, 3, 3] int8 -> [C, 3] int32 words ``w0 | w1 << 8 | w2 << 16`` (byte 3 zero)."""
    c = weight.shape[0]
    padded = np.zeros((c, KERNEL, 4), np.int8)
    padded[:, :, :KERNEL] = weight.reshape(c, KERNEL, KERNEL)
    return padded.view(np.int32).reshape(c, KERNEL)


def output_size(size: int, stride: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - KERNEL) // stride + 1


def geometry(hw, stride, pads):
    """(Ho, Wo, padded plane rows, padded row length) of a 3x3 layer: the padded row holds
    every 64-byte load of its output vectors, in whole 64-byte vectors (a 176-lane vector
    store was split into byte inserts: 188 vs 8 us for 32 x 112 x 112)."""
    h, w = hw
    ho = output_size(h, stride, (pads[0], pads[2]))
    wo = output_size(w, stride, (pads[1], pads[3]))
    vectors = -(-wo // LANES)
    rows = max(h + pads[0] + pads[2], (ho - 1) * stride + KERNEL)
    row_len = -(-(stride * LANES * vectors + ROW_SLACK) // 64) * 64
    return ho, wo, rows, row_len


def kernel_row_lanes(stride: int, row):
    """The `vpdpbusd` operand of 16 output pixels under one kernel row, from the 64-byte
    value `row` of a padded input row (:func:`llvm_ir`'s permute)."""
    return T.call_extern("uint8x64", f"tvm_sparse_dw_lanes{stride}", row)


def depthwise3x3(
    channels: int,
    hw: tuple[int, int],
    stride: int,
    pads: tuple[int, int, int, int],
    x_dtype: str,
    x_zp: int,
    out_dtype: str = "uint8",
    zp: int = 0,
    relu: bool = False,
    packed_columns: int | None = None,
) -> tirx.PrimFunc:
    """The kernel for one layer.

    Parameters
    ----------
    channels, hw
        Input [1, C, H, W].
    stride, pads
        Stride (1 or 2) and padding (top, left, bottom, right).
    x_dtype, x_zp
        Activation type and zero point.
    out_dtype, zp, relu
        Output type, output zero point, ReLU fused as a clamp at the zero point.
    packed_columns
        Write the output as the next pointwise kernel reads it, ``Yp[C/4, packed_columns, 4]``
        uint8 (`int8_pack.from_kmajor`'s layout, int8 shifted by +128, zero padded): each
        thread stages 4 channels' outputs and interleaves them into words, instead of a
        separate pack kernel reading the whole tensor again (C % 4 == 0 required).

    Returns
    -------
    PrimFunc
        Arguments ``(X [1, C, H, W], words [C, 3] int32, bias [C] int32, scale [C] float32,
        Y [1, C, Ho, Wo] or Yp)``; ``bias`` already holds ``-x_zp' * sum(w[c])`` with x_zp' the
        zero point of the shifted activation.
    """
    if stride not in (1, 2):
        raise ValueError(f"depthwise stride {stride}: 1 or 2 supported")
    h, w = hw
    top, left = pads[0], pads[1]
    ho, wo, plane_rows, row_len = geometry(hw, stride, pads)
    vectors = -(-wo // LANES)
    w16, w16_ceil = w // LANES, -(-w // LANES)
    last_row = channels * h - 1  # the tensor's last row: no reading past it
    zp_in = x_zp + (128 if x_dtype == "int8" else 0)
    lo, hi = epilogue_bounds(out_dtype, zp, relu)
    pixels = ho * wo
    stage_len = pixels + LANES  # a staged channel, with slack for a row's run-on vector
    is_packed = packed_columns is not None
    yw_columns = packed_columns if is_packed else 1
    if not is_packed:
        chunks, per_chunk = parallel_chunks(channels)
        y_shape = (1, channels, ho, wo)
    else:
        if channels % GROUP or packed_columns < -(-pixels // LANES) * LANES:
            raise ValueError(
                f"packed output: {channels} channels (need a multiple of {GROUP}) and "
                f"{packed_columns} columns (need whole vectors over {pixels} pixels)"
            )
        chunks, groups_per_chunk = parallel_chunks(channels // GROUP)
        per_chunk = GROUP * groups_per_chunk  # a group's 4 channels stay in one thread
        y_shape = (channels // GROUP, packed_columns, GROUP)
    y_out = "uint8" if is_packed else out_dtype
    y_all = tuple(slice(0, d) for d in y_shape)
    stage_size = GROUP * stage_len if is_packed else 1
    flip = SIGN_FLIP if out_dtype == "int8" else 0
    full = wo // LANES  # output vectors with 16 valid pixels
    span = stride * (ROWS - 1) + KERNEL  # input rows under ROWS output rows

    def requant(acc, scale_c):  # the bias starts the accumulator
        return requantize(acc, None, scale_c, lo, hi, zp, out_dtype, lanes=LANES)

    def lanes(plane, slot, row, ox0):
        return kernel_row_lanes(stride, plane.vload([slot, row, stride * ox0], "uint8x64"))

    def dot(acc, a, word):  # the kernel row's weight word, shared by the 16 pixels
        return vpdpbusd(acc, a, broadcast_word(word, "int8"))

    def load_flat(xf, i):
        return activation_byte(xf[i], x_dtype, None)

    def load_x(X, c, iy, ix):
        return activation_byte(X[0, c, iy, ix], x_dtype, None)

    @T.macro
    def fill(plane, xf, X, slot, c):
        # channel c's rows into the plane's slot (the padding around them is left as it is)
        for iy in range(h):
            if w16 == w16_ceil or c * h + iy == last_row:
                for j16 in range(w16):
                    for j in T.vectorized(LANES):
                        plane[slot, top + iy, left + j16 * LANES + j] = load_x(
                            X, c, iy, j16 * LANES + j
                        )
                for j in range(w - w16 * LANES):
                    plane[slot, top + iy, left + w16 * LANES + j] = load_x(
                        X, c, iy, w16 * LANES + j
                    )
            else:
                # whole 16-byte vectors, reading on into the next row (not
                # past the tensor), then the zero point back over the excess
                # (14 scalar byte copies per row of a 14x14 map were ~40 % of
                # its layer)
                for j16 in range(w16_ceil):
                    for j in T.vectorized(LANES):
                        plane[slot, top + iy, left + j16 * LANES + j] = load_flat(
                            xf,
                            (c * h + iy) * w + j16 * LANES + j,
                        )
                for j in T.vectorized(LANES):
                    plane[slot, top + iy, left + w + j] = T.uint8(zp_in)

    @T.macro
    def store(yf, tail, out, ch, c, oy, v):
        at: T.let = (c * ho + oy) * wo + v * LANES
        if at + LANES <= T.min((ch + 1) * per_chunk, channels) * ho * wo:
            # whole vectors: a row's last one runs on into the rows (or the channel) after
            # it, written later by this thread (a byte at a time was ~1/3 of the 28x28 layers)
            yf[at : at + LANES] = out
        else:
            # at the chunk's end: the next chunk is another thread's, and the tensor ends
            tail[0:LANES] = out
            for j in range(wo - full * LANES):
                yf[at + j] = tail[j]

    @T.macro
    def emit(yf, tail, lanebuf, words, bias, scale, ch, c, oy, v, r0):
        # output vector v of row oy from the lanes of its kernel rows at lanebuf[r0 + 0..2]
        acc: T.let = dot(
            dot(
                dot(T.Broadcast(bias[c], LANES), lanebuf.vload([r0, 0], "uint8x64"), words[c, 0]),
                lanebuf.vload([r0 + 1, 0], "uint8x64"),
                words[c, 1],
            ),
            lanebuf.vload([r0 + 2, 0], "uint8x64"),
            words[c, 2],
        )
        out: T.let = requant(acc, scale[c])
        if is_packed:  # yf is the chunk's stage of 4 channels
            staged: T.let = (c % GROUP) * stage_len + oy * wo + v * LANES
            yf[staged : staged + LANES] = out
        else:
            store(yf, tail, out, ch, c, oy, v)

    def staged_word(stage, col):  # the 4 channels' bytes of one pixel as one word
        def byte(e):
            return tirx.Cast("int32", tirx.Cast("uint8", stage[e * stage_len + col]))

        return byte_word(byte, flip)

    @T.macro
    def interleave(yw, stage, g):
        # whole vectors (the stage's slack covers the last one), then the zero padding
        for v in range(-(-pixels // LANES)):
            for j in T.vectorized(LANES):
                yw[g, v * LANES + j] = staged_word(stage, v * LANES + j)
        for j in range(packed_columns - pixels):
            yw[g, pixels + j] = 0

    @T.macro
    def rows_at(yf, tail, lanebuf, plane, words, bias, scale, ch, c, slot, oy0, count, v):
        # vector v of `count` output rows from oy0 on, over the permuted input rows under them
        for r in T.unroll(stride * (count - 1) + KERNEL):
            lanebuf[r, 0:64] = lanes(plane, slot, oy0 * stride + r, v * LANES)
        for k in T.unroll(count):
            emit(yf, tail, lanebuf, words, bias, scale, ch, c, oy0 + k, v, k * stride)

    @T.prim_func(s_tir=True)
    def kernel(
        X: T.Buffer((1, channels, h, w), x_dtype),
        words: T.Buffer((channels, KERNEL), "int32"),
        bias: T.Buffer((channels,), "int32"),
        scale: T.Buffer((channels,), "float32"),
        Y: T.Buffer(y_shape, y_out),
    ):
        with T.sblock("root"):
            T.reads(
                X[0, 0:channels, 0:h, 0:w],
                words[0:channels, 0:KERNEL],
                bias[0:channels],
                scale[0:channels],
            )
            T.writes(Y[y_all])
            xf = T.decl_buffer((channels * h * w,), x_dtype, data=X.data)  # flat NCHW view
            yf = T.decl_buffer((channels * ho * wo,), out_dtype, data=Y.data)
            yw = T.decl_buffer((channels // GROUP, yw_columns), "int32", data=Y.data)
            with T.attr(0, IMPORT, llvm_ir(stride)):
                for ch in T.parallel(chunks):
                    # the channel's input plane padded with the zero point, filled once per
                    # channel and read long after (filling the 3 rows under each output row
                    # just before the vector loads stalled store forwarding: 77 vs 12 us)
                    plane = T.alloc_buffer((2, plane_rows, row_len), "uint8")
                    tail = T.alloc_buffer((LANES,), out_dtype)
                    lanebuf = T.alloc_buffer((span, 64), "uint8", scope="local")
                    stage = T.alloc_buffer((stage_size,), out_dtype)
                    out = stage if is_packed else yf
                    # the padding is the same for every channel and the row copies below
                    # leave it as it is: filled once per chunk
                    for slot, r in T.grid(2, plane_rows):
                        for j64 in range(row_len // 64):
                            for j in T.vectorized(64):
                                plane[slot, r, j64 * 64 + j] = T.uint8(zp_in)
                    # two planes: the next channel's is filled before this one's is read, so
                    # the vector loads do not wait on the row stores just made (alone,
                    # 1024 x 7 x 7: 10.9 -> 6.7 us, 512 x 14 x 14: 8.7 -> 6.3 us)
                    fill(plane, xf, X, 0, ch * per_chunk)
                    for cc in range(per_chunk):
                        if ch * per_chunk + cc < channels:
                            if cc + 1 < per_chunk and ch * per_chunk + cc + 1 < channels:
                                fill(plane, xf, X, (cc + 1) % 2, ch * per_chunk + cc + 1)
                            # ROWS output rows at a time share the permuted input rows
                            # under them (stride 1: 6 permutes for 4 vectors, not 12); their
                            # vectors last to first, so that a row's last vector, which runs
                            # on into the next row, is stored before that row's first
                            for og, vr in T.grid(ho // ROWS, vectors):
                                rows_at(
                                    out,
                                    tail,
                                    lanebuf,
                                    plane,
                                    words,
                                    bias,
                                    scale,
                                    ch,
                                    ch * per_chunk + cc,
                                    cc % 2,
                                    og * ROWS,
                                    ROWS,
                                    vectors - 1 - vr,
                                )
                            for oy, v in T.grid(ho % ROWS, vectors):  # the rows left, one by one
                                rows_at(
                                    out,
                                    tail,
                                    lanebuf,
                                    plane,
                                    words,
                                    bias,
                                    scale,
                                    ch,
                                    ch * per_chunk + cc,
                                    cc % 2,
                                    ho // ROWS * ROWS + oy,
                                    1,
                                    v,
                                )
                            if is_packed:
                                if (ch * per_chunk + cc) % GROUP == GROUP - 1:
                                    interleave(yw, stage, (ch * per_chunk + cc) // GROUP)

    func = kernel.without_attr("global_symbol")
    return func.with_attrs(
        {ATTR_NOALIAS: True, ATTR_SCHEDULED: True, "tvm_sparse.kernel": "dw3x3_u8s8"}
    )


def reference(
    x: np.ndarray,
    weight: np.ndarray,
    stride: int,
    pads: tuple[int, int, int, int],
    x_zp: int,
    bias: np.ndarray,
    scale: np.ndarray,
    out_dtype: str,
    zp: int,
    relu: bool,
) -> np.ndarray:
    """NumPy: int64 depthwise conv of ``x - x_zp`` (zero padding), + bias, requantized."""
    _, c, h, w = x.shape
    top, left, bottom, right = pads
    xp = np.pad(x.astype(np.int64) - x_zp, ((0, 0), (0, 0), (top, bottom), (left, right)))
    ho = output_size(h, stride, (top, bottom))
    wo = output_size(w, stride, (left, right))
    acc = np.zeros((c, ho, wo), np.int64)
    for dy in range(KERNEL):
        for dx in range(KERNEL):
            win = xp[0, :, dy : dy + stride * ho : stride, dx : dx + stride * wo : stride]
            acc += win * weight[:, dy, dx].astype(np.int64)[:, None, None]
    real = (acc + bias[:, None, None]).astype(np.float32) * scale[:, None, None]
    lo, hi = QRANGE[out_dtype]
    lo = max(lo, zp) if relu else lo
    return np.clip(np.rint(real) + zp, lo, hi).astype(out_dtype)[None]
