"""int8 models: tvm-sparse's VNNI kernels vs ONNX Runtime int8 on the same QDQ file, one run.

Each case builds an fp32 model (pruned at 90 % with the given [out, in] block, or dense),
quantizes it with ONNX Runtime's ``quantize_static`` (QDQ, per-channel symmetric int8 weights,
uint8 activations; symmetric weight quantization keeps zeros zero) and times, in separate
phases: ORT on the QDQ file, tvm-sparse on the QDQ file (sparse="auto", measured selection),
and tvm-sparse on the fp32 model (our fp32 sparse path), each in a fresh process. Also checks
that our int8 output is within one quantization step of ORT's. The LSTM rows quantize with
``quantize_dynamic`` instead (DynamicQuantizeLSTM; float outputs, whose step is range / 255).
Usage: .venv/bin/python scripts/bench_int8.py [--quick] [--only SUBSTRING] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from _bench import fmt_ms, machine, ort_session, random_inputs, time_fresh  # noqa: E402
from bench_sparse import pruned_matmul  # noqa: E402
from onnxruntime.quantization import (  # noqa: E402
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)

import tvm_sparse  # noqa: E402
from tvm_sparse import examples  # noqa: E402
from tvm_sparse.target import num_cores  # noqa: E402

# (name, fp32 builder, target vs ORT int8 or None, target vs our fp32 sparse or None)
# LSTM rows: ORT's quantize_dynamic (DynamicQuantizeLSTM, the form ORT quantizes LSTMs in);
# the issue sets no target for them.
LSTM = "LSTM T=100 H=1024"
CASES = [
    ("MatMul 64x1024x1024 dense", lambda: pruned_matmul(0.0, (1, 1)), 0.9, None),
    ("MatMul 64x1024x1024 90% 1x4", lambda: pruned_matmul(0.9, (1, 4)), 2.5, 1.3),
    ("MatMul 64x1024x1024 90% 4x1", lambda: pruned_matmul(0.9, (4, 1)), 2.5, 1.3),
    ("MobileNet-v1 dense", lambda: examples.mobilenet_v1(), 0.9, None),
    ("MobileNet-v1 90% 1x4", lambda: examples.mobilenet_v1(sparsity=0.9, block=(1, 4)), 2.5, 1.3),
    ("MobileNet-v1 90% 4x1", lambda: examples.mobilenet_v1(sparsity=0.9, block=(4, 1)), 2.5, 1.3),
    (f"{LSTM} dense", lambda: examples.lstm(100, 1, 512, 1024), None, None),
    (
        f"{LSTM} 90% 16x4",
        lambda: examples.lstm(100, 1, 512, 1024, sparsity=0.9, block=(16, 4)),
        None,
        None,
    ),
]


ROUNDS = 5


class _Calibration(CalibrationDataReader):
    """ORT CalibrationDataReader over a few fixed-seed random inputs."""

    def __init__(self, model: onnx.ModelProto, samples: int = 4):
        self._batches = iter([random_inputs(model, seed) for seed in range(samples)])

    def get_next(self):
        return next(self._batches, None)


def quantize_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """ORT quantize_static, QDQ format, per-channel int8 weights, uint8 activations."""
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # ORT's "consider pre-processing" notes
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        onnx.save(model, src)
        quantize_static(
            src,
            dst,
            _Calibration(model),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        return onnx.load(dst)


def quantize_dynamic_lstm(model: onnx.ModelProto) -> onnx.ModelProto:
    """ORT quantize_dynamic, int8 weights: LSTM nodes become DynamicQuantizeLSTM."""
    import logging

    from onnxruntime.quantization import quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        onnx.save(model, src)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        return onnx.load(dst)


def _output_step(model: onnx.ModelProto) -> float:
    """The quantization step of the graph output (scale of its last DequantizeLinear)."""
    from onnx import numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = model.graph.output[0].name
    node = next(n for n in model.graph.node if out in n.output)
    return float(consts[node.input[1]]) if node.op_type == "DequantizeLinear" else 0.0


def run_case(name, build, seconds, threads, work) -> dict:
    fp32 = build()
    qdq = quantize_dynamic_lstm(fp32) if name.startswith(LSTM) else quantize_qdq(fp32)
    inputs = random_inputs(fp32)
    print(f"[{name}] compiling int8 and fp32 (measured selection) ...", file=sys.stderr, flush=True)
    cm8 = tvm_sparse.compile(qdq)
    cm32 = tvm_sparse.compile(fp32)
    ours, ref = cm8.run(inputs)[0], ort_session(qdq, threads).run(None, inputs)[0]
    # float outputs (dynamic quantization): the step ORT's quantization of them would have
    step = _output_step(qdq) or float(max(ref.max(), 0) - min(ref.min(), 0)) / 255
    diff = float(np.max(np.abs(ours - ref)))
    paths = {side: os.path.join(work, side) for side in ("ort", "int8", "fp32")}
    onnx.save(qdq, paths["ort"] + ".onnx")
    cm8.save(paths["int8"])
    cm32.save(paths["fp32"])
    # Each side is timed in a fresh process (see _bench), and the machine is shared: alternate
    # the three sides over rounds and keep each side's median, so a burst of outside load does
    # not land on one side only.
    samples = {"ort": [], "int8": [], "fp32": []}
    for _ in range(ROUNDS):
        samples["ort"].append(time_fresh("ort", paths["ort"] + ".onnx", seconds / ROUNDS))
        samples["int8"].append(time_fresh("tvm", paths["int8"], seconds / ROUNDS))
        samples["fp32"].append(time_fresh("tvm", paths["fp32"], seconds / ROUNDS))
    t_ort, t_int8, t_fp32 = (float(np.median(samples[k])) for k in ("ort", "int8", "fp32"))
    kernels = sorted({r["kernel"] for r in cm8.report if r.get("kernel")})
    return dict(
        case=name,
        ort_int8_s=t_ort,
        tvm_int8_s=t_int8,
        tvm_fp32_s=t_fp32,
        vs_ort=t_ort / t_int8,
        vs_fp32=t_fp32 / t_int8,
        max_diff_steps=diff / step if step else diff,
        differing=float(np.mean(ours != ref)),
        int8_kernels=kernels,
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="shorter timing (noisier)")
    parser.add_argument("--only", help="run the cases whose name contains this")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    seconds = 0.5 if args.quick else 2.0
    threads = num_cores()
    rows = []
    for name, build, vs_ort, vs_fp32 in CASES:
        if args.only and args.only not in name:
            continue
        with tempfile.TemporaryDirectory() as work:
            row = run_case(name, build, seconds, threads, work)
        row.update(target_vs_ort=vs_ort, target_vs_fp32=vs_fp32)
        rows.append(row)
        print(
            f"[{name}] ORT int8 {fmt_ms(row['ort_int8_s'])} ms, ours int8 "
            f"{fmt_ms(row['tvm_int8_s'])} ms, ours fp32 {fmt_ms(row['tvm_fp32_s'])} ms; "
            f"kernels {row['int8_kernels']}",
            file=sys.stderr,
        )
    print(
        f"\nMeasured {datetime.date.today()} on {machine()}, {threads} threads each; "
        "tvm-sparse untuned, sparse='auto' (measured selection); ORT quantize_static QDQ"
    )
    print(
        "| case | ORT int8 (ms) | ours int8 (ms) | ours fp32 (ms) | vs ORT int8 | target "
        "| vs our fp32 | target | max diff (steps) | met |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ok = (r["target_vs_ort"] is None or r["vs_ort"] >= r["target_vs_ort"]) and (
            r["target_vs_fp32"] is None or r["vs_fp32"] >= r["target_vs_fp32"]
        )
        untargeted = r["target_vs_ort"] is None and r["target_vs_fp32"] is None
        fp32_target = "-" if r["target_vs_fp32"] is None else f">= {r['target_vs_fp32']:g}x"
        ort_target = "-" if r["target_vs_ort"] is None else f">= {r['target_vs_ort']:g}x"
        print(
            f"| {r['case']} | {fmt_ms(r['ort_int8_s'])} | {fmt_ms(r['tvm_int8_s'])} | "
            f"{fmt_ms(r['tvm_fp32_s'])} | {r['vs_ort']:.2f}x | {ort_target} | "
            f"{r['vs_fp32']:.2f}x | {fp32_target} | {r['max_diff_steps']:.2g} | "
            f"{'-' if untargeted else 'yes' if ok else '**no**'} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
