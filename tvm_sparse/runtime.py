"""Compiled models: run them, save them to a directory, load them back."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping

import numpy as np
import tvm
from tvm import relax

from .errors import ArtifactError, InputError
from .frontend.onnx import InputSpec

FORMAT_VERSION = 1
LIBRARY = "model.so"
META = "model.json"
REPORT = "report.json"


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence fd 2 for TVM 0.27's leftover "Scope Saving/Loaded" warnings in (de)serialisation."""
    try:
        saved = os.dup(2)
    except OSError:  # no usable stderr: nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _flatten(value) -> list[np.ndarray]:
    if isinstance(value, tvm.runtime.Tensor):
        return [value.numpy()]
    out = []
    for item in value:
        out.extend(_flatten(item))
    return out


class CompiledModel:
    """A built model bound to the CPU: ``run`` it, ``save`` it, read its ``report``."""

    def __init__(
        self,
        executable,
        inputs: list[InputSpec],
        outputs: list[str],
        report: list[dict],
        target: str,
    ):
        self._executable = executable
        self._vm = relax.VirtualMachine(executable, tvm.cpu())
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.report = report
        self.target = target

    def _arguments(self, inputs: Mapping[str, np.ndarray]) -> list[tvm.runtime.Tensor]:
        if not isinstance(inputs, Mapping):
            raise InputError("inputs: expected a dict {input name: array}")
        expected = [s.name for s in self.inputs]
        unknown = sorted(set(inputs) - set(expected))
        missing = [n for n in expected if n not in inputs]
        if unknown or missing:
            raise InputError(
                f"inputs: model takes {expected}; missing {missing}, unknown {unknown}"
            )
        args = []
        for spec in self.inputs:
            arr = np.asarray(inputs[spec.name])
            if tuple(arr.shape) != spec.shape or str(arr.dtype) != spec.dtype:
                raise InputError(
                    f"input '{spec.name}': expected {spec.dtype} {list(spec.shape)}, "
                    f"got {arr.dtype} {list(arr.shape)}"
                )
            args.append(tvm.runtime.tensor(np.require(arr, requirements="C")))  # keeps 0-d
        return args

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run once; returns the graph outputs in graph order."""
        return _flatten(self._vm["main"](*self._arguments(inputs)))

    def time(
        self,
        inputs: Mapping[str, np.ndarray],
        number: int = 10,
        repeat: int = 5,
        min_repeat_ms: int = 100,
    ) -> float:
        """Median seconds per run, measured by TVM's time evaluator (no Python in the loop)."""
        timer = self._vm.time_evaluator(
            "main", tvm.cpu(), number=number, repeat=repeat, min_repeat_ms=min_repeat_ms
        )
        return float(timer(*self._arguments(inputs)).median)

    def save(self, out_dir: str | os.PathLike) -> str:
        """Write the library, the I/O description and the report; atomically replaces `out_dir`."""
        out_dir = os.path.abspath(os.fspath(out_dir))
        parent = os.path.dirname(out_dir)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tvm-sparse-", dir=parent)
        try:
            with _quiet_native_stderr():
                self._executable.export_library(os.path.join(tmp, LIBRARY))
            meta = {
                "format": FORMAT_VERSION,
                "target": self.target,
                "library": LIBRARY,
                "inputs": [
                    {"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in self.inputs
                ],
                "outputs": self.outputs,
            }
            with open(os.path.join(tmp, META), "w") as f:
                json.dump(meta, f, indent=2)
            with open(os.path.join(tmp, REPORT), "w") as f:
                json.dump(self.report, f, indent=2)
            if os.path.exists(out_dir):
                old = tempfile.mkdtemp(prefix=".tvm-sparse-old-", dir=parent)
                os.rename(out_dir, os.path.join(old, "x"))
                os.rename(tmp, out_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out_dir


def load(out_dir: str | os.PathLike) -> CompiledModel:
    """Load a directory written by :meth:`CompiledModel.save` (or ``tvm-sparse compile``)."""
    out_dir = os.fspath(out_dir)
    meta_path = os.path.join(out_dir, META)
    if not os.path.isdir(out_dir):
        raise ArtifactError(f"{out_dir}: no such directory (expected output of tvm-sparse compile)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        inputs = [InputSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in meta["inputs"]]
        outputs, target = list(meta["outputs"]), meta["target"]
        if meta.get("format") != FORMAT_VERSION:
            raise ArtifactError(f"{meta_path}: format {meta.get('format')} not supported")
    except ArtifactError:
        raise
    except FileNotFoundError as err:
        raise ArtifactError(f"{meta_path}: missing; {out_dir} is not a compiled model") from err
    except (ValueError, KeyError, TypeError) as err:
        raise ArtifactError(f"{meta_path}: corrupt ({type(err).__name__}: {err})") from err
    lib_path = os.path.join(out_dir, meta.get("library", LIBRARY))
    if not os.path.isfile(lib_path):
        raise ArtifactError(f"{lib_path}: missing library")
    try:
        with _quiet_native_stderr():
            executable = tvm.runtime.load_module(lib_path)
    except Exception as err:
        raise ArtifactError(
            f"{lib_path}: cannot load library ({str(err).splitlines()[0]})"
        ) from err
    report = []
    report_path = os.path.join(out_dir, REPORT)
    if os.path.exists(report_path):
        try:
            with open(report_path) as f:
                report = json.load(f)
        except ValueError as err:
            raise ArtifactError(f"{report_path}: corrupt ({err})") from err
    return CompiledModel(executable, inputs, outputs, report, target)
