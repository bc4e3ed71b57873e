"""Resolve user-facing target names ("host", "llvm -mcpu=...", dicts) to a TVM Target."""

from __future__ import annotations

import os

import tvm

from .errors import TvmSparseError

_TRIPLE = "x86_64-unknown-linux-gnu"


def host_cpu() -> str:
    """The LLVM name of this machine's CPU (e.g. ``znver5``, ``sapphirerapids``)."""
    return str(tvm.target.codegen.llvm_get_system_cpu())


def num_cores() -> int:
    """Cores this process may use (respects CPU affinity masks)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def resolve_target(target: str | dict | tvm.target.Target = "host") -> tvm.target.Target:
    """Turn ``"host"``, a CPU name, a target dict or a Target into a TVM Target.

    Parameters
    ----------
    target
        ``"host"`` detects this CPU and uses all its cores; a string starting with ``{`` is a
        JSON target dict (``'{"kind": "llvm", "mcpu": "znver4", "num-cores": 8}'``, e.g. for
        a device tuned over RPC); any other string is an LLVM CPU name
        (``"skylake-avx512"``); a dict is passed to :class:`tvm.target.Target`.

    Returns
    -------
    tvm.target.Target
    """
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, str) and target.lstrip().startswith("{"):  # a dict from the CLI
        import json

        try:
            target = json.loads(target)
        except ValueError as err:
            raise TvmSparseError(f"target: {target!r} is not a valid JSON dict ({err})") from None
    if isinstance(target, dict):
        return tvm.target.Target(target)
    if not isinstance(target, str) or not target:
        raise TvmSparseError(f"target: expected 'host', a CPU name or a dict, got {target!r}")
    mcpu = host_cpu() if target == "host" else target
    if not tvm.target.codegen.llvm_is_valid_cpu(mcpu, _TRIPLE):
        raise TvmSparseError(f"target: '{target}' is not a CPU LLVM knows")
    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": num_cores()})


def set_runtime_threads(n: int | None = None) -> int:
    """Make TVM's thread pool use ``n`` threads (default: all cores); TVM itself defaults to 1."""
    n = n or num_cores()
    os.environ.setdefault("TVM_NUM_THREADS", str(n))
    return n
