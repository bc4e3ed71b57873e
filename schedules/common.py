"""Helpers shared by the schedule rules: block analysis and loop utilities."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import SBlockInfo, normalize_prim_func

from .spaces import choose_rv

__all__ = [
    "SBlockInfo",
    "normalize_prim_func",
    "const_extent",
    "inline_epilogues",
    "vector_width",
    "schedule_leftover",
    "choose_factor",
    "layout_free",
    "prepack",
]

# The annotation MetaSchedule's RewriteLayout puts on a weight-repacking block; Relax's
# SplitLayoutRewritePreproc moves such blocks into their own function, which FoldConstant then
# runs at compile time when the weight is a constant.
PREPACK_ATTR = "meta_schedule.layout_rewrite_preproc"

# A T.alloc_buffer annotation: keep the buffer on the stack (an LLVM alloca) instead of a
# TVMBackendAllocWorkspace call per loop iteration.
ON_STACK = {"disable_lower_builtin": True}

# Work below this many output elements is not worth waking the thread pool for (~2-5 us).
PARALLEL_MIN_ELEMS = 16384


def const_extent(expr) -> int | None:
    """The integer value of a loop/iter extent, or None when it is symbolic."""
    if isinstance(expr, int):
        return expr
    return int(expr.value) if isinstance(expr, tirx.IntImm) else None


def vector_width(extent: int, dtype_bits: int = 32, register_bits: int = 512) -> int:
    """Largest power-of-two lane count <= one register that divides `extent` (1 if none)."""
    lanes = register_bits // dtype_bits
    while lanes > 1 and extent % lanes:
        lanes //= 2
    return max(lanes, 1)


def inline_epilogues(sch: s_tir.Schedule, acc) -> None:
    """Fold the single-consumer elementwise chain after `acc` into its write-back loop nest."""
    while True:
        consumers = sch.get_consumers(acc)
        if len(consumers) != 1:
            return
        try:
            sch.reverse_compute_inline(consumers[0])
        except Exception:  # not elementwise on the tile: it stays a separate loop nest
            return


def _schedule_block(sch: s_tir.Schedule, info: SBlockInfo) -> None:
    loops = sch.get_loops(info.block_rv)
    kinds = [it.kind for it in info.iters]
    if not loops or len(loops) != len(kinds):
        return
    lead = 0
    while lead < len(kinds) and kinds[lead] == "S":
        lead += 1
    if lead == 0:
        return
    extents = [const_extent(it.dom) for it in info.iters[:lead]]
    if any(e is None for e in extents):
        return
    total = 1
    for e in extents:
        total *= e
    fused = sch.fuse(*loops[:lead]) if lead > 1 else loops[0]
    dtype_bits = sch.get(info.block_rv).writes[0].source.dtype.bits
    if info.is_injective():
        vec = vector_width(total, dtype_bits)
        if vec > 1:
            fused, inner = sch.split(fused, [None, vec])
            sch.vectorize(inner)
            total //= vec
        if total * vec >= PARALLEL_MIN_ELEMS and total > 1:
            sch.parallel(fused)
    elif total > 1 and total * max(1, _reduction_size(info)) >= PARALLEL_MIN_ELEMS:
        sch.parallel(fused)


def _reduction_size(info: SBlockInfo) -> int:
    size = 1
    for it in info.iters:
        if it.kind == "R":
            size *= const_extent(it.dom) or 1
    return size


def schedule_leftover(sch: s_tir.Schedule, skip: set[str] = frozenset()) -> None:
    """Parallelise and vectorise the root-level blocks no other rule took care of."""
    for info in normalize_prim_func(sch) or []:
        if sch.get(info.block_rv).name_hint in skip:
            continue
        try:
            _schedule_block(sch, info)
        except Exception:  # a shape the simple recipe cannot handle stays correct, unscheduled
            continue


def choose_factor(sch: s_tir.Schedule, choices, default: int, tune: bool):
    """A :func:`spaces.choose` decision as ``(value, ExprRV)``.

    Pass the ExprRV (not the value) to ``split``: MetaSchedule's search replays the design
    space's instructions with fresh decisions, so only factors that reference the sampled
    variable change between candidates; a literal would freeze the first sample.
    """
    rv = choose_rv(sch, choices, default, tune)
    return int(sch.get(rv)), rv


def layout_free(sch: s_tir.Schedule, buffer: tirx.Buffer) -> bool:
    """Whether `buffer` is a parameter that Relax marked layout-free (a model weight or
    constant, see ``relax.transform.AttachAttrLayoutFreeBuffers``): the kernel may then read it
    in any layout, packed once at compile time.

    The Python PrimFunc exposes no buffer map; parameters and their buffers share names in the
    functions Relax legalisation and FuseTIR produce, so the name identifies the parameter (an
    ambiguous name means no).
    """
    func = sch.mod["main"]
    free = func.attrs.get("layout_free_buffers") if func.attrs else None
    if not free:
        return False
    names = [p.name for p in func.params]
    if names.count(buffer.name) != 1:
        return False
    return names.index(buffer.name) in {int(i) for i in free}


def prepack(sch: s_tir.Schedule, block, read_index: int, index_map):
    """Read input `read_index` of `block` from a copy in the layout `index_map` gives; the copy
    is a root-level block annotated for Relax's weight-prepacking passes (see PREPACK_ATTR), so
    the build runs it once at compile time, and MetaSchedule's builder leaves it out of the
    measured kernel. Returns the copy block."""
    packed = sch.cache_read(block, read_index, "global")
    sch.transform_layout(packed, ("write", 0), index_map)
    sch.annotate(packed, PREPACK_ATTR, True)
    return packed
