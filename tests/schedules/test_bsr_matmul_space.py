"""Design spaces of the BSR matmul kernels: traces replay, decisions reach the schedule, the nnz
bucket makes re-pruned layers one task, and MetaSchedule tunes a kernel fed real BSR arrays."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from conftest import assert_close
from tvm_sparse._compat import s_tir, structural_hash
from tvm_sparse.examples import prune_out_in
from tvm_sparse.formats import to_bsr
from tvm_sparse.passes.collect_sparse_layers import MatmulLayer
from tvm_sparse.schedules import bsr_matmul, spaces
from tvm_sparse.schedules.bsr_matmul import Variant, bsr_wx, kernel_arrays, reference
from tvm_sparse.schedules.bsr_matmul_space import FAMILIES, BsrMatmul
from tvm_sparse.tuning import RealArguments, build_kernel

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver5", "num-cores": 2})


def _kernel(variant: Variant, n=128, k=64, p=64, sparsity=0.8, seed=0):
    w = prune_out_in(
        np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32),
        sparsity,
        (variant.rows, variant.cols),
    )
    arrays = kernel_arrays(to_bsr(w, (variant.rows, variant.cols)), variant)
    if variant.form == "gemv":
        func = bsr_matmul.bsr_gemv(n, k, variant, len(arrays[1]))
    elif variant.form == "xw":
        func = bsr_matmul.bsr_xw(p, n, k, variant, len(arrays[1]))
    else:
        func = bsr_wx(n, k, p, variant, len(arrays[1]))
    return w, arrays, func


FORMS = [Variant(4, 1, "wx"), Variant(8, 8, "wx"), Variant(16, 1, "gemv"), Variant(16, 1, "xw")]


def test_families_are_registered_and_found():
    for variant in FORMS:
        _, _, func = _kernel(variant)
        space = spaces.space_for(func)
        assert space is not None and space.name == f"bsr_{variant.form}"
    assert spaces.space_for(tvm.tirx.PrimFunc([], tvm.tirx.Evaluate(0))) is None


def test_schedule_phase_schedules_the_kernel():
    """The default rule runs in the schedule phase: the kernel leaves it scheduled."""
    from tvm_sparse.passes import optimize
    from tvm_sparse.selection import _bsr_module

    w = prune_out_in(np.random.default_rng(0).standard_normal((64, 32)), 0.8, (4, 1))
    mod = optimize(_bsr_module(MatmulLayer("fc", "wx", w.astype(np.float32), 32), FORMS[0]), TARGET)
    kernels = [
        f
        for _, f in mod.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and "tvm_sparse.kernel" in f.attrs
    ]
    assert len(kernels) == 1 and "tirx.is_scheduled" in kernels[0].attrs
    assert "T.parallel" in kernels[0].script() and "T.vectorized" in kernels[0].script()


def test_unscheduled_kernels_are_not_marked_scheduled():
    for variant in FORMS:
        _, _, func = _kernel(variant)
        assert "tirx.is_scheduled" not in func.attrs
        assert str(func.attrs["tvm_sparse.kernel"]) == variant.name
        assert BsrMatmul().apply(func, TARGET, False) is not None


@pytest.mark.parametrize("variant", FORMS, ids=lambda v: v.name)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_trace_replays_on_the_unscheduled_kernel(variant, seed):
    _, _, func = _kernel(variant)
    sch = s_tir.Schedule(func, seed=seed)
    assert FAMILIES[variant.form].apply(sch, TARGET, True)
    replay = s_tir.Schedule(func)
    sch.trace.apply_to_schedule(replay, remove_postproc=False)
    tvm.ir.assert_structural_equal(replay.mod, sch.mod)


def _with_decisions(func, trace, pick):
    """Replay `trace` on `func` with each sampled decision replaced by `pick(inst, choices)`."""
    for inst in trace.insts:
        if inst.kind.name == "SampleCategorical":
            trace = trace.with_decision(inst, pick(inst, list(inst.attrs[0])), True)
    sch = s_tir.Schedule(func)
    trace.apply_to_schedule(sch, remove_postproc=True)
    return sch


def test_decisions_reach_the_schedule():
    """The search re-samples decisions and replays the trace: the tile must follow them."""
    _, _, func = _kernel(Variant(4, 1, "wx"))
    sch = s_tir.Schedule(func)
    FAMILIES["wx"].apply(sch, TARGET, False)
    first = _with_decisions(func, sch.trace, lambda inst, choices: 0)
    last = _with_decisions(func, sch.trace, lambda inst, choices: len(choices) - 1)
    assert structural_hash(first.mod) != structural_hash(last.mod)


@pytest.mark.parametrize("variant", FORMS, ids=lambda v: v.name)
def test_every_extreme_decision_is_correct(variant):
    w, (data, indices, indptr), func = _kernel(variant)
    n, k = w.shape
    sch = s_tir.Schedule(func)
    FAMILIES[variant.form].apply(sch, TARGET, False)
    rng = np.random.default_rng(4)
    p = 1 if variant.form == "gemv" else 64
    x = rng.standard_normal((k, p)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    want = reference(w, x, bias)
    for pick in (lambda i, c: 0, lambda i, c: len(c) - 1):
        lib = tvm.compile(
            _with_decisions(func, sch.trace, pick).mod["main"].with_attr("global_symbol", "main"),
            target=TARGET,
        )
        operand, shape = {
            "wx": (x, (n, p)),
            "gemv": (x[:, 0].copy(), (n,)),
            "xw": (np.ascontiguousarray(x.T), (p, n)),
        }[variant.form]
        out = tvm.runtime.tensor(np.full(shape, np.nan, np.float32))
        lib(*[tvm.runtime.tensor(a) for a in (operand, data, indices, indptr, bias)], out)
        got = out.numpy()
        expect = {"wx": want, "gemv": want[:, 0], "xw": want.T}[variant.form]
        assert_close(got, np.ascontiguousarray(expect), what=f"{variant.name} decisions")


def _bsr_funcs(weight: np.ndarray, variant: Variant, columns: int, form: str) -> list:
    from tvm_sparse.selection import _bsr_module

    layer = MatmulLayer("fc", form, weight, columns)
    mod = _bsr_module(layer, variant)
    return [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]


@pytest.mark.parametrize(
    "variant,columns,form",
    [
        (Variant(4, 1, "wx"), 64, "wx"),
        (Variant(16, 1, "wx"), 1, "xw"),
        (Variant(8, 8, "xw"), 32, "xw"),
    ],
    ids=["wx", "gemv", "xw"],
)
def test_repruned_layers_give_structurally_equal_kernels(variant, columns, form):
    """Same shapes and sparsity, other pattern (the stored-block counts differ): one task."""
    block = (variant.rows, variant.cols)
    weights = []
    for seed in (0, 1):
        w = np.random.default_rng(seed).standard_normal((256, 128)).astype(np.float32)
        weights.append(prune_out_in(w, 0.9, block))
    # Unstructured leftovers inside blocks differ too: drop one more block in one of them.
    extra = to_bsr(weights[1], block)
    row = int(np.argmax(np.diff(extra.indptr)))
    col = int(extra.indices[extra.indptr[row]])
    weights[1][row * block[0] : (row + 1) * block[0], col * block[1] : (col + 1) * block[1]] = 0
    nnzb = [to_bsr(w, block).nnzb for w in weights]
    assert nnzb[0] != nnzb[1]
    (a,), (b,) = (_bsr_funcs(w, variant, columns, form) for w in weights)
    assert structural_hash(a) == structural_hash(b)
    tvm.ir.assert_structural_equal(a, b)


def test_metaschedule_tunes_with_real_bsr_arrays(tmp_path):
    """16 trials of the "bsr_wx" space, the runner fed the layer's BSR arrays: the records
    build, the best one computes the right result on the unscheduled workload, and a layer
    re-pruned at the same sparsity (other pattern) finds that record in a Relax module."""
    from tvm.s_tir import meta_schedule as ms

    variant = Variant(4, 1, "wx")
    w, (data, indices, indptr), func = _kernel(variant, n=256, k=256, p=64, sparsity=0.9)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    bias = rng.standard_normal(256).astype(np.float32)
    runner = ms.runner.LocalRunner(
        f_alloc_argument=RealArguments({0: x, 1: data, 2: indices, 3: indptr, 4: bias})
    )
    space = spaces.space_for(func)
    db = ms.tune_tir(
        func,
        TARGET,
        str(tmp_path),
        max_trials_global=16,
        num_trials_per_iter=8,
        space=spaces.schedule_fn(space, TARGET),
        builder=ms.builder.LocalBuilder(f_build=build_kernel),
        runner=runner,
        seed=0,
    )
    records = db.get_all_tuning_records()
    times = [r.run_secs for r in records if r.run_secs]
    assert len(times) >= 8, f"only {len(times)} of 16 trials measured"
    sch = ms.tir_integration.compile_tir(db, func, TARGET)
    assert sch is not None
    lib = tvm.compile(sch.mod["main"].with_attr("global_symbol", "main"), target=TARGET)
    out = tvm.runtime.tensor(np.full((256, 64), np.nan, np.float32))
    lib(*[tvm.runtime.tensor(a) for a in (x, data, indices, indptr, bias)], out)
    assert_close(out.numpy(), reference(w, x, bias), what="tuned bsr_wx_4x1")
    _check_record_reused(db, variant)


def _check_record_reused(db, variant: Variant) -> None:
    """A re-pruned weight (other seed, same sparsity) in a Relax module: the schedule phase
    finds the tuned record (no new task), and the module computes the right result."""
    from tvm import relax

    from tvm_sparse.passes import lowering_pipeline, optimize
    from tvm_sparse.selection import _bsr_module

    w = np.random.default_rng(7).standard_normal((256, 256)).astype(np.float32)
    w = prune_out_in(w, 0.9, (variant.rows, variant.cols))
    mod = _bsr_module(MatmulLayer("fc", "wx", w, 64), variant)
    with TARGET, db:
        applied = relax.transform.MetaScheduleApplyDatabase(enable_warning=True)(mod)
    (kernel,) = [f for _, f in applied.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert "tirx.is_scheduled" in kernel.attrs, "the tuned record was not found"
    ex = relax.build(optimize(applied, TARGET), TARGET, relax_pipeline=lowering_pipeline(TARGET))
    x = np.random.default_rng(8).standard_normal((256, 64)).astype(np.float32)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert_close(got, reference(w, x), what="re-pruned layer with the tuned record")
