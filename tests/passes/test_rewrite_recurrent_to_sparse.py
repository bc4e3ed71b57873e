"""RewriteRecurrentToSparse: layer collection, candidates, timing, and whole models vs ORT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from tvm_sparse import examples
from tvm_sparse.frontend.onnx import from_onnx, input_specs
from tvm_sparse.passes import lowering_pipeline, optimize
from tvm_sparse.passes.rewrite_recurrent_to_sparse import (
    DENSE,
    RewriteRecurrentToSparse,
    candidates,
    collect_recurrent_layers,
    parse_candidate,
    time_candidate,
)

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver5", "num-cores": 2})
# One recurrent layer against onnxruntime: both float32, each with its own sigmoid/tanh, so
# agreement is to a few ulp of the activations, amplified over the steps (as for the dense
# kernels in tests/frontend/test_rnn.py).
TOL = {"rtol": 1e-5, "atol": 1e-5}
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def rnn_model(
    op: str,
    *,
    steps: int = 6,
    batch: int = 1,
    inputs: int = 16,
    hidden: int = 64,
    direction: str = "forward",
    sparsity: float | dict = 0.9,
    block: tuple[int, int] = (1, 1),
    initial: bool = False,
    peephole: bool = False,
    lens_input: bool = False,
    seed: int = 0,
    **attrs,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A one-node LSTM/GRU/RNN model whose R (and W) gates are pruned, and its feeds.

    ``sparsity`` is one value for every gate or {gate index: sparsity}."""
    rng = np.random.default_rng(seed)
    n_dir, n_g, scale = 2 if direction == "bidirectional" else 1, GATES[op], 1 / np.sqrt(hidden)
    per_gate = sparsity if isinstance(sparsity, dict) else dict.fromkeys(range(n_g), sparsity)

    def rand(*shape, s=scale):
        return rng.uniform(-s, s, shape).astype(np.float32)

    w, r = rand(n_dir, n_g * hidden, inputs), rand(n_dir, n_g * hidden, hidden)
    for g, s in per_gate.items():
        rows = slice(g * hidden, (g + 1) * hidden)
        w[:, rows] = examples.prune_weight("LSTM", w[:, rows], s, block)
        r[:, rows] = examples.prune_weight("LSTM", r[:, rows], s, block)
    consts = {"W": w, "R": r, "B": rand(n_dir, 2 * n_g * hidden)}
    feeds = {"x": rand(steps, batch, inputs, s=1.0)}
    names = ["x", "W", "R", "B", "", "", "", ""]
    graph_inputs = [("x", [steps, batch, inputs])]
    if lens_input:
        names[4] = "lens"
        feeds["lens"] = np.full(batch, steps, np.int32)
        graph_inputs.append(("lens", [batch]))
    if initial:
        for i, name in ((5, "h0"), (6, "c0")) if op == "LSTM" else ((5, "h0"),):
            names[i] = name
            feeds[name] = rand(n_dir, batch, hidden, s=1.0)
            graph_inputs.append((name, [n_dir, batch, hidden]))
    if peephole:
        names[7], consts["P"] = "P", rand(n_dir, 3 * hidden, s=0.5)
    while names[-1] == "":
        names.pop()
    outputs = ["y", "y_h", "y_c"][: 3 if op == "LSTM" else 2]
    node = helper.make_node(
        op, names, outputs, name=f"{op.lower()}0", hidden_size=hidden, direction=direction, **attrs
    )
    types = {"lens": TensorProto.INT32}
    graph = helper.make_graph(
        [node],
        "rnn",
        [
            helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), s)
            for n, s in graph_inputs
        ],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(v, n) for n, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    return model, feeds


def simplified(model: onnx.ModelProto) -> tvm.IRModule:
    specs = input_specs(model, None)
    mod = from_onnx(model, {s.name: list(s.shape) for s in specs})
    return optimize(mod, TARGET, phases=("simplify",))


def build(mod: tvm.IRModule):
    """The rest of compile(): legalize, schedule, build."""
    mod = optimize(mod, TARGET, phases=("legalize", "schedule"))
    return relax.build(mod, TARGET, relax_pipeline=lowering_pipeline(TARGET))


def build_and_run(mod: tvm.IRModule, model: onnx.ModelProto, feeds: dict, executable=None):
    """Build (unless given the executable) and run with the graph's inputs."""
    vm = relax.VirtualMachine(executable or build(mod), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(feeds[v.name]) for v in model.graph.input])
    outs = [out] if len(model.graph.output) == 1 else list(out)
    return [o.numpy() for o in outs]


def run_ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def kernel_names(mod: tvm.IRModule) -> list[str]:
    return sorted(
        str(f.attrs.get("tvm_sparse.kernel", "dense"))
        for f in mod.functions.values()
        if isinstance(f, tvm.tirx.PrimFunc) and "tvm_sparse.kind" in (f.attrs or {})
    )


def assert_outputs(got, want, tol=TOL):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape and g.dtype == w.dtype, f"output {i}: {g.shape} vs {w.shape}"
        np.testing.assert_allclose(g, w, err_msg=f"output {i}", **tol)


def test_collect_unpacks_r_per_direction():
    model, _ = rnn_model("LSTM", direction="bidirectional", hidden=40, sparsity={0: 0.9, 2: 0.5})
    layers = collect_recurrent_layers(simplified(model))
    r = numpy_helper.to_array(model.graph.initializer[1])
    assert [layer.key for layer in layers] == ["lstm0:forward", "lstm0:reverse"]
    for d, layer in enumerate(layers):
        assert (layer.kind, layer.kernel_kind, layer.node) == ("LSTM", "LSTM", "lstm0")
        assert (layer.seq_len, layer.batch, layer.hidden) == (6, 1, 40)
        np.testing.assert_array_equal(layer.r, r[d])
        assert layer.gate_sparsity["o"] == 0 and layer.gate_sparsity["c"] == 0
        assert abs(layer.gate_sparsity["i"] - 0.9) < 0.01


def test_weights_as_graph_inputs_are_not_collected():
    model, feeds = rnn_model("GRU", steps=3, hidden=16)
    r = model.graph.initializer.pop(1)  # R becomes a graph input
    model.graph.input.append(helper.make_tensor_value_info("R", TensorProto.FLOAT, list(r.dims)))
    assert collect_recurrent_layers(simplified(model)) == []


def test_candidates():
    sel, _ = rnn_model("LSTM", sparsity={0: 0.9, 1: 0.9, 2: 0.9})
    blocks, _ = rnn_model("LSTM", sparsity=0.9, block=(16, 1))
    dense, _ = rnn_model("GRU", sparsity=0.0, linear_before_reset=1)
    narrow, _ = rnn_model("RNN", hidden=40, sparsity=0.9)  # one 40-unit panel: 8x1 only
    names = [candidates(collect_recurrent_layers(simplified(m))[0]) for m in (sel, blocks, dense)]
    assert names[0][0] == DENSE and "lstm_win16x32_iof+dense_c" in names[0]
    assert "lstm_bsr16x1_iof+dense_c" in names[0] and "lstm_sell16_iof+dense_c" in names[0]
    assert names[1] == [DENSE, "lstm_bsr16x1_iofc"]
    assert names[2] == [DENSE]
    assert candidates(collect_recurrent_layers(simplified(narrow))[0]) == [DENSE, "rnn_bsr8x1_h"]
    no_avx512 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    assert candidates(collect_recurrent_layers(simplified(blocks))[0], no_avx512) == [DENSE]


def test_parse_candidate_rejects_foreign_names():
    model, _ = rnn_model("GRU", sparsity=0.9)
    layer = collect_recurrent_layers(simplified(model))[0]
    assert parse_candidate(layer, "gru_sell16_zr+dense_h") == ("sell16", (True, True, False))
    for bad in ("lstm_bsr16x1_iofc", "gru_bsr4x4_zrh", "gru_bsr16x1_rz", "gru_bsr16x1_"):
        with pytest.raises(ValueError):
            parse_candidate(layer, bad)


def test_not_applicable_is_unchanged():
    model, _ = rnn_model("LSTM", sparsity=0.0, direction="bidirectional")
    before = simplified(model)
    keys = [layer.key for layer in collect_recurrent_layers(before)]
    for plan in ({}, dict.fromkeys(keys, DENSE), {"other:forward": "lstm_bsr16x1_iofc"}):
        tvm.ir.assert_structural_equal(RewriteRecurrentToSparse(plan)(before), before)


def test_rewrite_is_well_formed_and_idempotent():
    model, _ = rnn_model("LSTM", sparsity=0.9, block=(16, 1), direction="bidirectional")
    before = simplified(model)
    plan = {layer.key: candidates(layer)[-1] for layer in collect_recurrent_layers(before)}
    after = RewriteRecurrentToSparse(plan)(before)
    assert relax.analysis.check_well_formed(after)
    assert kernel_names(after) == ["lstm_bsr16x1_iofc"] * 2
    assert collect_recurrent_layers(after) == []  # sparse kernels are not candidates again
    tvm.ir.assert_structural_equal(RewriteRecurrentToSparse(plan)(after), after)


def test_time_candidate():
    model, _ = rnn_model("LSTM", steps=4, sparsity=0.9, block=(16, 1))
    layer = collect_recurrent_layers(simplified(model))[0]
    times = {name: time_candidate(layer, name, TARGET) for name in candidates(layer)}
    assert all(0 < t < 0.1 for t in times.values()), times


# (op, model kwargs, which candidate of each layer: "all" cycles through them over layers).
MODELS = {
    "lstm_90_16x1": ("LSTM", {"sparsity": 0.9, "block": (16, 1)}),
    "lstm_90_bidir_peephole_initial": (
        "LSTM",
        {"sparsity": 0.9, "direction": "bidirectional", "peephole": True, "initial": True},
    ),
    "lstm_selective": ("LSTM", {"sparsity": {0: 0.9, 1: 0.9, 2: 0.9}, "batch": 2}),
    "lstm_50_reverse_lens": (
        "LSTM",
        {"sparsity": 0.5, "direction": "reverse", "lens_input": True, "hidden": 40},
    ),
    "lstm_50_16x1_batch2": ("LSTM", {"sparsity": 0.5, "block": (16, 1), "batch": 2}),
    "lstm_0": ("LSTM", {"sparsity": 0.0}),
    "gru_90_16x1_bidir": ("GRU", {"sparsity": 0.9, "block": (16, 1), "direction": "bidirectional"}),
    "gru_lbr_50_initial": ("GRU", {"sparsity": 0.5, "linear_before_reset": 1, "initial": True}),
    "gru_lbr_90_batch3": ("GRU", {"sparsity": 0.9, "linear_before_reset": 1, "batch": 3}),
    "rnn_90_bidir": ("RNN", {"sparsity": 0.9, "direction": "bidirectional", "hidden": 128}),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_matches_onnxruntime(name):
    """Every candidate of every layer (cycled over the layers), against onnxruntime."""
    op, kwargs = MODELS[name]
    model, feeds = rnn_model(op, **kwargs)
    before = simplified(model)
    layers = collect_recurrent_layers(before)
    options = [candidates(layer)[1:] or [DENSE] for layer in layers]
    want = run_ort(model, feeds)
    rounds = max(len(o) for o in options)
    for k in range(rounds):
        plan = {layer.key: o[(k + i) % len(o)] for i, (layer, o) in enumerate(zip(layers, options))}
        after = RewriteRecurrentToSparse(plan)(before)
        assert kernel_names(after) == sorted(v if v != DENSE else "dense" for v in plan.values()), (
            plan
        )
        assert_outputs(build_and_run(after, model, feeds), want)


def test_stacked_lstm_matches_onnxruntime():
    """Two bidirectional 16x1-pruned layers (examples.lstm), every direction sparse."""
    model = examples.lstm(6, 2, 16, 64, layers=2, bidirectional=True, sparsity=0.9, block=(16, 1))
    x = np.random.default_rng(0).standard_normal((6, 2, 16)).astype(np.float32)
    before = simplified(model)
    plan = {layer.key: candidates(layer)[1] for layer in collect_recurrent_layers(before)}
    assert len(plan) == 4
    after = RewriteRecurrentToSparse(plan)(before)
    got = build_and_run(after, model, {"input": x})
    assert_outputs(got, run_ort(model, {"input": x}))


def test_exported_library_runs(tmp_path):
    """The kernels' imported LLVM IR and packed constants survive export_library + load."""
    model, feeds = rnn_model("GRU", sparsity=0.9, steps=4)
    before = simplified(model)
    plan = {layer.key: candidates(layer)[-1] for layer in collect_recurrent_layers(before)}
    path = str(tmp_path / "model.so")
    build(RewriteRecurrentToSparse(plan)(before)).export_library(path)
    got = build_and_run(None, model, feeds, tvm.runtime.load_module(path))
    assert_outputs(got, run_ort(model, feeds))
