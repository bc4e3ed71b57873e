"""tune(): MetaSchedule (evolutionary search + XGBoost cost model) over every kernel of a model.

A tuning database is a directory:

* ``database_workload.json``, ``database_tuning_record.json``: MetaSchedule's JSON database
  (one JSON document per line; a record is a schedule trace and its measured times).
* ``selection.json``: the candidate timings of the measured kernel selection, taken with the
  tuned kernels, so that every build with this database chooses the same kernels.
* ``defaults.json``: each task's time with its default schedule (for the report).
* ``args/``: the real constant arguments (BSR arrays) of sparse tasks, for the runner.
* ``logs/``: MetaSchedule's logs.

Task keys. A task is a PrimFunc of the compiled model as MetaSchedule normalises it; its
database key is the structural hash of that function. Sparse kernels take the block pattern
as runtime data (BSR ``indices``/``indptr`` arrays) and pad the number of stored blocks to a
bucket, so their key is (kernel, shapes, block shape, nnz bucket): a model re-pruned at the
same sparsity reuses the records with zero new trials.

Kinds of tasks: ``space`` (our schedules' design spaces, ``schedules/spaces.py``; the default
schedule is stored as the first record, so a tuned kernel is never slower than the default),
``generic`` (unscheduled dense ops without a space of ours: MetaSchedule's own space for the
target; ops under 1 % of the model's FLOPs keep the default schedule) and ``fixed``
(hand-scheduled kernels without a design space yet: measured, not tuned).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax, tirx
from tvm_ffi import structural_equal, structural_hash

from ._compat import ATTR_SCHEDULED, Constant, constant_value
from .errors import TvmSparseError

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
SELECTION_FILE = "selection.json"
DEFAULTS_FILE = "defaults.json"
SMALL_TASK = 0.01  # generic tasks under this share of the model's FLOPs are not tuned
FAILED = 1e9  # run time MetaSchedule records for a failed candidate is above this


class DatabaseError(TvmSparseError):
    """A tuning database directory or file that cannot be read."""


# ---------------------------------------------------------------- database


class TuningDatabase:
    """A tuning database directory: MetaSchedule's JSON database plus our selection timings."""

    def __init__(self, path: str | os.PathLike, create: bool = False):
        from tvm.s_tir import meta_schedule as ms

        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            if not create:
                raise DatabaseError(f"tuning database {self.path}: no such directory")
            os.makedirs(self.path)
        for name in (WORKLOAD_FILE, RECORD_FILE):
            _check_json_lines(os.path.join(self.path, name))
        try:
            self.ms = ms.database.JSONDatabase(work_dir=self.path, allow_missing=True)
        except Exception as err:  # a well-formed JSON line that is not a MetaSchedule record
            raise DatabaseError(
                f"tuning database {self.path}: not a MetaSchedule database "
                f"({str(err).strip().splitlines()[-1]})"
            ) from None
        self.selection: dict[str, dict[str, float]] = self._load(SELECTION_FILE)
        self.defaults: dict[str, float] = self._load(DEFAULTS_FILE)

    def _load(self, name: str) -> dict:
        path = os.path.join(self.path, name)
        if not os.path.exists(path):
            return {}
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as err:
            raise DatabaseError(f"tuning database file {path}: unreadable ({err})") from None

    def save(self) -> None:
        """Write the selection timings and default times atomically (temp file, rename)."""
        for name, value in ((SELECTION_FILE, self.selection), (DEFAULTS_FILE, self.defaults)):
            path = os.path.join(self.path, name)
            with open(path + ".tmp", "w") as f:
                json.dump(value, f, indent=1, sort_keys=True)
            os.replace(path + ".tmp", path)

    def records(self, task: Task) -> list:
        """All records of `task` (failed ones included)."""
        workload = self.ms.commit_workload(task.mod)
        return [r for r in self.ms.get_all_tuning_records() if r.workload.same_as(workload)]

    def best_seconds(self, task: Task) -> float | None:
        times = [_seconds(r) for r in self.records(task)]
        times = [t for t in times if t is not None]
        return min(times) if times else None


def _check_json_lines(path: str) -> None:
    """MetaSchedule aborts on a bad line without naming the file; name file and line."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except ValueError:
                raise DatabaseError(
                    f"tuning database file {path}, line {number}: not valid JSON (truncated "
                    "or edited?); remove that line, or the file to start over"
                ) from None


def _seconds(record) -> float | None:
    if record.run_secs is None or len(record.run_secs) == 0:
        return None
    t = float(np.mean([float(s) for s in record.run_secs]))
    return None if t >= FAILED else t


def open_database(path: str | os.PathLike, create: bool = False) -> TuningDatabase:
    """Open (or with `create`, create) a tuning database directory."""
    return TuningDatabase(path, create=create)


@contextlib.contextmanager
def using_database(db: TuningDatabase | None):
    """Make `db` MetaSchedule's current database: the schedule phase then applies its records
    (`tvm_sparse.passes.pipeline`)."""
    if db is None:
        yield
        return
    with db.ms:
        yield


def selection_cache(db: TuningDatabase, target) -> dict[str, float]:
    """The selection timings stored with `db` for `target` (filled as candidates are timed)."""
    return db.selection.setdefault(str(target), {})


# ---------------------------------------------------------------- tasks


@dataclass
class Task:
    """One kernel of the compiled model, as MetaSchedule sees it."""

    name: str
    mod: tvm.IRModule
    kind: str  # "space", "generic" or "fixed"
    space: object | None  # schedules.spaces.Space for kind "space"
    kernel: str  # what the report calls it: a space name, our kernel name or the PrimFunc's
    calls: int = 1
    flops: float = 0.0
    constants: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The workload's structural hash (what the database keys records by)."""
        return f"{structural_hash(self.mod) & (2**64 - 1):016x}"

    @property
    def shape(self) -> str:
        from tvm.s_tir.meta_schedule.arg_info import ArgInfo

        shapes = [info.shape for info in ArgInfo.from_prim_func(self.mod["main"])]
        return " ".join("x".join(str(int(d)) for d in s) for s in shapes[:2] + shapes[-1:])


def _call_sites(mod: tvm.IRModule) -> dict[str, list[list]]:
    """PrimFunc name -> argument lists of its call_tir sites in the Relax functions."""
    sites: dict[str, list[list]] = {}
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op.same_as(call_tir):
            args = expr.args[1]
            fields = list(args.fields) if isinstance(args, relax.Tuple) else [args]
            sites.setdefault(expr.args[0].name_hint, []).append(fields)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return sites


def extract_tasks(mod: tvm.IRModule) -> list[Task]:
    """The distinct PrimFuncs `mod` calls (structurally equal ones are one task)."""
    from tvm.s_tir.analysis import estimate_tir_flops
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    from tvm_sparse.schedules.spaces import space_for

    sites = _call_sites(mod)
    tasks: dict[int, list[Task]] = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc) or gv.name_hint not in sites:
            continue
        func = func.without_attr("global_symbol")
        workload = _normalize_mod(func)
        space = space_for(func) if not _attr(func, ATTR_SCHEDULED) else None
        if _attr(func, ATTR_SCHEDULED):
            kind = "fixed"
        else:
            kind = "space" if space is not None else "generic"
        kernel = space.name if space is not None else str(_attr(func, "tvm_sparse.kernel") or "")
        constants = {}
        for i, arg in enumerate(sites[gv.name_hint][0]):
            if isinstance(arg, Constant) and _attr(func, "tvm_sparse.kernel"):
                constants[i] = constant_value(arg)
        try:
            flops = float(estimate_tir_flops(workload))
        except Exception:  # data-dependent loops: no estimate
            flops = 0.0
        task = Task(
            gv.name_hint,
            workload,
            kind,
            space,
            kernel or gv.name_hint,
            len(sites[gv.name_hint]),
            flops,
            constants,
        )
        bucket = tasks.setdefault(structural_hash(workload), [])
        same = next((t for t in bucket if structural_equal(t.mod, workload)), None)
        if same is None:
            bucket.append(task)
        else:
            same.calls += task.calls
    return [t for bucket in tasks.values() for t in bucket]


def _attr(func, name):
    return func.attrs[name] if func.attrs is not None and name in func.attrs else None


# ---------------------------------------------------------------- measuring


class RealArguments:
    """The runner's ``f_alloc_argument``: a task's constant arguments (its real BSR arrays,
    which keep indptr-driven loops in bounds and time the real pattern), random data for the
    other arguments (activations, outputs) as MetaSchedule's default does.

    `source` is ``{argument index: array}`` or the path of an ``.npz`` file holding them (keys
    are the indices; cheaper to send to the runner's worker process for large weights).
    Picklable, so it reaches that process; works for the local and the RPC runner."""

    def __init__(self, source: str | dict[int, np.ndarray]):
        self.path = source if isinstance(source, str) else None
        self.arrays = None if self.path else {int(i): np.asarray(a) for i, a in source.items()}

    def _arrays(self) -> dict[int, np.ndarray]:
        if self.arrays is not None:
            return self.arrays
        with np.load(self.path) as data:
            return {int(k): data[k] for k in data.files}

    def allocate(self, device, args_info, repeat: int, fill) -> list[list]:
        arrays = self._arrays()
        out = []
        for _ in range(repeat):
            args = []
            for i, info in enumerate(args_info):
                _, dtype, shape = info
                if i in arrays:
                    array = arrays[i]
                    if list(array.shape) != list(shape) or str(array.dtype) != dtype:
                        raise ValueError(
                            f"argument {i}: kernel wants {dtype}{list(shape)}, "
                            f"got {array.dtype}{list(array.shape)}"
                        )
                    args.append(tvm.runtime.tensor(np.ascontiguousarray(array), device))
                else:
                    tensor = tvm.runtime.empty(shape=shape, dtype=dtype, device=device)
                    fill(tensor)
                    args.append(tensor)
            out.append(args)
        return out

    def __call__(self, *args):
        if len(args) == 4:  # RPC runner: (session, device, args_info, repeat)
            session, device, args_info, repeat = args
            fill = session.get_function("tvm.contrib.random.random_fill_for_measure")
        else:  # local runner: (device, args_info, repeat)
            device, args_info, repeat = args
            fill = tvm.get_global_func("tvm.contrib.random.random_fill_for_measure")
        return self.allocate(device, args_info, repeat, fill)


@dataclass
class RPCSettings:
    """Measure on another machine through a TVM RPC tracker (see the README)."""

    tracker_host: str
    tracker_port: int
    key: str
    session_timeout_sec: float = 60.0


def build_kernel(mod, target, params=None):
    """The builder's ``f_build``: a plain build. MetaSchedule's default imports
    ``tvm.s_tir.tensor_intrin`` (parsing every intrinsic of every target) in each fresh builder
    process, and LocalBuilder starts fresh processes for every batch: 20-25 s per batch on
    this machine. Our kernels use no tensor intrinsics. Weight-prepacking blocks
    (``schedules.common.prepack``) run at compile time in a model, so, as in MetaSchedule's
    default, they are left out of the measured kernel."""
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    if params:
        raise ValueError("build_kernel: kernels take no bound parameters")
    return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _evaluator():
    from tvm.s_tir import meta_schedule as ms

    return ms.runner.EvaluatorConfig(
        number=1, repeat=15, min_repeat_ms=5, enable_cpu_cache_flush=False
    )


def fastest_repeat(*args) -> list[float]:
    """The runner's ``f_run_evaluator``: TVM's time evaluator, keeping the fastest repeat.

    MetaSchedule ranks records by the mean of what this returns; on a machine shared with
    other work a mean of repeats can be 2x off (a repeat that lost a core), the minimum is
    what the kernel costs. Takes the local ``(module, device, config, args)`` and the RPC
    ``(session, module, device, config, args)`` forms."""
    from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

    rt_mod, device, config, repeated_args = args[-4:]
    return [min(run_evaluator_common(rt_mod, device, config, repeated_args))]


def make_runner(task: Task, db: TuningDatabase, rpc: RPCSettings | None, timeout: float):
    """A local (or RPC) runner that feeds `task` its real constant arguments."""
    from tvm.s_tir import meta_schedule as ms

    alloc = None
    if task.constants:
        args_dir = os.path.join(db.path, "args")
        os.makedirs(args_dir, exist_ok=True)
        digest = f"{structural_hash(task.mod) & 0xFFFFFFFFFFFF:012x}"
        path = os.path.join(args_dir, f"{digest}.npz")
        if not os.path.exists(path):
            tmp = path + ".tmp.npz"
            np.savez(tmp, **{str(i): a for i, a in task.constants.items()})
            os.replace(tmp, path)
        alloc = RealArguments(path)
    if rpc is not None:
        config = ms.runner.RPCConfig(
            tracker_host=rpc.tracker_host,
            tracker_port=rpc.tracker_port,
            tracker_key=rpc.key,
            session_timeout_sec=rpc.session_timeout_sec,
        )
        return ms.runner.RPCRunner(
            rpc_config=config,
            evaluator_config=_evaluator(),
            f_alloc_argument=alloc,
            f_run_evaluator=fastest_repeat,
            max_workers=1,
        )
    return ms.runner.LocalRunner(
        timeout_sec=timeout,
        evaluator_config=_evaluator(),
        f_alloc_argument=alloc,
        f_run_evaluator=fastest_repeat,
    )


def default_schedule(task: Task, target):
    """The schedule a build without records gives `task` (None for fixed kernels, whose
    schedule is the function itself; None if the default rule's trace does not replay)."""
    from tvm import s_tir

    from tvm_sparse.schedules import default_rules

    if task.kind == "fixed":
        return None
    if task.space is not None:
        sch = s_tir.Schedule(task.mod)
        if not task.space.apply(sch, target, False):
            return None
    else:
        sch = None
        with target:
            for rule in default_rules():
                sch = rule.apply(task.mod["main"], target, False)
                if sch is not None:
                    break
        if sch is None or isinstance(sch, list):
            return None
    replay = s_tir.Schedule(task.mod)
    sch.trace.apply_to_schedule(replay, remove_postproc=False)
    if not structural_equal(replay.mod["main"].body, sch.mod["main"].body):
        return None  # the rule did something its trace does not record
    return replay


def measure(sch_mod: tvm.IRModule, target, builder, runner) -> float | None:
    """Build `sch_mod` with the tuner's builder and time it with `runner` (None: failed)."""
    from tvm.s_tir import meta_schedule as ms

    (built,) = builder.build([ms.builder.BuilderInput(sch_mod, target)])
    if built.error_msg:
        return None
    try:
        # The builder drops weight-prepacking blocks: the kernel then takes the packed weight.
        args_info = ms.arg_info.ArgInfo.from_entry_func(sch_mod, remove_preproc=True)
        (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, "cpu", args_info)])
        result = future.result()
    finally:
        import shutil

        shutil.rmtree(os.path.dirname(built.artifact_path), ignore_errors=True)
    if result.error_msg or not result.run_secs:
        return None
    return float(np.mean([float(s) for s in result.run_secs]))


# ---------------------------------------------------------------- tuning


@dataclass
class TaskResult:
    """One row of the tuning table."""

    name: str
    kernel: str
    kind: str
    shape: str
    calls: int
    default_s: float | None
    tuned_s: float | None
    trials: int  # records in the database for this task
    new_trials: int  # measured in this run
    note: str = ""


@dataclass
class TuneReport:
    """What :func:`tune` did: a row per task, and whether it finished."""

    database: str
    rows: list[TaskResult]
    seconds: float
    complete: bool
    interrupted: bool = False

    def table(self) -> str:
        head = (
            "task",
            "kernel",
            "kind",
            "shapes",
            "calls",
            "default",
            "tuned",
            "trials",
            "new",
            "",
        )
        lines = [head]
        for r in self.rows:
            lines.append(
                (
                    r.name,
                    r.kernel,
                    r.kind,
                    r.shape,
                    str(r.calls),
                    _us(r.default_s),
                    _us(r.tuned_s),
                    str(r.trials),
                    str(r.new_trials),
                    r.note,
                )
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines
        )


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.1f} us"


def parse_budget(text: str) -> float:
    """'90s', '10m', '1.5h' or plain seconds -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not match:
        raise TvmSparseError(f"--budget {text!r}: expected a duration like 90s, 10m or 1h")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value * {"s": 1, "m": 60, "h": 3600}[unit]


class _Stopped(Exception):
    """Ctrl-C was pressed: raised at the next safe point (after a measured batch)."""


class _Progress:
    """Counts measured candidates (MetaSchedule measure callback) and reports them; stops
    the search after the batch during which Ctrl-C was pressed (`stop`)."""

    def __init__(self, total: int, report: Callable[[int, int, str], None] | None):
        import threading

        self.total, self.done, self.report, self.task = total, 0, report, ""
        self.failed = 0
        self.stop = threading.Event()
        self.interrupts = _Interrupts(self.stop)  # counts only once installed

    def check(self) -> None:
        self.interrupts.poll()
        if self.stop.is_set():
            raise _Stopped

    def callback(self):
        from tvm.ir.utils import derived_object
        from tvm.s_tir import meta_schedule as ms

        progress = self

        @derived_object
        class _Callback(ms.measure_callback.PyMeasureCallback):
            def apply(self, task_scheduler, task_id, measure_candidates, builds, runs):
                progress.done += len(runs)
                progress.failed += sum(
                    1 for b, r in zip(builds, runs) if b.error_msg or r.error_msg
                )
                if progress.report:
                    progress.report(progress.done, progress.total, progress.task)
                progress.check()  # the batch's records are in the database already

        return _Callback()


def _space_generator(task: Task, target):
    from tvm_sparse.schedules.spaces import schedule_fn

    if task.space is not None:
        return schedule_fn(task.space, target)
    return "post-order-apply"


def tune(
    model,
    database: str | os.PathLike = "tuning/",
    trials: int = 64,
    time_budget: float | None = None,
    target: str | dict = "host",
    shapes: dict[str, list[int]] | None = None,
    *,
    sparse: str = "auto",
    policy: str = "measured",
    calibration: dict | None = None,
    rpc: RPCSettings | None = None,
    timeout: float = 10.0,
    seed: int = 0,
    on_progress: Callable[[int, int, str], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> TuneReport:
    """Tune every kernel of `model` with MetaSchedule and store the records in `database`.

    Parameters
    ----------
    model
        Path to an ``.onnx`` file or an ``onnx.ModelProto``.
    database
        Directory of the tuning database (created if missing). Running again continues:
        a task that already has `trials` records gets no new trials.
    trials
        Measured candidates per task (the default schedule counts as one).
    time_budget
        Seconds; tuning stops starting new rounds after it (the database stays valid).
    target, shapes, sparse, policy, calibration
        As for :func:`tvm_sparse.compile` (the tuned kernels are the ones it would build).
    rpc
        Measure on a remote device through an RPC tracker instead of this machine.
    timeout
        Seconds a candidate may run before it is recorded as failed.
    seed
        Random seed of the search.
    on_progress
        Called as ``on_progress(measured, total, task name)`` after each batch.
    on_phase
        Called with the name of each phase.
    """
    from tvm.s_tir import meta_schedule as ms

    if trials < 1:
        raise TvmSparseError(f"trials: expected a positive number, got {trials}")
    start = time.perf_counter()
    deadline = None if time_budget is None else start + float(time_budget)
    db = open_database(database, create=True)
    from .compiler import _prepare
    from .target import resolve_target

    rows: dict[str, TaskResult] = {}
    progress = _Progress(0, on_progress)
    builder = ms.builder.LocalBuilder(max_workers=_cores(), f_build=build_kernel)
    options = dict(trials=trials, deadline=deadline, seed=seed, timeout=timeout, rpc=rpc)
    state = {"complete": True, "interrupted": False}
    saved = progress.interrupts.install()
    with using_database(db):
        try:

            def prepare():  # the candidates are timed again, with the records so far
                db.selection.pop(str(resolve_target(target)), None)
                return _prepare(
                    model, target, shapes, sparse, policy, calibration, on_phase=on_phase, db=db
                )

            _rounds(prepare, db, builder, rows, progress, state, on_phase, **options)
        except Exception:
            # _Stopped raised in our measure callback reaches us through MetaSchedule's C++
            # loop as another exception type; every record measured so far is already in the
            # database (one line per record).
            if not progress.stop.is_set():
                raise
            state.update(complete=False, interrupted=True)
        finally:
            db.save()
            progress.interrupts.restore(saved)
    order = {"space": 0, "generic": 1, "fixed": 2}
    report_rows = sorted(rows.values(), key=lambda r: (order[r.kind], -(r.default_s or 0), r.name))
    return TuneReport(
        db.path, report_rows, time.perf_counter() - start, state["complete"], state["interrupted"]
    )


def _rounds(
    prepare, db, builder, rows, progress, state, on_phase, *, trials, deadline, seed, timeout, rpc
):
    """The tuning rounds of :func:`tune`: `prepare()` gives the module to take the tasks from
    (state["complete"] turns False at the deadline)."""
    # Round 2 re-selects with the tuned kernels; if that changes a layer's kernel, the new
    # kernel's task is tuned too. The timings of the last selection are stored with `db`.
    for round_ in (1, 2):
        _, _, tgt, mod, _ = prepare()
        tasks = extract_tasks(mod)
        total_flops = sum(t.flops * t.calls for t in tasks) or 1.0
        todo = []
        for task in tasks:
            if task.name in rows:
                continue
            row = _row(task, db)
            rows[task.name] = row
            if task.kind == "generic" and task.flops * task.calls < SMALL_TASK * total_flops:
                row.note = "not tuned: under 1 % of the model's FLOPs"
                continue
            todo.append((task, row))
        if on_phase:
            on_phase(f"round {round_}: {len(todo)} of {len(tasks)} tasks to tune")
        for task, row in todo:
            progress.check()
            runner = make_runner(task, db, rpc, timeout)
            _measure_default(task, row, tgt, db, builder, runner)
            if task.kind == "fixed":
                row.note = "not tuned: hand-scheduled, no design space yet"
                continue
            if not tune_task(task, row, tgt, db, builder, runner, trials, deadline, seed, progress):
                state["complete"] = False
            row.tuned_s = db.best_seconds(task)
        if not state["complete"]:
            break


# Measured candidates a task's cost model waits for before it ranks: one batch. MetaSchedule's
# default (100) is meant for models shared by many tasks; with one model per task and 32-128
# trials it would rank at random for most of the run (held-back Spearman rho about 0 instead
# of 0.7-0.98 on the MobileNet tasks, see the README).
COST_MODEL_WARMUP = 16


def cost_model():
    """MetaSchedule's XGBoost cost model as every task is tuned with (fresh per task)."""
    from tvm.s_tir import meta_schedule as ms

    return ms.cost_model.XGBModel(
        extractor=ms.feature_extractor.PerStoreFeature(),
        adaptive_training=True,
        num_warmup_samples=COST_MODEL_WARMUP,
        num_tuning_cores=_cores(),
    )


def _warm_start(model, task: Task, target, db: TuningDatabase) -> None:
    """Train `model` on the task's measured records, so a resumed run ranks from its first
    batch on instead of relearning what the database already holds."""
    from tvm.s_tir import meta_schedule as ms

    measured = [(r, t) for r in db.records(task) if (t := _seconds(r)) is not None]
    if not measured:
        return
    ctx = ms.TuneContext(mod=task.mod, target=target, num_threads=_cores())
    model.update(
        ctx,
        [r.as_measure_candidate() for r, _ in measured],
        [ms.runner.RunnerResult([t], None) for _, t in measured],
    )


def tune_task(task, row, target, db, builder, runner, trials, deadline, seed, progress) -> bool:
    """Measure candidates of `task` until it has `trials` records (False: stopped at
    `deadline`). Failed candidates (build errors, crashes, time-outs) are records too."""
    from tvm.s_tir import meta_schedule as ms

    need = trials - row.trials
    progress.total += max(need, 0)
    progress.task = task.name
    model = cost_model()
    if need > 0:
        _warm_start(model, task, target, db)
    while need > 0:
        progress.check()
        if deadline is not None and time.perf_counter() > deadline:
            return False
        before = progress.done
        chunk = min(need, 32)
        ctx = ms.TuneContext(
            mod=task.mod,
            target=target,
            space_generator=_space_generator(task, target),
            search_strategy=_search(),
            task_name=task.name,
            rand_state=seed + row.trials,
            num_threads=_cores(),
        )
        ms.tune_tasks(
            tasks=[ctx],
            task_weights=[1.0],
            work_dir=os.path.join(db.path, "logs"),
            max_trials_global=chunk,
            num_trials_per_iter=min(chunk, 16),
            builder=builder,
            runner=runner,
            database=db.ms,
            cost_model=model,
            measure_callbacks=[*ms.MeasureCallback.create("default"), progress.callback()],
            task_scheduler="round-robin",
        )
        measured = progress.done - before
        row.new_trials += measured
        row.trials += measured
        need -= measured
        if measured == 0:  # the space has nothing left to propose
            row.note = "design space exhausted"
            break
    return True


class _Interrupts:
    """Counts Ctrl-C presses through the signal module's wakeup pipe.

    Python runs a signal handler only when the main thread executes bytecode, and while
    MetaSchedule's loop blocks the main thread in native code a press could go unseen for the
    rest of the run (observed in about one run in three). The C-level handler also writes the
    signal number to the wakeup pipe at once, so every safe point (`_Progress.check`, in
    whichever thread) reads the presses from there. First press: stop after the current batch;
    a second: interrupt at once (from the Python-level handler, where raising is safe). A press
    that lands while native code has its own SIGINT handler installed (TVM's bundled Z3, for
    milliseconds at a time) never gets here; the command line avoids that by taking SIGINT on
    a thread of its own (`cli._take_sigint_on_a_thread`), which hands presses to this pipe."""

    def __init__(self, stop):
        import threading

        self.stop, self.count, self.lock = stop, 0, threading.Lock()
        self.read_fd = self.write_fd = None

    def install(self):
        """Start counting (main thread only; None elsewhere: then nothing is caught)."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return None
        self.read_fd, self.write_fd = os.pipe()
        for fd in (self.read_fd, self.write_fd):
            os.set_blocking(fd, False)
        previous_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        previous = signal.signal(signal.SIGINT, self._handler)
        return previous, previous_fd

    def poll(self) -> None:
        """Read the presses written since the last poll; the first sets `stop`."""
        import signal
        import sys

        if self.read_fd is None:
            return
        with self.lock:
            try:
                data = os.read(self.read_fd, 512)
            except BlockingIOError:
                data = b""
            presses = data.count(bytes([signal.SIGINT]))
            if presses and self.count == 0:
                print("\nstopping after the current batch (Ctrl-C again to abort)", file=sys.stderr)
                self.stop.set()
            self.count += presses

    def _handler(self, signum, frame):
        self.poll()
        if self.count >= 2:
            raise KeyboardInterrupt

    def restore(self, saved) -> None:
        import signal

        if saved is None:
            return
        previous, previous_fd = saved
        signal.signal(signal.SIGINT, previous)
        signal.set_wakeup_fd(previous_fd)
        for fd in (self.read_fd, self.write_fd):
            os.close(fd)
        self.read_fd = self.write_fd = None


def _search():
    """Evolutionary search sized for small machines: MetaSchedule's defaults (512 candidates,
    4 generations per batch) spend more time ranking than measuring on 2 cores."""
    from tvm.s_tir import meta_schedule as ms

    return ms.search_strategy.EvolutionarySearch(
        population_size=128, init_min_unmeasured=32, genetic_num_iters=3
    )


def _cores() -> int:
    from .target import num_cores

    return num_cores()


def _row(task: Task, db: TuningDatabase) -> TaskResult:
    records = db.records(task)
    best = db.best_seconds(task)
    return TaskResult(
        task.name, task.kernel, task.kind, task.shape, task.calls, None, best, len(records), 0
    )


def _measure_default(task: Task, row: TaskResult, target, db: TuningDatabase, builder, runner):
    """Time the default schedule; store it as the task's first record (when it replays and the
    task has no records yet)."""
    from tvm.s_tir import meta_schedule as ms

    key = f"{task.key}|{target}"
    if key in db.defaults:  # measured by an earlier run
        row.default_s = db.defaults[key]
        if task.kind == "fixed":
            row.tuned_s = row.default_s
        return
    sch = default_schedule(task, target)
    mod = sch.mod if sch is not None else task.mod
    if task.kind != "fixed" and sch is None:
        return  # no replayable default: the search starts from scratch
    seconds = measure(mod, target, builder, runner)
    row.default_s = seconds
    if seconds is not None:
        db.defaults[key] = seconds
    if task.kind == "fixed":
        row.tuned_s = seconds
    if sch is None or seconds is None or row.trials > 0:
        return
    workload = db.ms.commit_workload(task.mod)
    args_info = ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])
    db.ms.commit_tuning_record(
        ms.database.TuningRecord(sch.trace, workload, [seconds], target, args_info)
    )
    row.trials += 1
    row.new_trials += 1
    row.tuned_s = db.best_seconds(task)
