"""Activation packing for the int8 VNNI kernels: (u)int8 -> uint8 ``Xp[K/4, P, 4]`` (K-major).

Both packers write 32-bit words (4 reduction bytes of one column) through an int32 view of the
output, so the byte interleave becomes word arithmetic that vectorizes: ``from_kmajor`` (a
pointwise NCHW conv input [C, H*W]) zero-extends 4 rows and shifts them into one word per
column; ``from_rowmajor`` (a MatMul input [M, K], whose 4 consecutive bytes of a row already
are one word) is a word transpose. int8 activations are shifted into uint8 by flipping each
byte's top bit (x + 128); the kernels' zero-point correction accounts for it.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from tvm_sparse._compat import ATTR_NOALIAS, ATTR_SCHEDULED

from . import int8_quad as iq
from . import shuffles
from . import tile_transpose as tt
from .common import ON_STACK
from .int8_matmul import QRANGE, parallel_chunks
from .int8_vnni import GROUP, LANES

SIGN_FLIP = -2139062144  # 0x80808080 as int32: each byte's top bit, int8 -> uint8 + 128


def byte_word(byte, flip: int = 0):
    """One int32 word of 4 reduction bytes: ``byte(e)`` (an int32 in 0..255) in byte e,
    xor `flip` (`SIGN_FLIP` shifts int8 bytes into uint8)."""
    value = byte(0)
    for e in (1, 2, 3):
        value = value | tirx.shift_left(byte(e), 8 * e)
    return tirx.bitwise_xor(value, flip)


def _padded(k: int, p: int) -> tuple[int, int]:
    return -(-k // GROUP), -(-p // LANES) * LANES


OPAQUE = 8  # relax OpPatternKind kOpaque: FuseOps must not merge a packer (it aliases buffers)


def _attrs(func: tirx.PrimFunc, name: str) -> tirx.PrimFunc:
    func = func.without_attr("global_symbol")
    return func.with_attrs(
        {
            ATTR_NOALIAS: True,
            ATTR_SCHEDULED: True,
            "tvm_sparse.kernel": name,
            "op_pattern": OPAQUE,
        }
    )


def quantize_value(x, scale: float, zp: int, dtype: str):
    """ONNX QuantizeLinear of a float32 value as TVM legalizes it (``round(x / scale) + zp``,
    round half to even, saturated to `dtype`), as the int32 of the byte the kernels read
    (int8 shifted by +128)."""
    lo, hi = QRANGE[dtype]
    shift = 128 if dtype == "int8" else 0
    scaled = tirx.nearbyint(x / tirx.const(scale, "float32")) + tirx.const(float(zp), "float32")
    clamped = tirx.max(tirx.min(scaled, tirx.const(float(hi), "float32")), float(lo))
    return tirx.Cast("int32", clamped) + shift


def from_kmajor(
    k: int,
    p: int,
    dtype: str = "uint8",
    hw: tuple[int, int] | None = None,
    columns: int | None = None,
    quantize: tuple[float, int] | None = None,
) -> tirx.PrimFunc:
    """X[K, P] (or, with `hw`, the NCHW tensor [1, K, H, W], P = H * W) ->
    Xp[K/4, columns, 4], zero padded (K % 4 == 0 required; columns default ceil(P/16)*16).

    With ``quantize=(scale, zero_point)`` X is float32 and quantized to `dtype` on the way
    (QuantizeLinear fused into the pack: one pass over the activation instead of two)."""
    kg, pp = _padded(k, p)
    pp = columns or pp
    if k % GROUP:
        raise ValueError(f"reduction length {k} is not a multiple of {GROUP}")
    flip = SIGN_FLIP if dtype == "int8" and quantize is None else 0
    body = p // LANES * LANES
    x_shape = (1, k, *hw) if hw else (k, p)
    x_all = tuple(slice(0, d) for d in x_shape)
    x_dtype = "float32" if quantize else dtype

    def load(X, row, col):
        if quantize:
            return quantize_value(X[row, col], quantize[0], quantize[1], dtype)
        return tirx.Cast("int32", tirx.Cast("uint8", X[row, col]))

    def word(X, g, col):
        return byte_word(lambda e: load(X, g * 4 + e, col), flip)

    @T.prim_func(s_tir=True)
    def kernel(X: T.Buffer(x_shape, x_dtype), Xp: T.Buffer((kg, pp, 4), "uint8")):
        with T.sblock("root"):
            T.reads(X[x_all])
            T.writes(Xp[0:kg, 0:pp, 0:4])
            words = T.decl_buffer((kg, pp), "int32", data=Xp.data)
            flat = T.decl_buffer((k, p), x_dtype, data=X.data)  # NCHW [1, K, H, W] as [K, H*W]
            for g in T.parallel(kg):
                for v in range(body // LANES):
                    for j in T.vectorized(LANES):
                        words[g, v * LANES + j] = word(flat, g, v * LANES + j)
                for j in range(p - body):
                    words[g, body + j] = word(flat, g, body + j)
                if pp > p:  # padding columns (a scalar loop of 112 words per group at 28 x 28)
                    for j in T.vectorized(pp - p):
                        words[g, p + j] = 0

    return _attrs(kernel, f"pack_kmajor_{'quantize_' if quantize else ''}{dtype}")


def from_rowmajor(
    m: int, k: int, dtype: str = "uint8", columns: int | None = None
) -> tirx.PrimFunc:
    """X[M, K] -> Xp[K/4, ceil(M/16)*16, 4] (K % 4 == 0 required): a transpose of words."""
    kg, mp = _padded(k, m)
    mp = columns or mp
    if k % GROUP:
        raise ValueError(f"reduction length {k} is not a multiple of {GROUP}")
    flip = SIGN_FLIP if dtype == "int8" else 0

    @T.prim_func(s_tir=True)
    def kernel(X: T.Buffer((m, k), dtype), Xp: T.Buffer((kg, mp, 4), "uint8")):
        with T.sblock("root"):
            T.reads(X[0:m, 0:k])
            T.writes(Xp[0:kg, 0:mp, 0:4])
            src = T.decl_buffer((m, kg), "int32", data=X.data)
            words = T.decl_buffer((kg, mp), "int32", data=Xp.data)
            for g in T.parallel(kg):
                for i in range(mp):
                    words[g, i] = 0
                    if i < m:
                        words[g, i] = T.bitwise_xor(src[i, g], flip)

    return _attrs(kernel, f"pack_rowmajor_{dtype}")


#: `quantize_rowmajor` works on tiles of 64 reduction elements.
QUANTIZE_ROWMAJOR_MIN_K = 64


def quantize_rowmajor(
    m: int, k: int, scale: float, zp: int, dtype: str = "uint8", columns: int | None = None
) -> tirx.PrimFunc:
    """float32 X[M, K] -> Xp[K/4, columns, 4]: QuantizeLinear (per tensor) fused with
    `from_rowmajor`'s word transpose (K % 4 == 0 required).

    Per 16 rows x 64 columns: the row segments are quantized with contiguous vector loads
    into a 1 KB stack tile, whose bytes already are the 16 x 16 words of those rows, and the
    tile's words are transposed into Xp from there (one pass over the activation instead of a
    quantize pass plus a pack pass). Rows past M are zero. (The 16 x 16 register transpose of
    `tile_transpose` crashed at run time when called from this kernel; not investigated.)"""
    kg, mp = _padded(k, m)
    mp = columns or mp
    if k % GROUP or k < QUANTIZE_ROWMAJOR_MIN_K:
        raise ValueError(f"reduction length {k}: needs a multiple of {GROUP}, at least 64")
    g16 = kg // tt.TILE  # full tiles of 16 words along K
    m16 = -(-m // tt.TILE)
    span = tt.TILE * GROUP  # floats of one row per tile
    chunks, per_chunk = parallel_chunks(max(m16 * g16, 1))

    def word(X, i, g):
        value = quantize_value(X[i, g * 4], scale, zp, dtype)
        for e in (1, 2, 3):
            value = value | tirx.shift_left(
                quantize_value(X[i, g * 4 + e], scale, zp, dtype), 8 * e
            )
        return value

    @T.macro
    def tile_body(X, words, tile, tile_bytes, t):
        for r in range(tt.TILE):
            if (t % m16) * tt.TILE + r < m:
                for j in T.vectorized(span):
                    tile_bytes[r * span + j] = T.Cast(
                        "uint8",
                        quantize_value(
                            X[(t % m16) * tt.TILE + r, (t // m16) * span + j],
                            scale,
                            zp,
                            dtype,
                        ),
                    )
            else:
                for j in T.vectorized(tt.TILE):
                    tile[r * tt.TILE + j] = 0
        for w, i in T.grid(tt.TILE, tt.TILE):
            words[((t // m16) * tt.TILE + w) * mp + (t % m16) * tt.TILE + i] = tile[i * tt.TILE + w]

    @T.prim_func(s_tir=True)
    def kernel(X: T.Buffer((m, k), "float32"), Xp: T.Buffer((kg, mp, 4), "uint8")):
        with T.sblock("root"):
            T.reads(X[0:m, 0:k])
            T.writes(Xp[0:kg, 0:mp, 0:4])
            words = T.decl_buffer((kg * mp,), "int32", data=Xp.data)
            for ch in T.parallel(chunks):
                # the tile once per chunk, not per tile (each was a workspace call); the
                # 16-row blocks of one K tile are consecutive tiles (whole cache lines of
                # Xp per thread)
                tile = T.alloc_buffer((tt.TILE * tt.TILE,), "int32", annotations=ON_STACK)
                tile_bytes = T.decl_buffer((tt.TILE * span,), "uint8", data=tile.data)
                for tc in range(per_chunk):
                    if ch * per_chunk + tc < m16 * g16:
                        tile_body(X, words, tile, tile_bytes, ch * per_chunk + tc)
            for g in range(g16 * tt.TILE, kg):  # words past the last full tile
                for i in range(mp):
                    words[g * mp + i] = 0
                    if i < m:
                        words[g * mp + i] = word(X, i, g)
            for g, i in T.grid(g16 * tt.TILE, mp - m16 * tt.TILE):  # padding columns
                words[g * mp + m16 * tt.TILE + i] = 0

    return _attrs(kernel, f"pack_rowmajor_quantize_{dtype}")


def _flat_map(shape: tuple[int, ...], src_dtype: str, dst_dtype: str, value, name: str):
    """``dst[i] = value(src[i])`` over flat views of two tensors of `shape`: parallel 1024-element
    vector chunks, then the rest."""
    size = 1
    for d in shape:
        size *= int(d)
    chunk = 1024
    body = size // chunk * chunk
    full = tuple(slice(0, d) for d in shape)

    @T.prim_func(s_tir=True)
    def kernel(X: T.Buffer(shape, src_dtype), Y: T.Buffer(shape, dst_dtype)):
        with T.sblock("root"):
            T.reads(X[full])
            T.writes(Y[full])
            x = T.decl_buffer((size,), src_dtype, data=X.data)
            y = T.decl_buffer((size,), dst_dtype, data=Y.data)
            for c in T.parallel(body // chunk):
                for j in T.vectorized(chunk):
                    y[c * chunk + j] = value(x[c * chunk + j])
            for j in range(size - body):
                y[body + j] = value(x[body + j])

    return _attrs(kernel, name)


def quantize_flat(
    shape: tuple[int, ...], dtype: str, scale: float, zp: int, shift: bool = False
) -> tirx.PrimFunc:
    """QuantizeLinear (per tensor, float32 -> `dtype`) over a flat view of any shape, as
    `quantize_value` computes it; with `shift`, int8 results come out +128 as uint8 (the form
    the integer kernels read). TVM's legalized quantize of a 4-D tensor costs ~250 us for a
    32x112x112 map (div/mod indexing); this flat loop a few us."""
    out_dtype = "uint8" if shift else dtype
    offset = 0 if shift or dtype == "uint8" else -128  # quantize_value adds 128 for int8

    def value(x):
        return tirx.Cast(out_dtype, quantize_value(x, scale, zp, dtype) + offset)

    return _flat_map(shape, "float32", out_dtype, value, f"quantize_{dtype}")


def dequantize_flat(shape: tuple[int, ...], dtype: str, scale: float, zp: int) -> tirx.PrimFunc:
    """``float32(q - zp) * scale`` (per-tensor) over a flat view of any shape.

    The int8 kernels' outputs feed float layers (depthwise convs) through DequantizeLinear;
    TVM's legalized dequantize indexes the 4-D NCHW tensor with div/mod the vectorizer
    cannot fold (~100 us for a 64x112x112 map), a flat loop does the same in a few us.
    """

    def value(q):
        return tirx.Cast("float32", tirx.Cast("int32", q) - zp) * tirx.const(scale, "float32")

    return _flat_map(shape, dtype, "float32", value, f"dequantize_{dtype}")


# ------------------------------------------------- K-major bytes, for column-quad kernels
# The column-quad kernels (`int8_matmul.Int8Variant(gather=True)`) gather 4 arbitrary
# reduction rows per block, so they read the activation as K-major bytes Xk[K, P] (K padded to
# a multiple of 4 with zero rows, P to a multiple of 64 with zero columns). Their gather leaves
# each 64-column window in the order of `int8_quad.stored_column`: conv inputs are stored in
# that order (their outputs are written in natural order), MatMul inputs in natural order
# (the MatMul kernels map the columns back when they store their row-major output).


def activation_byte(x, dtype: str, quantize: tuple[float, int] | None):
    """The uint8 a kernel reads for activation value `x` (quantized, or int8 shifted by +128)."""
    if quantize:
        return tirx.Cast("uint8", quantize_value(x, quantize[0], quantize[1], dtype))
    if dtype == "int8":
        return tirx.Cast("uint8", tirx.Cast("int32", x) + 128)
    return x


#: Rows x reduction elements of the tiles `bytes_rowmajor` transposes (a 16 x 64 tile and
#: its transpose, 1 KB each, would leave the stack for workspace calls).
BYTE_TILE = (16, 32)


def _byte_columns(p: int, columns: int | None) -> int:
    pp = columns or -(-p // iq.WINDOW) * iq.WINDOW
    if pp % iq.WINDOW or pp < p:
        raise ValueError(f"columns {pp}: need a multiple of {iq.WINDOW} covering {p}")
    return pp


def bytes_kmajor(
    k: int,
    p: int,
    dtype: str = "uint8",
    hw: tuple[int, int] | None = None,
    columns: int | None = None,
    quantize: tuple[float, int] | None = None,
) -> tirx.PrimFunc:
    """X[K, P] (or the NCHW tensor [1, K, H, W]) -> Xk[ceil(K/4)*4, columns] uint8, windows
    permuted (quantizing float32 X with ``quantize=(scale, zero_point)``)."""
    pp, k4 = _byte_columns(p, columns), -(-k // GROUP) * GROUP
    w = iq.WINDOW
    full = p // w  # windows with no padding column
    x_shape = (1, k, *hw) if hw else (k, p)
    x_all = tuple(slice(0, d) for d in x_shape)
    x_dtype = "float32" if quantize else dtype

    @T.prim_func(s_tir=True)
    def kernel(X: T.Buffer(x_shape, x_dtype), Xk: T.Buffer((k4, pp), "uint8")):
        with T.sblock("root"):
            T.reads(X[x_all])
            T.writes(Xk[0:k4, 0:pp])
            flat = T.decl_buffer((k, p), x_dtype, data=X.data)  # NCHW [1, K, H, W] as [K, H*W]
            line = T.decl_buffer((k * p,), x_dtype, data=X.data)
            with T.attr(0, iq.IMPORT, iq.llvm_ir()):
                for c in T.parallel(k4):
                    tmp = T.alloc_buffer((w,), "uint8", annotations=ON_STACK)
                    if c < k:
                        for win in range(full):
                            for j in T.vectorized(w):
                                tmp[j] = activation_byte(flat[c, win * w + j], dtype, quantize)
                            Xk[c, win * w : win * w + w] = iq.permute(tmp.vload([0], "uint8x64"))
                        if full * w < p and c * p + full * w + w <= k * p:
                            # the partial window as a whole one: 64 bytes reading on into the
                            # next rows (not past the tensor), the excess zeroed (its scalar
                            # permuted copy was 17 us of 1024 x 7 x 7)
                            for j in T.vectorized(w):
                                tmp[j] = T.Select(
                                    full * w + j < p,
                                    activation_byte(line[c * p + full * w + j], dtype, quantize),
                                    T.uint8(0),
                                )
                            Xk[c, full * w : full * w + w] = iq.permute(tmp.vload([0], "uint8x64"))
                            for j in range(pp - full * w - w):  # columns past the window
                                Xk[c, full * w + w + j] = T.uint8(0)
                        else:
                            for s in range(pp - full * w):
                                Xk[c, full * w + s] = T.uint8(0)
                                if full * w + iq.stored_column(s) < p:
                                    Xk[c, full * w + s] = activation_byte(
                                        flat[c, full * w + iq.stored_column(s)], dtype, quantize
                                    )
                    else:
                        for j in T.vectorized(pp):
                            Xk[c, j] = T.uint8(0)

    return _attrs(kernel, f"bytes_kmajor_{'quantize_' if quantize else ''}{dtype}")


def bytes_rowmajor(
    m: int,
    k: int,
    dtype: str = "uint8",
    columns: int | None = None,
    quantize: tuple[float, int] | None = None,
) -> tirx.PrimFunc:
    """X[M, K] -> Xk[ceil(K/4)*4, columns] uint8, the transpose, columns in their natural
    order (the MatMul kernels undo the window order at their output instead, where it is
    free), quantizing float32 X with ``quantize=(scale, zero_point)``: per 16 rows x 32
    reduction elements, the rows go (quantized) into a stack tile with contiguous vector
    loads and come out as 32 rows of 16 bytes through the register transpose of
    `shuffles`. (Storing them at permuted positions instead became 16
    ``vpscatterqd`` per tile: 8 vs 4 us.)"""
    mp, k4 = _byte_columns(m, columns), -(-k // GROUP) * GROUP
    rows, cols = BYTE_TILE
    m16, kt = -(-m // rows), k // cols
    chunks, per_chunk = parallel_chunks(max(m16 * kt, 1))
    x_dtype = "float32" if quantize else dtype

    @T.macro
    def tile_body(X, Xk, tile, out, t):
        for r in range(rows):
            if (t % m16) * rows + r < m:
                for j in T.vectorized(cols):
                    tile[r, j] = activation_byte(
                        X[(t % m16) * rows + r, (t // m16) * cols + j],
                        dtype,
                        quantize,
                    )
            else:
                for j in T.vectorized(cols):
                    tile[r, j] = T.uint8(0)
        out[0 : rows * cols] = shuffles.transpose_tile(tile, rows, cols, "uint8", 0)
        for c in range(cols):
            for i in T.vectorized(rows):
                Xk[(t // m16) * cols + c, (t % m16) * rows + i] = out[c * rows + i]

    @T.prim_func(s_tir=True)
    def kernel(X: T.Buffer((m, k), x_dtype), Xk: T.Buffer((k4, mp), "uint8")):
        with T.sblock("root"):
            T.reads(X[0:m, 0:k])
            T.writes(Xk[0:k4, 0:mp])
            with T.attr(0, shuffles.IMPORT, shuffles.llvm_ir(rows, cols, "uint8")):
                if kt > 0:  # whole tiles
                    for ch in T.parallel(chunks):
                        # scratch once per chunk, not per tile (each was a workspace call); the
                        # 16-row blocks of one reduction tile are consecutive tiles, so one
                        # thread writes whole cache lines of Xk (2 threads sharing them made
                        # the 64 x 1024 pack slower than 1 thread)
                        tile = T.alloc_buffer((rows, cols), "uint8", annotations=ON_STACK)
                        out = T.alloc_buffer((rows * cols,), "uint8", annotations=ON_STACK)
                        for tc in range(per_chunk):
                            if ch * per_chunk + tc < m16 * kt:
                                tile_body(X, Xk, tile, out, ch * per_chunk + tc)
                for c, i in T.grid(k4 - kt * cols, mp):  # reduction rows past the last full tile
                    Xk[kt * cols + c, i] = T.uint8(0)
                    if i < m and kt * cols + c < k:
                        Xk[kt * cols + c, i] = activation_byte(X[i, kt * cols + c], dtype, quantize)
                for c, i in T.grid(kt * cols, mp - m16 * rows):  # padding columns
                    Xk[c, m16 * rows + i] = T.uint8(0)

    return _attrs(kernel, f"bytes_rowmajor_{'quantize_' if quantize else ''}{dtype}")
