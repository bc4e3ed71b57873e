"""Autotuning: tuned tvm-sparse vs its default schedules vs ONNX Runtime, one run.

Cases (all batch 1 / the issue's shapes, 2 threads):
* dense MatMul 64x1024x1024, dense MobileNet-v1-like (224), dense LSTM T=100 I=512 H=1024:
  tuned build vs default build vs ORT (ratio = ORT time / ours: > 1 is faster than ORT).
* MobileNet tuning curve: tuning continues in steps of trials per task up to a time budget;
  after each step the model is built with the database and timed -> latency vs trials/minutes
  (CSV + SVG plot), and the minutes it took to get within 10 % of the final latency.
* Sparse MatMul 64x1024x1024 at 90 % (16x1, 4x1, 8x8 blocks): tuned vs default kernels and
  the share of the ideal speed-up (dense MACs / nonzero MACs, against the tuned dense time).
* Re-pruning: the 16x1 model pruned again with another seed (same sparsity) tuned with the same
  database: new trials (expected 0).
* XGBoost ranking quality on the records of every MobileNet task (with >= 32 of them) and of
  the MatMul task: the cost model trained on 3/4 of a task's measured candidates ranks the
  held-back 1/4 (Spearman rho, top-k recall) vs a random ranking; and evolutionary search +
  XGBoost vs random search (replay-trace) at equal trials on the MatMul and on the
  MobileNet's heaviest task.

Every build is timed in a fresh process (timings taken right after tuning in the tuning
process are unreliable, see NOTES-tvm.md). Usage:
  .venv/bin/python scripts/bench_tune.py [--quick] [--only NAME] [--budget-min 15]
      [--work DIR] [--json out.json] [--plot tuning_curve.svg]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
from _bench import (  # noqa: E402
    machine,
    macs,
    ort_session,
    random_inputs,
    time_fresh,
    time_ort,
)
from bench_dense import matmul  # noqa: E402

import tvm_sparse  # noqa: E402
from tvm_sparse import examples  # noqa: E402
from tvm_sparse.examples import prune_weight  # noqa: E402
from tvm_sparse.target import num_cores  # noqa: E402
from tvm_sparse.tuning import cost_model, open_database, tune  # noqa: E402


def _build_and_time(model, work: str, name: str, db: str | None, seconds: float, **kw) -> float:
    out = os.path.join(work, f"build-{name}-{'tuned' if db else 'default'}")
    tvm_sparse.compile(model, database=db, **kw).save(out)
    return time_fresh("tvm", out, seconds)


def _ort(model, seconds: float) -> float:
    return time_ort(ort_session(model, num_cores()), random_inputs(model), seconds)


def _pruned_matmul(block, seed: int = 0):
    """MatMul 64x1024x1024 with its weight pruned to 90 % in `block` blocks; another `seed`
    draws another weight, so the same sparsity falls on another pattern."""
    from onnx import numpy_helper

    model = matmul()
    w = numpy_helper.to_array(model.graph.initializer[0])
    if seed:
        w = np.random.default_rng(seed).standard_normal(w.shape).astype(np.float32)
    pruned = prune_weight("MatMul", w, 0.9, block)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(pruned, "w"))
    return model


def dense_cases(args, work: str, results: dict) -> None:
    cases = {
        "MatMul 64x1024x1024": (matmul(), args.trials),
        "LSTM T=100 I=512 H=1024": (examples.lstm(), args.trials // 2),
    }
    for name, (model, trials) in cases.items():
        if args.only and args.only not in name:
            continue
        db = os.path.join(work, "db-" + name.split()[0].lower())
        start = time.perf_counter()
        report = tune(model, database=db, trials=trials, sparse="off")
        minutes = (time.perf_counter() - start) / 60
        default = _build_and_time(model, work, name.split()[0], None, args.seconds, sparse="off")
        tuned = _build_and_time(model, work, name.split()[0], db, args.seconds, sparse="off")
        ort = _ort(model, args.seconds)
        row = {
            "trials_per_task": trials,
            "tasks_tuned": sum(1 for r in report.rows if r.new_trials),
            "minutes": round(minutes, 1),
            "default_ms": default * 1e3,
            "tuned_ms": tuned * 1e3,
            "ort_ms": ort * 1e3,
            "tuned_vs_ort": ort / tuned,
            "default_vs_ort": ort / default,
        }
        results[name] = row
        print(f"{name}: {_fmt(row)}", flush=True)


def mobilenet_curve(args, work: str, results: dict) -> None:
    model = examples.mobilenet_v1()
    db = os.path.join(work, "db-mobilenet")
    steps = [1, 4, 8, 16, 32, 64, 128]
    start = time.perf_counter()
    budget = args.budget_min * 60
    default = _build_and_time(model, work, "mobilenet", None, args.seconds, sparse="off")
    curve = [{"trials_per_task": 0, "trials": 0, "minutes": 0.0, "ms": default * 1e3}]
    print(f"MobileNet curve: default {default * 1e3:.3f} ms", flush=True)
    for trials in steps:
        left = budget - (time.perf_counter() - start)
        if left <= 0:
            break
        report = tune(model, database=db, trials=trials, time_budget=left, sparse="off")
        minutes = (time.perf_counter() - start) / 60  # tuning time only (builds below excluded)
        tuning_minutes = minutes - sum(p.get("build_minutes", 0) for p in curve)
        t0 = time.perf_counter()
        latency = _build_and_time(
            model, work, f"mobilenet-{trials}", db, args.seconds, sparse="off"
        )
        point = {
            "trials_per_task": trials,
            "trials": sum(r.trials for r in report.rows),
            "minutes": round(tuning_minutes, 2),
            "ms": latency * 1e3,
            "build_minutes": (time.perf_counter() - t0) / 60,
        }
        curve.append(point)
        print(f"  {point}", flush=True)
        if not report.complete:
            break
    ort = _ort(model, args.seconds)
    final = curve[-1]["ms"]
    within = next(p["minutes"] for p in curve if p["ms"] <= 1.1 * final)
    results["MobileNet-v1 224 (dense)"] = {
        "default_ms": default * 1e3,
        "tuned_ms": final,
        "ort_ms": ort * 1e3,
        "tuned_vs_ort": ort * 1e3 / final,
        "default_vs_ort": ort / default,
        "minutes": curve[-1]["minutes"],
        "minutes_to_within_10pct": within,
        "curve": curve,
    }
    print(f"MobileNet: {_fmt(results['MobileNet-v1 224 (dense)'])}", flush=True)
    if args.plot:
        _plot(curve, ort * 1e3, args.plot)


def sparse_cases(args, work: str, results: dict) -> None:
    dense_tuned = results.get("MatMul 64x1024x1024", {}).get("tuned_ms")
    for block in ((16, 1), (4, 1), (8, 8)):
        name = f"MatMul 90% {block[0]}x{block[1]}"
        if args.only and args.only not in name:
            continue
        model = _pruned_matmul(block)
        db = os.path.join(work, f"db-sparse-{block[0]}x{block[1]}")
        report = tune(model, database=db, trials=args.trials // 2)
        default = _build_and_time(model, work, name.replace(" ", "_"), None, args.seconds)
        tuned = _build_and_time(model, work, name.replace(" ", "_"), db, args.seconds)
        dense, nonzero = macs(model)
        row = {
            "default_ms": default * 1e3,
            "tuned_ms": tuned * 1e3,
            "kernels": sorted({r.kernel for r in report.rows if r.kind != "generic"}),
            "ideal": dense / nonzero,
        }
        if dense_tuned:
            row["of_ideal_vs_tuned_dense"] = dense_tuned / (tuned * 1e3) / row["ideal"]
        if block == (16, 1):
            again = tune(_pruned_matmul(block, seed=7), database=db, trials=args.trials // 2)
            row["re-pruned new trials"] = sum(r.new_trials for r in again.rows)
        results[name] = row
        print(f"{name}: {_fmt(row)}", flush=True)


def _valid_records(db) -> list[tuple]:
    """(record, mean run seconds) of every measured, non-failed record of `db`."""
    from tvm_sparse.tuning import _seconds

    return [(r, t) for r in db.ms.get_all_tuning_records() if (t := _seconds(r)) is not None]


def _rank_task(records: list[tuple], seed: int = 0) -> dict:
    """Train MetaSchedule's XGBoost cost model on 3/4 of one task's measured candidates and
    rank the held-back 1/4: Spearman rho against the measured times, recall of the true
    fastest tenth within the predicted fastest fifth, and what a random ranking would get."""
    from tvm.s_tir import meta_schedule as ms

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(records))
    split = len(order) * 3 // 4
    train, test = order[:split], order[split:]
    times = np.array([t for _, t in records])
    ctx = ms.TuneContext(
        mod=records[0][0].workload.mod,
        target=records[0][0].target,
        num_threads=num_cores(),
        space_generator="post-order-apply",
        search_strategy="replay-trace",
    )

    def candidates(idx):
        return [records[i][0].as_measure_candidate() for i in idx]

    model = cost_model()
    model.update(
        ctx, candidates(train), [ms.runner.RunnerResult([float(times[i])], None) for i in train]
    )
    pred = np.asarray(model.predict(ctx, candidates(test)))  # higher = faster
    true = -times[test]
    k = max(1, len(test) // 10)
    top_true = set(np.argsort(-true)[:k])
    return {
        "train": len(train),
        "held_back": len(test),
        "spearman_rho": _spearman(pred, true),
        "recall": len(top_true & set(np.argsort(-pred)[: 2 * k])) / k,
        "random_recall": min(1.0, 2 * k / len(test)),
        "k": k,
        # Spread of the held-back times: a task whose candidates all run alike has nothing
        # to rank (its rho is noise).
        "spread": float(times[test].max() / times[test].min()),
    }


def ranking(args, work: str, results: dict) -> None:
    """XGBoost ranking on held-back records; evolutionary+XGB vs random search."""
    from tvm_ffi import structural_hash

    # Every task of the MobileNet database with enough measured candidates (run after the
    # tuning curve has filled it), then the MatMul task.
    db_path = os.path.join(work, "db-mobilenet")
    if os.path.isdir(db_path):
        by_task: dict = {}
        for rec, t in _valid_records(open_database(db_path)):
            key = structural_hash(rec.workload.mod)
            by_task.setdefault(key, []).append((rec, t))
        rows = [_rank_task(recs) for recs in by_task.values() if len(recs) >= 32]
        if rows:
            rhos = np.array([r["spearman_rho"] for r in rows])
            results["XGBoost ranking (MobileNet tasks)"] = {
                "tasks": len(rows),
                "records": int(sum(r["train"] + r["held_back"] for r in rows)),
                "median_rho": float(np.median(rhos)),
                "mean_rho": float(np.mean(rhos)),
                "tasks_rho_above_0.5": int((rhos > 0.5).sum()),
                "tasks_rho_below_0": int((rhos < 0).sum()),
                "mean_top_recall": float(np.mean([r["recall"] for r in rows])),
                "mean_random_recall": float(np.mean([r["random_recall"] for r in rows])),
                "per_task": [
                    {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
                    for r in rows
                ],
            }
            summary = {
                k: v
                for k, v in results["XGBoost ranking (MobileNet tasks)"].items()
                if k != "per_task"
            }
            print(f"ranking (MobileNet tasks): {summary}", flush=True)
    db_path = os.path.join(work, "db-matmul")
    if not os.path.isdir(db_path):
        return
    row = _rank_task(_valid_records(open_database(db_path)))
    k = row.pop("k")
    row[f"top{k}_recall_in_top{2 * k}"] = row.pop("recall")
    row["random_expected_recall"] = row.pop("random_recall")
    results["XGBoost ranking (MatMul records)"] = row
    print(f"ranking: {results['XGBoost ranking (MatMul records)']}", flush=True)
    # Evolutionary search + XGBoost vs random search, same trial count, fresh databases: the
    # MatMul task and the MobileNet task with the most FLOPs (calls x FLOPs per call).
    from tvm_sparse.compiler import _prepare
    from tvm_sparse.tuning import extract_tasks

    for name, model in (("MatMul", matmul()), ("MobileNet", examples.mobilenet_v1())):
        if args.only and args.only not in ("ranking", name):
            continue
        _, _, tgt, mod, _ = _prepare(model, "host", None, "off", "measured")
        task = max(
            (t for t in extract_tasks(mod) if t.kind == "space"), key=lambda t: t.calls * t.flops
        )
        best = {
            s: _search_best(task, tgt, s, args.trials) for s in ("evolutionary", "replay-trace")
        }
        row = {
            "task": f"{task.kernel} {task.shape}",
            "trials": args.trials,
            "evolutionary+xgb_best_us": best["evolutionary"],
            "random_best_us": best["replay-trace"],
        }
        results[f"search at equal trials ({name})"] = row
        print(f"search ({name}): {row}", flush=True)


def _search_best(task, tgt, strategy: str, trials: int) -> float:
    """Best time (us) `strategy` finds for `task` in `trials` measurements, fresh database."""
    from tvm.s_tir import meta_schedule as ms

    from tvm_sparse.tuning import _seconds

    with tempfile.TemporaryDirectory() as tmp:
        mdb = ms.database.JSONDatabase(work_dir=tmp)
        ms.tune_tasks(
            tasks=[
                ms.TuneContext(
                    mod=task.mod,
                    target=tgt,
                    space_generator=_space(task, tgt),
                    search_strategy=strategy if strategy == "replay-trace" else _evo(),
                    num_threads=num_cores(),
                    rand_state=1,
                )
            ],
            task_weights=[1.0],
            work_dir=tmp,
            max_trials_global=trials,
            num_trials_per_iter=16,
            database=mdb,
            cost_model=cost_model(),  # the tuner's (random search ignores it)
            builder=ms.builder.LocalBuilder(max_workers=num_cores()),
            runner=ms.runner.LocalRunner(timeout_sec=10),
        )
        times = [_seconds(r) for r in mdb.get_all_tuning_records()]
    return min(t for t in times if t is not None) * 1e6


def _space(task, target):
    from tvm_sparse.schedules.spaces import schedule_fn

    return schedule_fn(task.space, target)


def _evo():
    from tvm_sparse.tuning import _search

    return _search()


def _spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _plot(curve, ort_ms: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p["minutes"] for p in curve], [p["ms"] for p in curve], "o-", label="tvm-sparse")
    for p in curve:
        ax.annotate(
            str(p["trials_per_task"]),
            (p["minutes"], p["ms"]),
            fontsize=7,
            textcoords="offset points",
            xytext=(2, 4),
        )
    ax.axhline(ort_ms, color="gray", linestyle="--", label="ONNX Runtime")
    ax.set_xlabel("tuning minutes (labels: trials per task)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("MobileNet-v1-like 224, 2 cores: latency vs tuning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def _fmt(row: dict) -> str:
    return ", ".join(
        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
        for k, v in row.items()
        if k != "curve"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few trials, short timing (smoke)")
    parser.add_argument("--only", help="run the cases whose name contains this")
    parser.add_argument("--trials", type=int, default=64, help="trials per task (dense cases)")
    parser.add_argument("--budget-min", type=float, default=15.0, help="MobileNet budget")
    parser.add_argument("--work", help="keep databases and builds here (default: temp dir)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write the MobileNet curve plot (SVG/PNG) here")
    args = parser.parse_args()
    args.seconds = 0.3 if args.quick else 1.0
    if args.quick:
        args.trials, args.budget_min = 4, 1.0
    work = args.work or tempfile.mkdtemp(prefix="bench-tune-")
    os.makedirs(work, exist_ok=True)
    results: dict = {}
    print(f"# {machine()}  {datetime.date.today()}  work dir {work}", flush=True)
    # The ranking reads the databases the other steps filled.
    steps = [dense_cases, sparse_cases, mobilenet_curve, ranking]
    for step in steps:
        if args.only and step in (ranking, mobilenet_curve) and args.only not in step.__name__:
            continue
        step(args, work, results)
        if args.json:  # after each step: a late failure keeps the earlier results
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
