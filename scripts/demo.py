"""Demo: pruned LSTM and CNN as ONNX -> `tvm-sparse compile` -> `tvm-sparse run` -> ORT check."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort

from tvm_sparse import examples

CLI = [sys.executable, "-m", "tvm_sparse"]


def _models() -> dict[str, tuple[onnx.ModelProto, tuple[int, ...]]]:
    return {
        "lstm_pruned90": (
            examples.lstm(
                seq_len=20,
                batch=1,
                input_size=128,
                hidden=256,
                layers=2,
                bidirectional=True,
                sparsity=0.9,
                block=(16, 1),
                seed=1,
            ),
            (20, 1, 128),
        ),
        "mobilenet_pruned80": (
            examples.mobilenet_v1(size=128, width=0.5, sparsity=0.8, block=(4, 1), seed=2),
            (1, 3, 128, 128),
        ),
    }


def _sh(*cmd: str) -> None:
    print("$ tvm-sparse " + " ".join(cmd[len(CLI) :]), flush=True)
    if subprocess.run(cmd).returncode:
        raise SystemExit(f"demo: 'tvm-sparse {cmd[len(CLI)]}' failed (see above)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo-out", help="working directory (default demo-out)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    failures = 0
    for name, (model, shape) in _models().items():
        print(f"\n=== {name} ===")
        path = os.path.join(args.out, f"{name}.onnx")
        onnx.save(model, path)
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        inputs = os.path.join(args.out, f"{name}.inputs.npz")
        outputs = os.path.join(args.out, f"{name}.outputs.npz")
        np.savez(inputs, input=x)
        build = os.path.join(args.out, name)
        _sh(*CLI, "inspect", path)
        _sh(*CLI, "compile", path, "-o", build)
        _sh(*CLI, "run", build, "--inputs", inputs, "--out", outputs)
        ours = np.load(outputs)[model.graph.output[0].name]
        ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
            None, {"input": x}
        )[0]
        err = float(np.max(np.abs(ours - ref)))
        ok = np.allclose(ours, ref, rtol=1e-4, atol=1e-4)
        failures += not ok
        print(f"check vs ONNX Runtime: max |diff| = {err:.2e} -> {'OK' if ok else 'MISMATCH'}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
