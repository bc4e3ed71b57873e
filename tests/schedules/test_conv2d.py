"""Conv2d schedule rule: numerics against NumPy for every layer kind, and that the rule applies."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax, s_tir
from tvm.relax.op import nn

from tvm_sparse.schedules import default_rules
from tvm_sparse.schedules.conv2d import ChannelTile, Conv2d, RowTile, choose_tile, match_conv2d
from tvm_sparse.target import resolve_target

TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(scope="module")
def target():
    return resolve_target("host")


def _legalize(mod: tvm.IRModule) -> tvm.IRModule:
    """The pipeline's legalize phase: one fused PrimFunc per conv + epilogue chain."""
    return tvm.transform.Sequential(
        [
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]
    )(mod)


def _out_hw(hw, k, stride, padding, dilation):
    t, left, bottom, right = padding
    span = dilation * (k - 1) + 1
    return (hw + t + bottom - span) // stride + 1, (hw + left + right - span) // stride + 1


def _conv_module(x_shape, w_shape, stride, padding, groups, dilation, epilogue):
    """Relax module: conv2d followed by the epilogue ops, every tensor a function input."""
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    w = relax.Var("w", relax.TensorType(w_shape, "float32"))
    out_shape = (
        x_shape[0],
        w_shape[0],
        *_out_hw(x_shape[2], w_shape[2], stride, padding, dilation),
    )
    extra = {
        "bias": relax.Var("b", relax.TensorType((1, w_shape[0], 1, 1), "float32")),
        "residual": relax.Var("skip", relax.TensorType(out_shape, "float32")),
    }
    conv = nn.conv2d(x, w, strides=stride, padding=padding, dilation=dilation, groups=groups)
    return _with_epilogue(x, w, conv, epilogue, extra)


def _with_epilogue(x, w, conv, epilogue, extra):
    """Relax module main(x, w, epilogue operands): `conv` followed by the epilogue ops."""
    params = [x, w] + [extra[op] for op in epilogue if op in extra]
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            y = bb.emit(conv)
            for op in epilogue:
                if op in extra:
                    y = bb.emit(relax.op.add(y, extra[op]))
                elif op == "relu":
                    y = bb.emit(nn.relu(y))
                elif op == "clip":
                    y = bb.emit(relax.op.clip(y, 0.0, 6.0))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _conv_ref(x, w, stride, padding, groups, dilation):
    t, left, bottom, right = padding
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (t, bottom), (left, right)))
    co, cpg, kh, kw = w.shape
    oh = (xp.shape[2] - dilation * (kh - 1) - 1) // stride + 1
    ow = (xp.shape[3] - dilation * (kw - 1) - 1) // stride + 1
    out = np.zeros((x.shape[0], co, oh, ow))
    opg = co // groups
    for g in range(groups):
        xs = xp[:, g * cpg : (g + 1) * cpg]
        for ry in range(kh):
            for rx in range(kw):
                patch = xs[
                    :,
                    :,
                    ry * dilation : ry * dilation + stride * (oh - 1) + 1 : stride,
                    rx * dilation : rx * dilation + stride * (ow - 1) + 1 : stride,
                ]
                out[:, g * opg : (g + 1) * opg] += np.einsum(
                    "nchw,oc->nohw", patch, w[g * opg : (g + 1) * opg, :, ry, rx]
                )
    return out


def _reference(arrays, stride, padding, groups, dilation, epilogue):
    y = _conv_ref(arrays[0], arrays[1], stride, padding, groups, dilation)
    extra = iter(arrays[2:])
    for op in epilogue:
        if op in ("bias", "residual"):
            y = y + next(extra)
        elif op == "relu":
            y = np.maximum(y, 0)
        elif op == "clip":
            y = np.clip(y, 0, 6)
    return y


# name: (batch, cin, cout, hw, kernel, stride, padding, groups, dilation, epilogue, tile kind)
CASES = {
    "depthwise_s1_odd_width": (1, 32, 32, 20, 3, 1, 1, 32, 1, ("bias", "relu"), RowTile),
    "depthwise_s2_deinterleaved": (1, 16, 16, 32, 3, 2, 1, 16, 1, ("bias", "clip"), RowTile),
    "depthwise_s2_odd_input": (1, 24, 24, 17, 3, 2, 1, 24, 1, ("bias", "relu"), RowTile),
    "depthwise_few_channels": (1, 4, 4, 16, 3, 1, 1, 4, 1, ("bias",), RowTile),
    "depthwise_5x5_width_16": (1, 16, 16, 16, 5, 1, 2, 16, 1, (), RowTile),
    "dense_3x3_s1": (1, 64, 48, 9, 3, 1, 1, 1, 1, ("bias", "relu"), ChannelTile),
    "dense_3x3_s1_short_reduction": (1, 16, 32, 14, 3, 1, 1, 1, 1, ("bias", "relu"), ChannelTile),
    "dense_3x3_s2_odd": (1, 8, 32, 15, 3, 2, 1, 1, 1, ("bias",), ChannelTile),
    "dense_residual": (1, 32, 32, 12, 3, 1, 1, 1, 1, ("bias", "residual", "relu"), ChannelTile),
    "stem_7x7_s2": (1, 3, 64, 32, 7, 2, 3, 1, 1, ("bias", "relu"), ChannelTile),
    "pointwise_s2": (1, 32, 64, 14, 1, 2, 0, 1, 1, ("bias",), ChannelTile),
    "pointwise_s1": (1, 24, 32, 10, 1, 1, 0, 1, 1, ("bias", "relu"), ChannelTile),
    "dense_channels_not_multiple_of_16": (1, 8, 20, 12, 3, 1, 1, 1, 1, ("bias",), RowTile),
    "grouped_not_depthwise": (1, 16, 32, 12, 3, 1, 1, 4, 1, ("bias", "relu"), RowTile),
    "batch_2": (2, 16, 32, 10, 3, 1, 1, 1, 1, ("bias",), ChannelTile),
    "dilation_2": (1, 16, 32, 13, 3, 1, 2, 1, 2, (), ChannelTile),
    "asymmetric_padding": (1, 8, 16, 11, 3, 2, (0, 0, 1, 1), 1, 1, ("relu",), ChannelTile),
    "output_1x1": (1, 16, 32, 3, 3, 1, 0, 1, 1, ("bias",), ChannelTile),
    "single_output_channel": (1, 8, 1, 10, 3, 1, 1, 1, 1, ("bias",), RowTile),
    "depth_multiplier_2": (1, 8, 16, 10, 3, 1, 1, 8, 1, ("bias",), RowTile),
    "depthwise_s3": (1, 16, 16, 20, 3, 3, 1, 16, 1, (), RowTile),
    "depthwise_asymmetric_padding": (1, 16, 16, 12, 3, 2, (1, 2, 0, 1), 16, 1, (), RowTile),
}


def _run_scheduled(sch, func, target):
    """Build `sch` and run it on seeded random inputs (weights scaled by 1/sqrt(fan-in)):
    (inputs, output)."""
    rng = np.random.default_rng(0)
    arrays = [
        rng.standard_normal([int(d) for d in p.shape]).astype("float32") for p in func.params[:-1]
    ]
    arrays[1] /= np.sqrt(arrays[1][0].size)
    lib = tvm.compile(sch.mod["main"].with_attr("global_symbol", "main"), target=target).jit()
    out = np.full([int(d) for d in func.params[-1].shape], np.nan, dtype="float32")
    args = [tvm.runtime.tensor(a) for a in [*arrays, out]]
    lib["main"](*args)
    return arrays, args[-1].numpy()


def _run_case(case, target, tile=None):
    batch, cin, cout, hw, k, stride, padding, groups, dilation, epilogue, _ = case
    padding = padding if isinstance(padding, tuple) else (padding,) * 4
    mod = _legalize(
        _conv_module(
            (batch, cin, hw, hw),
            (cout, cin // groups, k, k),
            stride,
            padding,
            groups,
            dilation,
            epilogue,
        )
    )
    (gv,) = [gv for gv in mod.functions if "conv2d" in gv.name_hint]
    func = mod[gv]
    sch = Conv2d(tile).apply(func, target, False)
    assert sch is not None, "Conv2d declined a convolution"
    script = sch.mod.script()
    assert "T.parallel" in script and "T.vectorized" in script
    arrays, got = _run_scheduled(sch, func, target)
    want = _reference(arrays, stride, padding, groups, dilation, epilogue)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, **TOL)
    return func


@pytest.mark.parametrize("name", list(CASES))
def test_conv_matches_numpy(name, target):
    func = _run_case(CASES[name], target)
    tile = choose_tile(match_conv2d(s_tir.Schedule(func)))
    assert isinstance(tile, CASES[name][-1]), tile


@pytest.mark.parametrize(
    "tile", [ChannelTile(1, 7), ChannelTile(2, 14), RowTile(4, 2, 1, 14), RowTile(1, 7, 2, 8)]
)
def test_forced_tiles(tile, target):
    """Tiles other than the default (more vectors, row tiles on a dense conv) stay correct."""
    _run_case((1, 16, 64, 14, 3, 1, 1, 1, 1, ("bias", "relu"), None), target, tile)


def _first_rule(func, target):
    for rule in default_rules():
        if rule.apply(func, target, False) is not None:
            return type(rule).__name__
    return None


def _model_convs(case):
    batch, cin, cout, hw, k, stride, padding, groups, dilation, epilogue, _ = case
    mod = _legalize(
        _conv_module(
            (batch, cin, hw, hw),
            (cout, cin // groups, k, k),
            stride,
            (padding,) * 4,
            groups,
            dilation,
            epilogue,
        )
    )
    return [mod[gv] for gv in mod.functions if "conv2d" in gv.name_hint]


@pytest.mark.parametrize(
    "name", ["depthwise_s1_odd_width", "dense_3x3_s1", "stem_7x7_s2", "pointwise_s2"]
)
def test_default_rules_dispatch_to_conv2d(name, target):
    """Convs reach this rule through default_rules (earlier rules must decline them)."""
    (func,) = _model_convs(CASES[name])
    assert _first_rule(func, target) == "Conv2d"


def _matmul_module():
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((16, 32), "float32"))
    b = relax.Var("b", relax.TensorType((32, 48), "float32"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.matmul(a, b)))
        bb.emit_func_output(out)
    return bb.get()


def _pool_module():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 12, 12), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(nn.max_pool2d(x, pool_size=3, strides=2, padding=1))
            out = bb.emit_output(bb.emit(nn.avg_pool2d(y, pool_size=2)))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("build", [_matmul_module, _pool_module])
def test_declines_other_kernels(build, target):
    mod = _legalize(build())
    funcs = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert funcs
    for func in funcs:
        assert Conv2d().apply(func, target, False) is None


def test_mobilenet_tiny_end_to_end_vs_onnxruntime():
    """A whole (small) MobileNet through tvm_sparse.compile, against onnxruntime."""
    import onnxruntime as ort

    import tvm_sparse
    from tvm_sparse import examples

    model = examples.mobilenet_v1(size=32, width=0.25, classes=10)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    got = tvm_sparse.compile(model).run({"input": x})[0]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


# NHWC convs (passes.convert_layout): name -> (case as in CASES, layout). "NCHW>NHWC" reads an
# NCHW input into an NHWC output (a model's first conv).
LAYOUT_CASES = {
    "nhwc_depthwise_s1": ((1, 32, 32, 20, 3, 1, 1, 32, 1, ("bias", "relu"), ChannelTile), "NHWC"),
    "nhwc_depthwise_s2_odd": ((1, 32, 32, 17, 3, 2, 1, 32, 1, ("bias",), ChannelTile), "NHWC"),
    "nhwc_depthwise_48": ((1, 48, 48, 9, 3, 1, 1, 48, 1, ("clip",), ChannelTile), "NHWC"),
    "nhwc_dense_3x3": ((1, 16, 48, 9, 3, 1, 1, 1, 1, ("bias", "relu"), ChannelTile), "NHWC"),
    "nhwc_pointwise": ((1, 24, 64, 10, 1, 1, 0, 1, 1, ("bias", "relu"), ChannelTile), "NHWC"),
    "nhwc_pointwise_s2": ((1, 32, 32, 14, 1, 2, 0, 1, 1, ("bias",), ChannelTile), "NHWC"),
    "nhwc_residual_batch_2": (
        (2, 16, 32, 8, 3, 1, 1, 1, 1, ("bias", "residual", "relu"), ChannelTile),
        "NHWC",
    ),
    "nhwc_asymmetric_padding": (
        (1, 16, 16, 11, 3, 2, (0, 0, 1, 1), 16, 1, ("relu",), ChannelTile),
        "NHWC",
    ),
    "nchw_to_nhwc_stem_3x3_s2": (
        (1, 3, 32, 15, 3, 2, 1, 1, 1, ("bias", "relu"), ChannelTile),
        "NCHW>NHWC",
    ),
    "nchw_to_nhwc_stem_7x7_s2": (
        (1, 3, 64, 16, 7, 2, 3, 1, 1, ("bias",), ChannelTile),
        "NCHW>NHWC",
    ),
}
# Layouts: (data, weight, output) axis orders as permutations of NCHW / OIHW.
_PERM = {"NCHW": (0, 1, 2, 3), "NHWC": (0, 2, 3, 1)}


def _layout_module(case, layout):
    """`case` as one conv2d in `layout` (weights OHWI), epilogue operands in the output's
    layout, legalized like the pipeline does (with passes.convert_layout's conv2d)."""
    from tvm_sparse.passes.convert_layout import legalize_conv2d

    batch, cin, cout, hw, k, stride, padding, groups, dilation, epilogue, _ = case
    padding = padding if isinstance(padding, tuple) else (padding,) * 4
    data_l, out_l = layout.split(">")[0], layout.split(">")[-1]
    nchw_out = (batch, cout, *_out_hw(hw, k, stride, padding, dilation))

    def shape(nchw, lay):
        return tuple(nchw[i] for i in _PERM[lay])

    x = relax.Var("x", relax.TensorType(shape((batch, cin, hw, hw), data_l), "float32"))
    w = relax.Var("w", relax.TensorType((cout, k, k, cin // groups), "float32"))
    extra = {
        "bias": relax.Var("b", relax.TensorType(shape((1, cout, 1, 1), out_l), "float32")),
        "residual": relax.Var("skip", relax.TensorType(shape(nchw_out, out_l), "float32")),
    }
    conv = nn.conv2d(
        x, w, strides=stride, padding=padding, dilation=dilation, groups=groups,
        data_layout=data_l, kernel_layout="OHWI", out_layout=out_l,
    )  # fmt: skip
    return tvm.transform.Sequential(
        [
            relax.transform.LegalizeOps({"relax.nn.conv2d": legalize_conv2d}),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]
    )(_with_epilogue(x, w, conv, epilogue, extra)), padding


@pytest.mark.parametrize("name", list(LAYOUT_CASES))
def test_nhwc_conv_matches_numpy(name, target):
    """NHWC convs (and an NCHW input into NHWC) run on channel tiles and match NumPy."""
    case, layout = LAYOUT_CASES[name]
    mod, padding = _layout_module(case, layout)
    (gv,) = [gv for gv in mod.functions if "conv2d" in gv.name_hint]
    func = mod[gv]
    conv = match_conv2d(s_tir.Schedule(func))
    assert conv is not None and conv.layout == layout
    assert isinstance(choose_tile(conv), ChannelTile)
    sch = Conv2d().apply(func, target, False)
    assert sch is not None, "Conv2d declined an NHWC convolution"
    arrays, got = _run_scheduled(sch, func, target)
    # The NCHW / OIHW reference on the same numbers.
    data_l, out_l = layout.split(">")[0], layout.split(">")[-1]
    to_nchw = np.argsort(_PERM[data_l])
    nchw = [arrays[0].transpose(to_nchw), arrays[1].transpose(0, 3, 1, 2)]
    nchw += [a.transpose(np.argsort(_PERM[out_l])) for a in arrays[2:]]
    _, _, _, _, _, stride, _, groups, dilation, epilogue, _ = case
    want = _reference(nchw, stride, padding, groups, dilation, epilogue)
    np.testing.assert_allclose(got, want.transpose(_PERM[out_l]), **TOL)


@pytest.mark.parametrize(
    "case",
    [
        (1, 16, 32, 12, 3, 1, 1, 4, 1, ("bias",), None),  # grouped, not depthwise
        (1, 8, 20, 12, 3, 1, 1, 1, 1, ("bias",), None),  # channels not a multiple of 16
    ],
)
def test_nhwc_without_channel_tiles_is_declined(case, target):
    """NHWC convs whose channels cannot be the lanes are left to the fallback rule (row tiles
    would read columns C apart)."""
    mod, _ = _layout_module(case, "NHWC")
    (gv,) = [gv for gv in mod.functions if "conv2d" in gv.name_hint]
    assert match_conv2d(s_tir.Schedule(mod[gv])) is not None
    assert Conv2d().apply(mod[gv], target, False) is None
