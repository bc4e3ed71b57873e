"""Panel layouts of the fused recurrent kernels, and packing ONNX weights into them.

A panel holds every gate of ``unit`` hidden units (see :mod:`tvm_sparse.schedules.recurrent`).
The input projection's columns, its bias and the recurrent weight ``R`` are all reordered to
panel order here, by NumPy at import time or by Relax ops (``ops``) when weights are graph
values. :func:`unpack_recurrent_weight` inverts the packing of ``R`` (the sparse rewrite reads
the dense ``R`` back from the kernel's constant argument).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: Hidden units per panel at batch 1, by kernel: 64-float panels (4 zmm accumulators).
#: "GRU" is the linear_before_reset=1 kernel; "GRU0" the two-phase linear_before_reset=0 one.
PANEL_UNITS = {"LSTM": 16, "GRU": 16, "GRU0": 32, "RNN": 64}
GATES = {"LSTM": 4, "GRU": 3, "GRU0": 3, "RNN": 1}
#: Accumulator floats of one batch tile: 16 zmm of the 32, the rest for loads and broadcasts.
ACC_FLOATS = 256


@dataclass(frozen=True)
class GateGroup:
    """Gates ``start:stop`` (ONNX order) packed together in panels of ``unit`` hidden units."""

    start: int
    stop: int
    unit: int

    @property
    def width(self) -> int:
        """Outputs per panel (the GEMV accumulator length)."""
        return (self.stop - self.start) * self.unit


@dataclass(frozen=True)
class PanelLayout:
    """How a layer's gate outputs are ordered in the projection and in the packed R.

    ``padded`` is ``hidden`` rounded up to whole panels; padded units get zero weights and
    biases, so their state stays exactly zero and is never written to an output.
    """

    hidden: int
    padded: int
    groups: tuple[GateGroup, ...]

    def panels(self, group: int) -> int:
        return self.padded // self.groups[group].unit

    def column_offset(self, group: int) -> int:
        """First projection column of a group (groups are concatenated)."""
        return sum((g.stop - g.start) * self.padded for g in self.groups[:group])


def panel_layout(kind: str, hidden: int, batch: int = 1) -> PanelLayout:
    """The panel layout of kernel ``kind`` ("LSTM", "GRU", "GRU0" or "RNN") for ``hidden``.

    Panels are as wide as possible (64 floats) unless halving them lets a batch tile hold
    more rows: every tile re-reads the whole of R once per step, which costs more than
    narrower panels (measured at H = 1024, batch 8: 15 ms with 32-float panels in one tile,
    36 ms with 64-float panels in three).
    """
    gates = 2 if kind == "GRU0" else GATES[kind]
    units = [u for u in (PANEL_UNITS[kind], PANEL_UNITS[kind] // 2) if gates * u % 16 == 0]
    unit = min(units, key=lambda u: (-(-batch // tile_rows(batch, gates * u)), -u))
    unit = min(unit, hidden)
    padded = -(-hidden // unit) * unit
    if kind != "GRU0":
        return PanelLayout(hidden, padded, (GateGroup(0, GATES[kind], unit),))
    # Phase two (the candidate) has one gate: twice the units give it the same panel width.
    unit_h = 2 * unit if padded % (2 * unit) == 0 else unit
    return PanelLayout(hidden, padded, (GateGroup(0, 2, unit), GateGroup(2, 3, unit_h)))


def tile_rows(batch: int, width: int) -> int:
    """Batch rows per tile for panels ``width`` floats wide (ACC_FLOATS accumulators)."""
    return max(1, min(batch, ACC_FLOATS // width))


def kernel_kind(layer: str, linear_before_reset: bool = False) -> str:
    """The kernel (and panel layout) name for an ONNX layer: "LSTM", "GRU", "GRU0" or "RNN"."""
    return "GRU0" if layer == "GRU" and not linear_before_reset else layer


class NumpyOps:
    """The array steps the packers need; the Relax frontend supplies the same for graph values."""

    reshape = staticmethod(np.reshape)
    transpose = staticmethod(np.transpose)
    add = staticmethod(np.add)

    @staticmethod
    def zeros(shape: tuple[int, ...], dtype: str):
        return np.zeros(shape, dtype)

    @staticmethod
    def concat(arrays: list, axis: int):
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=axis)

    @staticmethod
    def take(x, start: int, stop: int):
        """Rows ``start:stop`` of the first axis."""
        return x[start:stop]

    @staticmethod
    def pad(x, axis: int, amount: int):
        """Append ``amount`` zeros along ``axis``."""
        if amount == 0:
            return x
        width = [(0, 0)] * x.ndim
        width[axis] = (0, amount)
        return np.pad(x, width)


@dataclass(frozen=True)
class PackedWeights:
    """One direction's weights in kernel order (NumPy arrays, or Relax values from the frontend)."""

    w: Any  #: [input, gates * padded], the projection's right-hand side
    bias: Any  #: [gates * padded] projection bias (Wb + Rb, except GRU lbr=1's Rbh), or None
    r: list  #: per gate group, [panels, hidden, width]
    rbh: Any  #: GRU lbr=1 only: [1, padded] recurrent candidate bias, else None


def pack_weights(
    kind: str,
    hidden: int,
    w: Any,
    r: Any,
    b: Any = None,
    *,
    batch: int = 1,
    dtype: str = "float32",
    ops: Any = NumpyOps,
) -> PackedWeights:
    """Pack one direction's ONNX ``W`` [G*H, I], ``R`` [G*H, H] and ``B`` [2*G*H] (or None)
    for the kernel of ``batch`` rows (the panel width depends on it)."""
    lay = panel_layout(kind, hidden, batch)
    n_gh = GATES[kind] * hidden
    bias = rbh = None
    if b is not None:
        wb, rb = ops.take(b, 0, n_gh), ops.take(b, n_gh, 2 * n_gh)
        if kind == "GRU":  # Rbh sits inside the reset product: it goes to the kernel
            rbh = pack_vector(ops.take(rb, 2 * hidden, n_gh), lay, ops)
            rb = ops.pad(ops.take(rb, 0, 2 * hidden), 0, hidden)
        bias = pack_bias(ops.add(wb, rb), lay, ops)
    if kind == "GRU" and rbh is None:
        rbh = ops.zeros((1, lay.padded), dtype)
    return PackedWeights(
        pack_input_weight(w, lay, ops), bias, pack_recurrent_weight(r, lay, ops), rbh
    )


def pack_input_weight(w: Any, layout: PanelLayout, ops: Any = NumpyOps) -> Any:
    """ONNX ``W`` of one direction, ``[gates * hidden, input]``, to ``[input, gates * padded]``.

    The columns come in the kernel's panel order, so ``x @ result`` is the projection it reads.
    """
    return ops.transpose(_pack_rows(w, layout, ops), (1, 0))


def pack_bias(b: Any, layout: PanelLayout, ops: Any = NumpyOps) -> Any:
    """A per-gate vector ``[gates * hidden]`` to the projection's column order."""
    return ops.reshape(_pack_rows(ops.reshape(b, (-1, 1)), layout, ops), (-1,))


def pack_recurrent_weight(r: Any, layout: PanelLayout, ops: Any = NumpyOps) -> list:
    """ONNX ``R`` of one direction, ``[gates * hidden, hidden]``, to one array per gate group.

    Group ``g`` becomes ``[panels, hidden, gates_g * unit]``: panel ``p`` row ``k`` holds R's
    column ``k`` for every gate of hidden units ``p * unit ...``, contiguous for the FMA.
    """
    n_h, p_h = layout.hidden, layout.padded
    out = []
    for grp in layout.groups:
        n_g = grp.stop - grp.start
        rows = ops.pad(
            ops.reshape(ops.take(r, grp.start * n_h, grp.stop * n_h), (n_g, n_h, n_h)), 1, p_h - n_h
        )
        rows = ops.reshape(rows, (n_g, p_h // grp.unit, grp.unit, n_h))
        out.append(
            ops.reshape(ops.transpose(rows, (1, 3, 0, 2)), (p_h // grp.unit, n_h, grp.width))
        )
    return out


def pack_vector(v: Any, layout: PanelLayout, ops: Any = NumpyOps) -> Any:
    """Per-unit vectors ``[k * hidden]`` (peepholes, GRU's Rbh) to ``[k, padded]``."""
    rows = ops.reshape(v, (-1, layout.hidden))
    return ops.pad(rows, 1, layout.padded - layout.hidden)


def _pack_rows(w: Any, layout: PanelLayout, ops: Any) -> Any:
    n_h, p_h = layout.hidden, layout.padded
    parts = []
    for grp in layout.groups:
        n_g = grp.stop - grp.start
        rows = ops.reshape(ops.take(w, grp.start * n_h, grp.stop * n_h), (n_g, n_h, -1))
        rows = ops.reshape(ops.pad(rows, 1, p_h - n_h), (n_g, p_h // grp.unit, grp.unit, -1))
        parts.append(ops.reshape(ops.transpose(rows, (1, 0, 2, 3)), (n_g * p_h, -1)))
    return ops.concat(parts, 0)


def unpack_recurrent_weight(panels: list, layout: PanelLayout) -> np.ndarray:
    """Inverse of :func:`pack_recurrent_weight` for NumPy arrays: ONNX ``R`` ``[gates * H, H]``."""
    n_h, p_h = layout.hidden, layout.padded
    parts = []
    for grp, packed in zip(layout.groups, panels, strict=True):
        n_g = grp.stop - grp.start
        rows = np.asarray(packed).reshape(p_h // grp.unit, n_h, n_g, grp.unit)
        rows = rows.transpose(2, 0, 3, 1).reshape(n_g, p_h, n_h)[:, :n_h]
        parts.append(rows.reshape(n_g * n_h, n_h))
    return np.concatenate(parts, 0)


def onnx_rows(layout: PanelLayout, group: int) -> np.ndarray:
    """ONNX gate row (``gate * H + unit``) of each output of a group, in kernel order
    (panel, gate, unit within the panel); -1 for padded units."""
    grp, n_h = layout.groups[group], layout.hidden
    gate = np.arange(grp.start, grp.stop)[None, :, None]
    unit = np.arange(layout.padded).reshape(-1, 1, grp.unit)
    rows = np.where(unit < n_h, gate * n_h + unit, -1)
    return rows.reshape(-1)
