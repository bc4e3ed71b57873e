"""Weight sparsity measurement in the project's convention: a weight viewed as [out, in].

A block "RxC" is R output rows x C reduction elements of that view. ONNX MatMul weights [K, N]
are viewed transposed; Conv [O, I, kh, kw] as [O, kh*kw*I] with I innermost; LSTM/GRU/RNN
W and R as [gates*H, I] / [gates*H, H] per direction.
"""

from __future__ import annotations

import numpy as np

DEFAULT_BLOCKS: tuple[tuple[int, int], ...] = ((1, 1), (1, 4), (4, 1), (16, 1), (8, 8))


def as_out_in(op_type: str, weight: np.ndarray, trans_b: bool = False) -> list[np.ndarray]:
    """The [out, in] view(s) of an ONNX weight (one per direction for recurrent layers)."""
    if op_type in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        return [weight.reshape(-1, weight.shape[-1]).T if weight.ndim == 2 else weight.T]
    if op_type == "Gemm":
        return [weight if trans_b else weight.T]
    if op_type in ("Conv", "ConvInteger", "QLinearConv"):
        o = weight.shape[0]
        return [np.moveaxis(weight, 1, -1).reshape(o, -1)]
    if op_type in ("LSTM", "GRU", "RNN"):
        return [weight[d] for d in range(weight.shape[0])]
    raise ValueError(f"no [out, in] view defined for {op_type}")


def element_sparsity(w: np.ndarray) -> float:
    """Fraction of exactly-zero elements."""
    return float(np.count_nonzero(w == 0)) / w.size if w.size else 0.0


def zero_block_fraction(w: np.ndarray, block: tuple[int, int]) -> float:
    """Fraction of all-zero RxC blocks of a 2-D [out, in] weight (padded with zeros to fit)."""
    r, c = block
    rows, cols = w.shape
    pr, pc = -rows % r, -cols % c
    padded = np.pad(w != 0, ((0, pr), (0, pc)))
    blocks = padded.reshape((rows + pr) // r, r, (cols + pc) // c, c).any(axis=(1, 3))
    return 1.0 - float(blocks.mean()) if blocks.size else 0.0


def weight_stats(views: list[np.ndarray], blocks=DEFAULT_BLOCKS) -> dict:
    """Element sparsity and zero-block fractions over all views of one weight."""
    total = sum(v.size for v in views)
    zeros = sum(np.count_nonzero(v == 0) for v in views)
    stats = {"sparsity": float(zeros / total) if total else 0.0, "zero_blocks": {}}
    for block in blocks:
        nblocks = [np.ceil(v.shape[0] / block[0]) * np.ceil(v.shape[1] / block[1]) for v in views]
        fracs = [zero_block_fraction(v, block) for v in views]
        weighted = sum(f * n for f, n in zip(fracs, nblocks)) / max(sum(nblocks), 1)
        stats["zero_blocks"][f"{block[0]}x{block[1]}"] = float(weighted)
    return stats


GATES = {"LSTM": "iofc", "GRU": "zrh", "RNN": "h"}  # ONNX gate order of W and R rows


def gate_sparsity(op_type: str, weight: np.ndarray) -> dict[str, float]:
    """Element sparsity of each gate's rows of an LSTM/GRU/RNN W or R ([dirs, gates*H, in])."""
    names = GATES[op_type]
    hidden = weight.shape[1] // len(names)
    return {
        g: element_sparsity(weight[:, k * hidden : (k + 1) * hidden]) for k, g in enumerate(names)
    }
