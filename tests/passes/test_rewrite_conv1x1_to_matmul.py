"""RewriteConv1x1ToMatmul: applies, leaves other convs alone, idempotent, numerically equal."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from tvm_sparse.passes.rewrite_conv1x1_to_matmul import RewriteConv1x1ToMatmul

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver5", "num-cores": 2})


def conv_module(k: int = 1, stride: int = 1, groups: int = 1, epilogue: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 6 // groups, k, k)).astype(np.float32)
    b = rng.standard_normal((1, 8, 1, 1)).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 6, 5, 7), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(
                relax.op.nn.conv2d(x, relax.const(w), strides=stride, padding=k // 2, groups=groups)
            )
            if epilogue:
                y = bb.emit(relax.op.add(y, relax.const(b)))
                y = bb.emit(relax.op.nn.relu(y))
                y = bb.emit(relax.op.multiply(y, relax.const(np.float32(0.5))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def ops_of(mod) -> list[str]:
    names = []
    relax.analysis.post_order_visit(
        mod["main"],
        lambda e: (
            names.append(e.op.name)
            if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op)
            else None
        ),
    )
    return names


def run(mod, x):
    ex = relax.build(mod, TARGET)
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def test_pointwise_conv_becomes_matmul_with_epilogue_in_2d():
    after = RewriteConv1x1ToMatmul()(conv_module())
    assert relax.analysis.check_well_formed(after)
    ops = ops_of(after)
    assert "relax.nn.conv2d" not in ops and ops.count("relax.matmul") == 1
    # bias, relu and scale were sunk into the [C, H*W] domain: one reshape back at the end.
    assert ops[-1] == "relax.reshape"
    body = after["main"].body.blocks[0].bindings
    epilogue = [
        b.value
        for b in body
        if isinstance(b.value, relax.Call)
        and b.value.op.name in ("relax.add", "relax.nn.relu", "relax.multiply")
    ]
    assert epilogue and all(len(e.ty.shape) == 2 for e in epilogue)


@pytest.mark.parametrize("kwargs", [dict(k=3), dict(k=1, stride=2), dict(k=1, groups=2)])
def test_not_applicable_is_unchanged(kwargs):
    before = conv_module(**kwargs)
    after = RewriteConv1x1ToMatmul()(before)
    tvm.ir.assert_structural_equal(after, before)


def test_idempotent():
    once = RewriteConv1x1ToMatmul()(conv_module())
    tvm.ir.assert_structural_equal(RewriteConv1x1ToMatmul()(once), once)


@pytest.mark.parametrize("epilogue", [True, False])
def test_numerically_equal(epilogue):
    before = conv_module(epilogue=epilogue)
    after = RewriteConv1x1ToMatmul()(before)
    x = np.random.default_rng(1).standard_normal((1, 6, 5, 7)).astype(np.float32)
    np.testing.assert_allclose(run(after, x), run(before, x), rtol=1e-5, atol=1e-5)
