"""Design spaces of the dense matmul and conv2d schedules: defaults, random samples, replay."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from test_conv2d import CASES as CONV_CASES
from test_conv2d import _conv_module, _legalize, _reference
from test_matmul import TARGET, fused_primfunc
from tvm import s_tir
from tvm.s_tir.schedule import Trace

from conftest import SCHEDULE_TOLERANCE, assert_close
from tvm_sparse.schedules import conv2d, matmul, spaces

MATMUL_SHAPES = {  # (m, k, n, batch)
    "64x1024x1024": (64, 1024, 1024, None),
    "gemv": (1, 256, 512, None),
    "odd": (13, 600, 96, None),
    "batched": (5, 64, 48, 3),
}
CONV_NAMES = ["dense_3x3_s1", "pointwise_s2", "stem_7x7_s2", "depthwise_s2_deinterleaved"]
SEEDS = (1, 2, 3)


def _decisions(sch: s_tir.Schedule) -> list[int]:
    return [
        int(sch.get(inst.outputs[0]))
        for inst in sch.trace.insts
        if inst.kind.name == "SampleCategorical"
    ]


def _assert_replays(func: tvm.tirx.PrimFunc, sch: s_tir.Schedule) -> None:
    """The trace (decisions included) rebuilds the same module from the unscheduled func."""
    fresh = s_tir.Schedule(func)
    sch.trace.apply_to_schedule(fresh, remove_postproc=False)
    tvm.ir.assert_structural_equal(sch.mod, fresh.mod)


def _run(sch: s_tir.Schedule, arrays: list[np.ndarray], out_shape) -> np.ndarray:
    lib = tvm.compile(sch.mod["main"].with_attr("global_symbol", "main"), target=TARGET)
    out = tvm.runtime.tensor(np.full(out_shape, np.nan, np.float32))  # unwritten stays NaN
    lib(*[tvm.runtime.tensor(a) for a in arrays], out)
    return out.numpy()


def _matmul_case(name):
    m, k, n, batch = MATMUL_SHAPES[name]
    func, w, b = fused_primfunc(m, k, n, batch, epilogue=True)
    shape = (m, k) if batch is None else (batch, m, k)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    ref = np.maximum(x @ w.T + b, 0).astype(np.float32)
    return func, [x, np.ascontiguousarray(w.T), b], ref


def _conv_case(name):
    batch, cin, cout, hw, k, stride, pad, groups, dilation, epilogue, _ = CONV_CASES[name]
    padding = pad if isinstance(pad, tuple) else (pad,) * 4
    module = _conv_module(
        (batch, cin, hw, hw),
        (cout, cin // groups, k, k),
        stride,
        padding,
        groups,
        dilation,
        epilogue,
    )
    mod = _legalize(module)
    (gv,) = [gv for gv in mod.functions if "conv2d" in gv.name_hint]
    func = mod[gv]
    rng = np.random.default_rng(0)
    arrays = [
        rng.standard_normal([int(d) for d in p.shape]).astype(np.float32) for p in func.params[:-1]
    ]
    ref = _reference(arrays, stride, padding, groups, dilation, epilogue).astype(np.float32)
    return func, arrays, ref


def test_families_are_registered():
    func, _, _ = _matmul_case("odd")
    assert spaces.space_for(func).name == "matmul"
    func, _, _ = _conv_case("dense_3x3_s1")
    assert spaces.space_for(func).name == "conv2d"


@pytest.mark.parametrize("name", list(MATMUL_SHAPES))
def test_matmul_default_is_the_rule_and_replays(name):
    func, arrays, ref = _matmul_case(name)
    sch = s_tir.Schedule(func)
    assert matmul.apply_matmul(sch, TARGET, False)
    tvm.ir.assert_structural_equal(sch.mod, matmul.Matmul().apply(func, TARGET, False).mod)
    _assert_replays(func, sch)
    assert_close(_run(sch, arrays, ref.shape), ref, name, SCHEDULE_TOLERANCE)


@pytest.mark.parametrize(
    "name, order",
    [("gemv", matmul.PANELS_THEN_ROWS)]
    + [(name, order) for name in MATMUL_SHAPES if name != "gemv" for order in matmul.ORDERS],
)
def test_matmul_random_samples_are_correct(name, order):
    func, arrays, ref = _matmul_case(name)
    for seed in SEEDS:
        sch = s_tir.Schedule(func, seed=seed)
        assert matmul.apply_matmul(sch, TARGET, True, order)
        _assert_replays(func, sch)
        got = _run(sch, arrays, ref.shape)
        assert_close(
            got, ref, f"{name} order {order} decisions {_decisions(sch)}", SCHEDULE_TOLERANCE
        )


@pytest.mark.parametrize("name", CONV_NAMES)
def test_conv_default_is_the_rule_and_replays(name):
    func, arrays, ref = _conv_case(name)
    sch = s_tir.Schedule(func)
    assert conv2d.apply_conv2d(sch, TARGET, False)
    tvm.ir.assert_structural_equal(sch.mod, conv2d.Conv2d().apply(func, TARGET, False).mod)
    _assert_replays(func, sch)
    assert_close(_run(sch, arrays, ref.shape), ref, name, SCHEDULE_TOLERANCE)


@pytest.mark.parametrize("kind", [conv2d.CHANNEL, conv2d.ROW])
@pytest.mark.parametrize("name", CONV_NAMES)
def test_conv_random_samples_are_correct(name, kind):
    func, arrays, ref = _conv_case(name)
    if name.startswith("depthwise") and kind == conv2d.CHANNEL:
        assert not conv2d.apply_conv2d(s_tir.Schedule(func), TARGET, True, kind)
        return
    for seed in SEEDS:
        sch = s_tir.Schedule(func, seed=seed)
        assert conv2d.apply_conv2d(sch, TARGET, True, kind)
        _assert_replays(func, sch)
        got = _run(sch, arrays, ref.shape)
        assert_close(
            got, ref, f"{name} kind {kind} decisions {_decisions(sch)}", SCHEDULE_TOLERANCE
        )


@pytest.mark.parametrize(
    "case",
    [lambda: _matmul_case("64x1024x1024"), lambda: _conv_case("dense_3x3_s1")],
    ids=["matmul", "conv2d"],
)
def test_search_resamples_the_knobs(case):
    """MetaSchedule replays each design space's instructions with fresh decisions: the tile
    sizes must follow them (split factors referencing the sampled variables), or every
    candidate would be the same schedule. Choices that change the loop nest (matmul order,
    conv tile kind) get one design space each, as replay cannot change them."""
    from tvm.s_tir import meta_schedule as ms

    func, _, _ = case()
    generator = spaces.schedule_fn(spaces.space_for(func), TARGET)
    context = ms.TuneContext(mod=func, target=TARGET, space_generator=generator, task_name="t")
    designs = context.generate_design_space()
    assert len(designs) >= 2  # 64x1024x1024: four loop orders; dense 3x3: both tile kinds
    for space in designs:
        without_decisions = Trace(space.trace.insts, {})
        scripts = set()
        for seed in (11, 12, 13, 14, 15):
            sch = s_tir.Schedule(context.mod, seed=seed)
            without_decisions.apply_to_schedule(sch, remove_postproc=False)
            scripts.add(sch.mod.script())
        assert len(scripts) > 1, "every replay with new decisions gave the same schedule"
