"""Block-sparse direct convolution: Y = conv2d(X, W) with W in BSR over its [O, kh*kw*I] view.

A KxK conv is a product W[O, K] . X[K, P] where row k = (ky, kx, i) of X is input plane i
shifted by the tap. Instead of materialising those K rows (im2col, 9x the input for 3x3),
the input is stored once as *phase planes*: ``Xq[i, a, b, y, x] = Xpad[i, y*sh + a,
x*sw + b]`` (``prepare``; for stride 1 just the zero-padded input). Every tap then reads a
contiguous window of one phase plane: row k of the im2col matrix starts at ``coloff[k]`` in
the flat ``Xq``, and ``pack`` stores that offset with each nonzero block column.

``bsr_conv2d`` is the broadcast-FMA of ``bsr_matmul.bsr_wx`` over a register tile of
``rows`` output rows x ``cols`` output columns (output columns are the vector lanes; whole
vectors are computed, only the valid lanes stored), writing NCHW directly. Parallel tasks
are spatial tiles (x groups of block rows when there are few tiles). The reduction runs in
chunks of input channels (blocks sorted by block row, chunk, column) so that one chunk's
input windows stay in L1 while every block row reads them; partial sums wait in Y. Bias,
ReLU and an optional residual input are fused into the final store.

Public functions
----------------
``ConvGeometry``      shapes, stride, padding, dilation of one conv (batch 1, NCHW, groups 1)
``prepare(geom)``     PrimFunc ``X[1, I, H, W] -> Xq[I*ph*pw*Hq*Wq + 16]`` (phase planes)
``default_kernel``    block shape -> ``ConvKernel`` (register tile, channel chunk) for a layer
``pack(view, ...)``   the [O, kh*kw*I] weight view -> ``PackedConv`` (data, offsets, chunkptr)
``bsr_conv2d(...)``   PrimFunc ``(Xq, data, offsets, chunkptr, bias[, res]) -> Y[1, O, OH, OW]``
``column_offsets``    where each im2col row starts in ``Xq``
``conv_tile``         the default register tile
``reference``         NumPy conv2d (float64) for tests
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from tvm_sparse._compat import ATTR_NOALIAS, ATTR_SCHEDULED

from .bsr_matmul import FLOAT_MIN

LANES = 16  # fp32 lanes of a zmm register
ACC_REGISTERS = 16  # accumulator zmm registers per tile (of 32: the rest load and broadcast)
MIN_TASKS = 8  # parallel tasks to aim for (2 cores, uneven sparse rows)
L1_BUDGET = 32 * 1024  # bytes of input window per channel chunk (Zen 5 L1D: 48 KiB)


@dataclass(frozen=True)
class ConvGeometry:
    """A batch-1 NCHW, groups-1 conv2d: input [1, I, H, W], weight [O, I, kh, kw]."""

    in_channels: int
    out_channels: int
    height: int
    width: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilation: tuple[int, int] = (1, 1)

    @property
    def out_hw(self) -> tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        pt, pl, pb, pr = self.padding
        oh = (self.height + pt + pb - dh * (kh - 1) - 1) // sh + 1
        ow = (self.width + pl + pr - dw * (kw - 1) - 1) // sw + 1
        return oh, ow

    @property
    def plane_hw(self) -> tuple[int, int]:
        """(Hq, Wq) of one phase plane: the output size plus the largest tap shift."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        oh, ow = self.out_hw
        return oh + (kh - 1) * dh // sh, ow + (kw - 1) * dw // sw

    @property
    def phases(self) -> tuple[int, int]:
        """Phase planes kept per dim: up to the largest phase a tap reads (1 for 1x1 convs)."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        return (
            max(ky * dh % sh for ky in range(kh)) + 1,
            max(kx * dw % sw for kx in range(kw)) + 1,
        )

    @property
    def reduction(self) -> int:
        """K of the [O, kh*kw*I] view."""
        return self.kernel[0] * self.kernel[1] * self.in_channels

    @property
    def flat_size(self) -> int:
        (hq, wq), (ph, pw) = self.plane_hw, self.phases
        return self.in_channels * ph * pw * hq * wq

    @property
    def buffer_size(self) -> int:
        """Floats of ``Xq``: the phase planes plus one vector of zero slack at the end."""
        return self.flat_size + LANES


def column_offsets(geom: ConvGeometry, padded_k: int) -> np.ndarray:
    """coloff[k]: where row k = (ky*kw + kx)*I + i of the im2col matrix starts in ``Xq``.

    Columns past K (padding to the block width) point at 0; their weights are zero.
    """
    (kh, kw), (sh, sw), (dh, dw) = geom.kernel, geom.stride, geom.dilation
    (hq, wq), (ph, pw) = geom.plane_hw, geom.phases
    ky, kx, i = np.meshgrid(
        np.arange(kh), np.arange(kw), np.arange(geom.in_channels), indexing="ij"
    )
    a, dy = (ky * dh) % sh, (ky * dh) // sh
    b, dx = (kx * dw) % sw, (kx * dw) // sw
    off = (((i * ph + a) * pw + b) * hq + dy) * wq + dx
    out = np.zeros(padded_k, np.int32)
    out[: geom.reduction] = off.reshape(-1)
    return out


def _attrs(func: tirx.PrimFunc, name: str) -> tirx.PrimFunc:
    func = func.without_attr("global_symbol")
    return func.with_attrs({ATTR_NOALIAS: True, ATTR_SCHEDULED: True, "tvm_sparse.kernel": name})


@functools.lru_cache(maxsize=256)
def prepare(geom: ConvGeometry) -> tirx.PrimFunc:
    """``Xq[i, a, b, y, x] = X[0, i, y*sh + a - pt, x*sw + b - pl]`` (0 outside), flattened;
    phases ``a < ph, b < pw`` (``geom.phases``).

    Rows outside the input are zero-filled; within a row, the columns every phase can read
    without a bounds test are one copy, the few border columns scalar. For stride 1 the copy
    is a TIR vector loop; for stride s it iterates (column, phase) so that LLVM vectorises
    the stride-s reads as an interleave group (wide loads and shuffles, not gathers).
    """
    ci, h, w = geom.in_channels, geom.height, geom.width
    (sh, sw), (pt, pl, _, _) = geom.stride, geom.padding
    (hq, wq), (ph, pw) = geom.plane_hw, geom.phases
    # Interior: x*sw + b - pl in [0, w) for every phase b < pw.
    lo = min(max(-(-pl // sw), 0), wq)
    hi = max(min((w - pw + pl) // sw + 1, wq), lo)
    plane, flat, size = hq * wq, geom.flat_size, geom.buffer_size

    @T.prim_func(s_tir=True)
    def kernel(X: T.Buffer((1, ci, h, w), "float32"), Xq: T.Buffer((size,), "float32")):
        for x in T.vectorized(LANES):
            with T.sblock("slack"):
                vx = T.axis.spatial(LANES, x)
                Xq[flat + vx] = T.float32(0)
        for c in T.parallel(ci):
            for a, yq in T.grid(ph, hq):
                with T.sblock("row"):
                    vc, va, vy = T.axis.remap("SSS", [c, a, yq])
                    T.reads(X[0, vc, 0:h, 0:w])
                    T.writes(Xq[0:flat])
                    src = T.meta_var(vy * sh + va - pt)
                    base = T.meta_var((vc * ph + va) * pw * plane + vy * wq)
                    if src >= 0 and src < h:
                        for b, x in T.grid(pw, lo):
                            Xq[base + b * plane + x] = T.if_then_else(
                                x * sw + b - pl >= 0 and x * sw + b - pl < w,
                                X[0, vc, src, x * sw + b - pl],
                                T.float32(0),
                            )
                        if sw == 1:
                            for x in T.vectorized(hi - lo):
                                Xq[base + lo + x] = X[0, vc, src, lo + x - pl]
                        else:
                            for x in range(hi - lo):
                                for b in T.unroll(pw):
                                    Xq[base + b * plane + lo + x] = X[
                                        0, vc, src, (lo + x) * sw + b - pl
                                    ]
                        for b, x in T.grid(pw, wq - hi):
                            Xq[base + b * plane + hi + x] = T.if_then_else(
                                (hi + x) * sw + b - pl < w,
                                X[0, vc, src, (hi + x) * sw + b - pl],
                                T.float32(0),
                            )
                    else:
                        for b in range(pw):
                            for x in T.vectorized(wq):
                                Xq[base + b * plane + x] = T.float32(0)

    return _attrs(kernel, "bsr_conv2d_prepare")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def conv_tile(rows_per_block: int, oh: int, ow: int) -> tuple[int, int]:
    """(output rows, output columns) per register tile for R-row blocks.

    Columns are the vector lanes: a divisor of OW of at most 4 vectors. Rows fill the
    accumulator budget (R per row-vector): ``ACC_REGISTERS``, but 8 for single-row blocks on
    maps wider than one vector (every FMA then needs its own load; measured 15-30 % faster
    than 16). Score: useful lanes x registers; ties go to the wider tile, whose row loads
    touch fewer cache lines (measured 5-15 % faster at widths 28 and 56).
    """
    budget = 8 if rows_per_block == 1 and ow > LANES else ACC_REGISTERS
    best, best_score = (1, 1), -1.0
    for cols in _divisors(ow):
        vecs = -(-cols // LANES)
        if rows_per_block * vecs > budget or vecs > 4:
            continue
        rows = max(d for d in _divisors(oh) if rows_per_block * d * vecs <= budget)
        score = cols / (vecs * LANES) * rows_per_block * rows * vecs
        if score >= best_score - 1e-9:
            best, best_score = (rows, cols), score
    return best


@dataclass(frozen=True)
class ConvKernel:
    """How one layer's sparse conv runs: block shape, register tile, channels per L1 chunk."""

    block: tuple[int, int]
    tile: tuple[int, int]
    chunk: int  # input channels whose tile windows are reduced before the next chunk's

    @property
    def name(self) -> str:
        return f"bsr_conv2d_{self.block[0]}x{self.block[1]}_f32"


def default_kernel(geom: ConvGeometry, block: tuple[int, int]) -> ConvKernel:
    """The register tile of :func:`conv_tile`; for single-row blocks at stride 1, channel
    chunks whose input windows (what one tile reads of each plane) fit ``L1_BUDGET`` bytes.

    Measured on Zen 5 (one thread, 90 % sparse ResNet-18 3x3 layers): chunks cut 1x1-block
    layers at stride 1 by 5-25 %, but slowed 4x1 blocks (each loaded vector feeds 4 FMAs,
    L2 keeps up) and stride-2 layers (few blocks per chunk: the partial-sum traffic costs
    more) by up to 1.5x.
    """
    oh, ow = geom.out_hw
    rows, cols = conv_tile(block[0], oh, ow)
    if block[0] > 1 or max(geom.stride) > 1:
        return ConvKernel(block, (rows, cols), geom.in_channels)
    (kh, kw), (dh, dw) = geom.kernel, geom.dilation
    window = (rows + (kh - 1) * dh) * (-(-cols // LANES) * LANES + (kw - 1) * dw)
    chunk = max(1, L1_BUDGET // (4 * window))
    if chunk < geom.in_channels:
        chunk = max(block[1], chunk // block[1] * block[1])
        chunks = -(-geom.in_channels // chunk)
        chunk = -(-geom.in_channels // chunks)  # even chunks
        chunk = -(-chunk // block[1]) * block[1]
    return ConvKernel(block, (rows, cols), min(chunk, geom.in_channels))


@dataclass(frozen=True)
class PackedConv:
    """A conv weight in the kernel's layout.

    Blocks are ordered by block row, then channel chunk, then column; ``offsets[b, kk]`` is
    where column ``kk`` of block ``b`` starts in ``Xq``; block row ``br`` of chunk ``j`` owns
    blocks ``chunkptr[br, j]:chunkptr[br, j + 1]``.
    """

    data: np.ndarray  # [nnzb, R, C] float32
    offsets: np.ndarray  # [nnzb, C] int32
    chunkptr: np.ndarray  # [O / R, chunks + 1] int32

    @property
    def nnzb(self) -> int:
        return int(self.data.shape[0])


def column_order(geom: ConvGeometry, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(perm, bounds): the view's columns chunk-major (chunk, tap, channel) and where each
    chunk starts in that order (``bounds[-1] == K``)."""
    taps, ci = geom.kernel[0] * geom.kernel[1], geom.in_channels
    perm, bounds = [], [0]
    for start in range(0, ci, chunk):
        stop = min(start + chunk, ci)
        for tap in range(taps):
            perm.extend(tap * ci + i for i in range(start, stop))
        bounds.append(len(perm))
    return np.array(perm, np.int64), np.array(bounds, np.int64)


def pack(view: np.ndarray, geom: ConvGeometry, kernel: ConvKernel) -> PackedConv:
    """Pack the [O, kh*kw*I] view of a conv weight for :func:`bsr_conv2d`."""
    from tvm_sparse.formats import to_bsr

    r, c = kernel.block
    perm, bounds = column_order(geom, kernel.chunk)
    bsr = to_bsr(view[:, perm], (r, c))
    coloff = column_offsets(geom, geom.reduction)
    cols = bsr.indices.astype(np.int64)[:, None] * c + np.arange(c)  # permuted positions
    valid = cols < geom.reduction
    offsets = np.where(valid, coloff[perm[np.minimum(cols, geom.reduction - 1)]], 0)
    starts = np.searchsorted(bounds, bsr.indices.astype(np.int64) * c, side="right") - 1
    nb = bsr.indptr.shape[0] - 1
    chunkptr = np.empty((nb, len(bounds)), np.int32)
    for br in range(nb):
        lo, hi = bsr.indptr[br], bsr.indptr[br + 1]
        chunkptr[br] = lo + np.searchsorted(starts[lo:hi], np.arange(len(bounds)), side="left")
    data = bsr.data.astype(np.float32)
    if bsr.nnzb == 0:  # keep the buffers non-empty; no block row reads them
        data, offsets = np.zeros((1, r, c), np.float32), np.zeros((1, c), np.int64)
    return PackedConv(
        np.ascontiguousarray(data), offsets.astype(np.int32), np.ascontiguousarray(chunkptr)
    )


@T.inline
def _tile_io(Y, res, acc, bias, row0, y0, x0, rows, r, start, width, mode, floor):
    """Move columns ``start:start+width`` of the tile between ``acc`` and ``Y``.

    mode "load": acc <- Y (partial sums of earlier chunks); "store": Y <- acc;
    "bias", "residual": Y <- max(acc + bias (+ res), floor).
    """
    for i in T.unroll(r):
        for y in T.unroll(rows):
            for j in T.vectorized(width):
                if mode == "load":
                    acc[i, y, start + j] = Y[0, row0 + i, y0 + y, x0 + start + j]
                elif mode == "store":
                    Y[0, row0 + i, y0 + y, x0 + start + j] = acc[i, y, start + j]
                elif mode == "residual":
                    Y[0, row0 + i, y0 + y, x0 + start + j] = T.max(
                        acc[i, y, start + j]
                        + bias[row0 + i]
                        + res[0, row0 + i, y0 + y, x0 + start + j],
                        T.float32(floor),
                    )
                else:
                    Y[0, row0 + i, y0 + y, x0 + start + j] = T.max(
                        acc[i, y, start + j] + bias[row0 + i], T.float32(floor)
                    )


def _tail_pieces(cols: int) -> list[tuple[int, int]]:
    """(start, width) of the partial vectors that end a tile row: 8, 4, 2 and 1 lanes, each
    present or (0, 0); whole vectors come before them."""
    start, pieces = cols // LANES * LANES, []
    for width in (8, 4, 2, 1):
        present = bool(cols % LANES & width)
        pieces.append((start, width) if present else (0, 0))
        start += width if present else 0
    return pieces


@functools.lru_cache(maxsize=256)
def bsr_conv2d(
    geom: ConvGeometry,
    kernel: ConvKernel,
    relu: bool = False,
    residual: bool = False,
) -> tirx.PrimFunc:
    """The sparse conv kernel for one geometry (the pattern and its block count are runtime
    data, so layers of one shape share the function; built once per process).

    Parameters
    ----------
    geom
        The conv's shapes; ``geom.out_channels`` must be a multiple of the block rows and
        the tile must divide the output (``default_kernel`` chooses one that does).
    kernel
        Block shape, register tile and channel chunk (see :func:`default_kernel`).
    relu
        Clamp at 0 after bias (and residual).
    residual
        Take an extra input ``res[1, O, OH, OW]`` added after the bias, before the ReLU.

    Returns
    -------
    tvm.tirx.PrimFunc
        ``(Xq[buffer_size], data[nnzb, R, C], offsets[nnzb, C], chunkptr[O/R, chunks + 1],
        bias[O][, res]) -> Y[1, O, OH, OW]``, ``nnzb`` symbolic.
    """
    (r, c), (rows, cols) = kernel.block, kernel.tile
    o = geom.out_channels
    oh, ow = geom.out_hw
    if o % r or oh % rows or ow % cols:
        raise ValueError(f"bsr_conv2d: {kernel} does not divide the output {o}x{oh}x{ow}")
    wq, size = geom.plane_hw[1], geom.buffer_size
    nb, nchunks = o // r, -(-geom.in_channels // kernel.chunk)
    # The tile computes whole vectors; lanes past `cols` are never stored (their loads stay
    # inside Xq thanks to its LANES floats of slack).
    vecs, full = -(-cols // LANES), cols // LANES
    (s8, w8), (s4, w4), (s2, w2), (s1, w1) = _tail_pieces(cols)
    spatial = (oh // rows) * (ow // cols)
    groups = max(d for d in _divisors(nb) if d <= max(1, -(-MIN_TASKS // spatial)))
    per, col_tiles = nb // groups, ow // cols
    floor = 0.0 if relu else FLOAT_MIN
    rs = (1, o, oh, ow) if residual else (1, 1, 1, 1)
    last = "residual" if residual else "bias"

    @T.inline
    def io(Y, res, acc, bias, row0, y0, x0, mode):
        for v in T.unroll(full):
            _tile_io(Y, res, acc, bias, row0, y0, x0, rows, r, v * LANES, LANES, mode, floor)
        if w8 > 0:
            _tile_io(Y, res, acc, bias, row0, y0, x0, rows, r, s8, w8, mode, floor)
        if w4 > 0:
            _tile_io(Y, res, acc, bias, row0, y0, x0, rows, r, s4, w4, mode, floor)
        if w2 > 0:
            _tile_io(Y, res, acc, bias, row0, y0, x0, rows, r, s2, w2, mode, floor)
        if w1 > 0:
            _tile_io(Y, res, acc, bias, row0, y0, x0, rows, r, s1, w1, mode, floor)

    @T.prim_func(s_tir=True)
    def func(
        Xq: T.Buffer((size,), "float32"),
        data_h: T.handle,
        offsets_h: T.handle,
        chunkptr: T.Buffer((nb, nchunks + 1), "int32"),
        bias: T.Buffer((o,), "float32"),
        res: T.Buffer(rs, "float32"),
        Y: T.Buffer((1, o, oh, ow), "float32"),
    ):
        nnzb = T.int32()
        data = T.match_buffer(data_h, (nnzb, r, c), "float32")
        offsets = T.match_buffer(offsets_h, (nnzb, c), "int32")
        for task in T.parallel(spatial * groups):
            for ch in range(nchunks):
                for bi in range(per):
                    with T.sblock("tile"):
                        vt, vch, vbi = T.axis.remap("SSS", [task, ch, bi])
                        T.reads(
                            Xq[0:size],
                            data[0:nnzb, 0:r, 0:c],
                            offsets[0:nnzb, 0:c],
                            chunkptr[0:nb, 0 : nchunks + 1],
                            bias[0:o],
                            res[0:1, 0 : rs[1], 0 : rs[2], 0 : rs[3]],
                            Y[0, 0:o, 0:oh, 0:ow],
                        )
                        T.writes(Y[0, 0:o, 0:oh, 0:ow])
                        acc = T.sblock_alloc_buffer(
                            (r, rows, vecs * LANES), "float32", scope="global"
                        )
                        row0 = T.meta_var(((vt % groups) * per + vbi) * r)
                        y0 = T.meta_var((vt // groups) // col_tiles * rows)
                        x0 = T.meta_var((vt // groups) % col_tiles * cols)
                        if vch == 0:
                            for i in T.unroll(r):
                                for y in T.unroll(rows):
                                    for j in T.vectorized(vecs * LANES):
                                        acc[i, y, j] = T.float32(0)
                        else:
                            io(Y, res, acc, bias, row0, y0, x0, "load")
                        for blk in range(chunkptr[row0 // r, vch], chunkptr[row0 // r, vch + 1]):
                            for kk in range(c):
                                for y in T.unroll(rows):
                                    for v in T.unroll(vecs):
                                        for i in T.unroll(r):
                                            for j in T.vectorized(LANES):
                                                acc[i, y, v * LANES + j] = (
                                                    acc[i, y, v * LANES + j]
                                                    + data[blk, i, kk]
                                                    * Xq[
                                                        offsets[blk, kk]
                                                        + (y0 + y) * wq
                                                        + x0
                                                        + v * LANES
                                                        + j
                                                    ]
                                                )
                        if vch == nchunks - 1:
                            io(Y, res, acc, bias, row0, y0, x0, last)
                        else:
                            io(Y, res, acc, bias, row0, y0, x0, "store")

    if not residual:  # drop the unused parameter
        params = [p for p in func.params if p.name != "res"]
        func = tirx.PrimFunc(params, func.body, func.ret_type, func.attrs)
    return _attrs(func, kernel.name)


def reference(
    x: np.ndarray,
    w: np.ndarray,
    geom: ConvGeometry,
    bias: np.ndarray | None = None,
    residual: np.ndarray | None = None,
    relu: bool = False,
) -> np.ndarray:
    """NumPy conv2d (float64, then float32) with the kernel's epilogue."""
    (kh, kw), (sh, sw), (dh, dw) = geom.kernel, geom.stride, geom.dilation
    pt, pl, pb, pr = geom.padding
    oh, ow = geom.out_hw
    xp = np.pad(x[0].astype(np.float64), ((0, 0), (pt, pb), (pl, pr)))
    out = np.zeros((w.shape[0], oh, ow))
    for ky in range(kh):
        for kx in range(kw):
            win = xp[
                :,
                ky * dh : ky * dh + sh * (oh - 1) + 1 : sh,
                kx * dw : kx * dw + sw * (ow - 1) + 1 : sw,
            ]
            out += np.einsum("oi,ihw->ohw", w[:, :, ky, kx].astype(np.float64), win)
    if bias is not None:
        out += bias.reshape(-1, 1, 1)
    if residual is not None:
        out += residual[0]
    if relu:
        out = np.maximum(out, 0)
    return out[None].astype(np.float32)
