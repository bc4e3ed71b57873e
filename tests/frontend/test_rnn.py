"""ONNX LSTM/GRU/RNN via from_onnx: ONNX's node tests, onnxruntime at realistic sizes, errors."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from tvm_sparse.errors import UnsupportedOpError
from tvm_sparse.frontend import from_onnx

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver5", "num-cores": 2})
# fp32 against float32 references (ONNX's expected outputs, onnxruntime); both use their own
# sigmoid/tanh, so agreement is to a few ulp of the activations, amplified over the steps.
TOL = {"rtol": 1e-5, "atol": 1e-5}
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _node_cases():
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    return [
        c for c in cases if len(c.model.graph.node) == 1 and c.model.graph.node[0].op_type in GATES
    ]


NODE_CASES = {c.name: c for c in _node_cases()}


def run_tvm(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Import, build and run; inputs in the graph's order, outputs as a list."""
    mod = from_onnx(model)
    vm = relax.VirtualMachine(relax.build(mod, TARGET), tvm.cpu())
    initializers = {t.name for t in model.graph.initializer}
    names = [v.name for v in model.graph.input if v.name not in initializers]
    out = vm["main"](*[tvm.runtime.tensor(feeds[n]) for n in names])
    outs = [out] if len(model.graph.output) == 1 else list(out)
    return [o.numpy() for o in outs]


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_outputs(got: list[np.ndarray], want: list[np.ndarray], tol=TOL) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape and g.dtype == w.dtype, (
            f"output {i}: {g.shape} {g.dtype} vs {w.shape} {w.dtype}"
        )
        np.testing.assert_allclose(g, w, err_msg=f"output {i}", **tol)


def make_model(
    op: str,
    *,
    steps: int = 20,
    batch: int = 2,
    inputs: int = 64,
    hidden: int = 128,
    direction: str = "forward",
    layout: int = 0,
    bias: bool = True,
    initial: bool = False,
    peephole: bool = False,
    weights_as_inputs: bool = False,
    seed: int = 0,
    opset: int = 14,
    **attrs,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A one-node model with random weights (scaled 1/sqrt(H), as trained layers are) and feeds."""
    rng = np.random.default_rng(seed)
    n_dir, n_g = 2 if direction == "bidirectional" else 1, GATES[op]
    scale = 1.0 / np.sqrt(hidden)

    def rand(*shape, s=scale):
        return (rng.uniform(-1, 1, shape) * s).astype(np.float32)

    feeds = {"x": rand(steps, batch, inputs, s=1.0)}
    consts = {"W": rand(n_dir, n_g * hidden, inputs), "R": rand(n_dir, n_g * hidden, hidden)}
    names = ["x", "W", "R", "B" if bias else "", "", "", "", ""]
    if bias:
        consts["B"] = rand(n_dir, 2 * n_g * hidden)
    if initial:
        names[5] = "h0"
        feeds["h0"] = rand(n_dir, batch, hidden, s=1.0)
        if op == "LSTM":
            names[6] = "c0"
            feeds["c0"] = rand(n_dir, batch, hidden, s=1.0)
    if layout:  # the same values, batch-major: [B, T, I] and [B, D, H]
        feeds = {k: np.ascontiguousarray(v.transpose(1, 0, 2)) for k, v in feeds.items()}
    if peephole:
        names[7] = "P"
        consts["P"] = rand(n_dir, 3 * hidden, s=0.5)
    while names[-1] == "":
        names.pop()
    outputs = ["y", "y_h", "y_c"][: 3 if op == "LSTM" else 2]
    node = helper.make_node(
        op, names, outputs, name=f"{op.lower()}_0", hidden_size=hidden, direction=direction, **attrs
    )
    if layout:
        node.attribute.append(helper.make_attribute("layout", layout))
    graph_inputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape)) for n, v in feeds.items()
    ]
    if weights_as_inputs:
        feeds.update(consts)
        graph_inputs += [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape))
            for n, v in consts.items()
        ]
        initializers = []
    else:
        initializers = [numpy_helper.from_array(v, n) for n, v in consts.items()]
    graph = helper.make_graph(
        [node],
        "rnn",
        graph_inputs,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), feeds


@pytest.mark.parametrize("name", sorted(NODE_CASES))
def test_onnx_node_case(name):
    case = NODE_CASES[name]
    inputs, expected = case.data_sets[0]
    graph_inputs = [v.name for v in case.model.graph.input]
    got = run_tvm(case.model, dict(zip(graph_inputs, inputs, strict=True)))
    assert_outputs(got, list(expected))


ORT_CASES = {
    "lstm_forward": ("LSTM", {}),
    "lstm_reverse_initial": ("LSTM", {"direction": "reverse", "initial": True}),
    "lstm_bidir_layout1_peephole": (
        "LSTM",
        {"direction": "bidirectional", "layout": 1, "initial": True, "peephole": True},
    ),
    "lstm_padded_weights_as_inputs": (
        "LSTM",
        {"hidden": 40, "weights_as_inputs": True, "peephole": True},
    ),
    "lstm_batch8_reverse": ("LSTM", {"batch": 8, "hidden": 64, "direction": "reverse"}),
    "gru_bidir_initial": ("GRU", {"direction": "bidirectional", "initial": True}),
    "gru_lbr_batch7": ("GRU", {"batch": 7, "hidden": 48, "linear_before_reset": 1}),
    "gru_linear_before_reset_layout1": (
        "GRU",
        {"linear_before_reset": 1, "layout": 1, "opset": 22},
    ),
    "gru_padded_weights_as_inputs": (
        "GRU",
        {"hidden": 50, "weights_as_inputs": True, "direction": "reverse"},
    ),
    "rnn_bidir_no_bias_opset7": (
        "RNN",
        {"direction": "bidirectional", "bias": False, "initial": True, "opset": 7},
    ),
}


@pytest.mark.parametrize("case", sorted(ORT_CASES))
def test_against_onnxruntime(case):
    op, kwargs = ORT_CASES[case]
    model, feeds = make_model(op, **kwargs)
    if not kwargs.get("layout"):
        want = run_ort(model, feeds)
    else:  # onnxruntime has no layout=1: run the time-major twin and transpose its outputs
        twin, twin_feeds = make_model(op, **{**kwargs, "layout": 0})
        y, *finals = run_ort(twin, twin_feeds)
        want = [y.transpose(2, 0, 1, 3)] + [f.transpose(1, 0, 2) for f in finals]
    assert_outputs(run_tvm(model, feeds), want)


def test_stacked_lstm_against_onnxruntime():
    """Two bidirectional layers: Y [T, 2, B, H] -> Transpose/Reshape -> [T, B, 2H] -> layer 2."""
    steps, batch, n_in, hidden = 20, 2, 64, 128
    first, feeds = make_model(
        "LSTM", steps=steps, batch=batch, inputs=n_in, hidden=hidden, direction="bidirectional"
    )
    second, _ = make_model(
        "LSTM", steps=steps, batch=batch, inputs=2 * hidden, hidden=hidden, seed=1
    )
    g1, g2 = first.graph, second.graph
    renamed = {"W": "W2", "R": "R2", "B": "B2"}
    for init in g2.initializer:
        init.name = renamed[init.name]
    layer2 = g2.node[0]
    layer2.name = "lstm_1"
    layer2.input[:] = ["x2", "W2", "R2", "B2"]
    layer2.output[:] = ["y2", "y2_h", "y2_c"]
    nodes = [
        g1.node[0],
        helper.make_node("Transpose", ["y"], ["y_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["y_t", "shape"], ["x2"]),
        layer2,
    ]
    shape = numpy_helper.from_array(np.array([steps, batch, 2 * hidden], np.int64), "shape")
    graph = helper.make_graph(
        nodes,
        "stacked",
        list(g1.input),
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y2", "y2_h", "y_h")],
        list(g1.initializer) + list(g2.initializer) + [shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    assert_outputs(run_tvm(model, feeds), run_ort(model, feeds))


def test_one_call_per_direction_with_attributes():
    model, _ = make_model("LSTM", direction="bidirectional", peephole=True, steps=5, hidden=32)
    mod = from_onnx(model)
    kernels = {
        gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)
    }
    assert sorted(kernels) == ["lstm_recurrence_lstm_0_fwd", "lstm_recurrence_lstm_0_rev"]
    for name, func in kernels.items():
        assert func.attrs["tvm_sparse.layer"] == "LSTM"
        assert func.attrs["tvm_sparse.node"] == "lstm_0"
        assert func.attrs["tvm_sparse.direction"] == (
            "forward" if name.endswith("fwd") else "reverse"
        )
        assert func.attrs["tirx.noalias"] and func.attrs["tirx.is_scheduled"]
    text = mod["main"].script()
    assert (
        text.count("R.call_tir(") == 2
        and text.count("R.matmul(") == 2
        and text.count("R.add(") == 2
    )
    # R, peepholes and initial states reach the kernel as constants packed at import time.
    calls = [line for line in text.splitlines() if "R.call_tir(" in line]
    assert all(line.count("metadata[") == 4 for line in calls)


def test_runtime_sequence_lens_check():
    model, feeds = make_model("GRU", steps=4, hidden=16)
    node = model.graph.node[0]
    node.input[:] = ["x", "W", "R", "B", "lens"]
    model.graph.input.append(helper.make_tensor_value_info("lens", TensorProto.INT32, [2]))
    ok = dict(feeds, lens=np.array([4, 4], np.int32))
    assert_outputs(run_tvm(model, ok), run_ort(model, ok))
    with pytest.raises(RuntimeError, match="sequence_lens must all equal"):
        run_tvm(model, dict(feeds, lens=np.array([4, 3], np.int32)))


def test_default_activations_spelled_out_are_accepted():
    model, _ = make_model("LSTM", steps=3, hidden=8, activations=["Sigmoid", "Tanh", "Tanh"])
    assert "lstm_recurrence_lstm_0_fwd" in [gv.name_hint for gv in from_onnx(model).functions]


@pytest.mark.parametrize(
    "op, attrs, detail",
    [
        ("LSTM", {"activations": ["Relu", "Tanh", "Tanh"]}, "activations"),
        ("GRU", {"activations": ["Sigmoid", "Relu"]}, "activations"),
        ("RNN", {"activations": ["Relu"]}, "activations"),
        ("LSTM", {"clip": 5.0}, "clip"),
        ("LSTM", {"input_forget": 1}, "input_forget"),
        ("GRU", {"clip": 1.0}, "clip"),
    ],
)
def test_unsupported_attribute(op, attrs, detail):
    model, _ = make_model(op, steps=3, hidden=8, **attrs)
    with pytest.raises(UnsupportedOpError, match=detail) as err:
        from_onnx(model)
    assert err.value.op_type == op and err.value.node == f"{op.lower()}_0" and err.value.opset == 14


def test_constant_sequence_lens_shorter_than_sequence_is_unsupported():
    model, _ = make_model("LSTM", steps=4, hidden=8)
    model.graph.node[0].input[:] = ["x", "W", "R", "B", "lens"]
    model.graph.initializer.append(numpy_helper.from_array(np.array([4, 2], np.int32), "lens"))
    with pytest.raises(UnsupportedOpError, match="sequence_lens"):
        from_onnx(model)
