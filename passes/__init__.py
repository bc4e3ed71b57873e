"""Relax passes of tvm-sparse (installed as ``tvm_sparse.passes``)."""

from .pipeline import PHASES, optimize, lowering_pipeline

__all__ = ["PHASES", "optimize", "lowering_pipeline"]
