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
    const_extent,
    inline_epilogues,
    normalize_prim_func,
    schedule_leftover,
    vector_width,
)


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
    for v in (4, 3, 2):
        if n % (lanes * v) == 0:
            vectors = v
            break
    rows = min(6 if vectors == 4 else 8, m)
    return MatmulTile(rows=rows, vectors=vectors, lanes=lanes)


class Matmul(dl.ScheduleRule):
    """Schedule one-reduction-axis contractions (MatMul, Gemm, batched MatMul, 1x1 conv as GEMM)."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        red, _ = _find_contraction(sch)
        if red is None:
            return None
        m, n = (
            (const_extent(it.dom) for it in red.iters[-3:-1])
            if len(red.iters) > 2
            else (1, const_extent(red.iters[0].dom))
        )
        if m is None or n is None:
            return None
        block_rv = red.block_rv
        name = sch.get(block_rv).name_hint
        dtype_bits = sch.get(block_rv).writes[0].source.dtype.bits
        tile = _tile_for(m, n, dtype_bits)
        # Inline producers (casts, zero-point shifts) into the contraction.
        for info in normalize_prim_func(sch):
            if info.block_rv != block_rv and info.is_injective():
                try:
                    sch.compute_inline(info.block_rv)
                except Exception:
                    continue
        block_rv = sch.get_sblock(name)
        loops = sch.get_loops(block_rv)
        if len(red.iters) == 2:  # M = 1 squeezed away by normalisation: a GEMV
            (j, k), batch, i = loops, [], None
        else:
            *batch, i, j, k = loops
        j0, j1, j2 = sch.split(j, [None, tile.vectors, tile.lanes])
        order = [*batch, j0]
        if i is not None:
            i0, i1 = sch.split(i, [None, tile.rows])
            order.append(i0)
        k_outer = k
        kc = _k_block(const_extent(red.iters[-1].dom))
        if kc:
            k_outer, k = sch.split(k, [None, kc])
            order.append(k_outer)
        order += [k, i1, j1, j2] if i is not None else [k, j1, j2]
        sch.reorder(*order)
        outer = sch.fuse(*batch, j0, i0) if i is not None else sch.fuse(*batch, j0)
        acc = sch.cache_write(block_rv, 0, "global")  # < 1 KB "global" => registers
        sch.reverse_compute_at(acc, outer, preserve_unit_loops=True)
        inline_epilogues(sch, acc)
        sch.parallel(outer)
        if i is not None:
            sch.unroll(i1)
        sch.unroll(j1)
        sch.vectorize(j2)
        init = sch.decompose_reduction(block_rv, k_outer)
        sch.vectorize(sch.get_loops(init)[-1])
        wb_inner = sch.get_loops(acc)[-1]
        if tile.lanes > 1:
            _, lanes = sch.split(wb_inner, [None, tile.lanes])
            sch.vectorize(lanes)
        schedule_leftover(sch, skip={name, f"{name}_init", sch.get(acc).name_hint})
        return sch
