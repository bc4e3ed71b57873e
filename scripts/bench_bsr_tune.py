"""Tuned vs default BSR matmul kernels (MetaSchedule over `bsr_matmul_space`), as ratios.

Two steps, each meant to run under the bench lock; timing happens in a fresh process (kernels
timed right after tuning in the same process measure ~2x slow):

  .venv/bin/python scripts/bench_bsr_tune.py tune --db DIR [--trials 32] [--only 4x1]
  .venv/bin/python scripts/bench_bsr_tune.py time --db DIR [--only 4x1]

"tune" tunes each case's kernel with real BSR arrays in the runner and stores the records in
DIR/<case>/. "time" builds the default schedule and the best record of each case and times
them side by side, alternating, with the dense matmul of the same shape (our default dense
schedule, M x K . K x N) for the ideal: ideal speed-up = all blocks / nonzero blocks, "of ideal"
= (dense time / tuned kernel time) / ideal (GEMV: no dense reference, "-").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np
import tvm

from tvm_sparse.examples import prune_out_in
from tvm_sparse.formats import to_bsr
from tvm_sparse.schedules import spaces
from tvm_sparse.schedules.bsr_matmul import Variant, bsr_gemv, bsr_wx, bsr_xw, kernel_arrays
from tvm_sparse.schedules.bsr_matmul_space import BsrMatmul
from tvm_sparse.tuning import RealArguments, build_kernel

N = K = 1024
M = 64  # activation columns (wx) / rows (xw)
SPARSITY = 0.9
ROUNDS = 40  # alternating samples per timer (each >= 20 ms)
CASES = {  # name: variant; the MatMul layer's K-major kernel, the row-major one, batch-1
    "wx_4x1": Variant(4, 1, "wx"),
    "wx_16x1": Variant(16, 1, "wx"),
    "wx_8x8": Variant(8, 8, "wx"),
    "xw_16x1": Variant(16, 1, "xw"),
    "gemv_16x1": Variant(16, 1, "gemv"),
    # A 16x1 pattern is also four 4x1 (two 8x1) blocks, and the measured selection offers
    # every variant a pattern fits: the same weight as wx_16x1, served by smaller blocks.
    "wx_4x1_on_16x1": Variant(4, 1, "wx"),
    "wx_8x1_on_16x1": Variant(8, 1, "wx"),
}
# The block shape each weight is pruned in, where it is not the kernel's.
PATTERNS = {"wx_4x1_on_16x1": (16, 1), "wx_8x1_on_16x1": (16, 1)}


def target() -> tvm.target.Target:
    from tvm_sparse.target import resolve_target

    return resolve_target("host")


def case(name: str):
    """(unscheduled kernel, runner arrays [None for activation/output], weight, stored, total)."""
    variant = CASES[name]
    block = (variant.rows, variant.cols)
    pattern = PATTERNS.get(name, block)
    w = prune_out_in(
        np.random.default_rng(0).standard_normal((N, K)).astype(np.float32), SPARSITY, pattern
    )
    bsr = to_bsr(w, block)
    data, indices, indptr = kernel_arrays(bsr, variant)
    bias = np.random.default_rng(1).standard_normal(N).astype(np.float32)
    stored = len(indices)
    if variant.form == "wx":
        func, x = bsr_wx(N, K, M, variant, stored), (K, M)
    elif variant.form == "xw":
        func, x = bsr_xw(M, N, K, variant, stored), (M, K)
    else:
        func, x = bsr_gemv(N, K, variant, stored), (K,)
    x = np.random.default_rng(2).standard_normal(x).astype(np.float32)
    return func.with_attr("global_symbol", "main"), [x, data, indices, indptr, bias, None], bsr


def tune(db_dir: str, names: list[str], trials: int) -> None:
    from tvm.s_tir import meta_schedule as ms

    tgt = target()
    for name in names:
        func, arrays, _ = case(name)
        constants = {i: a for i, a in enumerate(arrays) if a is not None}
        ms.tune_tir(
            func,
            tgt,
            os.path.join(db_dir, name),
            max_trials_global=trials,
            num_trials_per_iter=min(trials, 16),
            space=spaces.schedule_fn(spaces.space_for(func), tgt),
            builder=ms.builder.LocalBuilder(f_build=build_kernel),
            runner=ms.runner.LocalRunner(f_alloc_argument=RealArguments(constants)),
            seed=0,
        )
        print(f"tuned {name}: {trials} trials", flush=True)


def _dense_timer(tgt, dev):
    """A timer of the dense matmul of the same shape (our default dense schedule)."""
    from tvm import relax

    from tvm_sparse.passes import lowering_pipeline, optimize

    w = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((M, K), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, relax.const(w)))
        bb.emit_func_output(out)
    ex = relax.build(optimize(bb.get(), tgt), tgt, relax_pipeline=lowering_pipeline(tgt))
    vm = relax.VirtualMachine(ex, dev)
    arg = tvm.runtime.tensor(np.ones((M, K), np.float32), dev)
    vm["main"](arg)
    ev = vm.time_evaluator("main", dev, number=5, repeat=1, min_repeat_ms=20)
    return lambda: ev(arg).mean


def _kernel_timer(lib, args, dev):
    ev = lib.mod.time_evaluator("main", dev, number=10, repeat=1, min_repeat_ms=20)
    return lambda: ev(*args).mean


def _side_by_side(timers: dict, rounds: int) -> dict[str, tuple[float, float]]:
    """(min, median) seconds per timer over `rounds` alternating short samples: other jobs on
    a shared machine inflate samples, never shorten them, so the minimum is the steadier."""
    samples = {k: [] for k in timers}
    for _ in range(rounds):
        for key, timer in timers.items():
            samples[key].append(timer())
    return {k: (min(v), statistics.median(v)) for k, v in samples.items()}


def time_cases(db_dir: str, names: list[str]) -> None:
    from tvm.s_tir import meta_schedule as ms

    tgt, dev = target(), tvm.cpu()
    dense = _dense_timer(tgt, dev)
    print(f"times: min (median) of {ROUNDS} alternating samples, dense timed beside each kernel")
    print("| kernel | dense (us) | default (us) | tuned (us) | tuned/default | ideal | of ideal |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        func, arrays, bsr = case(name)
        path = os.path.join(db_dir, name)
        db = ms.database.JSONDatabase(
            os.path.join(path, "database_workload.json"),
            os.path.join(path, "database_tuning_record.json"),
            allow_missing=False,
        )
        tuned = ms.tir_integration.compile_tir(db, func, tgt)
        if tuned is None:
            sys.exit(f"{name}: no tuning record in {path}")
        scheds = {"default": BsrMatmul().apply(func, tgt, False), "tuned": tuned}
        out_shape = {"wx": (N, M), "xw": (M, N), "gemv": (N,)}[CASES[name].form]
        args = [tvm.runtime.tensor(a, dev) for a in arrays[:-1]]
        timers, outs = {"dense": dense}, {}
        for key, sch in scheds.items():
            lib = tvm.compile(sch.mod["main"].with_attr("global_symbol", "main"), tgt)
            outs[key] = tvm.runtime.tensor(np.zeros(out_shape, np.float32), dev)
            lib(*args, outs[key])
            timers[key] = _kernel_timer(lib, [*args, outs[key]], dev)
        np.testing.assert_allclose(
            outs["tuned"].numpy(), outs["default"].numpy(), rtol=1e-5, atol=1e-4
        )
        t = _side_by_side(timers, ROUNDS)
        ideal = bsr.total_blocks / bsr.nnzb
        of_ideal = t["dense"][0] / t["tuned"][0] / ideal if CASES[name].form != "gemv" else None
        cells = [
            f"{t[k][0] * 1e6:.1f} ({t[k][1] * 1e6:.1f})" for k in ("dense", "default", "tuned")
        ]
        print(
            f"| {name} | {' | '.join(cells)} | {t['tuned'][0] / t['default'][0]:.3f} | "
            f"{ideal:.1f}x | {'-' if of_ideal is None else f'{of_ideal:.0%}'} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["tune", "time"])
    parser.add_argument("--db", required=True)
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--only", default="", help="substring of the case names to run")
    args = parser.parse_args()
    names = [n for n in CASES if args.only in n]
    if args.step == "tune":
        tune(args.db, names, args.trials)
    else:
        time_cases(args.db, names)


if __name__ == "__main__":
    main()
