"""Shared fixtures: fixed seeds, a tolerance table by dtype, small ONNX model builders."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

# The suite's one tolerance table by output dtype; integer outputs must be bit-exact.
# float32: a correct kernel differs from the reference only by summation order and by our
# vectorised tanh/sigmoid approximations (a few ulps); 1e-5 still catches a wrong bias, padding,
# gate or activation. float16: one ulp is ~1e-3 relative.
TOLERANCE = {"float32": dict(rtol=1e-5, atol=1e-5), "float16": dict(rtol=1e-3, atol=1e-3)}
# Whole networks: summation-order differences compound over depth and scale with the size of
# the activations (ResNet-18-like: 20 layers, reductions up to 4608 long, measured worst 1.2e-5
# absolute on outputs of magnitude ~1; a pruned MobileNet with outputs ~1500: 3e-3 absolute on
# an element of 9). So atol is relative to the largest reference output ("atol_scale").
MODEL_TOLERANCE = {"float32": dict(rtol=1e-4, atol=1e-5, atol_scale=True)}
# Single kernels under a tuned schedule: K blocking, unrolling and tile shapes reorder sums of up
# to 1024 (matmul) or 4608 (3x3 conv) products, so the rounding error grows with the reduction
# length and the magnitude of the outputs (|y| ~ 30 at K = 1024 for unit normal inputs), as for
# whole networks; elements near zero need the scaled atol, not rtol.
SCHEDULE_TOLERANCE = MODEL_TOLERANCE


def assert_close(
    actual: np.ndarray, expected: np.ndarray, what: str = "output", table: dict | None = None
) -> None:
    """Shape and dtype first, then values: exact for integers, by the table for floats."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if np.issubdtype(expected.dtype, np.integer) or expected.dtype == np.bool_:
        np.testing.assert_array_equal(actual, expected, err_msg=what)
    else:
        tol = dict((table or TOLERANCE)[str(expected.dtype)])
        if tol.pop("atol_scale", False) and expected.size:
            tol["atol"] *= max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(actual, expected, err_msg=what, **tol)


def ort_run(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


def single_node_model(
    op: str,
    inputs: list[tuple[str, int, list]],
    output: tuple[str, int, list],
    initializers: dict[str, np.ndarray] | None = None,
    opset: int = 17,
    name: str = "node0",
    **attrs,
) -> onnx.ModelProto:
    """A one-node graph: `inputs` are graph inputs (name, elem type, shape) before initializers."""
    init_names = list(initializers or {})
    node = helper.make_node(
        op, [i[0] for i in inputs] + init_names, [output[0]], name=name, **attrs
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(*i) for i in inputs],
        [helper.make_tensor_value_info(*output)],
        [numpy_helper.from_array(v, k) for k, v in (initializers or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def matmul_model(rng):
    w = rng.standard_normal((32, 24)).astype(np.float32)
    return single_node_model(
        "MatMul",
        [("x", TensorProto.FLOAT, [4, 32])],
        ("y", TensorProto.FLOAT, [4, 24]),
        {"w": w},
        name="fc",
    )
