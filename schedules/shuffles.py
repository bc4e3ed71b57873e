"""Register transposes for the int8 kernels and packs, as LLVM IR helpers called from TIR.

TIR expresses a transpose as one scalar move per element (or a gather per vector): a 16-row
output tile written down the columns of a row-major result cost more than the integer
arithmetic of a sparse MatMul. These helpers transpose small tiles held in vector registers
with rounds of pairwise interleaves (``shufflevector``; LLVM picks ``vpunpck*``/``vperm*``):
``R`` vectors of ``C`` elements in, ``out[c R + r] = x_r[c]`` out. They take and return
vector values, so the kernel does its loads and stores in TIR (TVM's alias information stays
intact) and the stack tiles in between stay in registers after LLVM inlines the helper
(imported with ``pragma_import_llvm``).
"""

from __future__ import annotations

import functools

from tvm.script import tirx as T

#: The AttrStmt key that links LLVM IR into a function's module.
IMPORT = "pragma_import_llvm"

_LLVM_TYPES = {"uint8": "i8", "int8": "i8", "uint32": "i32", "int32": "i32", "float32": "float"}


def _mask(values) -> str:
    return ", ".join(f"i32 {x}" for x in values)


def name(rows: int, cols: int, dtype: str, part: int = 0, parts: int = 1) -> str:
    return f"tvm_sparse_transpose_{rows}x{cols}_{dtype}_{part}of{parts}"


@functools.cache
def llvm_ir(rows: int, cols: int, dtype: str, parts: int = 1) -> str:
    """Helpers ``name(rows, cols, dtype, part, parts)(<cols x T> x0 .. x{rows-1})`` returning
    part `part` (of `parts` equal slices) of ``out[c * rows + r] = x_r[c]``."""
    assert rows & (rows - 1) == 0 and (rows * cols) % parts == 0, (rows, cols, parts)
    ty = _LLVM_TYPES[dtype]
    out = []
    for part in range(parts):
        lines = [
            f"define <{rows * cols // parts} x {ty}> @{name(rows, cols, dtype, part, parts)}("
            + ", ".join(f"<{cols} x {ty}> %x{i}" for i in range(rows))
            + ") {"
        ]
        level, size, unit = [f"%x{i}" for i in range(rows)], cols, 1
        while len(level) > 1:
            # out[2 u c + s u + b] = (a, b)[s][u c + b]: interleave units of u elements
            mask = _mask(
                s * size + unit * c + b
                for c in range(size // unit)
                for s in (0, 1)
                for b in range(unit)
            )
            nxt = []
            for j in range(0, len(level), 2):
                var = f"%t{unit}_{j // 2}"
                lines.append(
                    f"  {var} = shufflevector <{size} x {ty}> {level[j]}, <{size} x {ty}> "
                    f"{level[j + 1]}, <{2 * size} x i32> <{mask}>"
                )
                nxt.append(var)
            level, size, unit = nxt, 2 * size, 2 * unit
        width = size // parts
        if parts > 1:
            lines.append(
                f"  %part = shufflevector <{size} x {ty}> {level[0]}, <{size} x {ty}> poison, "
                f"<{width} x i32> <{_mask(range(part * width, (part + 1) * width))}>"
            )
            level = ["%part"]
        lines += [f"  ret <{width} x {ty}> {level[0]}", "}", ""]
        out += lines
    return "\n".join(out)


def transpose(rows: list, cols: int, dtype: str, part: int = 0, parts: int = 1):
    """The call of :func:`llvm_ir`'s helper on `rows` (vector values of `cols` lanes)."""
    lanes = len(rows) * cols // parts
    return T.call_extern(f"{dtype}x{lanes}", name(len(rows), cols, dtype, part, parts), *rows)


def transpose_tile(buf, rows: int, cols: int, dtype: str, col0, part: int = 0, parts: int = 1):
    """:func:`transpose` of ``buf[r, col0 : col0 + cols]`` for r < rows (a 2-D buffer)."""
    loads = [buf.vload([r, col0], f"{dtype}x{cols}") for r in range(rows)]
    return transpose(loads, cols, dtype, part, parts)
