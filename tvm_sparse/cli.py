"""The `tvm-sparse` command line: thin wrappers over the Python API (imports stay lazy)."""

from __future__ import annotations

import argparse
import os
import sys
import time

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 1

_EPILOG = """examples:
  tvm-sparse inspect model.onnx
  tvm-sparse compile model.onnx -o build/ --shape input=1,3,224,224
  tvm-sparse run build/ --inputs inputs.npz --out outputs.npz
  tvm-sparse tune model.onnx --db tuning/ --trials 64 --budget 15m
  tvm-sparse compile model.onnx -o build/ --db tuning/
  tvm-sparse quantize model.onnx --calib samples.npz -o model.int8.onnx
"""


def _shape_arg(text: str) -> tuple[str, list[int]]:
    name, sep, dims = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, [int(d) for d in dims.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not NAME=D0,D1,... (e.g. input=1,3,224,224)"
        ) from None


def _progress(start: float):
    def on_phase(name: str) -> None:
        print(f"  [{time.perf_counter() - start:6.1f}s] {name}", file=sys.stderr, flush=True)

    return on_phase


def _calibration(path: str | None):
    if path is None:
        return None
    import numpy as np

    from .errors import InputError

    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise InputError(f"--calib {path}: no such file") from None
    except Exception as err:
        raise InputError(f"--calib {path}: not a .npz file ({type(err).__name__})") from None


def cmd_inspect(args) -> int:
    from .frontend.onnx import load_model
    from .report import format_table, weight_layers

    model = load_model(args.model)
    if args.choose:
        from .compiler import plan_layers

        rows = plan_layers(
            model,
            target=args.target,
            shapes=dict(args.shape or []) or None,
            sparse=args.sparse,
            policy=args.policy,
            calibration=_calibration(args.calib),
        )
    else:
        rows = weight_layers(model)
        for row in rows:
            row.pop("keys", None)
    if args.json:
        import json

        print(json.dumps(rows, indent=2))
    elif rows:
        print(format_table(rows))
    else:
        print(f"{args.model}: no layer with a constant weight (MatMul, Gemm, Conv, LSTM, GRU, RNN)")
    return 0


def cmd_compile(args) -> int:
    from . import compile as compile_model
    from .report import format_table

    start = time.perf_counter()
    print(f"compiling {args.model} for target {args.target}", file=sys.stderr)
    cm = compile_model(
        args.model,
        target=args.target,
        shapes=dict(args.shape or []) or None,
        sparse=args.sparse,
        policy=args.policy,
        calibration=_calibration(args.calib),
        database=args.db,
        dump_ir=args.dump_ir,
        on_phase=_progress(start),
    )
    out = cm.save(args.output)
    if cm.report:
        print(format_table(cm.report))
    print(f"wrote {out} ({time.perf_counter() - start:.1f}s)")
    return 0


class _Bar:
    """A one-line progress bar on stderr (a line per update when stderr is not a terminal)."""

    def __init__(self, start: float):
        self.start, self.tty, self.last = start, sys.stderr.isatty(), ""

    def __call__(self, done: int, total: int, task: str) -> None:
        width = 30
        filled = width * done // total if total else width
        elapsed = time.perf_counter() - self.start
        line = (
            f"  tuning [{'#' * filled}{'.' * (width - filled)}] {done}/{total} trials  "
            f"{elapsed / 60:4.1f} min  {task}"
        )
        if self.tty:
            print(f"\r{line[:150]:<150}", end="", file=sys.stderr, flush=True)
        elif line != self.last:
            print(line, file=sys.stderr, flush=True)
        self.last = line

    def end(self) -> None:
        if self.tty and self.last:
            print(file=sys.stderr)


def cmd_tune(args) -> int:
    from .tuning import parse_budget, tune

    start = time.perf_counter()
    budget = parse_budget(args.budget) if args.budget else None
    if args.trials < 1:
        from .errors import InputError

        raise InputError(f"--trials {args.trials}: expected a positive number")
    rpc = None
    if args.rpc:
        rpc = _rpc_arg(args.rpc)
    print(f"tuning {args.model} for target {args.target} into {args.db}", file=sys.stderr)
    bar = _Bar(start)
    phase = _progress(start)

    def on_phase(name: str) -> None:
        bar.end()
        phase(name)

    try:
        report = tune(
            args.model,
            database=args.db,
            trials=args.trials,
            time_budget=budget,
            target=args.target,
            shapes=dict(args.shape or []) or None,
            sparse=args.sparse,
            policy=args.policy,
            calibration=_calibration(args.calib),
            rpc=rpc,
            on_progress=bar,
            on_phase=on_phase,
        )
    finally:
        bar.end()
    print(report.table())
    if report.interrupted:
        state = "interrupted (the database is valid; run the same command again to continue)"
    elif not report.complete:
        state = "stopped by --budget (run again to continue)"
    else:
        state = "done"
    print(f"{state}: {report.database} ({report.seconds / 60:.1f} min)")
    return 130 if report.interrupted else 0


def _rpc_arg(text: str):
    from .errors import InputError
    from .tuning import RPCSettings

    host, _, rest = text.rpartition(":")
    port, _, key = rest.partition("/")
    try:
        if not host or not key:
            raise ValueError
        return RPCSettings(host, int(port), key)
    except ValueError:
        raise InputError(f"--rpc {text}: expected HOST:PORT/KEY of an RPC tracker") from None


def cmd_run(args) -> int:
    import numpy as np

    from .errors import InputError
    from .runtime import load

    cm = load(args.model_dir)
    try:
        with np.load(args.inputs) as data:
            inputs = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise InputError(f"--inputs {args.inputs}: no such file") from None
    except Exception as err:
        raise InputError(
            f"--inputs {args.inputs}: not a .npz file ({type(err).__name__})"
        ) from None
    outputs = cm.run(inputs)
    for name, value in zip(cm.outputs, outputs):
        print(f"{name}: {value.dtype} {list(value.shape)}")
    if args.out:
        tmp = f"{args.out}.tmp-{os.getpid()}.npz"
        np.savez(tmp, **dict(zip(cm.outputs, outputs)))
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")
    return 0


def cmd_quantize(args) -> int:
    import onnx

    from .compress import quantize
    from .errors import InputError

    if args.calib is None:
        raise InputError("quantize needs --calib DATA.npz (sample inputs by input name)")
    model = quantize(
        args.model,
        _calibration(args.calib),
        per_channel=args.per_channel,
        bias_correction=args.bias_correction,
        activation_type=args.activations,
    )
    out = os.path.abspath(args.output)
    if os.path.isdir(out):
        raise InputError(f"-o {args.output}: is a directory")
    # Written beside the target and renamed: a failed run never leaves a truncated model.
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        onnx.save(model, tmp)
        os.replace(tmp, out)
    except OSError as err:
        raise InputError(f"-o {args.output}: cannot write ({err.strerror})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {args.output}")
    return 0


def _add_target_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        default="host",
        help="'host' (this CPU, all cores; default), an LLVM CPU name (e.g. znver4), or a "
        'TVM target as JSON, e.g. \'{"kind": "llvm", "mcpu": "znver4", "num-cores": 8}\'',
    )
    p.add_argument(
        "--shape",
        action="append",
        type=_shape_arg,
        metavar="NAME=D0,D1,...",
        help="static shape of an input with dynamic dims (repeatable)",
    )


def _add_kernel_options(p: argparse.ArgumentParser, default_policy: str) -> None:
    p.add_argument(
        "--sparse",
        choices=("auto", "off", "force"),
        default="auto",
        help="auto: a sparse kernel where the policy says it is faster (default); "
        "off: dense kernels only; force: sparse wherever the weight has zero blocks",
    )
    p.add_argument(
        "--policy",
        choices=("measured", "threshold"),
        default=default_policy,
        help="measured: time every candidate kernel on the target; threshold: decide "
        f"from the zero-block fraction without timing (default: {default_policy})",
    )
    p.add_argument(
        "--calib",
        metavar="DATA.npz",
        help="sample inputs (arrays by input name, samples stacked on a first axis) to measure "
        "each layer's input sparsity; batch-1 layers with mostly-zero inputs then also try "
        "input-sparse kernels",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tvm-sparse",
        description="Compile pruned and quantized ONNX models to fast TVM kernels for this CPU.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "inspect",
        help="show each weight layer's sparsity and the kernel it would get",
        description="Print one row per weight (MatMul, Gemm, Conv, LSTM/GRU/RNN W and R): shape, "
        "fraction of zero elements, fraction of all-zero blocks for block shapes RxC (R output "
        "rows x C reduction elements of the weight viewed as [out, in]), and the kernel compile "
        "would choose with the same --sparse/--policy (threshold by default: no timing).",
    )
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument(
        "--no-choose",
        dest="choose",
        action="store_false",
        help="only measure sparsity; do not work out the kernel choice",
    )
    _add_target_options(p)
    _add_kernel_options(p, default_policy="threshold")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "compile",
        help="compile a model into a deployable directory",
        description="Import MODEL, choose a dense or block-sparse kernel per layer, schedule and "
        "build it, and write OUT_DIR with model.so (the library), model.json (inputs, outputs, "
        "target) and report.json (per layer: kernel chosen, every candidate's time, why). "
        "OUT_DIR is replaced atomically.",
    )
    p.add_argument("model", help="ONNX model file")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output directory")
    _add_target_options(p)
    _add_kernel_options(p, default_policy="measured")
    p.add_argument(
        "--db",
        metavar="DIR",
        help="tuning database written by 'tvm-sparse tune': apply its tuned schedules",
    )
    p.add_argument("--dump-ir", metavar="DIR", help="write the IR after each pipeline phase")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser(
        "tune",
        help="autotune the model's kernels into a database that later builds reuse",
        description="Compile MODEL as 'compile' would, then tune each of its kernels with "
        "MetaSchedule (evolutionary search guided by an XGBoost cost model; our kernels' "
        "design spaces, MetaSchedule's own space for other dense ops) and store every "
        "measurement in the JSON database DIR. The default schedule of each kernel is its first "
        "record, so tuned kernels are never slower than the defaults. Ctrl-C or --budget "
        "leave a valid database; running again continues where it stopped (tasks with "
        "--trials records get no new trials; a re-pruned model with the same shapes and "
        "sparsity reuses the records). Use the database with 'compile --db DIR'.",
    )
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--db", required=True, metavar="DIR", help="tuning database directory")
    p.add_argument(
        "--trials",
        type=int,
        default=64,
        metavar="N",
        help="measured candidates per kernel task (default: 64)",
    )
    p.add_argument(
        "--budget",
        metavar="TIME",
        help="stop after this long, e.g. 90s, 15m, 1h (default: no limit)",
    )
    p.add_argument(
        "--rpc",
        metavar="HOST:PORT/KEY",
        help="measure candidates on the device registered as KEY with this RPC tracker "
        "(see README: tuning on another machine)",
    )
    _add_target_options(p)
    _add_kernel_options(p, default_policy="measured")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser(
        "run",
        help="run a compiled model on inputs from a .npz file",
        description="Load OUT_DIR written by 'tvm-sparse compile', run it on the arrays of "
        "INPUTS.npz (one per model input, by name) and print or save the outputs.",
    )
    p.add_argument("model_dir", metavar="OUT_DIR", help="directory written by 'compile'")
    p.add_argument("--inputs", required=True, metavar="INPUTS.npz", help="input arrays by name")
    p.add_argument("--out", metavar="OUTPUTS.npz", help="save the outputs (by output name)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "quantize",
        help="post-training int8 quantization of an fp32 model to QDQ ONNX",
        description="Quantize the MatMul, Gemm and Conv layers of an fp32 MODEL to int8 and write "
        "a standard QDQ ONNX model (ONNX Runtime and 'tvm-sparse compile' run it): symmetric "
        "int8 weights (zeros stay zeros), activation ranges measured on the --calib samples, "
        "int32 biases with bias correction (the mean output shift the weight quantization "
        "causes on the samples is subtracted from the bias). LSTM layers get int8 W and R "
        "with corrected float biases; their activations stay float.",
    )
    p.add_argument("model", help="fp32 ONNX model file (opset >= 13)")
    p.add_argument(
        "--calib",
        metavar="DATA.npz",
        help="calibration samples: arrays by input name, samples stacked on a first axis "
        "(required)",
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="output file")
    p.add_argument(
        "--per-tensor",
        dest="per_channel",
        action="store_false",
        help="one weight scale per tensor (default: one per output channel)",
    )
    p.add_argument(
        "--no-bias-correction",
        dest="bias_correction",
        action="store_false",
        help="keep the biases as they are",
    )
    p.add_argument(
        "--activations",
        choices=("uint8", "int8"),
        default="uint8",
        help="activation type (asymmetric; default uint8, as ONNX Runtime)",
    )
    p.set_defaults(func=cmd_quantize)
    return parser


def run() -> int:
    """The process entry point (`tvm-sparse`, `python -m tvm_sparse`): :func:`main`, with Ctrl-C
    taken by a thread of its own (:func:`_take_sigint_on_a_thread`)."""
    _take_sigint_on_a_thread()
    return main()


def _take_sigint_on_a_thread() -> None:
    """Let SIGINT reach Python only through one thread that waits for it, never through a
    signal handler.

    Native code may swap its own SIGINT handler in for a moment, and a press that lands then is
    lost: TVM's bundled Z3 prover installs one for a few milliseconds at a time while
    MetaSchedule works in this process, and it cancels its own solver instead of passing the
    signal on (about one `tune` in eight lost a single press). Blocked in every thread (a thread
    starts with the mask of the thread that starts it, and this runs before any other thread
    exists), the signal stays pending until the waiting thread takes it and hands it to Python
    as a press (`_thread.interrupt_main`): KeyboardInterrupt, or `tune`'s stop after the current
    batch. Child processes inherit the mask, so worker processes outlive a terminal's Ctrl-C
    until their pool shuts them down.
    """
    import _thread
    import signal
    import threading

    if threading.active_count() > 1 or not hasattr(signal, "pthread_sigmask"):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def wait() -> None:
        while True:
            signal.sigwait({signal.SIGINT})
            _thread.interrupt_main(signal.SIGINT)

    threading.Thread(target=wait, name="sigint", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import TvmSparseError

    try:
        return args.func(args)
    except TvmSparseError as err:
        print(f"tvm-sparse: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("tvm-sparse: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug of ours: one line unless debugging is asked for
        if os.environ.get("TVM_SPARSE_DEBUG"):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(
            f"tvm-sparse: internal error: {type(err).__name__}: {first} "
            "(set TVM_SPARSE_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
