"""Schedules of the BSR matmul kernels (`bsr_matmul`): the default and the tuning space.

One family per kernel form ("bsr_wx", "bsr_gemv", "bsr_xw"). With ``tune=False`` each family
gives the register-tiled schedule the kernels used to have written into their TVMScript
(parallel over block rows, an R x tile accumulator held in registers, unrolled over its rows and
vectorised over its columns); `BsrMatmul` is the dlight rule that applies it in the schedule
phase. When tuning, these decisions are sampled (each a ``sample_categorical`` feeding a split
factor or an annotation, so the search's re-sampling and mutations change the schedule):

- ``tile``: columns of X per register tile ("wx") or rows of X per tile ("xw"), among those
  that divide the extent and keep the accumulator within `bsr_matmul.ACCUMULATOR_BYTES`;
- ``grain``: block rows per parallel iteration (1, 2, 4, 8 when they divide the block rows);
- ``unroll``: auto-unroll limit of the loop over a block's reduction elements (C > 1 only).

The indptr-driven loop over a row's stored blocks is data dependent: the postprocs leave out
MetaSchedule's ``DisallowDynamicLoop`` (see NOTES-tvm.md) and the runner needs the real BSR
arrays (`tvm_sparse.tuning.RealArguments`).
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

from . import spaces
from .bsr_matmul import ACCUMULATOR_BYTES, KERNEL_ATTR, column_tile, row_tile

GRAINS = (1, 2, 4, 8)
COLUMN_TILES = (256, 128, 64, 48, 32, 16, 8, 4, 2, 1)
ROW_TILES = (32, 24, 16, 12, 8, 6, 4, 2, 1)
UNROLL_STEPS = (0, 16, 64)  # 0: the reduction-element loop stays a loop (the default)


def kernel_form(func) -> str | None:
    """ "wx", "gemv" or "xw" for a `bsr_matmul` kernel, else None."""
    if not isinstance(func, tirx.PrimFunc) or func.attrs is None or KERNEL_ATTR not in func.attrs:
        return None
    parts = str(func.attrs[KERNEL_ATTR]).split("_")
    if len(parts) != 4 or parts[0] != "bsr" or parts[1] not in ("wx", "gemv", "xw"):
        return None
    return parts[1]


def _extents(sch: s_tir.Schedule, loops) -> list[int]:
    return [int(sch.get(loop).extent) for loop in loops]


def column_tiles(rows: int, p: int) -> list[int]:
    """Register-tile widths for "wx": divide P, fit the accumulator, whole vectors if P allows."""
    budget = ACCUMULATOR_BYTES // 4 // rows
    default = column_tile(rows, p)
    return [
        t
        for t in COLUMN_TILES
        if p % t == 0 and t <= budget and (t % 16 == 0 or p % 16 or t == default)
    ] or [default]


def row_tiles(rows: int, m: int) -> list[int]:
    """Register-tile heights for "xw" (one accumulator register row per row of X)."""
    budget = ACCUMULATOR_BYTES // 4 // rows
    default = row_tile(m)
    return [t for t in ROW_TILES if m % t == 0 and t <= budget and (t >= 4 or t == default)] or [
        default
    ]


def _parallel_rows(sch: s_tir.Schedule, nb: int, tune: bool) -> None:
    (br,) = sch.get_loops(sch.get_sblock("row"))
    grain = spaces.choose_rv(sch, [g for g in GRAINS if nb % g == 0], 1, tune)
    outer, _ = sch.split(br, [None, grain])
    sch.parallel(outer)


def _unroll_reduction(sch: s_tir.Schedule, loop, cols: int, tune: bool) -> None:
    if cols == 1:  # nothing to unroll: keep the trace free of a decision without effect
        return
    steps = spaces.choose_rv(sch, UNROLL_STEPS, 0, tune)
    sch.annotate(loop, "pragma_auto_unroll_max_step", steps)
    sch.annotate(loop, "pragma_unroll_explicit", 1)


def _tile_nest(sch: s_tir.Schedule, unrolled, vector) -> None:
    sch.unroll(unrolled)
    sch.vectorize(vector)


def apply_wx(sch: s_tir.Schedule, target: Target, tune: bool) -> bool:
    """Y = W . X, K-major X: tile P per accumulator, reduce a row's blocks into it."""
    func = sch.mod["main"]
    if kernel_form(func) != "wx":
        return False
    upd, out = sch.get_sblock("update"), sch.get_sblock("out")
    i, j, blk, kk = sch.get_loops(upd)
    (nb,) = _extents(sch, sch.get_loops(sch.get_sblock("row")))
    r, p, c = _extents(sch, (i, j, kk))
    tile = spaces.choose_rv(sch, column_tiles(r, p), column_tile(r, p), tune)
    j0, j1 = sch.split(j, [None, tile])
    sch.reorder(j0, blk, kk, i, j1)
    _unroll_reduction(sch, kk, c, tune)
    sch.reverse_compute_at(out, j0, preserve_unit_loops=True)
    _tile_nest(sch, i, j1)
    _tile_nest(sch, *sch.get_loops(out)[-2:])
    init = sch.decompose_reduction(upd, blk)
    _tile_nest(sch, *sch.get_loops(init)[-2:])
    _parallel_rows(sch, nb, tune)
    return True


def apply_gemv(sch: s_tir.Schedule, target: Target, tune: bool) -> bool:
    """y = W . x: vectorised over a block's R rows (R > 1), scalar reduction for R = 1."""
    func = sch.mod["main"]
    if kernel_form(func) != "gemv":
        return False
    upd, out = sch.get_sblock("update"), sch.get_sblock("out")
    i, blk, kk = sch.get_loops(upd)
    (nb,) = _extents(sch, sch.get_loops(sch.get_sblock("row")))
    r, c = _extents(sch, (i, kk))
    sch.reorder(blk, kk, i)
    _unroll_reduction(sch, kk, c, tune)
    if r > 1:
        sch.vectorize(i)
        sch.vectorize(sch.get_loops(out)[-1])
    init = sch.decompose_reduction(upd, blk)
    if r > 1:
        sch.vectorize(sch.get_loops(init)[-1])
    _parallel_rows(sch, nb, tune)
    return True


def apply_xw(sch: s_tir.Schedule, target: Target, tune: bool) -> bool:
    """Y = X . W^T, row-major X: tile M per accumulator, vectorised over a block's R rows."""
    func = sch.mod["main"]
    if kernel_form(func) != "xw":
        return False
    upd, out = sch.get_sblock("update"), sch.get_sblock("out")
    mi, i, blk, kk = sch.get_loops(upd)
    (nb,) = _extents(sch, sch.get_loops(sch.get_sblock("row")))
    m, r, c = _extents(sch, (mi, i, kk))
    tile = spaces.choose_rv(sch, row_tiles(r, m), row_tile(m), tune)
    m0, m1 = sch.split(mi, [None, tile])
    sch.reorder(m0, blk, kk, m1, i)
    _unroll_reduction(sch, kk, c, tune)
    sch.reverse_compute_at(out, m0, preserve_unit_loops=True)
    _tile_nest(sch, m1, i)
    _tile_nest(sch, *sch.get_loops(out)[-2:])
    init = sch.decompose_reduction(upd, blk)
    _tile_nest(sch, *sch.get_loops(init)[-2:])
    _parallel_rows(sch, nb, tune)
    return True


def _postprocs() -> list:
    from tvm.s_tir import meta_schedule as ms

    return [ms.postproc.RewriteParallelVectorizeUnroll(), ms.postproc.RewriteReductionBlock()]


FAMILIES = {
    form: spaces.register(
        spaces.Space(f"bsr_{form}", lambda f, form=form: kernel_form(f) == form, apply, _postprocs)
    )
    for form, apply in (("wx", apply_wx), ("gemv", apply_gemv), ("xw", apply_xw))
}


class BsrMatmul(dl.ScheduleRule):
    """Default schedule of the `bsr_matmul` kernels (their families with ``tune=False``)."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        form = kernel_form(func)
        if form is None:
            return None
        sch = s_tir.Schedule(func)
        return sch if FAMILIES[form].apply(sch, target, False) else None
