"""Integer matmul kernels with AVX512-VNNI: Y[N, P] = requant(W[N, K] . X[K, P]), dense or BSR.

uint8 activations x int8 weights -> int32 accumulators -> requantized (u)int8, one kernel.
Activations come packed K-major in groups of 4 reduction elements, ``Xp[K/4, P, 4]`` (see
`pack_activations`), so 16 consecutive columns of one group are one 64-byte load: the lanes of
``vpdpbusd`` run over columns (MatMul rows, conv pixels) and each weight row contributes a
4-byte broadcast (`int8_vnni`). Pointwise NCHW convs are natively [C, H*W]; MatMul activations
get there through a small byte pack.

Weights are [out, in] blocks R x 4 (R output rows x 4 reduction elements): dense layers store
every block ``[N/R, K/4, R, 4]``, sparse ones only the nonzero blocks (BSR over the R x 4 grid).
A weight pruned with R x 1 blocks (e.g. 4x1) is stored as R x 4 blocks of aligned groups of 4
reduction elements; a group is kept when any of its 4 columns is nonzero.

The epilogue, per output row n: ``clamp(rint(float32(acc + bias[n]) * scale[n]) + zp, lo, hi)``
with rint rounding half to even, as ONNX Runtime's requantization (MLAS) does. ``bias`` already
holds the activation zero-point correction ``-x_zp * sum_k W[n, k]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import tirx
from tvm.s_tir import Schedule
from tvm.script import tirx as T

from tvm_sparse._compat import ATTR_NOALIAS, ATTR_SCHEDULED

from . import int8_quad, int8_vnni, shuffles
from .common import ON_STACK
from .int8_vnni import GROUP, LANES

ACCUMULATOR_BYTES = 1024  # "global" scratch up to this size is promoted to registers
QRANGE = {"uint8": (0, 255), "int8": (-128, 127)}
PARALLEL_CHUNKS = 8  # parallel loop iterations of a kernel (TVM splits them among threads)
WIDE_COLUMNS = 1024  # 1 x 4 BSR tiles of 8 vectors up to this many activation columns
STAGE_ROWS = 16  # row-major (MatMul) output: output rows requantized into a tile per store


@dataclass(frozen=True)
class Int8Variant:
    """An int8 kernel: block rows R (reduction always 4) and dense or sparse (BSR)."""

    rows: int
    sparse: bool = True
    gather: bool = False  # blocks of R rows x 4 arbitrary columns ("column quads")

    @property
    def name(self) -> str:
        if self.gather:
            return f"cq_wx_{self.rows}x{GROUP}_u8s8"
        kind = "bsr" if self.sparse else "dense"
        return f"{kind}_wx_{self.rows}x{GROUP}_u8s8"


VARIANTS: tuple[Int8Variant, ...] = (
    Int8Variant(4, sparse=False),
    Int8Variant(1),
    Int8Variant(4),
    Int8Variant(16),
    Int8Variant(4, gather=True),
)


def vectors_per_tile(rows: int, p: int, conv: bool = False) -> int:
    """16-column vectors per register tile: rows x vectors int32x16 within the budget (8 for
    single-row blocks of convs over at most `WIDE_COLUMNS` columns, see `padded_columns`)."""
    budget = ACCUMULATOR_BYTES // (4 * LANES * rows)
    wide = (8,) if conv and p <= WIDE_COLUMNS else ()
    for v in (*wide, 4, 3, 2, 1):
        if v <= budget and (p // LANES) % v == 0:
            return v
    return 1


def padded_columns(p: int, variant: Int8Variant | None = None, conv: bool = False) -> int:
    """Activation columns after padding: whole 16-lane vectors, rounded up to a multiple of 4
    (or 2) vectors when that wastes at most 1/8: a tile of one vector leaves too few
    independent accumulators (e.g. 14x14 maps, 13 vectors: 112 -> 59 us for 512x512).
    Column-quad kernels work on whole 64-column windows; 1 x 4 BSR convs (`conv`) on small maps
    on 8-vector tiles."""
    if variant is not None and variant.gather:
        return -(-p // int8_quad.WINDOW) * int8_quad.WINDOW
    vecs = -(-p // LANES)
    if conv and variant is not None and variant.sparse and variant.rows == 1:
        # 1 x 4 blocks on small maps: tiles of 8 vectors (one index and weight load per 8
        # `vpdpbusd`), worth up to 1/4 padding: 512 x 512 at 14 x 14 and 90 %, p = 256
        # columns, 17.6 us with 4-vector tiles, 15.8 us with 8 (p = 224, 2 vectors: 20 us)
        wide = -(-vecs // 8) * 8
        if wide * LANES <= WIDE_COLUMNS and (wide - vecs) * 4 <= vecs:
            return wide * LANES
    for tile in (4, 2):
        full = -(-vecs // tile) * tile
        if (full - vecs) * 8 <= vecs:
            return full * LANES
    return vecs * LANES


def pack_activations(x: np.ndarray) -> np.ndarray:
    """NumPy reference of the activation pack: X[K, P] (u)int8 -> Xp[ceil(K/4), ceil(P/16)*16, 4]
    uint8, zero padded; int8 activations are shifted by +128 (their zero point grows by 128)."""
    k, p = x.shape
    kp, pp = -(-k // GROUP) * GROUP, -(-p // LANES) * LANES
    if x.dtype == np.int8:
        x = (x.astype(np.int16) + 128).astype(np.uint8)
    padded = np.zeros((kp, pp), np.uint8)
    padded[:k, :p] = x
    return np.ascontiguousarray(padded.reshape(kp // GROUP, GROUP, pp).transpose(0, 2, 1))


def pack_bytes(x: np.ndarray, columns: int | None = None, permuted: bool = True) -> np.ndarray:
    """NumPy reference of the column-quad activation packs: X[K, P] (u)int8 ->
    Xk[ceil(K/4)*4, columns] uint8 (columns default: P rounded up to 64), zero padded, int8
    shifted by +128, each 64-column window in `int8_quad.stored_column` order (`permuted`,
    conv inputs) or not (MatMul inputs)."""
    k, p = x.shape
    pp = columns or -(-p // int8_quad.WINDOW) * int8_quad.WINDOW
    if x.dtype == np.int8:
        x = (x.astype(np.int16) + 128).astype(np.uint8)
    padded = np.zeros((-(-k // GROUP) * GROUP, pp), np.uint8)
    padded[:k, :p] = x
    if not permuted:
        return padded
    return np.ascontiguousarray(padded[:, [int8_quad.stored_column(i) for i in range(pp)]])


def _attrs(func: tirx.PrimFunc, name: str) -> tirx.PrimFunc:
    func = func.without_attr("global_symbol")
    return func.with_attrs({ATTR_NOALIAS: True, ATTR_SCHEDULED: True, "tvm_sparse.kernel": name})


def _tensorize(func: tirx.PrimFunc) -> tirx.PrimFunc:
    sch = Schedule(func)
    dot = sch.get_sblock("dot")
    sch.tensorize(sch.get_loops(dot)[-2], int8_vnni.register())
    return sch.mod["main"]


def epilogue_bounds(out_dtype: str, zp: int, relu: bool) -> tuple[float, float]:
    lo, hi = QRANGE[out_dtype]
    lo = max(lo, zp) if relu else lo
    return float(lo - zp), float(hi - zp)


def requantize(acc, bias, scale, lo, hi, zp, out_dtype, dequantize=None, lanes=1):
    """The epilogue of every int8 kernel, on an int32 accumulator (a scalar, or `lanes` lanes
    with scalar `bias` and `scale`; `bias` None: already in the accumulator):
    ``clamp(rint(float32(acc + bias) * scale), lo, hi)`` (`epilogue_bounds`) plus the zero
    point as `out_dtype`, or, with `dequantize`, that value's DequantizeLinear
    ``clamped * dequantize`` in float32."""

    def const(value, dtype="float32"):
        value = tirx.const(value, dtype)
        return value if lanes == 1 else tirx.Broadcast(value, lanes)

    def wide(value):
        return value if lanes == 1 else tirx.Broadcast(value, lanes)

    suffix = "" if lanes == 1 else f"x{lanes}"
    if bias is not None:
        acc = acc + wide(bias)
    real = tirx.Cast(f"float32{suffix}", acc) * wide(scale)
    if dequantize is not None:
        clamped = tirx.max(tirx.min(tirx.nearbyint(real), const(hi)), const(lo))
        return clamped * const(dequantize)
    # the bounds are integers, so clamping before rounding gives the same value; then one
    # rounding conversion (lrint: vcvtps2dq, half to even) instead of a round and a truncation
    clamped = tirx.max(tirx.min(real, const(hi)), const(lo))
    rounded = tirx.call_llvm_pure_intrin(f"int32{suffix}", "llvm.lrint", clamped)
    return tirx.Cast(f"{out_dtype}{suffix}", rounded + const(zp, "int32"))


def int8_wx(
    n: int,
    kg: int,
    p: int,
    variant: Int8Variant,
    nnzb: int = 0,
    out_dtype: str = "uint8",
    zp: int = 0,
    relu: bool = False,
    rows_out: int | None = None,
    conv_hw: tuple[int, int] | None = None,
    dequantize: float | None = None,
) -> tirx.PrimFunc:
    """The kernel for one layer shape.

    Parameters
    ----------
    n
        Output rows, a multiple of ``variant.rows`` (padded by the caller).
    kg
        Reduction groups of 4 (K padded to a multiple of 4).
    p
        Activation columns, a multiple of 16 (padded by the caller).
    variant
        Block rows and dense/sparse.
    nnzb
        Stored blocks (sparse only; a buffer size, the pattern itself is runtime data).
    out_dtype, zp, relu
        Output type, output zero point, ReLU fused as a clamp at the zero point.
    rows_out
        None: Y is [n, p] (a conv's [C, H*W]). An int M <= p: Y is [M, n], the row-major
        MatMul output, written transposed from the tile (columns past M dropped).
    conv_hw
        (H, W) with H * W <= p: Y is the NCHW conv output [1, n, H, W] (no reshape copy).
    dequantize
        The scale of a DequantizeLinear of the output, fused: Y is float32
        ``(q - zp) * dequantize``, computed as ``clamped * dequantize`` (the same value).

    Returns
    -------
    PrimFunc
        Arguments ``(Xp, data[, indices, indptr], bias, scale, Y)``, VNNI-tensorized.
    """
    r, mv = variant.rows, vectors_per_tile(variant.rows, p, conv=rows_out is None)
    if variant.gather:
        if p % int8_quad.WINDOW or r * int8_quad.WINDOW * 4 > ACCUMULATOR_BYTES:
            raise ValueError(f"column quads need {int8_quad.WINDOW}-column windows: p={p}, R={r}")
        mv = int8_quad.WINDOW // LANES
    pv, nb = mv * LANES, n // r
    lo, hi = epilogue_bounds(out_dtype, zp, relu)
    y_shape = (n, p) if rows_out is None else (rows_out, n)
    if conv_hw is not None:
        y_shape = (1, n, *conv_hw)
    p_valid = conv_hw[0] * conv_hw[1] if conv_hw else p

    y_dtype = "float32" if dequantize is not None else out_dtype
    staged = rows_out is not None and n % STAGE_ROWS == 0 and STAGE_ROWS % r == 0

    def q(acc_v, bias_v, scale_v):
        return requantize(acc_v, bias_v, scale_v, lo, hi, zp, out_dtype, dequantize)

    def column(j):
        # the output column of tile column j: column-quad kernels gather MatMul activations
        # (natural column order) into `int8_quad.stored_column` order
        return int8_quad.stored_column(j) if variant.gather and rows_out is not None else j

    def byte(value, pos):
        word = tirx.Cast("uint32", tirx.Cast("int32", value)) & tirx.const(255, "uint32")
        return word << tirx.Cast("uint32", pos * 8)

    @T.macro
    def requant(acc, bias, scale, Y, tile, vb, vp, g):
        # one block row's accumulators, requantized: into Y, or (staged) into the output tile
        if conv_hw is not None:  # Y is [1, n, H, W]: write it through a flat [n, H*W] view
            flat = T.decl_buffer((n, p_valid), y_dtype, data=Y.data)
            for i in T.unroll(r):
                for v in T.unroll(mv):
                    if vp * pv + v * 16 + 16 <= p_valid:
                        for j in T.vectorized(16):
                            flat[vb * r + i, vp * pv + v * 16 + j] = q(
                                acc[0, i, v * 16 + j], bias[vb * r + i], scale[vb * r + i]
                            )
                    else:
                        for j in range(16):
                            if vp * pv + v * 16 + j < p_valid:
                                flat[vb * r + i, vp * pv + v * 16 + j] = q(
                                    acc[0, i, v * 16 + j], bias[vb * r + i], scale[vb * r + i]
                                )
        elif staged and dequantize is not None:  # the float32 tile [STAGE_ROWS, pv]
            for i in T.unroll(r):
                for j in T.vectorized(pv):
                    tile[g * r + i, j] = q(acc[0, i, j], bias[vb * r + i], scale[vb * r + i])
        elif staged:  # the word tile [STAGE_ROWS / 4, pv]: byte (row % 4) of word row / 4
            for i in T.unroll(r):
                if (g * r + i) % 4 == 0:
                    for j in T.vectorized(pv):
                        tile[(g * r + i) // 4, j] = byte(
                            q(acc[0, i, j], bias[vb * r + i], scale[vb * r + i]), 0
                        )
                else:
                    for j in T.vectorized(pv):
                        tile[(g * r + i) // 4, j] = tile[(g * r + i) // 4, j] | byte(
                            q(acc[0, i, j], bias[vb * r + i], scale[vb * r + i]), (g * r + i) % 4
                        )
        elif rows_out is None:
            for i in T.unroll(r):
                for j in T.vectorized(pv):
                    Y[vb * r + i, vp * pv + j] = q(
                        acc[0, i, j], bias[vb * r + i], scale[vb * r + i]
                    )
        else:
            for j in range(pv):
                if column(j) < rows_out - vp * pv:
                    for i in T.unroll(r):
                        Y[vp * pv + column(j), vb * r + i] = q(
                            acc[0, i, j], bias[vb * r + i], scale[vb * r + i]
                        )

    @T.macro
    def zero(acc):
        for i in T.unroll(r):
            for j in T.vectorized(pv):
                acc[0, i, j] = 0

    words = STAGE_ROWS // 4

    @T.macro
    def store(tile, Y, vs, vp, scratch):
        if staged:  # (else requant wrote Y)
            # Column j of the tile is 16 consecutive output elements of row vp * pv + column(j) of
            # Y, stored together (64x1024x1024 at 90 % 1x4: one element per store down the
            # columns of Y, rows N bytes apart in a few L1 sets, 62 us; this 19 us), the tile
            # transposed 16 columns at a time in registers (`shuffles`).
            for c16 in range(pv // LANES):
                if dequantize is not None:  # float32 tile [16 rows, pv]: two halves of 8 columns
                    for half in range(2):
                        if half == 0:
                            scratch[0:128] = shuffles.transpose_tile(
                                tile, STAGE_ROWS, LANES, "float32", c16 * LANES, 0, 2
                            )
                        else:
                            scratch[0:128] = shuffles.transpose_tile(
                                tile, STAGE_ROWS, LANES, "float32", c16 * LANES, 1, 2
                            )
                        for c in range(8):
                            if column(c16 * LANES + half * 8 + c) < rows_out - vp * pv:
                                for i in T.vectorized(STAGE_ROWS):
                                    Y[
                                        vp * pv + column(c16 * LANES + half * 8 + c),
                                        vs * STAGE_ROWS + i,
                                    ] = scratch[c * STAGE_ROWS + i]
                else:  # word tile [4 words, pv]: 4 words (16 output bytes) per column
                    y32 = T.decl_buffer((rows_out, n // 4), "uint32", data=Y.data)
                    words_t = T.decl_buffer((LANES * words,), "uint32", data=scratch.data)
                    words_t[0 : LANES * words] = shuffles.transpose_tile(
                        tile, words, LANES, "uint32", c16 * LANES
                    )
                    for c in range(LANES):
                        if column(c16 * LANES + c) < rows_out - vp * pv:
                            for w in T.vectorized(words):
                                y32[vp * pv + column(c16 * LANES + c), vs * words + w] = words_t[
                                    c * words + w
                                ]

    g_rows = STAGE_ROWS // r if staged else 1
    if dequantize is not None:
        stage = ((STAGE_ROWS, pv), "float32")
    else:
        stage = ((words, pv), "uint32")
    args = (n, kg, p, r, mv, pv, nb, y_shape, y_dtype, zero, requant, g_rows, store)
    helpers = shuffles.llvm_ir(words, LANES, "uint32") + shuffles.llvm_ir(
        STAGE_ROWS, LANES, "float32", 2
    )
    args = (*args, stage, helpers)
    if variant.gather:
        func = _quad_kernel(*args, max(nnzb, 1))
    elif variant.sparse:
        func = _bsr_kernel(*args, max(nnzb, 1))
    else:
        func = _dense_kernel(*args)
    return _attrs(_tensorize(func), variant.name)


def parallel_chunks(stages: int) -> tuple[int, int]:
    """(parallel chunks, stages per chunk, the last chunk possibly short): `PARALLEL_CHUNKS`
    chunks at most. The scratch buffers (accumulators, output tile: 1 KB each) are allocated
    once per chunk: TVM's StorageRewrite drops their stack annotation, so each allocation is a
    workspace call (64x1024x1024 at 90 % 4x1: one per stage 19.9 us, one per chunk 15.7 us)."""
    chunks = min(PARALLEL_CHUNKS, stages)
    per_chunk = -(-stages // chunks)
    return -(-stages // per_chunk), per_chunk


def _dense_kernel(
    n, kg, p, r, mv, pv, nb, y_shape, out_dtype, zero, requant, g_rows, store, stage, helpers
):
    """`g_rows` block rows per tile, each requantized by `requant` (into Y or the output tile,
    which `store` then writes out)."""
    y_all = tuple(slice(0, d) for d in y_shape)
    chunks, per_chunk = parallel_chunks(nb // g_rows)

    @T.prim_func(s_tir=True)
    def kernel(
        Xp: T.Buffer((kg, p, 4), "uint8"),
        data: T.Buffer((nb, kg, r, 4), "int8"),
        bias: T.Buffer((n,), "int32"),
        scale: T.Buffer((n,), "float32"),
        Y: T.Buffer(y_shape, out_dtype),
    ):
        with T.attr(0, shuffles.IMPORT, helpers):
            for ch in T.parallel(chunks):
                acc = T.alloc_buffer((1, r, pv), "int32", annotations=ON_STACK)
                tile_buf = T.alloc_buffer(stage[0], stage[1], annotations=ON_STACK)
                scratch = T.alloc_buffer((128,), "float32", annotations=ON_STACK)
                for bs, p0 in T.grid(per_chunk, p // pv):
                    with T.sblock("tile"):
                        vs = T.axis.spatial(nb // g_rows, ch * per_chunk + bs)
                        vp = T.axis.spatial(p // pv, p0)
                        T.where(ch * per_chunk + bs < nb // g_rows)
                        T.reads(
                            Xp[0:kg, vp * pv : vp * pv + pv, 0:4],
                            data[vs * g_rows : vs * g_rows + g_rows, 0:kg, 0:r, 0:4],
                            bias[vs * g_rows * r : vs * g_rows * r + g_rows * r],
                            scale[vs * g_rows * r : vs * g_rows * r + g_rows * r],
                        )
                        T.writes(Y[y_all])
                        for g in range(g_rows):
                            zero(acc)
                            for gk in range(kg):
                                for i in T.unroll(r):
                                    for v in T.unroll(mv):
                                        for lane, e in T.grid(16, 4):
                                            with T.sblock("dot"):
                                                vr = T.axis.spatial(g_rows, g)
                                                vg, vi, vv, vl, ve = T.axis.remap(
                                                    "RSSSR", [gk, i, v, lane, e]
                                                )
                                                acc[0, vi, vv * 16 + vl] = acc[
                                                    0, vi, vv * 16 + vl
                                                ] + T.cast(
                                                    Xp[vg, vp * pv + vv * 16 + vl, ve], "int32"
                                                ) * T.cast(
                                                    data[vs * g_rows + vr, vg, vi, ve], "int32"
                                                )
                            requant(acc, bias, scale, Y, tile_buf, vs * g_rows + g, vp, g)
                        store(tile_buf, Y, vs, vp, scratch)

    return kernel


def _bsr_kernel(
    n, kg, p, r, mv, pv, nb, y_shape, out_dtype, zero, requant, g_rows, store, stage, helpers, nnzb
):
    """As `_dense_kernel`, over the stored blocks of each block row (BSR)."""
    y_all = tuple(slice(0, d) for d in y_shape)
    chunks, per_chunk = parallel_chunks(nb // g_rows)

    @T.prim_func(s_tir=True)
    def kernel(
        Xp: T.Buffer((kg, p, 4), "uint8"),
        data: T.Buffer((nnzb, r, 4), "int8"),
        indices: T.Buffer((nnzb,), "int32"),
        indptr: T.Buffer((nb + 1,), "int32"),
        bias: T.Buffer((n,), "int32"),
        scale: T.Buffer((n,), "float32"),
        Y: T.Buffer(y_shape, out_dtype),
    ):
        with T.attr(0, shuffles.IMPORT, helpers):
            for ch in T.parallel(chunks):
                acc = T.alloc_buffer((1, r, pv), "int32", annotations=ON_STACK)
                tile_buf = T.alloc_buffer(stage[0], stage[1], annotations=ON_STACK)
                scratch = T.alloc_buffer((128,), "float32", annotations=ON_STACK)
                for bs, p0 in T.grid(per_chunk, p // pv):
                    with T.sblock("tile"):
                        vs = T.axis.spatial(nb // g_rows, ch * per_chunk + bs)
                        vp = T.axis.spatial(p // pv, p0)
                        T.where(ch * per_chunk + bs < nb // g_rows)
                        T.reads(
                            Xp[0:kg, vp * pv : vp * pv + pv, 0:4],
                            data[0:nnzb, 0:r, 0:4],
                            indices[0:nnzb],
                            indptr[vs * g_rows : vs * g_rows + g_rows + 1],
                            bias[vs * g_rows * r : vs * g_rows * r + g_rows * r],
                            scale[vs * g_rows * r : vs * g_rows * r + g_rows * r],
                        )
                        T.writes(Y[y_all])
                        for g in range(g_rows):
                            zero(acc)
                            for blk in range(indptr[vs * g_rows + g], indptr[vs * g_rows + g + 1]):
                                col: T.let = indices[blk]
                                for i in T.unroll(r):
                                    for v in T.unroll(mv):
                                        for lane, e in T.grid(16, 4):
                                            with T.sblock("dot"):
                                                vj = T.axis.reduce(nnzb, blk)
                                                vi, vv, vl, ve = T.axis.remap(
                                                    "SSSR", [i, v, lane, e]
                                                )
                                                acc[0, vi, vv * 16 + vl] = acc[
                                                    0, vi, vv * 16 + vl
                                                ] + T.cast(
                                                    Xp[col, vp * pv + vv * 16 + vl, ve], "int32"
                                                ) * T.cast(data[vj, vi, ve], "int32")
                            requant(acc, bias, scale, Y, tile_buf, vs * g_rows + g, vp, g)
                        store(tile_buf, Y, vs, vp, scratch)

    return kernel


def _quad_kernel(
    n, kg, p, r, mv, pv, nb, y_shape, out_dtype, zero, requant, g_rows, store, stage, helpers, nnzb
):
    """As `_bsr_kernel`, for blocks of `r` rows x 4 arbitrary columns (`ColumnQuads`): the
    activation is K-major bytes ``Xk[K, P]``, each 64-column window in `int8_quad`'s stored
    order, and each block's 4 rows are gathered into VNNI order in registers."""
    y_all = tuple(slice(0, d) for d in y_shape)
    k = kg * GROUP
    chunks, per_chunk = parallel_chunks(nb // g_rows)

    @T.prim_func(s_tir=True)
    def kernel(
        Xk: T.Buffer((k, p), "uint8"),
        data: T.Buffer((nnzb, r, 4), "int8"),
        cols: T.Buffer((nnzb, 4), "int32"),
        indptr: T.Buffer((nb + 1,), "int32"),
        bias: T.Buffer((n,), "int32"),
        scale: T.Buffer((n,), "float32"),
        Y: T.Buffer(y_shape, out_dtype),
    ):
        with T.sblock("root"):
            T.reads(
                Xk[0:k, 0:p],
                data[0:nnzb, 0:r, 0:4],
                cols[0:nnzb, 0:4],
                indptr[0 : nb + 1],
                bias[0:n],
                scale[0:n],
            )
            T.writes(Y[y_all])
            with T.attr(0, shuffles.IMPORT, helpers + int8_quad.llvm_ir()):
                for ch in T.parallel(chunks):
                    acc = T.alloc_buffer((1, r, pv), "int32", annotations=ON_STACK)
                    tile_buf = T.alloc_buffer(stage[0], stage[1], annotations=ON_STACK)
                    scratch = T.alloc_buffer((128,), "float32", annotations=ON_STACK)
                    quad = T.alloc_buffer((pv, 4), "uint8", annotations=ON_STACK)
                    quad_words = T.decl_buffer((pv * 4,), "uint8", data=quad.data)
                    for bs, p0 in T.grid(per_chunk, p // pv):
                        with T.sblock("tile"):
                            vs = T.axis.spatial(nb // g_rows, ch * per_chunk + bs)
                            vp = T.axis.spatial(p // pv, p0)
                            T.where(ch * per_chunk + bs < nb // g_rows)
                            T.reads(
                                Xk[0:k, vp * pv : vp * pv + pv],
                                data[0:nnzb, 0:r, 0:4],
                                cols[0:nnzb, 0:4],
                                indptr[vs * g_rows : vs * g_rows + g_rows + 1],
                                bias[vs * g_rows * r : vs * g_rows * r + g_rows * r],
                                scale[vs * g_rows * r : vs * g_rows * r + g_rows * r],
                            )
                            T.writes(Y[y_all])
                            for g in range(g_rows):
                                zero(acc)
                                for blk in range(
                                    indptr[vs * g_rows + g], indptr[vs * g_rows + g + 1]
                                ):
                                    quad_words[0 : pv * 4] = int8_quad.gather(
                                        Xk, cols, blk, vp * pv
                                    )
                                    for i in T.unroll(r):
                                        for v in T.unroll(mv):
                                            for lane, e in T.grid(16, 4):
                                                with T.sblock("dot"):
                                                    vj = T.axis.reduce(nnzb, blk)
                                                    vi, vv, vl, ve = T.axis.remap(
                                                        "SSSR", [i, v, lane, e]
                                                    )
                                                    acc[0, vi, vv * 16 + vl] = acc[
                                                        0, vi, vv * 16 + vl
                                                    ] + T.cast(
                                                        quad[vv * 16 + vl, ve], "int32"
                                                    ) * T.cast(data[vj, vi, ve], "int32")
                                requant(acc, bias, scale, Y, tile_buf, vs * g_rows + g, vp, g)
                            store(tile_buf, Y, vs, vp, scratch)

    return kernel
