"""Timing helpers shared by the benchmark scripts: ORT and TVM timed in separate phases.

Measured on this machine: after an ONNX Runtime session has run in a process, TVM code in that
process runs ~10-15 % slower, even once the session is deleted. So the benchmarks time each
side in a fresh process (:func:`time_fresh`): ``python scripts/_bench.py --time ort|tvm PATH
SECONDS`` prints seconds per run of an ONNX file (ORT) or a saved tvm-sparse build.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort


def ort_session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def time_ort(
    sess: ort.InferenceSession, inputs: dict, min_seconds: float = 1.0, repeat: int = 5
) -> float:
    """Median over `repeat` batches of the mean seconds per run (batches last >= min/repeat s)."""
    for _ in range(3):
        sess.run(None, inputs)
    start = time.perf_counter()
    sess.run(None, inputs)
    once = max(time.perf_counter() - start, 1e-6)
    number = max(1, int(min_seconds / repeat / once))
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            sess.run(None, inputs)
        samples.append((time.perf_counter() - start) / number)
    return statistics.median(samples)


def time_tvm(compiled, inputs: dict, min_seconds: float = 1.0, repeat: int = 5) -> float:
    compiled.run(inputs)
    return compiled.time(
        inputs, number=1, repeat=repeat, min_repeat_ms=int(1000 * min_seconds / repeat)
    )


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, {platform.python_version()}"


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.2f}"


def random_inputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    from tvm_sparse.frontend.onnx import input_specs
    from tvm_sparse.frontend.onnx import random_inputs as make

    return make(input_specs(model), seed)


def macs(model: onnx.ModelProto) -> tuple[float, float]:
    """(dense MACs, MACs on nonzero weights) of the MatMul/Gemm/Conv/LSTM/GRU layers."""
    from onnx import numpy_helper, shape_inference

    inferred = shape_inference.infer_shapes(model)
    shapes = {}
    for v in (
        list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)
    ):
        shapes[v.name] = [d.dim_value for d in v.type.tensor_type.shape.dim]
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    dense = nonzero = 0.0
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and node.input[1] in consts:
            w = consts[node.input[1]]
            rows = int(np.prod(shapes[node.input[0]][:-1]))
            dense += rows * w.size
            nonzero += rows * np.count_nonzero(w)
        elif node.op_type == "Conv" and node.input[1] in consts:
            w = consts[node.input[1]]
            out = shapes[node.output[0]]
            pixels = out[2] * out[3] * out[0]
            dense += pixels * w.size
            nonzero += pixels * np.count_nonzero(w)
        elif node.op_type in ("LSTM", "GRU", "RNN"):
            steps = shapes[node.input[0]][0] * shapes[node.input[0]][1]
            for idx in (1, 2):
                w = consts[node.input[idx]]
                dense += steps * w.size
                nonzero += steps * np.count_nonzero(w)
    return dense, nonzero


def time_fresh(side: str, path: str, seconds: float) -> float:
    """Seconds per run of `path` timed in a fresh process: an ONNX file under ONNX Runtime
    (``side="ort"``) or a directory saved by ``CompiledModel.save`` (``side="tvm"``)."""
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--time", side, path, str(seconds)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out.strip().splitlines()[-1])


def _time_main(side: str, path: str, seconds: float) -> float:
    if side == "ort":
        model = onnx.load(path)
        return time_ort(
            ort_session(model, len(os.sched_getaffinity(0))), random_inputs(model), seconds
        )
    import tvm_sparse

    cm = tvm_sparse.load(path)
    inputs = {
        s.name: np.random.default_rng(0).standard_normal(s.shape).astype(s.dtype) for s in cm.inputs
    }
    return time_tvm(cm, inputs, seconds)


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "--time" or sys.argv[2] not in ("ort", "tvm"):
        sys.exit("usage: _bench.py --time ort|tvm PATH SECONDS")
    print(_time_main(sys.argv[2], sys.argv[3], float(sys.argv[4])))
