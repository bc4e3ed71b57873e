"""Block-sparse (BSR) packing of weights in the Y = X . W^T convention (W stored [N, K]).

A block "RxC" covers R output rows and C reduction elements. Shapes that do not divide are
padded with zero rows/columns; `n` and `k` record the logical size.

Kernels take the stored block count as a buffer size, so it is part of their task key. To keep
that key independent of where the nonzeros are, `bucket` pads the stored blocks up to the next
multiple of 1/`NNZ_BUCKETS` of all blocks: two prunings of a weight at the same sparsity give
the same buffer shapes (the padding blocks are zero and no block row points at them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NNZ_BUCKETS = 64  # stored-block counts are rounded up to a multiple of total_blocks / this


@dataclass(frozen=True)
class BSR:
    """Block compressed sparse rows: `data[b]` is block b, at block column `indices[b]`;
    block row r owns blocks `indptr[r]:indptr[r+1]` (ascending columns)."""

    data: np.ndarray  # [nnzb, R, C]
    indices: np.ndarray  # [nnzb] int32
    indptr: np.ndarray  # [N/R + 1] int32
    block: tuple[int, int]
    shape: tuple[int, int]  # logical [N, K] before padding

    @property
    def nnzb(self) -> int:
        """Blocks the block rows point at (the nonzero blocks)."""
        return int(self.indptr[-1])

    @property
    def stored(self) -> int:
        """Blocks held in `data` (`nnzb` plus any bucket padding)."""
        return int(self.indices.shape[0])

    @property
    def total_blocks(self) -> int:
        rows, cols = self.padded_shape
        return (rows // self.block[0]) * (cols // self.block[1])

    @property
    def padded_shape(self) -> tuple[int, int]:
        r, c = self.block
        return (-(-self.shape[0] // r) * r, -(-self.shape[1] // c) * c)

    @property
    def density(self) -> float:
        """Fraction of blocks stored (what the kernel's work is proportional to)."""
        total = self.total_blocks
        return self.nnzb / total if total else 0.0


def to_bsr(w: np.ndarray, block: tuple[int, int]) -> BSR:
    """Pack a 2-D [N, K] weight; all-zero blocks are dropped, zeros inside kept blocks stay."""
    if w.ndim != 2:
        raise ValueError(f"to_bsr: expected a 2-D [out, in] weight, got shape {w.shape}")
    r, c = block
    n, k = w.shape
    padded = np.pad(w, ((0, -n % r), (0, -k % c)))
    rows, cols = padded.shape[0] // r, padded.shape[1] // c
    blocks = padded.reshape(rows, r, cols, c).transpose(0, 2, 1, 3)  # [rows, cols, r, c]
    keep = blocks.any(axis=(2, 3))
    indptr = np.zeros(rows + 1, np.int32)
    np.cumsum(keep.sum(axis=1), out=indptr[1:])
    row_idx, col_idx = np.nonzero(keep)
    data = np.ascontiguousarray(blocks[row_idx, col_idx], dtype=w.dtype)
    return BSR(data, col_idx.astype(np.int32), indptr, (r, c), (n, k))


def to_dense(bsr: BSR) -> np.ndarray:
    """Inverse of `to_bsr` (logical shape)."""
    r, c = bsr.block
    rows, cols = bsr.padded_shape
    out = np.zeros((rows // r, cols // c, r, c), bsr.data.dtype)
    row_idx = np.repeat(np.arange(rows // r), np.diff(bsr.indptr))
    out[row_idx, bsr.indices[: bsr.nnzb]] = bsr.data[: bsr.nnzb]  # bucket padding ignored
    return out.transpose(0, 2, 1, 3).reshape(rows, cols)[: bsr.shape[0], : bsr.shape[1]]


def nnzb_bucket(nnzb: int, total_blocks: int, buckets: int = NNZ_BUCKETS) -> int:
    """The stored-block count for `nnzb` nonzero blocks out of `total_blocks`: rounded up to a
    multiple of ceil(total_blocks / buckets), and at least 1 (kernels take a non-empty buffer)."""
    step = max(1, -(-total_blocks // buckets))
    return max(1, -(-nnzb // step) * step)


def bucket(bsr: BSR, buckets: int = NNZ_BUCKETS) -> BSR:
    """`bsr` with zero blocks (column index 0, outside every block row) appended up to its
    `nnzb_bucket`; the matrix it represents is unchanged."""
    stored = nnzb_bucket(bsr.nnzb, bsr.total_blocks, buckets)
    extra = stored - bsr.stored
    if extra <= 0:
        return bsr
    data = np.concatenate([bsr.data, np.zeros((extra,) + bsr.data.shape[1:], bsr.data.dtype)])
    indices = np.concatenate([bsr.indices, np.zeros(extra, np.int32)])
    return BSR(data, indices, bsr.indptr, bsr.block, bsr.shape)


@dataclass(frozen=True)
class ColumnQuads:
    """Blocks of R rows x 4 *arbitrary* columns: block row r owns blocks
    `indptr[r]:indptr[r+1]`; block b holds `data[b][i, e] = W[r R + i, cols[b, e]]`. Each
    block row's nonzero columns (any of its R rows nonzero), ascending, are cut into groups of
    4; the last group is padded by repeating its last column with zero weights. An R x 1
    pruning keeps ~1/4 of the blocks R x 4 blocks of aligned columns keep (int8 VNNI kernels,
    whose reduction group is 4)."""

    data: np.ndarray  # [nq, R, 4]
    cols: np.ndarray  # [nq, 4] int32
    indptr: np.ndarray  # [N/R + 1] int32
    shape: tuple[int, int]  # logical [N, K]; N a multiple of R

    @property
    def nnzb(self) -> int:
        return int(self.indptr[-1])


def to_column_quads(w: np.ndarray, rows: int) -> ColumnQuads:
    """Pack a 2-D [N, K] weight (N a multiple of `rows`) as `ColumnQuads`."""
    n, k = w.shape
    if n % rows:
        raise ValueError(f"to_column_quads: {n} rows is not a multiple of {rows}")
    data, cols, indptr = [], [], [0]
    for b in range(n // rows):
        block_rows = w[b * rows : (b + 1) * rows]
        nz = np.flatnonzero(block_rows.any(axis=0))
        pad = -len(nz) % 4
        group = np.concatenate([nz, np.full(pad, nz[-1] if len(nz) else 0)]).reshape(-1, 4)
        vals = block_rows[:, group].transpose(1, 0, 2)  # [groups, rows, 4]
        if pad:
            vals[-1, :, 4 - pad :] = 0
        data.append(vals)
        cols.append(group)
        indptr.append(indptr[-1] + len(group))
    return ColumnQuads(
        np.ascontiguousarray(np.concatenate(data), dtype=w.dtype).reshape(-1, rows, 4),
        np.concatenate(cols).astype(np.int32).reshape(-1, 4),
        np.asarray(indptr, np.int32),
        (n, k),
    )
