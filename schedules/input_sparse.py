"""Input-sparse GEMV: y = W x that skips the zero entries of x (activation sparsity, seed 004).

After a ReLU many activations are exactly zero. For one activation column (batch-1 FC, a
pointwise conv on a 1x1 map) the kernel first compacts the nonzero x[k] into (index, value)
lists, branch-free, then accumulates ``value * Wt[index, :]`` over those entries only, with
the weight stored K-major and dense (``Wt[K, Npad]``) so each entry is one contiguous row
segment: a broadcast and ``tile / 16`` vector FMAs per entry and register tile. Work and
weight traffic scale with the number of nonzeros of x, measured at run time; the weight
itself need not be sparse.

Public functions
----------------
``VARIANTS`` / ``Variant``   the kernel table (register tile, floats per parallel task)
``variants_for(n)``          the variants worth timing for N outputs (little padding)
``padded_n(n, variant)``     N rounded up to the variant's work unit
``input_sparse_gemv(n, k, variant, relu)``
    PrimFunc ``(x[K], wt[K, Npad], bias[Npad]) -> y[N]``
``pack(weight, variant)``    the [N, K] weight view to ``wt[K, Npad]`` (zero columns added)
``reference(w, x, bias, relu)``  NumPy y = max(W x + bias, floor)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from tvm_sparse._compat import ATTR_NOALIAS, ATTR_SCHEDULED

from .bsr_matmul import FLOAT_MIN

LANES = 16  # fp32 lanes of a zmm register


@dataclass(frozen=True)
class Variant:
    """``tile`` output floats kept in registers; ``task`` output floats per parallel task."""

    tile: int = 64
    task: int = 256

    @property
    def name(self) -> str:
        return f"input_sparse_gemv_{self.tile}_f32"


# Largest tile first. 256 floats (16 zmm) measured best at N = K = 1024 (one thread, 80 %
# zeros: 4.8 us vs 7.2 us for 128 and 9.5 us for 64): longer contiguous row segments per
# nonzero and fewer passes over the index list.
VARIANTS: tuple[Variant, ...] = (
    Variant(256, 512),
    Variant(128, 256),
    Variant(64, 128),
    Variant(16, 16),
)


def variants_for(n: int, max_waste: float = 0.125) -> list[Variant]:
    """Variants whose padding wastes at most `max_waste` of the work (else the least wasteful)."""
    ok = [v for v in VARIANTS if padded_n(n, v) <= (1 + max_waste) * n]
    return ok or [min(VARIANTS, key=lambda v: padded_n(n, v))]


def padded_n(n: int, variant: Variant) -> int:
    """N rounded up to whole tasks (smaller layers: whole tiles)."""
    unit = variant.task if n >= 2 * variant.task else variant.tile
    return -(-n // unit) * unit


def pack(weight: np.ndarray, variant: Variant) -> np.ndarray:
    """The [N, K] weight view as ``wt[K, Npad]`` (K-major; zero columns past N)."""
    n, k = weight.shape
    wt = np.zeros((k, padded_n(n, variant)), np.float32)
    wt[:, :n] = weight.T
    return wt


@functools.lru_cache(maxsize=256)
def input_sparse_gemv(n: int, k: int, variant: Variant, relu: bool = False) -> tirx.PrimFunc:
    """y[N] = max(W x + bias, floor), visiting only the nonzero x[k].

    Parameters
    ----------
    n, k
        Outputs and inputs of the layer (N is padded internally, see :func:`padded_n`).
    variant
        Register tile and task size.
    relu
        Clamp at 0 (fused ReLU); otherwise no clamp.

    Returns
    -------
    tvm.tirx.PrimFunc
        ``(x[K], wt[K, Npad], bias[Npad]) -> y[N]``.
    """
    tile = variant.tile
    npad = padded_n(n, variant)
    task = variant.task if npad % variant.task == 0 else tile
    tiles, vecs = task // tile, tile // LANES
    floor = 0.0 if relu else FLOAT_MIN

    @T.prim_func(s_tir=True)
    def kernel(
        x: T.Buffer((k,), "float32"),
        wt: T.Buffer((k, npad), "float32"),
        bias: T.Buffer((npad,), "float32"),
        y: T.Buffer((n,), "float32"),
    ):
        idx = T.sblock_alloc_buffer((k,), "int32", scope="global")
        val = T.sblock_alloc_buffer((k,), "float32", scope="global")
        cnt = T.sblock_alloc_buffer((1,), "int32", scope="global")
        with T.sblock("compact"):
            T.reads(x[0:k])
            T.writes(idx[0:k], val[0:k], cnt[0:1])
            cnt[0] = 0
            for kk in range(k):
                # Branch-free: always write, advance only past nonzeros.
                idx[cnt[0]] = kk
                val[cnt[0]] = x[kk]
                cnt[0] = cnt[0] + T.Cast("int32", x[kk] != T.float32(0))
        for t in T.parallel(npad // task):
            for s in range(tiles):
                with T.sblock("tile"):
                    vt, vs = T.axis.remap("SS", [t, s])
                    T.reads(idx[0:k], val[0:k], cnt[0:1], wt[0:k, 0:npad], bias[0:npad])
                    T.writes(y[0:n])
                    acc = T.sblock_alloc_buffer((tile,), "float32", scope="global")
                    for j in T.vectorized(tile):
                        acc[j] = T.float32(0)
                    for e in range(cnt[0]):
                        for j in T.vectorized(tile):
                            acc[j] = acc[j] + val[e] * wt[idx[e], (vt * tiles + vs) * tile + j]
                    for v in T.unroll(vecs):
                        if (vt * tiles + vs) * tile + v * LANES + LANES <= n:
                            for j in T.vectorized(LANES):
                                y[(vt * tiles + vs) * tile + v * LANES + j] = T.max(
                                    acc[v * LANES + j]
                                    + bias[(vt * tiles + vs) * tile + v * LANES + j],
                                    T.float32(floor),
                                )
                        else:
                            for j in range(LANES):
                                if (vt * tiles + vs) * tile + v * LANES + j < n:
                                    y[(vt * tiles + vs) * tile + v * LANES + j] = T.max(
                                        acc[v * LANES + j]
                                        + bias[(vt * tiles + vs) * tile + v * LANES + j],
                                        T.float32(floor),
                                    )

    func = kernel.without_attr("global_symbol")
    return func.with_attrs(
        {ATTR_NOALIAS: True, ATTR_SCHEDULED: True, "tvm_sparse.kernel": variant.name}
    )


def reference(
    w: np.ndarray, x: np.ndarray, bias: np.ndarray | None = None, relu: bool = False
) -> np.ndarray:
    """NumPy y = W[N, K] . x[K] (+ bias) (ReLU), in float64 then float32."""
    y = w.astype(np.float64) @ x.astype(np.float64)
    if bias is not None:
        y += bias
    return (np.maximum(y, 0) if relu else y).astype(np.float32)
