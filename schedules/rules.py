"""The ordered list of default schedule rules applied to every unscheduled PrimFunc."""

from __future__ import annotations

from tvm.s_tir import dlight as dl


def default_rules() -> list[dl.ScheduleRule]:
    """Rules in priority order: the first that accepts a PrimFunc schedules it."""
    from .bsr_matmul_space import BsrMatmul
    from .generic import Generic
    from .matmul import Matmul
    from .transpose import Transpose

    # BsrMatmul first: it matches only our BSR kernels, by their "tvm_sparse.kernel" name.
    rules: list[dl.ScheduleRule] = [BsrMatmul(), Matmul(), Transpose()]
    try:
        from .conv2d import Conv2d
    except ImportError:  # pragma: no cover - conv rule not available
        pass
    else:
        rules.append(Conv2d())
    rules.append(Generic())
    return rules
