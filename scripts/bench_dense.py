"""Dense (unpruned) models, default schedules vs ONNX Runtime, side by side in one run.

Usage: .venv/bin/python scripts/bench_dense.py [--quick] [--json out.json]
Ratio = TVM time / ORT time (below 1.0: tvm-sparse is faster).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
from _bench import fmt_ms, machine, ort_session, random_inputs, time_ort, time_tvm  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import tvm_sparse  # noqa: E402
from tvm_sparse import examples  # noqa: E402
from tvm_sparse.target import num_cores  # noqa: E402


def matmul(m=64, k=1024, n=1024):
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


CASES = {
    "MatMul 64x1024x1024": lambda: matmul(),
    "LSTM T=100 B=1 I=512 H=1024": lambda: examples.lstm(100, 1, 512, 1024),
    "MobileNet-v1-like 224x224": lambda: examples.mobilenet_v1(),
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="shorter timing (noisier)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    seconds = 0.5 if args.quick else 2.0
    threads = num_cores()
    rows = []
    for name, build in CASES.items():
        model = build()
        inputs = random_inputs(model)
        print(f"[{name}] compiling ...", file=sys.stderr, flush=True)
        compiled = tvm_sparse.compile(model, target="host")
        sess = ort_session(model, threads)
        ref = sess.run(None, inputs)[0]
        out = compiled.run(inputs)[0]
        err = float(np.max(np.abs(out - ref)))
        t_ort = time_ort(sess, inputs, seconds)  # separate phases: thread pools spin
        t_tvm = time_tvm(compiled, inputs, seconds)
        rows.append(
            {
                "case": name,
                "ort_s": t_ort,
                "tvm_s": t_tvm,
                "ratio": t_tvm / t_ort,
                "max_abs_err": err,
            }
        )
        print(f"[{name}] ORT {fmt_ms(t_ort)} ms, tvm-sparse {fmt_ms(t_tvm)} ms", file=sys.stderr)
    print(f"\nMeasured {datetime.date.today()} on {machine()}, {threads} threads each")
    print("| case | ONNX Runtime (ms) | tvm-sparse untuned (ms) | ratio (tvm/ORT) | max abs err |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {fmt_ms(r['ort_s'])} | {fmt_ms(r['tvm_s'])} | "
            f"{r['ratio']:.2f} | {r['max_abs_err']:.1e} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
