"""Fallback rule: inline injective chains, then parallelise and vectorise what remains."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

from .common import normalize_prim_func, schedule_leftover


class Generic(dl.ScheduleRule):
    """Elementwise, broadcast, pooling and other small kernels: correct and not scalar-serial."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        # Fold chains of elementwise ops into their last consumer (one pass over memory).
        for info in reversed(infos):
            if info.is_injective():
                try:
                    sch.compute_inline(info.block_rv)
                except Exception:
                    continue
        schedule_leftover(sch)
        return sch
