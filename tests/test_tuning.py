"""tvm_sparse.tuning: records, resume, database reuse by compile, faults, RPC measurement.

Trial counts are tiny: these tests check the machinery (what is recorded, what is reused, what
fails cleanly), not tuning quality; scripts/bench_tune.py measures that.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from test_cli import assert_clean_failure, cli
from tvm.script import tirx as T

from tvm_sparse.schedules import spaces
from tvm_sparse.target import resolve_target
from tvm_sparse.tuning import (
    COST_MODEL_WARMUP,
    FAILED,
    DatabaseError,
    RealArguments,
    RPCSettings,
    Task,
    TaskResult,
    _Progress,
    _seconds,
    _space_generator,
    _warm_start,
    cost_model,
    extract_tasks,
    make_runner,
    open_database,
    parse_budget,
    tune,
    tune_task,
)


def _matmul_model(m=8, k=32, n=48, seed=0):
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, w


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One small tuning run shared by the tests below (trials kept minimal)."""
    db = tmp_path_factory.mktemp("db")
    model, w = _matmul_model()
    report = tune(model, database=db, trials=3, sparse="off")
    return db, model, w, report


def test_tune_records_every_task_with_default_first(tuned):
    db, _, _, report = tuned
    assert report.complete
    (row,) = [r for r in report.rows if r.kind != "generic" or r.note == ""]
    assert row.trials == 3 and row.new_trials == 3
    assert row.default_s is not None and row.tuned_s is not None
    assert row.tuned_s <= row.default_s  # the default schedule is one of the records
    for name in ("database_workload.json", "database_tuning_record.json", "selection.json"):
        assert (db / name).exists()
    lines = (db / "database_tuning_record.json").read_text().splitlines()
    assert len(lines) == 3


def test_second_run_continues_with_zero_new_trials(tuned):
    db, model, _, _ = tuned
    again = tune(model, database=db, trials=3, sparse="off")
    assert again.rows and all(r.new_trials == 0 for r in again.rows if r.kind != "fixed")
    more = tune(model, database=db, trials=4, sparse="off")
    assert sum(r.new_trials for r in more.rows) == 1  # continues up to the new count


def test_resumed_run_trains_the_cost_model_on_the_stored_records(tuned):
    db, model, _, _ = tuned
    from tvm_sparse.compiler import _prepare

    _, _, target, mod, _ = _prepare(model, "host", None, "off", "measured")
    (task,) = [t for t in extract_tasks(mod) if t.kind == "space"]
    database = open_database(db)
    stored = [r for r in database.records(task) if _seconds(r) is not None]  # not failed
    assert stored
    fresh = cost_model()
    _warm_start(fresh, task, target, database)
    assert fresh.data_size == len(stored)


def test_compile_with_database_matches_numpy_and_is_reproducible(tuned):
    import tvm_sparse

    db, model, w, _ = tuned
    x = np.random.default_rng(1).standard_normal((8, 32)).astype(np.float32)
    first = tvm_sparse.compile(model, database=db, sparse="off")
    (y,) = first.run({"x": x})
    np.testing.assert_allclose(y, x @ w, rtol=1e-4, atol=1e-4)
    second = tvm_sparse.compile(model, database=db, sparse="off")
    assert [r.get("kernel") for r in first.report] == [r.get("kernel") for r in second.report]


def test_missing_and_corrupt_database_name_the_file(tmp_path, tuned):
    with pytest.raises(DatabaseError, match="no such directory"):
        open_database(tmp_path / "nope")
    db, *_ = tuned
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("database_workload.json", "database_tuning_record.json"):
        (broken / name).write_bytes((db / name).read_bytes())
    records = broken / "database_tuning_record.json"
    last = len(records.read_text().splitlines())
    records.write_text(records.read_text()[:-40])  # a truncated last line
    with pytest.raises(DatabaseError, match=rf"database_tuning_record.json, line {last}:"):
        open_database(broken)


def test_parse_budget():
    assert parse_budget("90s") == 90 and parse_budget("15m") == 900 and parse_budget("2") == 2
    assert parse_budget("1.5h") == 5400
    with pytest.raises(Exception, match="--budget"):
        parse_budget("soon")


# A kernel whose loop bounds and reads come from a runtime array (like BSR indptr/indices):
# with args[0] = [trip count, read index] the constants decide whether it runs, hangs or crashes.
@T.prim_func(s_tir=True)
def _indexed(
    meta: T.Buffer((2,), "int64"), x: T.Buffer((64,), "float32"), y: T.Buffer((64,), "float32")
):
    T.func_attr({"tvm_sparse.kernel": "test_indexed"})
    for i in range(64):
        with T.sblock("y"):
            vi = T.axis.spatial(64, i)
            T.reads(meta[0:2], x[0:64])
            T.writes(y[vi])
            y[vi] = x[vi]
            for _j in range(meta[0]):
                y[vi] = y[vi] + x[meta[1]]


def _split_space(sch, target, tune_):
    (loop,) = sch.get_loops(sch.get_sblock("y"))
    factor = spaces.choose(sch, [2, 4, 8, 16], 8, tune_)
    sch.split(loop, [None, factor])
    return True


_INDEXED = spaces.Space(
    "test_indexed",
    lambda f: f.attrs is not None and f.attrs.get("tvm_sparse.kernel") == "test_indexed",
    _split_space,
    postprocs=lambda: [],
)


def _indexed_task(meta):
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    mod = _normalize_mod(_indexed.without_attr("global_symbol"))
    constants = {0: np.asarray(meta, dtype="int64")}
    return Task("indexed", mod, "space", _INDEXED, "test_indexed", constants=constants)


@pytest.mark.parametrize(
    "meta, fault",
    [([1 << 40, 0], "hangs"), ([1, 1 << 40], "crashes"), ([3, 5], None)],
    ids=["hang", "crash", "ok"],
)
def test_failed_candidates_are_recorded_and_tuning_goes_on(tmp_path, meta, fault):
    from tvm.s_tir import meta_schedule as ms

    db = open_database(tmp_path / "db", create=True)
    task = _indexed_task(meta)
    target = resolve_target("host")
    row = TaskResult(task.name, task.kernel, task.kind, task.shape, 1, None, None, 0, 0)
    builder = ms.builder.LocalBuilder(max_workers=1)
    runner = make_runner(task, db, None, timeout=3)
    progress = _Progress(0, None)
    assert tune_task(task, row, target, db, builder, runner, 2, None, 0, progress)
    records = db.records(task)
    assert row.trials == 2 and len(records) == 2  # every candidate is a record, failed or not
    times = [float(np.mean([float(s) for s in r.run_secs])) for r in records]
    if fault:
        assert progress.failed == 2 and all(t >= FAILED for t in times), fault
        assert db.best_seconds(task) is None
    else:
        assert progress.failed == 0 and db.best_seconds(task) < 1e-3


def test_real_arguments_check_shapes():
    alloc = RealArguments({0: np.zeros(3, np.float32)})
    info = [("TENSOR", "float32", [3]), ("TENSOR", "float32", [2, 2])]
    (args,) = alloc(tvm.cpu(), info, 1)
    assert args[0].numpy().tolist() == [0, 0, 0] and args[1].shape == (2, 2)
    with pytest.raises(ValueError, match="argument 0"):
        alloc(tvm.cpu(), [("TENSOR", "float32", [4]), info[1]], 1)


def test_runner_gets_the_real_constant_arguments(tmp_path):
    task = _indexed_task([3, 5])
    db = open_database(tmp_path / "db", create=True)
    runner = make_runner(task, db, None, timeout=3)
    (args,) = runner.f_alloc_argument(tvm.cpu(), [["TENSOR", "int64", [2]]] * 3, 1)
    np.testing.assert_array_equal(args[0].numpy(), [3, 5])
    assert os.path.exists(runner.f_alloc_argument.path)


def test_rpc_runner_measures_through_a_loopback_tracker(tmp_path):
    from tvm import rpc
    from tvm.rpc import tracker as rpc_tracker
    from tvm.s_tir import meta_schedule as ms

    tracker = rpc_tracker.Tracker("127.0.0.1", port=19190, port_end=19290, silent=True)
    server = rpc.Server(
        "127.0.0.1",
        port=19300,
        port_end=19400,
        key="test",
        tracker_addr=("127.0.0.1", tracker.port),
    )
    try:
        db = open_database(tmp_path / "db", create=True)
        task = _indexed_task([3, 5])
        settings = RPCSettings("127.0.0.1", tracker.port, "test")
        runner = make_runner(task, db, settings, timeout=10)
        row = TaskResult(task.name, task.kernel, task.kind, task.shape, 1, None, None, 0, 0)
        builder = ms.builder.LocalBuilder(max_workers=1)
        target = resolve_target("host")
        progress = _Progress(0, None)
        assert tune_task(task, row, target, db, builder, runner, 2, None, 0, progress)
        assert progress.failed == 0 and db.best_seconds(task) is not None
    finally:
        server.terminate()
        tracker.terminate()


def test_cli_tune_then_compile_with_db(tmp_path):
    import onnx

    model, _ = _matmul_model(seed=3)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    db = tmp_path / "db"
    result = cli("tune", path, "--db", db, "--trials", "2", "--sparse", "off")
    assert result.returncode == 0, result.stderr
    assert "trials" in result.stdout and "done:" in result.stdout
    assert json.loads((db / "selection.json").read_text()) is not None
    result = cli("compile", path, "-o", tmp_path / "out", "--db", db)
    assert result.returncode == 0, result.stderr
    assert_clean_failure(
        cli("compile", path, "-o", tmp_path / "out2", "--db", tmp_path / "missing"), "missing"
    )
    assert_clean_failure(cli("tune", path, "--db", db, "--budget", "soon"), "--budget")
    assert_clean_failure(cli("tune", path, "--db", db, "--trials", "0"), "--trials")
    (db / "database_workload.json").write_text("{not json\n")
    assert_clean_failure(cli("tune", path, "--db", db), "database_workload.json, line 1")


def test_ctrl_c_leaves_a_valid_database_and_a_rerun_continues(tmp_path):
    import signal
    import subprocess
    import sys
    import threading
    import time

    import onnx

    model, _ = _matmul_model(seed=5)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    db = tmp_path / "db"
    records = db / "database_tuning_record.json"
    cmd = [sys.executable, "-m", "tvm_sparse", "tune", str(path), "--db", str(db)]
    proc = subprocess.Popen(
        [*cmd, "--trials", "1000", "--sparse", "off"],
        stdout=subprocess.PIPE,
        text=True,
        stderr=subprocess.PIPE,
    )
    # stderr is read as it comes (the progress lines say when trials are being measured), so
    # the signal goes out while the search runs however slow the machine is
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    start, deadline = time.time(), time.time() + 600
    while (
        time.time() < deadline
        and proc.poll() is None
        and not (
            any("trials" in line for line in lines)
            and records.exists()
            and len(records.read_text().splitlines()) >= 2
        )
    ):
        time.sleep(0.2)
    assert proc.poll() is None, "".join(lines)
    sent = time.time() - start
    proc.send_signal(signal.SIGINT)
    out = proc.stdout.read()  # until the process closes it (exits)
    proc.wait(timeout=300)
    reader.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == 130, f"SIGINT sent after {sent:.1f} s\n{err}"
    assert "interrupted" in out and "Traceback" not in err
    done = len(open_database(db).ms.get_all_tuning_records())
    assert done >= 2
    rerun = tune(path, database=db, trials=done + 1, sparse="off")
    assert sum(r.new_trials for r in rerun.rows) == 1


def test_compile_with_database_reuses_the_stored_selection(tmp_path, monkeypatch):
    """The measured selection's timings are stored with the database; a build with it chooses
    from them without timing anything again, so every build picks the same kernels."""
    import tvm_sparse
    from tvm_sparse import selection
    from tvm_sparse.examples import prune_weight

    model, w = _matmul_model(m=16, k=64, n=64, seed=4)
    pruned = prune_weight("MatMul", w, 0.9, (4, 1))
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(pruned, "w"))
    report = tune(model, database=tmp_path / "db", trials=2)
    assert report.complete
    stored = json.loads((tmp_path / "db" / "selection.json").read_text())
    assert sum(len(v) for v in stored.values()) >= 2  # dense and at least one sparse candidate

    def no_timing(*_):
        raise AssertionError("a candidate was timed again")

    monkeypatch.setattr(selection.Timer, "_time_module", no_timing)
    first = tvm_sparse.compile(model, database=tmp_path / "db")
    second = tvm_sparse.compile(model, database=tmp_path / "db")
    kernels = [r.get("kernel") for r in first.report]
    assert kernels == [r.get("kernel") for r in second.report]
    x = np.random.default_rng(2).standard_normal((16, 64)).astype(np.float32)
    np.testing.assert_allclose(first.run({"x": x})[0], x @ pruned, rtol=1e-4, atol=1e-4)


def test_re_pruned_model_reuses_the_records_with_zero_new_trials(tmp_path):
    """Sparse kernels' task keys hold shapes, block shape and an nnz bucket, not the pattern:
    the same layer pruned to the same sparsity from another weight needs no new trials."""
    from tvm_sparse.examples import prune_weight

    def pruned(seed):
        model, w = _matmul_model(m=16, k=128, n=128, seed=seed)
        w = prune_weight("MatMul", w, 0.9, (16, 1))  # the block shape the selection picks
        model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
        return model, w

    (first, w1), (second, w2) = pruned(1), pruned(2)
    assert not np.array_equal(w1 != 0, w2 != 0)  # other pattern
    options = dict(database=tmp_path / "db", trials=3, sparse="force", policy="threshold")
    report = tune(first, **options)
    tuned = [r for r in report.rows if r.kind == "space" and r.kernel.startswith("bsr_")]
    assert tuned and tuned[0].new_trials == 3
    again = tune(second, **options)
    assert [r.new_trials for r in again.rows if r.kind == "space"] == [0] * len(tuned)


def _spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_cost_model_ranks_after_one_batch():
    """The tuner's XGBoost model ranks candidates once it has seen one batch: MetaSchedule's
    default waits for 100 samples and until then predicts at random, which is all of a
    32-128 trial task. Costs here are a made-up monotone function of the candidates' features
    (nothing is measured): the model must be deterministic and recover their order."""
    from tvm.s_tir import meta_schedule as ms

    from tvm_sparse.compiler import _prepare

    model, _ = _matmul_model(m=64, k=256, n=256)
    _, _, target, mod, _ = _prepare(model, "host", None, "off", "measured")
    (task,) = [t for t in extract_tasks(mod) if t.kind == "space"]
    ctx = ms.TuneContext(
        mod=task.mod,
        target=target,
        space_generator=_space_generator(task, target),
        search_strategy="replay-trace",
        num_threads=2,
        rand_state=0,
    )
    ctx.pre_tuning(
        max_trials=64,
        num_trials_per_iter=64,
        design_spaces=ctx.generate_design_space(),
        database=ms.database.MemoryDatabase(),
        cost_model=cost_model(),
    )
    cands = ctx.search_strategy.generate_measure_candidates()
    feats = ms.feature_extractor.PerStoreFeature().extract_from(ctx, cands)
    score = [f.numpy().sum(0)[:20].sum() for f in feats]
    costs = np.empty(len(cands))
    costs[np.argsort(score)] = 1e-5 * (1 + np.arange(len(cands)))
    n = COST_MODEL_WARMUP
    results = [ms.runner.RunnerResult([float(c)], None) for c in costs[:n]]
    ours = cost_model()
    ours.update(ctx, cands[:n], results)
    first, again = ours.predict(ctx, cands[n:]), ours.predict(ctx, cands[n:])
    assert np.array_equal(first, again)  # a model, not the random warm-up
    assert _spearman(first, -costs[n:]) > 0.5  # higher score = faster
    stock = ms.cost_model.XGBModel(num_tuning_cores=2)  # what tuning used before
    stock.update(ctx, cands[:n], results)
    assert not np.array_equal(stock.predict(ctx, cands[n:]), stock.predict(ctx, cands[n:]))
