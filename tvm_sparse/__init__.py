"""tvm-sparse: compile pruned and quantized ONNX models to fast kernels with Apache TVM."""

from __future__ import annotations

import os as _os

from .errors import TvmSparseError

__version__ = "0.1.0"

# TVM's thread pool defaults to one thread on small machines; use every core unless told.
_os.environ.setdefault("TVM_NUM_THREADS", str(len(_os.sched_getaffinity(0))))

__all__ = ["CompiledModel", "TvmSparseError", "compile", "load", "tune", "__version__"]


def __getattr__(name: str):
    # Lazy: importing TVM takes ~1 s; `tvm-sparse --help` should not pay for it.
    if name == "compile":
        from .compiler import compile

        return compile
    if name == "tune":
        from .tuning import tune

        return tune
    if name in ("load", "CompiledModel"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(name)
