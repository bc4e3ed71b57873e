"""`python -m tvm_sparse` is the `tvm-sparse` command."""

from .cli import run

raise SystemExit(run())
