"""16x16 float32 tile transposes in AVX-512 registers, as an LLVM IR helper for TIR kernels.

TIR can only express a transpose as scalar moves (one store per element, ~8 us per core for a
64x1024 activation) or as gathers. This helper loads 16 rows, transposes them with four stages
of two-register shuffles (unpack ps, unpack pd, two 128-bit lane shuffles: 64 shuffles) and
stores 16 rows. Kernels link it with ``pragma_import_llvm`` (see :mod:`.recurrent_llvm_ir`;
TVM inlines imported functions) and call it through :func:`transpose16`.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

#: Rows and columns of one tile.
TILE = 16


def _lanes(pattern: tuple[int, ...]) -> list[int]:
    """A within-128-bit-lane pattern (indices into the concatenation of two registers)
    repeated over the four lanes."""
    return [lane * 4 + x for lane in range(4) for x in pattern]


def _blocks(sel: tuple[int, ...]) -> list[int]:
    """Whole 128-bit lanes picked from the concatenation of two registers (lanes 0..7)."""
    return [s * 4 + x for s in sel for x in range(4)]


def stages() -> list[list[tuple[int, int, list[int]]]]:
    """The shuffle network: per stage, per output register (a, b, mask over concat(a, b))."""
    lo_ps, hi_ps = _lanes((0, 16, 1, 17)), _lanes((2, 18, 3, 19))
    lo_pd, hi_pd = _lanes((0, 1, 16, 17)), _lanes((2, 3, 18, 19))
    even, odd = _blocks((0, 2, 4, 6)), _blocks((1, 3, 5, 7))
    s1 = [(i - i % 2, i - i % 2 + 1, hi_ps if i % 2 else lo_ps) for i in range(16)]
    s2 = []
    for b in range(0, 16, 4):
        s2 += [(b, b + 2, lo_pd), (b, b + 2, hi_pd), (b + 1, b + 3, lo_pd), (b + 1, b + 3, hi_pd)]
    s3 = [
        (i - i % 8 + i % 4, i - i % 8 + i % 4 + 4, odd if i % 8 >= 4 else even) for i in range(16)
    ]
    s4 = [(i % 8, i % 8 + 8, odd if i >= 8 else even) for i in range(16)]
    return [s1, s2, s3, s4]


def _llvm_ir() -> str:
    vec = "<16 x float>"
    lines = [
        "define void @tvm_sparse_transpose16(ptr %sbase, i32 %soff, i32 %ss,"
        " ptr %dbase, i32 %doff, i32 %ds) {",
        "  %src = getelementptr float, ptr %sbase, i32 %soff",
        "  %dst = getelementptr float, ptr %dbase, i32 %doff",
    ]
    for i in range(TILE):
        lines += [
            f"  %so{i} = mul i32 %ss, {i}",
            f"  %sp{i} = getelementptr float, ptr %src, i32 %so{i}",
            f"  %v0_{i} = load {vec}, ptr %sp{i}, align 4",
        ]
    for s, stage in enumerate(stages()):
        for i, (a, b, mask) in enumerate(stage):
            m = ", ".join(f"i32 {x}" for x in mask)
            args = f"{vec} %v{s}_{a}, {vec} %v{s}_{b}"
            lines.append(f"  %v{s + 1}_{i} = shufflevector {args}, <16 x i32> <{m}>")
    for i in range(TILE):
        lines += [
            f"  %do{i} = mul i32 %ds, {i}",
            f"  %dp{i} = getelementptr float, ptr %dst, i32 %do{i}",
            f"  store {vec} %v4_{i}, ptr %dp{i}, align 4",
        ]
    lines += ["  ret void", "}", ""]
    return "\n".join(lines)


LLVM_IR = _llvm_ir()
#: The AttrStmt key that links :data:`LLVM_IR` into the function's LLVM module.
IMPORT = "pragma_import_llvm"


def transpose16(
    src: tirx.Buffer, src_offset, src_stride, dst: tirx.Buffer, dst_offset, dst_stride
) -> tirx.PrimExpr:
    """``dst.flat[dst_offset + j * dst_stride + i] = src.flat[src_offset + i * src_stride + j]``
    for i, j in 0..15 (strides and offsets in elements)."""
    return T.call_extern(
        "void",
        "tvm_sparse_transpose16",
        src.data,
        src_offset,
        src_stride,
        dst.data,
        dst_offset,
        dst_stride,
    )
