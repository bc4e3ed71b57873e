"""Pruned models: tvm-sparse (default schedules, sparse="auto") vs ONNX Runtime, one run.

ONNX Runtime does not exploit zeros, so its time is the dense time. Speed-up = ORT time /
tvm-sparse time; ideal = dense MACs / nonzero MACs; "of ideal" = speed-up / ideal.
Usage: .venv/bin/python scripts/bench_sparse.py [--quick] [--only SUBSTRING] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
from _bench import fmt_ms, machine, macs, ort_session, random_inputs, time_ort, time_tvm  # noqa: E402
from bench_dense import matmul  # noqa: E402

import tvm_sparse  # noqa: E402
from tvm_sparse import examples  # noqa: E402
from tvm_sparse.examples import prune_weight  # noqa: E402
from tvm_sparse.target import num_cores  # noqa: E402

SELECTIVE = {"i": 0.9, "o": 0.9, "f": 0.9, "c": 0.0}


def pruned_matmul(sparsity: float, block):
    model = matmul()
    w = onnx_array(model.graph.initializer[0])
    from onnx import numpy_helper

    model.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(prune_weight("MatMul", w, sparsity, block), "w")
    )
    return model


def onnx_array(tensor):
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor)


# (name, builder, target speed-up vs ORT or None)
CASES = [
    ("LSTM 90% unstructured", lambda: examples.lstm(100, 1, 512, 1024, sparsity=0.9), 12.0),
    ("LSTM 90% 16x1", lambda: examples.lstm(100, 1, 512, 1024, sparsity=0.9, block=(16, 1)), 12.0),
    (
        "LSTM selective i,o,f 90% c dense",
        lambda: examples.lstm(100, 1, 512, 1024, block=(16, 1), gate_sparsity=SELECTIVE),
        3.0,
    ),
    ("MatMul 64x1024x1024 90% 4x1", lambda: pruned_matmul(0.9, (4, 1)), 7.0),
    ("MatMul 64x1024x1024 90% 16x1", lambda: pruned_matmul(0.9, (16, 1)), 7.0),
    ("MatMul 64x1024x1024 90% 8x8", lambda: pruned_matmul(0.9, (8, 8)), 7.0),
    ("MatMul 64x1024x1024 90% unstructured", lambda: pruned_matmul(0.9, (1, 1)), 3.0),
    ("MobileNet-v1 90% unstructured", lambda: examples.mobilenet_v1(sparsity=0.9), 2.5),
    ("MobileNet-v1 90% 4x1", lambda: examples.mobilenet_v1(sparsity=0.9, block=(4, 1)), 2.5),
]
DENSE_CASES = [  # 0 % sparsity: sparse="auto" must not be more than 5 % slower than "off"
    ("MatMul 64x1024x1024 0%", matmul),
    ("LSTM 0%", lambda: examples.lstm(100, 1, 512, 1024)),
    ("MobileNet-v1 0%", lambda: examples.mobilenet_v1()),
]


def _time_in_fresh_process(case: str, mode: str, seconds: float) -> float:
    import subprocess

    out = subprocess.run(
        [sys.executable, __file__, "--time-one", case, mode, str(seconds)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out.strip().splitlines()[-1])


def _time_one(case: str, mode: str, seconds: float) -> None:
    model = dict(DENSE_CASES)[case]()
    inputs = random_inputs(model)
    print(time_tvm(tvm_sparse.compile(model, sparse=mode), inputs, seconds))


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--time-one":
        _time_one(sys.argv[2], sys.argv[3], float(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="shorter timing (noisier)")
    parser.add_argument("--only", help="run the cases whose name contains this")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    seconds = 0.5 if args.quick else 2.0
    threads = num_cores()
    rows, dense_rows = [], []
    for name, build, target in CASES:
        if args.only and args.only not in name:
            continue
        model = build()
        inputs = random_inputs(model)
        print(f"[{name}] compiling (measured selection) ...", file=sys.stderr, flush=True)
        cm = tvm_sparse.compile(model)
        sess = ort_session(model, threads)
        err = float(np.max(np.abs(cm.run(inputs)[0] - sess.run(None, inputs)[0])))
        t_ort = time_ort(sess, inputs, seconds)
        t_tvm = time_tvm(cm, inputs, seconds)
        dense, nonzero = macs(model)
        speedup, ideal = t_ort / t_tvm, dense / nonzero
        kernels = sorted({r["kernel"] for r in cm.report if r.get("kernel")})
        rows.append(
            dict(
                case=name,
                ort_s=t_ort,
                tvm_s=t_tvm,
                speedup=speedup,
                ideal=ideal,
                target=target,
                max_abs_err=err,
                kernels=kernels,
            )
        )
        print(
            f"[{name}] ORT {fmt_ms(t_ort)} ms, tvm-sparse {fmt_ms(t_tvm)} ms, "
            f"{speedup:.2f}x (ideal {ideal:.1f}x)",
            file=sys.stderr,
        )
    for name, _ in DENSE_CASES:
        if args.only and args.only not in name:
            continue
        # Each build timed in its own process, modes alternated: two identical builds timed in
        # one process differ by up to 9 % depending on which was built first.
        times = {"auto": [], "off": []}
        for mode in ("auto", "off", "off", "auto"):
            times[mode].append(_time_in_fresh_process(name, mode, seconds))
        t_auto, t_off = float(np.median(times["auto"])), float(np.median(times["off"]))
        dense_rows.append(dict(case=name, auto_s=t_auto, off_s=t_off, ratio=t_auto / t_off))
    print(
        f"\nMeasured {datetime.date.today()} on {machine()}, {threads} threads each; "
        "tvm-sparse untuned, sparse='auto' (measured selection)"
    )
    if rows:
        print(
            "| case | ORT (ms) | tvm-sparse (ms) | speed-up vs ORT | ideal | of ideal | target "
            "| met |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            met = "yes" if r["speedup"] >= r["target"] else "**no**"
            print(
                f"| {r['case']} | {fmt_ms(r['ort_s'])} | {fmt_ms(r['tvm_s'])} | "
                f"{r['speedup']:.2f}x | {r['ideal']:.1f}x | {r['speedup'] / r['ideal']:.0%} | "
                f">= {r['target']:g}x | {met} |"
            )
    if dense_rows:
        print("\n| 0 % sparsity | sparse='off' (ms) | sparse='auto' (ms) | auto/off | <= 1.05 |")
        print("|---|---|---|---|---|")
        for r in dense_rows:
            ok = "yes" if r["ratio"] <= 1.05 else "**no**"
            print(
                f"| {r['case']} | {fmt_ms(r['off_s'])} | {fmt_ms(r['auto_s'])} | "
                f"{r['ratio']:.3f} | {ok} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sparse": rows, "dense": dense_rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
