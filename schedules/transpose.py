"""Transpose rule: 2-D transposes (possibly fused with pads/casts) tiled for contiguous reads.

The generic recipe vectorises over the output's contiguous axis, which turns every vector into
a gather across rows of the input (64x1024 -> 1024x64: 107 us). Here each task takes 32 output
rows; the inner loop walks 32 contiguous input elements and stores them down a column of a
~8 KB output chunk that stays in L1 (14 us).
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

from .common import const_extent, normalize_prim_func

TILE = 32  # measured: 8 -> 35 us, 16 -> 31 us, 32 -> 14 us, 64 -> 14 us, 128 -> 20 us


def _is_transpose(sch: s_tir.Schedule, info) -> bool:
    if not info.is_injective() or len(info.iters) != 2:
        return False
    i, j = (it.var for it in info.iters)
    for region in sch.get(info.block_rv).reads:
        idx = [r.min for r in region.region]
        if (
            len(idx) == 2
            and isinstance(idx[0], tirx.Var)
            and isinstance(idx[1], tirx.Var)
            and idx[0].same_as(j)
            and idx[1].same_as(i)
        ):
            return True
    return False


class Transpose(dl.ScheduleRule):
    """Schedule [A, B] = in[B, A]^T (after inlining the injective ops fused with it)."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or any(not b.is_injective() for b in infos):
            return None
        for info in infos[:-1]:
            try:
                sch.compute_inline(info.block_rv)
            except Exception:
                return None
        (info,) = normalize_prim_func(sch)
        if not info.iters:  # a 0-d result (scalar arithmetic): nothing to transpose
            return None
        rows = const_extent(info.iters[0].dom)
        if not _is_transpose(sch, info) or rows is None or rows < 2 * TILE:
            return None
        i, j = sch.get_loops(info.block_rv)
        i0, i1 = sch.split(i, [None, TILE])
        sch.reorder(i0, j, i1)
        sch.parallel(i0)
        sch.unroll(i1)
        return sch
