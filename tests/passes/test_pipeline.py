"""The compile pipeline packs constant weights once, at build time."""

from __future__ import annotations

import numpy as np
import tvm
from onnx import TensorProto
from tvm import relax

from conftest import single_node_model
from tvm_sparse.frontend.onnx import from_onnx
from tvm_sparse.passes import lowering_pipeline, optimize
from tvm_sparse.passes.pipeline import _packs_weights

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver5", "num-cores": 2})


def test_matmul_weight_is_packed_at_compile_time():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 256)).astype(np.float32)
    model = single_node_model(
        "MatMul",
        [("x", TensorProto.FLOAT, [64, 128])],
        ("y", TensorProto.FLOAT, [64, 256]),
        {"w": w},
    )
    mod = optimize(from_onnx(model, None), TARGET)
    prims = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    # the kernel that remains reads the packed panels; the packing ran in FoldConstant
    assert any(name.endswith("_prepacked") for name in prims), sorted(prims)
    assert not any(_packs_weights(f) for f in prims.values()), sorted(prims)
    ex = relax.build(mod, TARGET, relax_pipeline=lowering_pipeline(TARGET))
    x = rng.standard_normal((64, 128)).astype(np.float32)
    y = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(y, x @ w, rtol=1e-4, atol=1e-4)
