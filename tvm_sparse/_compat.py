"""One place for the TVM names that moved between releases (0.24+ split tir into tirx/s_tir)."""

from tvm import relax, s_tir, tirx  # noqa: F401
from tvm.relax.frontend.onnx import onnx_frontend  # noqa: F401
from tvm.s_tir import Schedule  # noqa: F401
from tvm.script import tirx as T  # noqa: F401

# 0.27 has only tvm.ir.assert_structural_equal; the hash and the boolean test moved to tvm_ffi.
from tvm_ffi import register_error, structural_equal, structural_hash  # noqa: F401

# Ctrl-C in a Python callback that TVM calls from C++ (a pass, a schedule rule) comes back out
# of the FFI as a bare RuntimeError unless KeyboardInterrupt is a registered FFI error type;
# an `except Exception` around a schedule primitive then swallowed it, and an interrupted
# build went on to the end with that kernel unscheduled.
register_error(KeyboardInterrupt)

# Function attributes understood by TVM 0.27 (the pre-0.24 "tir.*" spellings are silently ignored).
ATTR_NOALIAS = "tirx.noalias"
ATTR_SCHEDULED = "tirx.is_scheduled"

# Relax constants are `tvm.ir.expr.Constant` (0.27 has no `relax.Constant`); value: `.value`.
from tvm.ir.expr import Constant  # noqa: E402,F401


def constant_value(const):
    """The NumPy array held by a Relax constant."""
    return const.value.numpy()
