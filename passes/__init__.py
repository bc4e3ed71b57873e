"""Relax passes of tvm-sparse (installed as ``tvm_sparse.passes``)."""

from .pipeline import PHASES, lowering_pipeline, optimize

__all__ = ["PHASES", "optimize", "lowering_pipeline"]
