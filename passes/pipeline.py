"""The compilation pipeline, in named phases; each phase's IR can be dumped for debugging."""

from __future__ import annotations

import os
from collections.abc import Callable

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.s_tir import SBlockRealize
from tvm.s_tir import dlight as dl
from tvm.s_tir.meta_schedule.database import Database

from tvm_sparse.passes.convert_layout import legalize_conv2d
from tvm_sparse.schedules import default_rules
from tvm_sparse.schedules.common import PREPACK_ATTR

PHASES = ("simplify", "legalize", "schedule")


def _phase_passes(name: str, target: tvm.target.Target) -> list[tvm.transform.Pass]:
    if name == "simplify":
        return [
            relax.transform.FoldConstant(),
            relax.transform.CanonicalizeBindings(),
            relax.transform.DeadCodeElimination(),
        ]
    if name == "legalize":
        return [
            relax.transform.LegalizeOps({"relax.nn.conv2d": legalize_conv2d}),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            # Weights and constants may be read in a packed layout (schedules.common.prepack).
            relax.transform.AttachAttrLayoutFreeBuffers(),
        ]
    if name == "schedule":
        # Tuned records first (from the current MetaSchedule database, see tvm_sparse.tuning);
        # the default rules then schedule whatever the database does not cover.
        tuned = [relax.transform.MetaScheduleApplyDatabase()] if Database.current() else []
        # Weight repacking blocks become functions of their own, run at compile time.
        prepack = [
            _split_layout_rewrite_preproc(),
            relax.transform.FoldConstant(),
        ]
        return tuned + [dl.ApplyDefaultSchedule(*default_rules())] + prepack
    raise ValueError(f"unknown phase {name!r}")


def _packs_weights(func: tvm.tirx.PrimFunc) -> bool:
    """Whether `func` has a weight-prepacking block (``schedules.common.PREPACK_ATTR``)."""
    if not func.attrs or "layout_free_buffers" not in func.attrs:
        return False
    if not isinstance(func.body, SBlockRealize):
        return False
    return any(PREPACK_ATTR in block.annotations for block in _blocks(func.body))


def _blocks(stmt):
    """Every block under `stmt` (a walk over the statement tree)."""
    if stmt is None:
        return
    if isinstance(stmt, SBlockRealize):
        yield stmt.block
        yield from _blocks(stmt.block.body)
        return
    if isinstance(stmt, tvm.tirx.SeqStmt):
        for child in stmt.seq:
            yield from _blocks(child)
        return
    if isinstance(stmt, tvm.tirx.IfThenElse):
        yield from _blocks(stmt.then_case)
        yield from _blocks(stmt.else_case)
        return
    body = getattr(stmt, "body", None)  # loops, attributes, lets, buffer declarations
    if isinstance(body, tvm.tirx.Stmt):
        yield from _blocks(body)


def _split_layout_rewrite_preproc() -> tvm.transform.Pass:
    """Relax's SplitLayoutRewritePreproc (the weight-packing blocks of a PrimFunc become a
    function of their own) over the PrimFuncs that pack weights: it rejects some that do not
    (bodies without a root block or without child blocks: our hand-written kernels), so the
    others are set aside while it runs."""

    @tvm.transform.module_pass(opt_level=0, name="SplitLayoutRewritePreprocTolerant")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        aside = {
            gv: func
            for gv, func in mod.functions.items()
            if isinstance(func, tvm.tirx.PrimFunc) and not _packs_weights(func)
        }
        attrs = {key: mod.attrs[key] for key in mod.attrs.keys()} if mod.attrs else None
        kept = tvm.IRModule(
            {gv: f for gv, f in mod.functions.items() if gv not in aside},
            attrs=attrs,
            global_infos=mod.global_infos,
        )
        out = relax.transform.SplitLayoutRewritePreproc()(kept)
        for gv, func in aside.items():
            out[gv] = func
        return out

    return _pass


def optimize(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    dump_dir: str | None = None,
    extra: dict[str, list[tvm.transform.Pass]] | None = None,
    on_phase: Callable[[str], None] | None = None,
    phases: tuple[str, ...] = PHASES,
) -> tvm.IRModule:
    """Run the phases in order; `extra[phase]` passes run before that phase's own passes.

    Parameters
    ----------
    mod
        The imported Relax module.
    target
        The build target (schedule rules read its features).
    dump_dir
        If given, the IR after each phase is written to ``dump_dir/NN-<phase>.py``.
    extra
        Passes later stages (sparse rewrites, tuning) insert in front of a phase.
    on_phase
        Called with each phase name as it starts (progress display).
    phases
        The phases to run (in `PHASES` order); compile() stops after "simplify" to choose
        kernels, then runs the rest.
    """
    extra = extra or {}
    with target:
        for index, name in enumerate(PHASES):
            if name not in phases:
                continue
            if on_phase:
                on_phase(name)
            seq = tvm.transform.Sequential(extra.get(name, []) + _phase_passes(name, target))
            mod = seq(mod)
            if dump_dir:
                os.makedirs(dump_dir, exist_ok=True)
                with open(os.path.join(dump_dir, f"{index:02d}-{name}.py"), "w") as f:
                    f.write(mod.script(show_meta=False))
    return mod


def lowering_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """Relax lowering after our phases (TVM's CPU pipeline minus legalization, already done)."""

    @tvm.transform.module_pass(opt_level=0, name="TvmSparseLowering")
    def _lower(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                cpu_pipeline.library_dispatch_passes(target)
                + cpu_pipeline.dataflow_lower_passes(target)
                + cpu_pipeline.finalize_passes(target)
            )
            return seq(mod)

    return _lower
