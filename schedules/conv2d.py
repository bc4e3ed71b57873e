"""NCHW conv2d rule: register-tiled direct convolution with fused padding and epilogues.

Matches the PrimFuncs Relax legalisation produces for ``conv2d_nchw`` / ``group_conv2d_nchw``
(dense, grouped and depthwise; any kernel size, stride and dilation): an optional padding
block, one reduction block ``out[n, co, oh, ow] += data[n, c, oh*s + ry*d, ow*s + rx*d] *
weight[co, rc, ry, rx]`` and elementwise epilogues (bias, ReLU, residual add, Clip), which are
computed straight from the register tile.

Two register tilings, both with the reduction loops (``rc, ry, rx``) outside the tile:

* :class:`ChannelTile` (dense convs, ``Co % 16 == 0``): ``16 * vectors`` output channels x
  ``pixels`` output columns. Output channels are the vector lanes, so every input pixel is a
  broadcast and stride, kernel size and odd widths cost nothing. The weight slice of the
  channel block is repacked to ``[ci, ry, rx, co]`` once per parallel task.
* :class:`RowTile` (depthwise, small groups, odd channel counts): ``co x rows x vectors *
  lanes`` with ``ow`` as the vector lanes; for stride ``s > 1`` the padded input is stored
  de-interleaved by ``w mod s`` so that the loads stay contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.sym import detect_linear_equation
from tvm.target import Target
from tvm.tirx import IndexMap

from .common import (
    choose_factor,
    const_extent,
    inline_epilogues,
    layout_free,
    normalize_prim_func,
    prepack,
)
from .spaces import Space, choose, register

ROLES = ("n", "co", "oh", "ow", "rc", "ry", "rx")
# Layouts ("data>output" when they differ): the roles of the output's indices, of the
# weight's indices, and the positions of (batch, channel, row, column) in the data. NHWC convs
# take OHWI weights; "NCHW>NHWC" is a model's first conv reading its NCHW input straight
# into the NHWC chain (passes.convert_layout).
LAYOUTS = {
    "NCHW": (("n", "co", "oh", "ow"), ("co", "rc", "ry", "rx"), (0, 1, 2, 3)),
    "NHWC": (("n", "oh", "ow", "co"), ("co", "ry", "rx", "rc"), (0, 3, 1, 2)),
    "NCHW>NHWC": (("n", "oh", "ow", "co"), ("co", "ry", "rx", "rc"), (0, 1, 2, 3)),
}
LANES = 16  # fp32 lanes of one zmm register
# Spread work over at least this many parallel tasks (2 cores, some load imbalance).
MIN_TASKS = 8


@dataclass(frozen=True)
class ChannelTile:
    """``vectors`` x 16 output channels times ``pixels`` consecutive output columns."""

    vectors: int
    pixels: int


@dataclass(frozen=True)
class RowTile:
    """``co`` channels x ``rows`` output rows x ``vectors`` x ``lanes`` output columns."""

    co: int
    rows: int
    vectors: int
    lanes: int


@dataclass
class ConvBlock:
    """The matched reduction block: one loop per surviving role, plus shape facts."""

    block: s_tir.schedule.SBlockRV
    loops: dict  # role -> LoopRV for the roles whose loop survived normalisation
    extents: dict  # role -> int (1 for roles normalisation dropped)
    stride: tuple[int, int]
    grouped: bool  # the data channel depends on the output channel (group or depthwise)
    data: tirx.Buffer
    weight: tirx.Buffer
    layout: str = "NCHW"  # a key of LAYOUTS

    @property
    def data_layout(self) -> str:
        return self.layout.split(">")[0]

    @property
    def out_layout(self) -> str:
        return self.layout.split(">")[-1]

    @property
    def depthwise(self) -> bool:
        """One input channel per output channel (the reduction is over the kernel only)."""
        return self.grouped and self.extents["rc"] == 1


def _uses(expr, var) -> bool:
    return var is not None and any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr))


def _linear(expr, var_list) -> list[int] | None:
    """Integer coefficients of `expr` in `var_list` then the constant; None if not affine."""
    present = [v for v in var_list if v is not None]
    coeffs = detect_linear_equation(expr, present)
    if not coeffs or any(not isinstance(c, tirx.IntImm) for c in coeffs):
        return None
    values = iter(int(c.value) for c in coeffs)
    return [next(values) if v is not None else 0 for v in var_list] + [next(values)]


def _bind_vars(region, roles, by_var, kind, var_of) -> bool:
    """Record the block var behind each index of `region` (constants allowed) under `roles`."""
    for role, rng in zip(roles, region):
        idx = rng.min
        if isinstance(idx, tirx.Var):
            if idx not in by_var or by_var[idx].kind != kind:
                return False
            var_of[role] = idx
        elif not isinstance(idx, tirx.IntImm):
            return False
    return True


def _bind_operands(data, weight, by_var, spatial_vars, layout: str):
    """Roles of every block var if `data` / `weight` read like conv2d input / kernel in
    `layout`, else None.

    The weight (OIHW or OHWI) names the reduction vars; the data's rows and columns must be
    affine in them (``oh*s + ry*d``), with its channel a function of co (groups) and rc only.
    """
    _, w_roles, (n_at, c_at, h_at, w_at) = LAYOUTS[layout]
    var_of = dict(spatial_vars)
    w_idx = [r.min for r in weight.region]
    if not (isinstance(w_idx[0], tirx.IntImm) or w_idx[0].same_as(var_of.get("co"))):
        return None
    if not _bind_vars(weight.region[1:], w_roles[1:], by_var, "R", var_of):
        return None
    if set(by_var) != set(var_of.values()) or len(var_of) != len(by_var):
        return None
    d_idx = [r.min for r in data.region]
    h = _linear(d_idx[h_at], [var_of.get("oh"), var_of.get("ry")])
    w = _linear(d_idx[w_at], [var_of.get("ow"), var_of.get("rx")])
    n_ok = isinstance(d_idx[n_at], tirx.IntImm) or d_idx[n_at].same_as(var_of.get("n"))
    c_vars = set(tirx.analysis.undefined_vars(d_idx[c_at]))
    if h is None or w is None or not n_ok or not c_vars <= {var_of.get("co"), var_of.get("rc")}:
        return None
    return var_of, (max(h[0], 1), max(w[0], 1)), _uses(d_idx[c_at], var_of.get("co"))


def match_conv2d(sch: s_tir.Schedule) -> ConvBlock | None:
    """Normalise `sch` and return its NCHW or NHWC convolution block, or None if it has none."""
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    reductions = [b for b in infos if b.is_reduction()]
    if len(reductions) != 1 or any(not b.is_injective() for b in infos if b is not reductions[0]):
        return None
    red = reductions[0]
    block = sch.get(red.block_rv)
    if len(block.writes) != 1 or len(block.writes[0].region) != 4:
        return None
    out = block.writes[0]
    if "float" not in str(out.source.dtype):
        return None
    reads = [r for r in block.reads if not r.source.same_as(out.source)]
    if len(reads) != 2 or any(len(r.region) != 4 for r in reads):
        return None
    by_var = {it.var: it for it in red.iters}
    bound = None
    for layout, (out_roles, _, _) in LAYOUTS.items():
        spatial: dict = {}
        if not _bind_vars(out.region, out_roles, by_var, "S", spatial):
            continue
        for data, weight in (reads, reads[::-1]):
            bound = _bind_operands(data, weight, by_var, spatial, layout)
            if bound is not None:
                break
        if bound is not None:
            break
    if bound is None:
        return None
    var_of, stride, grouped = bound
    extents = {role: 1 for role in ROLES}
    loops = {}
    for role, var in var_of.items():
        extent = const_extent(by_var[var].dom)
        if extent is None:
            return None
        extents[role] = extent
        loops[role] = by_var[var].loop_rv
    return ConvBlock(
        block=red.block_rv,
        loops=loops,
        extents=extents,
        stride=stride,
        grouped=grouped,
        data=data.source,
        weight=weight.source,
        layout=layout,
    )


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def _choices(candidates, default: int, fits) -> list[int]:
    """The candidates that `fits` accepts, plus the default (always a valid choice)."""
    return sorted({c for c in candidates if fits(c)} | {default})


def _divisors(n: int, at_most: int, default: int) -> list[int]:
    return _choices(range(1, at_most + 1), default, lambda d: n % d == 0)


def channel_tile_ok(conv: ConvBlock) -> bool:
    """Whether output channels can be the vector lanes: dense convs with ``Co % 16 == 0``,
    and NHWC depthwise convs (there the data's channels are the same lanes)."""
    if conv.extents["co"] % LANES:
        return False
    return not conv.grouped or (conv.data_layout == "NHWC" and conv.depthwise)


def choose_tile(conv: ConvBlock) -> ChannelTile | RowTile:
    """The default register tile for `conv` (measured on Zen 5, one thread).

    Dense: 16 channels x 14 pixels for 3x3 and larger reductions (reading neighbouring pixels
    keeps the broadcasts cheap); 32 channels x 8-14 pixels for 1x1 convs and stems, whose short
    reductions need more accumulators per load. Depthwise NCHW: one vector of a row, 4-8 rows,
    two channels per task for 7x7 planes; depthwise NHWC: 32 channels x up to 7 pixels (one
    data vector and one FMA per tap and pixel).
    """
    co, ow = conv.extents["co"], conv.extents["ow"]
    if not channel_tile_ok(conv):
        return _row_tile(conv)
    if conv.grouped:
        vectors = 2 if co % (2 * LANES) == 0 else 1
        return ChannelTile(vectors=vectors, pixels=_largest_divisor(ow, 14 // vectors))
    reduction = conv.extents["rc"] * conv.extents["ry"] * conv.extents["rx"]
    pointwise = conv.extents["ry"] * conv.extents["rx"] == 1
    if co % (2 * LANES) == 0 and (pointwise or reduction < 256):
        return ChannelTile(vectors=2, pixels=_largest_divisor(ow, 14 if pointwise else 8))
    return ChannelTile(vectors=1, pixels=_largest_divisor(ow, 14))


def _row_tile(conv: ConvBlock) -> RowTile:
    co, oh, ow = conv.extents["co"], conv.extents["oh"], conv.extents["ow"]
    # Power-of-two rows vectorise cleanly; other widths become one odd-sized vector per row
    # (LLVM splits it into zmm/ymm/xmm parts), which measured better than 4- or 8-lane tiles.
    lanes = LANES if ow % LANES == 0 else _largest_divisor(ow, 2 * LANES)
    regs = -(-lanes // LANES)
    rows = _largest_divisor(oh, max(1, 8 // regs))
    if conv.grouped:  # two channels per task when the planes are tiny (7x7): less overhead
        co_b = _largest_divisor(co, max(1, 128 // (oh * ow)))
    else:
        co_b = _largest_divisor(co, max(1, 8 // (rows * regs)))
    return RowTile(co=co_b, rows=rows, vectors=1, lanes=lanes)


def _producer_of(sch: s_tir.Schedule, block, buffer):
    for prod in sch.get_producers(block):
        if any(w.source.same_as(buffer) for w in sch.get(prod).writes):
            return prod
    return None


def _is_copy(sch: s_tir.Schedule, pad) -> bool:
    """Whether the padding block pads nothing (1x1 convs): then it can simply be inlined."""
    block = sch.get(pad)
    return len(block.reads) == 1 and [const_extent(d) for d in block.reads[0].source.shape] == [
        const_extent(d) for d in block.writes[0].source.shape
    ]


def _schedule_pad_root(sch: s_tir.Schedule, pad, before, phases: int) -> None:
    """Pad in its own parallel pass over the channel planes."""
    loops = sch.get_loops(pad)
    plane = 3 if phases > 1 else 2
    if len(loops) > plane:
        sch.parallel(sch.fuse(*loops[:-plane]) if len(loops) > plane + 1 else loops[0])
    _vectorize_pad_plane(sch, pad, before, phases)


def _channel_knobs(sch: s_tir.Schedule, conv: ConvBlock, tile: ChannelTile, tune: bool) -> dict:
    """Vectors of 16 output channels, output columns per tile, and row chunks (parallel tasks
    per channel block; each chunk repacks its weights), as (value, ExprRV) pairs."""
    co, oh, ow = conv.extents["co"], conv.extents["oh"], conv.extents["ow"]
    vec_ok = _choices((1, 2, 4), tile.vectors, lambda v: co % (v * LANES) == 0)
    # Enough parallel tasks by default: 8 over the channel blocks and row chunks.
    chunks = _largest_divisor(oh, -(-MIN_TASKS // (co // (tile.vectors * LANES))))
    return {
        "vectors": choose_factor(sch, vec_ok, tile.vectors, tune),
        "pixels": choose_factor(sch, _divisors(ow, 16, tile.pixels), tile.pixels, tune),
        "chunks": choose_factor(sch, _divisors(oh, 16, chunks), chunks, tune),
    }


def _schedule_channel_tile(sch: s_tir.Schedule, conv: ConvBlock, knobs: dict):
    lp = conv.loops
    block = conv.block
    pad = _producer_of(sch, block, conv.data)
    co_o, co_v, co_l = sch.split(lp["co"], [None, knobs["vectors"][1], LANES])
    task = [lp["n"]] if "n" in lp else []
    task.append(co_o)
    spatial = []
    if "oh" in lp:
        oh_o, oh_i = sch.split(lp["oh"], [knobs["chunks"][1], None])
        task.append(oh_o)
        spatial.append(oh_i)
    pixel = []
    if "ow" in lp:
        ow_o, ow_i = sch.split(lp["ow"], [None, knobs["pixels"][1]])
        spatial.append(ow_o)
        pixel.append(ow_i)
    nhwc = conv.data_layout == "NHWC"
    # NHWC: input channels innermost, so a pixel's channels are read in order.
    red = [lp[r] for r in (("ry", "rx", "rc") if nhwc else ("rc", "ry", "rx")) if r in lp]
    sch.reorder(*task, *spatial, *red, *pixel, co_v, co_l)
    par = sch.fuse(*task) if len(task) > 1 else task[0]
    tile_loop = sch.fuse(*spatial) if len(spatial) > 1 else (spatial[0] if spatial else par)
    # Accumulators: channels innermost so each register holds 16 channels of one pixel.
    acc = sch.cache_write(block, 0, "global")
    if conv.out_layout == "NCHW":
        sch.transform_layout(block, ("write", 0), lambda n, co, oh, ow: (n, oh, ow, co))
    sch.reverse_compute_at(acc, tile_loop, preserve_unit_loops=True)
    inline_epilogues(sch, acc)
    w_index = next(i for i, r in enumerate(sch.get(block).reads) if r.source.same_as(conv.weight))
    if layout_free(sch, conv.weight):
        # A constant weight: packed once at compile time as [co / cb, ci, ry, rx, cb], cb the
        # channels of one tile, so every tile streams one contiguous panel.
        # (NHWC: OHWI weights become [co / cb, ry, rx, ci, cb].)
        cb = knobs["vectors"][0] * LANES
        prepack(sch, block, w_index, lambda co, a, b, c: (co // cb, a, b, c, co % cb))
    else:  # repacked to [ci, ry, rx, co] by each parallel task, for the channels it computes
        packed = sch.cache_read(block, w_index, "global")
        sch.compute_at(packed, par, preserve_unit_loops=True)
        sch.transform_layout(packed, ("write", 0), lambda co, a, b, c: (a, b, c, co))
        pack_loops = sch.get_loops(packed)[1:]
        sch.reorder(*pack_loops[1:], pack_loops[0])  # contiguous writes
    sch.parallel(par)
    for loop in pixel:
        sch.unroll(loop)
    sch.unroll(co_v)
    sch.vectorize(co_l)
    if red:
        init = sch.decompose_reduction(block, red[0])
        sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(acc)[-1])
    if pad is not None:
        if _is_copy(sch, pad):
            sch.compute_inline(pad)
        elif nhwc:
            _schedule_pad_nhwc(sch, pad, par)
        else:
            _schedule_pad_root(sch, pad, _pad_before(sch, pad), 1)


def _schedule_pad_nhwc(sch: s_tir.Schedule, pad, par) -> None:
    """Pad an NHWC input inside each parallel task, for the rows (and channels) the task
    reads: the padded copy stays in the core's L2 for the reduction that follows, and no
    separate pass over the whole tensor is made. A pixel's channels are copied as vectors."""
    sch.compute_at(pad, par, preserve_unit_loops=True)
    loops = sch.get_loops(pad)
    channels = const_extent(sch.get(loops[-1]).extent)
    if channels and channels % LANES == 0:
        _, lanes = sch.split(loops[-1], [None, LANES])
        sch.vectorize(lanes)


def _row_knobs(sch: s_tir.Schedule, conv: ConvBlock, tile: RowTile, tune: bool) -> dict:
    """Channels, output rows and vectors of ``tile.lanes`` columns per tile, as (value, ExprRV)
    pairs."""
    co, oh, ow = conv.extents["co"], conv.extents["oh"], conv.extents["ow"]
    vec_ok = _choices((1, 2, 4), tile.vectors, lambda v: ow % (v * tile.lanes) == 0)
    return {
        "co": choose_factor(sch, _divisors(co, 16, tile.co), tile.co, tune),
        "rows": choose_factor(sch, _divisors(oh, 8, tile.rows), tile.rows, tune),
        "vectors": choose_factor(sch, vec_ok, tile.vectors, tune),
    }


def _schedule_row_tile(sch: s_tir.Schedule, conv: ConvBlock, tile: RowTile, knobs: dict):
    lp, ext = conv.loops, conv.extents
    block = conv.block
    pad = _producer_of(sch, block, conv.data)
    sw = conv.stride[1]
    padded_w = const_extent(conv.data.shape[3])
    phases = sw if pad is not None and sw > 1 and padded_w % sw == 0 else 1
    before = _pad_before(sch, pad) if pad is not None else None
    if phases > 1:
        # De-interleave columns by phase so stride-s loads along ow become contiguous.
        sch.transform_layout(pad, ("write", 0), lambda n, c, h, w: (n, c, h, w % sw, w // sw))
        iters = len(sch.get(pad).iter_vars)
        sch.transform_block_layout(
            pad, IndexMap.from_func(lambda *v: (*v[:-1], v[-1] // sw, v[-1] % sw), ndim=iters)
        )
    task, spatial, inner, vec = [], [], [], []
    if "n" in lp:
        task.append(lp["n"])
    if "co" in lp:
        co_o, co_i = sch.split(lp["co"], [None, knobs["co"][1]])
        task.append(co_o)
        inner.append(co_i)
    if "oh" in lp:
        oh_o, oh_i = sch.split(lp["oh"], [None, knobs["rows"][1]])
        spatial.append(oh_o)
        inner.append(oh_i)
    if "ow" in lp:
        ow_o, ow_v, ow_l = sch.split(lp["ow"], [None, knobs["vectors"][1], tile.lanes])
        spatial.append(ow_o)
        inner.append(ow_v)
        vec.append(ow_l)
    red = [lp[r] for r in ("rc", "ry", "rx") if r in lp]
    sch.reorder(*task, *spatial, *red, *inner, *vec)
    # Depthwise: one task per channel plane, padded once into L1/L2 (no halo recomputation).
    # Decided on the default tile (`tile`), as it shapes the loop nest every sample shares.
    depthwise = conv.grouped and "rc" not in lp
    per_plane = depthwise and bool(task) and ext["n"] * ext["co"] // tile.co >= MIN_TASKS
    if per_plane:
        par = sch.fuse(*task) if len(task) > 1 else task[0]
        tile_loop = sch.fuse(*spatial) if len(spatial) > 1 else (spatial[0] if spatial else par)
    else:
        par = tile_loop = sch.fuse(*task, *spatial)
    acc = sch.cache_write(block, 0, "global")
    sch.reverse_compute_at(acc, tile_loop, preserve_unit_loops=True)
    inline_epilogues(sch, acc)
    sch.parallel(par)
    for loop in inner:
        sch.unroll(loop)
    for role in ("ry", "rx"):
        if role in lp:
            sch.unroll(lp[role])
    for loop in vec:
        sch.vectorize(loop)
    if red:
        init = sch.decompose_reduction(block, red[0])
        sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(acc)[-1])
    if pad is None:
        return
    if per_plane:
        sch.compute_at(pad, par, preserve_unit_loops=True)
        _vectorize_pad_plane(sch, pad, before, phases)
    elif phases == 1 and _is_copy(sch, pad):
        sch.compute_inline(pad)
    else:
        _schedule_pad_root(sch, pad, before, phases)


def _pad_before(sch: s_tir.Schedule, pad) -> tuple[int, int] | None:
    """Rows and columns of padding before the input (top, left), read off the pad block."""
    block = sch.get(pad)
    if len(block.reads) != 1:
        return None
    offsets = []
    for dim in (2, 3):
        coeffs = detect_linear_equation(
            block.reads[0].region[dim].min, [iv.var for iv in block.iter_vars]
        )
        if not coeffs or not isinstance(coeffs[-1], tirx.IntImm):
            return None
        offsets.append(-int(coeffs[-1].value))
    return offsets[0], offsets[1]


def _border_split(extent: int, before: int, inner: int, phases: int):
    """Partition of a pad loop into (leading border, interior, trailing border), zero sizes
    dropped, and the position of the interior; None if there is no interior."""
    lo = -(-before // phases)
    hi = (before + inner - phases) // phases + 1
    if not 0 <= lo < hi <= extent:
        return None
    parts = [p for p in (lo, hi - lo, extent - hi) if p]
    return parts, 1 if lo else 0


def _interior(sch: s_tir.Schedule, loop, split):
    parts, index = split
    if len(parts) == 1:
        return loop
    return sch.loop_partition(loop, parts[:-1] + [None])[index]


def _vectorize_pad_plane(sch: s_tir.Schedule, pad, before, phases: int) -> None:
    """Cut the padded plane into borders and interior: the interior copy has no bounds test
    and vectorises; the thin borders stay scalar."""
    block = sch.get(pad)
    if before is None or len(block.reads) != 1:
        return
    in_shape = [const_extent(d) for d in block.reads[0].source.shape]
    loops = sch.get_loops(pad)
    h_loop, w_loop = (loops[-3], loops[-2]) if phases > 1 else (loops[-2], loops[-1])
    h_split = _border_split(const_extent(sch.get(h_loop).extent), before[0], in_shape[2], 1)
    w_split = _border_split(const_extent(sch.get(w_loop).extent), before[1], in_shape[3], phases)
    if h_split is None or w_split is None:
        return
    rows = _interior(sch, h_loop, h_split)
    w_loop = sch.get_loops(sch.get_child_blocks(rows)[0])[-1 if phases == 1 else -2]
    cols = _interior(sch, w_loop, w_split)
    if phases == 1:
        sch.vectorize(cols)
    else:
        # Iterating (column group, phase) lets LLVM vectorise the stride-s reads as an
        # interleave group (wide loads + shuffles), far cheaper than TIR's gathers.
        sch.unroll(sch.get_loops(sch.get_child_blocks(cols)[0])[-1])


# Tile kinds: ChannelTile, RowTile. A kind shapes the loop nest, so a MetaSchedule design space
# (one trace, replayed with new decisions) holds one kind: tune with one space per kind.
CHANNEL, ROW = 0, 1
KINDS = (CHANNEL, ROW)


def apply_conv2d(
    sch: s_tir.Schedule,
    target: Target,
    tune: bool,
    kind: int | None = None,
    tile: ChannelTile | RowTile | None = None,
) -> bool:
    """Schedule the convolution of ``sch.mod["main"]`` in place; False if it has none.

    Knobs: the tile kind (:class:`ChannelTile` only for dense convs with ``Co % 16 == 0``; the
    kind shapes the loop nest, so it is fixed when MetaSchedule builds the design space, and
    `kind` fixes it), then the kind's tile sizes as split factors. ``tune=False`` takes the
    defaults of :func:`choose_tile`, or of `tile` when given.
    """
    conv = match_conv2d(sch)
    if conv is None:
        return False
    default = tile or choose_tile(conv)
    channel_ok = channel_tile_ok(conv)
    if isinstance(default, ChannelTile) and (
        not channel_ok or conv.extents["co"] % (default.vectors * LANES)
    ):
        return False
    if conv.out_layout == "NHWC":  # columns are not contiguous in NHWC: no row tiles
        if not channel_ok or isinstance(default, RowTile):
            return False
        kinds = [CHANNEL]
    else:
        kinds = [CHANNEL, ROW] if channel_ok else [ROW]
    default_kind = CHANNEL if isinstance(default, ChannelTile) else ROW
    if kind is not None:
        if kind not in kinds:
            return False
        kinds = [kind]
    kind = choose(sch, kinds, default_kind if default_kind in kinds else kinds[0], tune)
    if kind != default_kind:
        default = ChannelTile(vectors=1, pixels=_largest_divisor(conv.extents["ow"], 14))
        default = _row_tile(conv) if kind == ROW else default
    try:
        if kind == CHANNEL:
            _schedule_channel_tile(sch, conv, _channel_knobs(sch, conv, default, tune))
        else:
            _schedule_row_tile(sch, conv, default, _row_knobs(sch, conv, default, tune))
    except s_tir.ScheduleError:  # an unforeseen structure: leave it to the fallback rule
        return False
    return True


def _is_conv2d(func: tirx.PrimFunc) -> bool:
    return match_conv2d(s_tir.Schedule(func)) is not None


SPACE = register(Space("conv2d", _is_conv2d, apply_conv2d, structures=("kind", KINDS)))


class Conv2d(dl.ScheduleRule):
    """Schedule NCHW and NHWC convolutions (dense, grouped, depthwise) with their fused
    epilogues, with the default decisions of :func:`apply_conv2d`.

    Parameters
    ----------
    tile
        Force one register tile (benchmarks, tests); by default :func:`choose_tile` picks it.
    """

    def __init__(self, tile: ChannelTile | RowTile | None = None):
        self.tile = tile

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        return sch if apply_conv2d(sch, target, False, tile=self.tile) else None
