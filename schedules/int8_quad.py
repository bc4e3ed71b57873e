"""The column-quad int8 kernels' gather: 4 arbitrary activation rows into VNNI order, in
registers.

A weight pruned with R x 1 blocks (e.g. 4x1) keeps, per block of R output rows, an arbitrary
set of reduction columns. Stored as R x 4 blocks of *aligned* groups of 4 columns it keeps a
block whenever any of its 4 columns is nonzero: ~34 % of the blocks at 90 % sparsity instead
of 10 %. Stored as R x 4 blocks of *any* 4 nonzero columns ("column quads",
`tvm_sparse.formats.ColumnQuads`) it keeps ~10 %, but each block needs its own operand: for
every activation column m, the 4 bytes ``Xk[col_e, m]`` (e < 4) side by side.

:func:`llvm_ir`'s helper builds that operand for a window of 64 columns from 4 row loads with
8 in-lane unpacks (bytes, then 16-bit pairs). In-lane unpacks (1 cycle) instead of full-width
byte permutes (``vpermt2b``, measured 21.8 vs 18.3 us for a 64x1024x1024 layer at 90 % 4x1)
leave the columns in a fixed order (:func:`stored_column`): position ``16 j + 4 v + t`` of a
window holds column ``16 v + 4 j + t`` (a swap of j and v, its own inverse). Conv packs store
each 64-column window of ``Xk`` in that order, so the helper's 4 outputs come out as columns
0-15, 16-31, 32-47, 48-63; MatMul packs keep the natural order and the MatMul kernels map the
columns back where they store their row-major output tile (free there).

The helpers are LLVM IR imported with ``pragma_import_llvm``; TVM inlines them. They take and
return vector values (the kernel does the loads and stores in TIR, so LLVM keeps TVM's alias
information and the accumulators stay in registers).
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.script import tirx as T

from .shuffles import IMPORT  # noqa: F401 - re-exported: the key that links the IR

#: Activation columns per gathered operand (4 zmm registers).
WINDOW = 64


def stored_column(position):
    """The activation column stored at `position` of a 64-column window (and vice versa)."""
    return position // 64 * 64 + position % 4 + (position // 16 % 4) * 4 + (position // 4 % 4) * 16


def _mask(values) -> str:
    return ", ".join(f"i32 {x}" for x in values)


@functools.cache
def llvm_ir() -> str:
    """``tvm_sparse_quad(<64 x i8> s0, s1, s2, s3) -> <256 x i8>``: for the 64 stored columns
    of a window (:func:`stored_column` order), ``out[4 m + e] = s_e[stored position of m]``."""
    v = "<64 x i8>"

    def unpack(unit: int, high: bool) -> list[int]:
        # per 16-byte lane: interleave units of `unit` bytes of the low (or high) half of a, b
        half = range(8 // unit, 16 // unit) if high else range(8 // unit)
        return [
            src + 16 * lane + unit * t + b
            for lane in range(4)
            for t in half
            for src in (0, 64)
            for b in range(unit)
        ]

    return "\n".join(
        [
            f"define <256 x i8> @tvm_sparse_quad({v} %s0, {v} %s1, {v} %s2, {v} %s3) {{",
            f"  %abl = shufflevector {v} %s0, {v} %s1, <64 x i32> <{_mask(unpack(1, False))}>",
            f"  %abh = shufflevector {v} %s0, {v} %s1, <64 x i32> <{_mask(unpack(1, True))}>",
            f"  %cdl = shufflevector {v} %s2, {v} %s3, <64 x i32> <{_mask(unpack(1, False))}>",
            f"  %cdh = shufflevector {v} %s2, {v} %s3, <64 x i32> <{_mask(unpack(1, True))}>",
            f"  %o0 = shufflevector {v} %abl, {v} %cdl, <64 x i32> <{_mask(unpack(2, False))}>",
            f"  %o1 = shufflevector {v} %abl, {v} %cdl, <64 x i32> <{_mask(unpack(2, True))}>",
            f"  %o2 = shufflevector {v} %abh, {v} %cdh, <64 x i32> <{_mask(unpack(2, False))}>",
            f"  %o3 = shufflevector {v} %abh, {v} %cdh, <64 x i32> <{_mask(unpack(2, True))}>",
            f"  %c01 = shufflevector {v} %o0, {v} %o1, <128 x i32> <{_mask(range(128))}>",
            f"  %c23 = shufflevector {v} %o2, {v} %o3, <128 x i32> <{_mask(range(128))}>",
            f"  %q = shufflevector <128 x i8> %c01, <128 x i8> %c23, <256 x i32>"
            f" <{_mask(range(256))}>",
            "  ret <256 x i8> %q",
            "}",
            "",
            f"define {v} @tvm_sparse_perm64({v} %x) {{",
            f"  %y = shufflevector {v} %x, {v} %x, <64 x i32>"
            f" <{_mask(stored_column(p) for p in range(64))}>",
            f"  ret {v} %y",
            "}",
            "",
        ]
    )


def gather(xk: tirx.Buffer, cols: tirx.Buffer, blk, offset):
    """The VNNI operand of columns ``offset .. offset + 63`` for block `blk`: uint8x256,
    ``[xk[cols[blk, e], column m] for m < 64 for e < 4]`` (4 loads and :func:`llvm_ir`)."""
    loads = [xk.vload([cols[blk, e], offset], f"uint8x{WINDOW}") for e in range(4)]
    return T.call_extern(f"uint8x{4 * WINDOW}", "tvm_sparse_quad", *loads)


def permute(x):
    """A 64-byte window (uint8x64 value) in :func:`stored_column` order."""
    return T.call_extern(f"uint8x{WINDOW}", "tvm_sparse_perm64", x)
