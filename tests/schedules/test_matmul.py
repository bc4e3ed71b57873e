"""Matmul rule: applies to contractions, leaves other kernels alone, and computes every element."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from tvm_sparse.schedules.matmul import Matmul

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver5", "num-cores": 2})


def fused_primfunc(m, k, n, batch=None, epilogue=True, seed=0):
    """Legalize+fuse Relax matmul(x, W^T) [+ bias, relu]; return (PrimFunc, W, b)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    shape = (m, k) if batch is None else (batch, m, k)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.op.permute_dims(relax.const(w))))
            if epilogue:
                y = bb.emit(relax.op.nn.relu(relax.op.add(y, relax.const(b))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = tvm.transform.Sequential(
        [
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]
    )(bb.get())
    (func,) = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    return func, w, b


@pytest.mark.parametrize(
    "m, k, n, batch",
    [
        (64, 1024, 1024, None),
        (1, 256, 512, None),
        (7, 33, 50, None),
        (3, 4, 5, None),
        (13, 600, 96, None),
        (5, 64, 48, 3),
        (1, 17, 1, None),
    ],
)
@pytest.mark.parametrize("epilogue", [True, False])
def test_matmul_rule_every_element(m, k, n, batch, epilogue):
    func, w, b = fused_primfunc(m, k, n, batch, epilogue)
    sch = Matmul().apply(func, TARGET, False)
    assert sch is not None, "the matmul rule declined a matmul"
    lib = tvm.compile(sch.mod["main"].with_attr("global_symbol", "main"), target=TARGET)
    rng = np.random.default_rng(1)
    shape = (m, k) if batch is None else (batch, m, k)
    x = rng.standard_normal(shape).astype(np.float32)
    out = np.full(shape[:-1] + (n,), np.nan, np.float32)  # unwritten elements stay NaN
    out_t = tvm.runtime.tensor(out)
    lib(
        tvm.runtime.tensor(x),
        tvm.runtime.tensor(np.ascontiguousarray(w.T)),
        *([tvm.runtime.tensor(b)] if epilogue else []),
        out_t,
    )
    ref = x @ w.T
    if epilogue:
        ref = np.maximum(ref + b, 0)
    got = out_t.numpy()
    bad = np.argwhere(~np.isclose(got, ref, rtol=1e-4, atol=1e-4))
    assert not bad.size, (
        f"{len(bad)} wrong elements, first at {tuple(bad[0])}: "
        f"{got[tuple(bad[0])]} vs {ref[tuple(bad[0])]}"
    )


def test_matmul_rule_declines_non_contractions():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.sum(relax.op.exp(x), axis=1))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    for _, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            assert Matmul().apply(func, TARGET, False) is None
