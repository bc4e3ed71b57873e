"""Sparse storage of a recurrent layer's R for the kernels of :mod:`.recurrent_sparse`.

The kernels keep the dense kernels' panel order (so the input projection is unchanged): output
``(panel p, gate g, lane j)`` is hidden unit ``p * unit + j`` of gate ``g``. Each gate of a
layer is either *sparse*, stored in the layer's one sparse :class:`Format`, or *dense*, stored
as dense panels ``[panels, H, dense_gates * unit]`` like the dense kernel's. The sparse rows
are numbered panel by panel, then by sparse gate, then in slices of ``Format.rows`` lanes;
slice ``(p, s, q)`` is number ``(p * n_sparse + s) * (unit // rows) + q``.

Formats (``FORMATS``, one table for dispatch, tests and benchmarks):

- ``bsr16x1`` / ``bsr8x1``: block-sparse rows, blocks of 16 (8) output rows by one column;
  per stored block one broadcast of ``h[k]`` and one FMA. Blocks with some zeros are stored
  with their zeros (on unstructured patterns this is the "explicit zeros" variant).
- ``sell16``: sliced ELLPACK over 16 rows: entry ``e`` of a slice holds one nonzero of each
  of its 16 rows (zero-padded to the slice's longest row) and their 16 columns; per entry
  one hardware gather of ``h`` and one FMA. For unstructured patterns.
- ``win16x32``: as ``sell16``, but every entry takes its 16 columns from one 32-column
  window of ``h`` (``window``: its first column; ``index``: uint8 offsets in it), so the
  lookup is two loads and one ``vpermi2ps`` instead of a gather (about 5x cheaper on Zen 5);
  each window is padded to the slice row with the most nonzeros in it. For unstructured
  patterns.

Each slice's entries are padded with zeros to a multiple of ``chains``, the number of
independent accumulators the kernel rotates through (an FMA chain is latency-bound).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .recurrent_layout import GATES, PanelLayout, onnx_rows, panel_layout, tile_rows


@dataclass(frozen=True)
class Format:
    """A sparse storage format: ``rows`` outputs per slice (the vector width) and how an entry
    finds its ``h`` values: "broadcast" (BSR: one column per block), "gather" (SELL: one
    column per lane) or "window" (one column per lane within a 32-column window)."""

    name: str
    rows: int
    lookup: str

    @property
    def per_lane(self) -> bool:
        """Whether the index array holds one column per lane ([entries, rows])."""
        return self.lookup != "broadcast"


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("bsr16x1", 16, "broadcast"),
        Format("bsr8x1", 8, "broadcast"),
        Format("sell16", 16, "gather"),
        Format("win16x32", 16, "window"),
    )
}
#: Columns of one window of the "window" lookup.
WINDOW = 32
#: Relative cost per stored entry, by format, and per panel (epilogue), for splitting panels
#: among threads (about cycles on Zen 5); dense gates cost 1 per (column, 16 lanes).
ENTRY_COST = {"bsr16x1": 1.0, "bsr8x1": 0.7, "sell16": 8.0, "win16x32": 1.6}
PANEL_COST = 24.0


@dataclass
class GroupWeights:
    """One gate group's R: the sparse gates in the format (``data``, ``index``, ``indptr``)
    and the dense gates as panels (``dense``); None where the group has no such gates."""

    data: np.ndarray | None  # [entries, rows] float32
    index: np.ndarray | None  # [entries] (BSR), [entries, 16] int32 (SELL) or uint8 (window)
    indptr: np.ndarray | None  # [slices + 1] int32, each slice a multiple of chains long
    dense: np.ndarray | None  # [panels, H, n_dense * unit] float32
    cost: np.ndarray  # [panels] relative work, for the thread split
    window: np.ndarray | None = None  # [entries] int32: first column of the entry's window


@dataclass
class SparseWeights:
    """A layer direction's R packed for one sparse kernel variant."""

    kind: str
    fmt: Format
    sparse: tuple[bool, ...]  # per ONNX gate
    layout: PanelLayout
    chains: int
    groups: list[GroupWeights]
    bounds: np.ndarray  # [groups, threads + 1] int32: panel ranges of each thread's chunk

    def arrays(self) -> list[np.ndarray]:
        """The kernel's weight arguments in order: per group data, index, window, indptr, dense
        (those present), then bounds."""
        out = []
        for grp in self.groups:
            arrays = (grp.data, grp.index, grp.window, grp.indptr, grp.dense)
            out += [a for a in arrays if a is not None]
        return out + [self.bounds]

    def sizes(self) -> list[tuple[int, int]]:
        """(sparse entries, dense gates) per group: the buffer sizes the kernel is built for."""
        out = []
        for g, grp in zip(self.layout.groups, self.groups, strict=True):
            n_dense = sum(not self.sparse[i] for i in range(g.start, g.stop))
            out.append((0 if grp.index is None else grp.index.shape[0], n_dense))
        return out


def chains_for(batch: int, width: int) -> int:
    """Independent accumulators per sparse slice: 4 FMA chains in flight at batch 1; wider
    batch tiles already give each loaded block several independent FMAs."""
    return max(1, 4 // tile_rows(batch, width))


def pack_sparse(
    kind: str,
    r: np.ndarray,
    fmt: str,
    sparse: tuple[bool, ...],
    *,
    batch: int = 1,
    threads: int = 2,
) -> SparseWeights:
    """Pack ONNX ``R`` ``[gates * H, H]`` (one direction) for a sparse kernel.

    Parameters
    ----------
    kind
        Kernel kind ("LSTM", "GRU", "GRU0", "RNN"); the panel layout is that of the dense
        kernel for ``batch``.
    fmt
        A :data:`FORMATS` name; its ``rows`` must divide every group's unit.
    sparse
        Per ONNX gate: stored in ``fmt`` (True) or as dense panels.
    threads
        Chunks the panels are split into (balanced by stored entries); at least two, since
        TVM drops a parallel loop of one iteration (and the kernel needs one).

    Returns
    -------
    SparseWeights
        ``.arrays()`` are the kernel's weight arguments; the rest fixes the kernel's shapes.
    """
    form = FORMATS[fmt]
    r = np.asarray(r, np.float32)
    n_h = r.shape[1]
    lay = panel_layout(kind, n_h, batch)
    if len(sparse) != GATES[kind]:
        raise ValueError(f"{kind}: {GATES[kind]} gates, got {len(sparse)} flags")
    if any(g.unit % form.rows for g in lay.groups):
        raise ValueError(f"{fmt}: {form.rows} rows do not divide the panel units of {lay}")
    chains = chains_for(batch, max(g.width for g in lay.groups))
    groups = []
    for gi, g in enumerate(lay.groups):
        rows = onnx_rows(lay, gi).reshape(lay.panels(gi), g.stop - g.start, g.unit)
        flags = np.array(sparse[g.start : g.stop])
        padded = np.concatenate([r, np.zeros((1, n_h), r.dtype)])  # row -1: a padded unit
        groups.append(_pack_group(padded, rows, flags, form, chains))
    chunks = max(2, threads)
    bounds = np.stack([_split(grp.cost, chunks) for grp in groups]).astype(np.int32)
    return SparseWeights(kind, form, tuple(sparse), lay, chains, groups, bounds)


def _pack_group(r, rows, flags, form, chains) -> GroupWeights:
    n_p, _, unit = rows.shape
    cost = np.full(n_p, PANEL_COST)
    data = index = indptr = dense = window = None
    if flags.any():
        data, index, window, indptr = _pack_slices(r[rows[:, flags].reshape(-1)], form, chains)
        per_panel = np.diff(indptr[:: flags.sum() * unit // form.rows])
        cost += per_panel * ENTRY_COST[form.name]
    if not flags.all():
        dense = r[rows[:, ~flags]]  # [panels, dense gates, unit, H]
        dense = np.ascontiguousarray(dense.transpose(0, 3, 1, 2).reshape(n_p, r.shape[1], -1))
        cost += dense.shape[1] * dense.shape[2] / 16
    return GroupWeights(data, index, indptr, dense, cost, window)


def _pack_slices(m: np.ndarray, form: Format, chains: int):
    """Rows of ``m`` in slices of ``form.rows``: (data, index, window, indptr), slices padded
    with zero entries to a multiple of ``chains``; at least one entry so no buffer is empty."""
    blocks = m.reshape(-1, form.rows, m.shape[1])
    parts = [_slice_entries(b, form) for b in blocks]
    counts = np.array([len(p[0]) for p in parts])
    padded = -(-counts // chains) * chains
    indptr = np.zeros(len(parts) + 1, np.int32)
    np.cumsum(padded, out=indptr[1:])
    total = max(int(indptr[-1]), 1)
    data = np.zeros((total, form.rows), np.float32)
    index = np.zeros((total, form.rows) if form.per_lane else (total,), np.int32)
    window = np.zeros(total, np.int32)
    for start, (d, i, w) in zip(indptr, parts):
        data[start : start + len(d)], index[start : start + len(d)] = d, i
        window[start : start + len(d)] = w
    if form.lookup == "window":
        return data, index.astype(np.uint8), window, indptr
    return data, index, None, indptr


def _slice_entries(block: np.ndarray, form: Format):
    """(data [n, rows], index, window [n]) of one slice's entries, unpadded."""
    if form.lookup == "broadcast":
        cols = np.flatnonzero(block.any(axis=0))
        return block[:, cols].T, cols, np.zeros(len(cols), np.int32)
    if form.lookup == "gather":
        counts = (block != 0).sum(axis=1)
        n = int(counts.max())
        data, index = np.zeros((n, form.rows), np.float32), np.zeros((n, form.rows), np.int32)
        for lane, row in enumerate(block):
            cols = np.flatnonzero(row)
            data[: cols.size, lane], index[: cols.size, lane] = row[cols], cols
        return data, index, np.zeros(n, np.int32)
    n_w = -(-block.shape[1] // WINDOW)
    win = np.pad(block, ((0, 0), (0, n_w * WINDOW - block.shape[1]))).reshape(form.rows, n_w, -1)
    nz = win != 0
    per_window = nz.sum(axis=2).max(axis=0)  # entries each window needs
    first = np.concatenate([[0], np.cumsum(per_window)])
    lane, w, col = np.nonzero(nz)
    rank = (np.cumsum(nz, axis=2) - 1)[lane, w, col]
    n = int(first[-1])
    data, index = np.zeros((n, form.rows), np.float32), np.zeros((n, form.rows), np.int32)
    data[first[w] + rank, lane], index[first[w] + rank, lane] = win[lane, w, col], col
    window = np.repeat(np.arange(n_w, dtype=np.int32) * WINDOW, per_window)
    return data, index, window


def _split(cost: np.ndarray, threads: int) -> np.ndarray:
    """Panel boundaries of ``threads`` contiguous chunks of about equal total cost."""
    cum = np.concatenate([[0.0], np.cumsum(cost)])
    inner = np.searchsorted(cum, cum[-1] * np.arange(1, threads) / threads)
    return np.concatenate([[0], np.clip(inner, 0, len(cost)), [len(cost)]])


def sparse_pattern_r(weights: SparseWeights, n_h: int) -> np.ndarray:
    """The dense ONNX ``R`` the packed weights represent (for tests)."""
    lay, out = weights.layout, np.zeros((GATES[weights.kind] * n_h, n_h), np.float32)
    rows_per = weights.fmt.rows
    for gi, (g, grp) in enumerate(zip(lay.groups, weights.groups, strict=True)):
        rows = onnx_rows(lay, gi).reshape(lay.panels(gi), g.stop - g.start, g.unit)
        flags = np.array(weights.sparse[g.start : g.stop])
        if grp.index is not None:
            srows = rows[:, flags].reshape(-1, rows_per)
            for s, lanes in enumerate(srows):
                lo, hi = grp.indptr[s], grp.indptr[s + 1]
                for lane, row in enumerate(lanes):
                    if row < 0:
                        continue
                    cols = grp.index[lo:hi, lane] if weights.fmt.per_lane else grp.index[lo:hi]
                    if grp.window is not None:
                        cols = cols.astype(np.int64) + grp.window[lo:hi]
                    np.add.at(out[row], cols, grp.data[lo:hi, lane])
        if grp.dense is not None:
            drows = rows[:, ~flags]  # [panels, dense gates, unit]
            values = grp.dense.reshape(drows.shape[0], n_h, drows.shape[1], drows.shape[2])
            keep = drows >= 0
            out[drows[keep]] = values.transpose(0, 2, 3, 1)[keep]
    return out
