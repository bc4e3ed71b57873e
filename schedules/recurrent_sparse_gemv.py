"""The recurrent GEMV of one panel for the sparse kernels: sparse slices and dense gates.

A panel's gate pre-activations ``acc[rows, width]`` get ``R_g @ h`` added for every gate ``g``
of the group: the sparse gates slice by slice (``rows`` lanes each), each slice's entries
spread over ``chains`` accumulators so the FMAs do not wait for each other; the dense gates
by broadcast-FMA over their panel ``[H, n_dense * unit]``, ``H`` split the same way. Sparse
entries differ only in how they find their ``h`` values (:data:`Format.lookup`): one
broadcast per block (BSR), a gather per entry (SELL), or a permute of a 32-float window.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from . import recurrent_llvm_ir as lir
from .recurrent_cells import ON_STACK
from .recurrent_layout import tile_rows
from .recurrent_sparse_pack import SparseWeights


def _column(slots: list[int], unit: int):
    """acc column of the ``s``-th gate of ``slots`` (gate indices within the group), as a TIR
    expression of the unrolled loop variable ``s`` (constant once unrolled)."""

    def col(s):
        expr = tirx.const(slots[-1] * unit, "int32")
        for k in range(len(slots) - 2, -1, -1):
            expr = tirx.Select(s == k, tirx.const(slots[k] * unit, "int32"), expr)
        return expr

    return col


def _lookup(lookup: str, lanes: int, n_b: int, n_hk: int):
    """``f(h, si, sw, s, b, e)``: the ``lanes`` values of ``h[s, b]`` entry ``e`` multiplies."""

    def broadcast(h, si, sw, s, b, e):
        return T.broadcast(h[s, b, si[e]], lanes)

    def gather(h, si, sw, s, b, e):
        return lir.gather16(h, (s * n_b + b) * n_hk, si[e, T.ramp(0, 1, 16)])

    def window(h, si, sw, s, b, e):
        index = T.cast(si[e, T.ramp(0, 1, 16)], "int32x16")
        return lir.window32(h, (s * n_b + b) * n_hk + sw[e], index)

    return {"broadcast": broadcast, "gather": gather, "window": window}[lookup]


@T.inline
def _sparse_gates(acc, sd, si, sw, sp, h, s, p, b0, rows, n_s, nsub, lanes, chains, col, value):
    """acc[i, gate columns] += R_sparse @ h[s, b0 + i] for the panel's ``n_s`` sparse gates."""
    for g in T.unroll(n_s):
        for q in T.unroll(nsub):
            part = T.alloc_buffer((chains, rows, lanes), "float32", annotations=ON_STACK)
            for a, i in T.grid(chains, rows):
                part[a, i, T.ramp(0, 1, lanes)] = T.broadcast(T.float32(0), lanes)
            lo: T.let = sp[(p * n_s + g) * nsub + q]
            n_iter: T.let = (sp[(p * n_s + g) * nsub + q + 1] - lo) // chains
            for e in range(n_iter):
                for a in T.unroll(chains):
                    for i in T.unroll(rows):
                        part[a, i, T.ramp(0, 1, lanes)] = part[a, i, T.ramp(0, 1, lanes)] + sd[
                            lo + e * chains + a, T.ramp(0, 1, lanes)
                        ] * value(h, si, sw, s, b0 + i, lo + e * chains + a)
            base: T.let = col(g) + q * lanes
            for i in T.unroll(rows):
                for a in T.unroll(chains):
                    for j in T.vectorized(lanes):
                        acc[i, base + j] = acc[i, base + j] + part[a, i, j]


@T.inline
def _dense_gates(acc, rd, h, s, p, b0, rows, n_d, unit, n_k, chains, col):
    """acc[i, gate columns] += h @ R for the panel's dense gates (``rd[p]``: [H, n_d * unit])."""
    part = T.alloc_buffer((chains, rows, n_d * unit), "float32", annotations=ON_STACK)
    for a, i in T.grid(chains, rows):
        for j in T.vectorized(n_d * unit):
            part[a, i, j] = T.float32(0)
    for k in range(n_k // chains):
        for a in T.unroll(chains):
            for i in T.unroll(rows):
                for j in T.vectorized(n_d * unit):
                    part[a, i, j] = (
                        part[a, i, j] + h[s, b0 + i, k * chains + a] * rd[p, k * chains + a, j]
                    )
    for k in range(n_k % chains):
        for i in T.unroll(rows):
            for j in T.vectorized(n_d * unit):
                part[0, i, j] = (
                    part[0, i, j]
                    + h[s, b0 + i, n_k - n_k % chains + k] * rd[p, n_k - n_k % chains + k, j]
                )
    for g in T.unroll(n_d):
        base: T.let = col(g)
        for i in T.unroll(rows):
            for a in T.unroll(chains):
                for j in T.vectorized(unit):
                    acc[i, base + j] = acc[i, base + j] + part[a, i, g * unit + j]


class Group:
    """Static facts about one gate group of a sparse kernel (Python values the macros use)."""

    def __init__(self, weights: SparseWeights, index: int, batch: int):
        grp, lay = weights.layout.groups[index], weights.layout
        flags = weights.sparse[grp.start : grp.stop]
        self.unit, self.width, self.panels = grp.unit, grp.width, lay.panels(index)
        self.sparse = [g for g, f in enumerate(flags) if f]
        self.dense = [g for g, f in enumerate(flags) if not f]
        self.entries = max(1, weights.sizes()[index][0])
        self.nsub = grp.unit // weights.fmt.rows
        self.slices = self.panels * len(self.sparse) * self.nsub
        self.rows = tile_rows(batch, grp.width)
        self.chains = weights.chains
        self.dense_chains = max(1, 4 // max(1, len(self.dense) * self.rows))


def gemv_macro(weights: SparseWeights, grp: Group, n_h: int, n_b: int, n_hk: int):
    """A macro ``(acc, w, h, s, p, b0, rows)`` adding the group's R @ h[s] to ``acc``; ``w``:
    the group's (data, index, window, indptr, dense) buffers; ``h`` rows ``n_hk`` floats apart."""
    fmt, n_s, n_d, unit = weights.fmt, len(grp.sparse), len(grp.dense), grp.unit
    nsub, chains, d_chains = grp.nsub, grp.chains, grp.dense_chains
    value = _lookup(fmt.lookup, fmt.rows, n_b, n_hk)
    scol = _column(grp.sparse, unit) if n_s else None
    dcol = _column(grp.dense, unit) if n_d else None

    @T.inline
    def gemv(acc, w, h, s, p, b0, rows):
        # w is indexed, not unpacked: a TVMScript assignment would rename the parameters.
        if n_s > 0:
            _sparse_gates(
                acc, w[0], w[1], w[2], w[3], h, s, p, b0, rows, n_s, nsub, fmt.rows, chains,
                scol, value,
            )  # fmt: skip
        if n_d > 0:
            _dense_gates(acc, w[4], h, s, p, b0, rows, n_d, unit, n_h, d_chains, dcol)

    return gemv
