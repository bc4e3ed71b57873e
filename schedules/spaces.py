"""Design spaces of our schedules, as data.

A tunable schedule is a function ``apply(sch, target, tune) -> bool`` that schedules
``sch.mod["main"]`` in place (False: not applicable). Every choice it makes (tile sizes,
loop order, vector width, unroll, parallel split) goes through :func:`choose`, a MetaSchedule
``sample_categorical``: with ``tune=False`` each choice takes its default, so the default
schedule (the dlight rule path), the tuner's samples and a tuned record replayed from the
database all run the same code and produce replayable traces.

Families register themselves with :func:`register`; :func:`space_for` finds the one for a
PrimFunc and :func:`schedule_fn` turns it into a MetaSchedule space generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.target import Target


def choose(sch: s_tir.Schedule, choices: Sequence[int], default: int, tune: bool) -> int:
    """One tunable decision: a uniform categorical sample over `choices` when tuning,
    else `default` (which must be one of `choices`), recorded in the trace either way.

    The value returned is a Python int: a schedule that branches on it or passes it as a
    constant freezes this sample into the trace, so the search's mutations and re-sampling
    (which replay the trace with new decisions) cannot change it. Pass :func:`choose_rv`'s
    random variable to split factors and annotations instead."""
    return int(sch.get(choose_rv(sch, choices, default, tune)))


def choose_rv(sch: s_tir.Schedule, choices: Sequence[int], default: int, tune: bool):
    """:func:`choose` as the sampled random variable (an ``ExprRV``, usable as a split factor
    or annotation value), so replaying the trace with another decision changes the schedule."""
    choices = [int(c) for c in choices]
    if default not in choices:
        raise ValueError(f"default {default} not among choices {choices}")
    probs = [1.0 / len(choices)] * len(choices)
    decision = None if tune else choices.index(default)
    return sch.sample_categorical(choices, probs, decision=decision)


@dataclass(frozen=True)
class Space:
    """A tunable schedule family.

    name
        Shown in tuning reports (e.g. ``"matmul"``, ``"bsr_wx"``).
    matches
        Whether this family schedules a PrimFunc.
    apply
        ``apply(sch, target, tune)``: schedule ``sch.mod["main"]`` in place; False if it cannot.
    postprocs
        MetaSchedule postprocessors for tuning (``None``: :func:`default_postprocs`; sparse
        kernels need a list without ``DisallowDynamicLoop``).
    structures
        ``(keyword, values)`` of a choice that changes the loop nest (e.g. matmul loop orders).
        MetaSchedule replays one trace per design space with new decisions, which cannot change
        such a choice, so tuning gets one design space per value: ``apply(..., keyword=value)``.
    """

    name: str
    matches: Callable[[tirx.PrimFunc], bool]
    apply: Callable[..., bool]
    postprocs: Callable[[], list] | None = None
    structures: tuple[str, tuple] | None = None


_SPACES: list[Space] = []


def register(space: Space) -> Space:
    """Add a family (later registrations of the same name replace earlier ones)."""
    _SPACES[:] = [s for s in _SPACES if s.name != space.name] + [space]
    return space


def space_for(func: tirx.PrimFunc) -> Space | None:
    """The registered family that schedules `func`, or None (then it has no design space)."""
    _load_families()
    for space in _SPACES:
        if space.matches(func):
            return space
    return None


def default_postprocs() -> list:
    """MetaSchedule's LLVM postprocessors minus ``RewriteLayout``: our families pack their
    constant weights themselves (``common.prepack``), and RewriteLayout would re-pack the
    already packed weight with a layout of its own."""
    from tvm.s_tir import meta_schedule as ms

    return [
        ms.postproc.DisallowDynamicLoop(),
        ms.postproc.RewriteParallelVectorizeUnroll(),
        ms.postproc.RewriteReductionBlock(),
    ]


def schedule_fn(space: Space, target: Target):
    """A MetaSchedule ``ScheduleFn`` sampling `space` (no extra schedule rules)."""
    from tvm.s_tir import meta_schedule as ms

    def sample(sch: s_tir.Schedule) -> list[s_tir.Schedule]:
        if space.structures is None:
            variants = [(sch, {})]
        else:
            keyword, values = space.structures
            variants = [(sch.copy(), {keyword: value}) for value in values]
        designs = [s for s, kw in variants if space.apply(s, target, True, **kw)]
        if not designs:
            raise ValueError(f"design space {space.name!r} does not apply to this workload")
        return designs

    postprocs = space.postprocs() if space.postprocs is not None else default_postprocs()
    return ms.space_generator.ScheduleFn(
        sample, sch_rules=[], postprocs=postprocs, mutator_probs="from-target"
    )


def _load_families() -> None:
    """Import the modules that register families (each registers at import)."""
    # Modules defining families are listed here as they gain design spaces.
    from . import bsr_matmul_space, conv2d, matmul  # noqa: F401
