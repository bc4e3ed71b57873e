"""Transpose rule: applies to 2-D transposes (also fused with a pad), writes every element."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from tvm_sparse.schedules.transpose import Transpose

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver5", "num-cores": 2})


def fused(shape, pad: int):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.permute_dims(x))
            if pad:
                y = bb.emit(relax.op.nn.pad(y, [0, 0, 0, pad]))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = tvm.transform.Sequential(
        [
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]
    )(bb.get())
    (func,) = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    return func


@pytest.mark.parametrize("shape", [(64, 1024), (1024, 64), (100, 512), (70, 100)])
@pytest.mark.parametrize("pad", [0, 12])
def test_transpose_every_element(shape, pad):
    sch = Transpose().apply(fused(shape, pad), TARGET, False)
    assert sch is not None, "the transpose rule declined a transpose"
    lib = tvm.compile(sch.mod["main"].with_attr("global_symbol", "main"), target=TARGET)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out = tvm.runtime.tensor(np.full((shape[1], shape[0] + pad), np.nan, np.float32))
    lib(tvm.runtime.tensor(x), out)
    np.testing.assert_array_equal(out.numpy(), np.pad(x.T, ((0, 0), (0, pad))))


def test_declines_small_and_non_transposes():
    assert Transpose().apply(fused((8, 8), 0), TARGET, False) is None
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((128, 128), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.add(x, x))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    (func,) = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert Transpose().apply(func, TARGET, False) is None
