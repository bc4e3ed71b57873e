"""TIR kernels and default schedules (installed as ``tvm_sparse.schedules``)."""

from .rules import default_rules

__all__ = ["default_rules"]
