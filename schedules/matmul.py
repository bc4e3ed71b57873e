"""Dense matmul rule: register-tiled, B-panel-reusing, parallel schedule with fused epilogues.

Targets C[..., i, j] = sum_k A[..., i, k] * B[..., k, j] (FoldConstant has already turned
constant ``W^T`` into [K, N]), optionally followed by elementwise epilogues (bias, ReLU,
residual add) that are computed straight from the accumulator tile.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

from .common import (
    choose_factor,
    const_extent,
    inline_epilogues,
    layout_free,
    normalize_prim_func,
    prepack,
    schedule_leftover,
    vector_width,
)
from .spaces import Space, choose, register


@dataclass(frozen=True)
class MatmulTile:
    """Register tile: ``rows`` rows of A times ``vectors`` x ``lanes`` columns of B.

    6 x (4 x 16) keeps 24 zmm accumulators live, which measured fastest for
    64x1024x1024 on AVX-512 (on par with ONNX Runtime's MLAS).
    """

    rows: int = 6
    vectors: int = 4
    lanes: int = 16


def _k_block(k: int | None) -> int:
    """Reduction block length: 256 keeps a 64-wide B panel slice in L1 (measured: 303 vs 426 us
    unblocked at 64x1024x1024); 0 means no blocking (short or awkward K)."""
    if k is None or k <= 512:
        return 0
    for kc in range(256, 63, -1):
        if k % kc == 0:
            return kc
    return 0


def _operands_are_matrices(block, iters) -> bool:
    """A[..., i, k] and B[..., k, j] (i absent for a GEMV): rules out pointwise convs
    (out[co, oh, ow] += W[co, rc] * X[rc, oh, ow]) whose loops also look like "SSSR"."""
    k, j = iters[-1], iters[-2]
    i = iters[-3] if len(iters) > 2 else None

    def is_(expr, it):
        if isinstance(expr, tirx.Var):
            return expr.same_as(it.var)
        return isinstance(expr, tirx.IntImm) and const_extent(it.dom) == 1

    def has(first, second):
        return any(
            len(r.region) >= 2 and is_(r.region[-2].min, first) and is_(r.region[-1].min, second)
            for r in block.reads
        )

    if i is None:  # GEMV: A is the vector x[k] (or [1, k] with the unit dim dropped)
        has_a = any(r.region and is_(r.region[-1].min, k) for r in block.reads)
    else:
        has_a = has(i, k)
    return has_a and has(k, j)


def _find_contraction(sch: s_tir.Schedule):
    infos = normalize_prim_func(sch)
    if infos is None:
        return None, None
    reductions = [b for b in infos if b.is_reduction()]
    if len(reductions) != 1:
        return None, None
    red = reductions[0]
    kinds = "".join(it.kind for it in red.iters)
    if not (kinds.endswith("SR") and set(kinds[:-1]) == {"S"}):
        return None, None
    block = sch.get(red.block_rv)
    if len(block.reads) < 2 or len(block.writes) != 1:  # A and B (C is implied by init)
        return None, None
    # Contractions index operands with bare loop variables; strided or windowed reads
    # (convolutions: pad[c, oh * 2 + ry, ...]) belong to the conv rule.
    for region in block.reads:
        for rng in region.region:
            if not isinstance(rng.min, (tirx.Var, tirx.IntImm)):
                return None, None
    if not _operands_are_matrices(block, red.iters):
        return None, None
    return red, infos


def _tile_for(m: int, n: int, dtype_bits: int) -> MatmulTile:
    lanes = vector_width(n, dtype_bits)
    vectors = 1
    # A GEMV has one accumulator per vector, each a chain of dependent FMAs over K: it needs
    # several vectors to hide the FMA latency (N = 1000: 5 x 8 lanes, not 1).
    for v in (8, 5, 4, 3, 2) if m == 1 else (4, 3, 2):
        if n % (lanes * v) == 0:
            vectors = v
            break
    rows = min(6 if vectors == 4 else 8, m)
    return MatmulTile(rows=rows, vectors=vectors, lanes=lanes)


def _choices(candidates, default: int, fits) -> list[int]:
    """The candidates that `fits` accepts, plus the default (always a valid choice)."""
    return sorted({c for c in candidates if fits(c)} | {default})


def _shape(red) -> tuple[int | None, int | None, int | None]:
    """(M, N, K) of the contraction; M = 1 for a GEMV (its row loop was normalised away)."""
    if len(red.iters) > 2:
        m, n = (const_extent(it.dom) for it in red.iters[-3:-1])
    else:
        m, n = 1, const_extent(red.iters[0].dom)
    return m, n, const_extent(red.iters[-1].dom)


# Parallel split of the tile loops: both fused with column panels outer (a B panel is reused by
# consecutive row tiles), both fused with row tiles outer, or column panels only, each task
# walking all row tiles of its panel (which makes repacking its B panel worth it), or column
# panels with the K blocks outside the row tiles (GotoBLAS). The split changes the loop nest,
# so it is fixed when MetaSchedule builds a design space (one trace, replayed with new
# decisions): tune with one space per order (`apply_matmul(..., order=...)`); the other knobs
# are split factors that every candidate resamples.
PANELS_THEN_ROWS, ROWS_THEN_PANELS, PANELS_ONLY, PANELS_KBLOCKS = 0, 1, 2, 3
ORDERS = (PANELS_THEN_ROWS, ROWS_THEN_PANELS, PANELS_ONLY, PANELS_KBLOCKS)
K_UNROLLS = (1, 2, 4)


@dataclass(frozen=True)
class MatmulConfig:
    """One point of the matmul design space: each knob's value and, for split factors, its
    sampled variable (``None`` in the defaults a caller may build by hand)."""

    rows: tuple
    vectors: tuple
    k_block: tuple  # K for no blocking
    k_unroll: tuple  # inner K loop unrolled by this factor (1: not unrolled)
    order: int  # one of ORDERS
    pack_b: bool  # PANELS_ONLY / PANELS_KBLOCKS: copy B panel (blocks) to contiguous buffers
    lanes: int


def _decide(
    sch: s_tir.Schedule, shape: tuple, bits: int, tune: bool, orders: list[int]
) -> MatmulConfig:
    """Sample (or take the defaults of) every knob, in a fixed order."""
    m, n, k = shape
    default = _tile_for(m, n, bits)
    lanes = default.lanes
    vec_ok = _choices((1, 2, 3, 4), default.vectors, lambda v: n % (lanes * v) == 0)
    vectors = choose_factor(sch, vec_ok, default.vectors, tune)
    row_ok = _choices((1, 2, 3, 4, 5, 6, 8), default.rows, lambda r: r <= m)
    rows = choose_factor(sch, row_ok, default.rows, tune)
    kc_default = _k_block(k) or k
    kc_ok = _choices((64, 128, 256, 512), kc_default, lambda c: c < k and k % c == 0)
    k_block = choose_factor(sch, kc_ok, kc_default, tune)
    # Every unroll factor divides every K block, whichever pair the search draws.
    unroll_ok = [u for u in K_UNROLLS if all(c % u == 0 for c in kc_ok)]
    k_unroll = choose_factor(sch, unroll_ok, 1, tune)
    order = choose(sch, orders, orders[0], tune)
    packs = order in (PANELS_ONLY, PANELS_KBLOCKS)
    pack_b = bool(choose(sch, [0, 1], 0, tune)) if packs else False
    return MatmulConfig(rows, vectors, k_block, k_unroll, order, pack_b, lanes)


def _b_read_index(sch: s_tir.Schedule, block_rv) -> int | None:
    """Index of B[..., k, j] among the reads of the contraction block."""
    block = sch.get(block_rv)
    k_var, j_var = block.iter_vars[-1].var, block.iter_vars[-2].var
    for index, region in enumerate(block.reads):
        mins = [r.min for r in region.region]
        if len(mins) >= 2 and mins[-2].same_as(k_var) and mins[-1].same_as(j_var):
            return index
    return None


def _loop_nest(sch: s_tir.Schedule, cfg: MatmulConfig, batch, i, j, k_loop):
    """Split and order the contraction's loops for `cfg`; returns the parallel loop, where the
    accumulator tile and the packed B panel go, the outer and unrolled K loops, the register
    tile loops and the lane loop."""
    j0, j1, j2 = sch.split(j, [None, cfg.vectors[1], cfg.lanes])
    # K is always split (factor K: a unit outer loop; unroll 1: a unit inner loop that lowering
    # removes), so every decision yields the same loop nest shape.
    k_outer, k_inner = sch.split(k_loop, [None, cfg.k_block[1]])
    k_mid, k_in = sch.split(k_inner, [None, cfg.k_unroll[1]])
    if i is None:
        sch.reorder(*batch, j0, k_outer, k_mid, k_in, j1, j2)
        outer = sch.fuse(*batch, j0)
        return outer, outer, outer, k_outer, k_in, [j1], j2
    i0, i1 = sch.split(i, [None, cfg.rows[1]])
    if cfg.order == PANELS_KBLOCKS:
        # GotoBLAS order: a K block of the panel is reused by every row tile from L1/L2; the
        # accumulators of the whole panel live in a buffer across K blocks.
        sch.reorder(*batch, j0, k_outer, i0, k_mid, k_in, i1, j1, j2)
        outer = sch.fuse(*batch, j0)
        return outer, outer, k_outer, k_outer, k_in, [i1, j1], j2
    tasks = {
        PANELS_THEN_ROWS: [j0, i0],
        ROWS_THEN_PANELS: [i0, j0],
        PANELS_ONLY: [j0],
    }[cfg.order]
    serial = [i0] if cfg.order == PANELS_ONLY else []
    sch.reorder(*batch, *tasks, *serial, k_outer, k_mid, k_in, i1, j1, j2)
    outer = sch.fuse(*batch, *tasks)
    return outer, serial[0] if serial else outer, outer, k_outer, k_in, [i1, j1], j2


def apply_matmul(sch: s_tir.Schedule, target: Target, tune: bool, order: int | None = None) -> bool:
    """Schedule the contraction of ``sch.mod["main"]`` in place; False if it has none.

    Knobs (:class:`MatmulConfig`): rows of the register tile, vectors of lanes per row, K block,
    inner K unroll, parallel split / loop order, B panel repacking. ``tune=False`` takes the
    defaults, which are the hand-tuned rule. `order` fixes the parallel split (one design space
    per split: see :data:`PANELS_ONLY`).
    """
    red, _ = _find_contraction(sch)
    if red is None:
        return False
    m, n, k = _shape(red)
    if m is None or n is None or k is None:
        return False
    block_rv = red.block_rv
    name = sch.get(block_rv).name_hint
    bits = sch.get(block_rv).writes[0].source.dtype.bits
    gemv = len(red.iters) == 2  # M = 1 squeezed away by normalisation: no row loop
    orders = [PANELS_THEN_ROWS] if gemv else list(ORDERS)
    if order is not None:
        if order not in orders:
            return False
        orders = [order]
    cfg = _decide(sch, (m, n, k), bits, tune, orders)
    # Inline producers (casts, zero-point shifts) into the contraction.
    for info in normalize_prim_func(sch):
        if info.block_rv != block_rv and info.is_injective():
            try:
                sch.compute_inline(info.block_rv)
            except Exception:
                continue
    block_rv = sch.get_sblock(name)
    loops = sch.get_loops(block_rv)
    if gemv:
        (j, k_loop), batch, i = loops, [], None
    else:
        *batch, i, j, k_loop = loops
    outer, acc_at, pack_at, k_outer, k_in, regs, j2 = _loop_nest(sch, cfg, batch, i, j, k_loop)
    acc = sch.cache_write(block_rv, 0, "global")  # < 1 KB "global" => registers
    sch.reverse_compute_at(acc, acc_at, preserve_unit_loops=True)
    inline_epilogues(sch, acc)
    b_index = _b_read_index(sch, block_rv)
    b_buffer = sch.get(block_rv).reads[b_index].source if b_index is not None else None
    if b_buffer is not None and len(b_buffer.shape) == 2 and layout_free(sch, b_buffer):
        # A constant B: packed once at compile time into column panels [N / w, K, w], w the
        # tile width, so a tile streams one contiguous panel.
        width = cfg.vectors[0] * cfg.lanes
        prepack(sch, block_rv, b_index, lambda kk, jj: (jj // width, kk, jj % width))
    elif cfg.pack_b and b_index is not None:
        # B rows are N apart: a K x 64 panel maps onto few L1 sets. A contiguous copy per task.
        packed = sch.cache_read(block_rv, b_index, "global")
        sch.compute_at(packed, pack_at, preserve_unit_loops=True)
        sch.vectorize(sch.split(sch.get_loops(packed)[-1], [None, cfg.lanes])[1])
    sch.parallel(outer)
    sch.unroll(k_in)
    for loop in regs:
        sch.unroll(loop)
    sch.vectorize(j2)
    init = sch.decompose_reduction(block_rv, k_outer)
    sch.vectorize(sch.get_loops(init)[-1])
    wb_inner = sch.get_loops(acc)[-1]
    if cfg.lanes > 1:
        _, lane_loop = sch.split(wb_inner, [None, cfg.lanes])
        sch.vectorize(lane_loop)
    schedule_leftover(sch, skip={name, f"{name}_init", sch.get(acc).name_hint})
    return True


def _is_matmul(func: tirx.PrimFunc) -> bool:
    red, _ = _find_contraction(s_tir.Schedule(func))
    return red is not None and None not in _shape(red)


SPACE = register(Space("matmul", _is_matmul, apply_matmul, structures=("order", ORDERS)))


class Matmul(dl.ScheduleRule):
    """Schedule one-reduction-axis contractions (MatMul, Gemm, batched MatMul, 1x1 conv as GEMM)
    with the default decisions of :func:`apply_matmul`."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        return sch if apply_matmul(sch, target, False) else None
