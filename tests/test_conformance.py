"""ONNX's own node test cases for the ops tvm-sparse compiles, run end to end through `compile`.

Selection: every case of ``onnx.backend.test.case.node.collect_testcases(None)`` whose graph is a
single node with op_type in `OPS`, minus the cases whose inputs or outputs use a type in
`EXCLUDED_TYPES`: formats below 8 bits, float8, float4 and 16-bit integers, all outside
tvm-sparse's scope (TVM's own converters happen to pass the four non-blocked 16-bit Q/DQ cases;
the rest are rejected with UnsupportedOpError). With onnx 1.23.2 that is 81 cases: 60 in, 21
out. The count and the excluded names are asserted, so an onnx release that adds or renames
cases is noticed.

Included (60), by op:
  Conv (6): basic_conv_with_padding, basic_conv_without_padding, conv_with_strides_padding,
    conv_with_strides_no_padding, conv_with_strides_and_asymmetric_padding,
    conv_with_autopad_same
  ConvInteger (2): convinteger_without_padding, convinteger_with_padding
  DequantizeLinear (3): dequantizelinear, dequantizelinear_axis, dequantizelinear_blocked
  Gemm (11): gemm_default_zero_bias, gemm_default_no_bias, gemm_default_scalar_bias,
    gemm_default_single_elem_vector_bias, gemm_default_vector_bias, gemm_default_matrix_bias,
    gemm_transposeA, gemm_transposeB, gemm_alpha, gemm_beta, gemm_all_attributes
  GRU (6): gru_defaults, gru_with_initial_bias, gru_seq_length, gru_batchwise, gru_reverse,
    gru_bidirectional
  LSTM (6): lstm_defaults, lstm_with_initial_bias, lstm_with_peepholes, lstm_batchwise,
    lstm_reverse, lstm_bidirectional
  MatMul (7): matmul_2d, matmul_3d, matmul_4d, matmul_bcast, matmul_1d_3d, matmul_4d_1d,
    matmul_1d_1d
  MatMulInteger (1): matmulinteger
  QLinearConv (1): qlinearconv
  QLinearMatMul (8): qlinearmatmul_{2D,3D}_{uint8,int8}_{float32,float16}
  QuantizeLinear (3): quantizelinear, quantizelinear_axis, quantizelinear_blocked_asymmetric
  RNN (6): simple_rnn_defaults, simple_rnn_with_initial_bias, rnn_seq_length,
    simple_rnn_batchwise, simple_rnn_reverse, simple_rnn_bidirectional

Excluded (21), all QuantizeLinear/DequantizeLinear, by the type that excludes them:
  float8 (6): dequantizelinear_e4m3fn, dequantizelinear_e4m3fn_float16,
    dequantizelinear_e4m3fn_zero_point, dequantizelinear_e5m2, quantizelinear_e4m3fn,
    quantizelinear_e5m2
  16-bit integers (5): dequantizelinear_uint16, dequantizelinear_int16, quantizelinear_uint16,
    quantizelinear_int16, quantizelinear_blocked_symmetric (int16)
  4-bit and 2-bit integers (8): {de,}quantizelinear_{uint4,int4,uint2,int2}
  float4 (2): dequantizelinear_float4e2m1, quantizelinear_float4e2m1
"""

from __future__ import annotations

import warnings

import onnx
import pytest

import tvm_sparse
from conftest import assert_close

# fmt: off
OPS = {
    "LSTM", "GRU", "RNN", "Conv", "Gemm", "MatMul", "MatMulInteger", "ConvInteger",
    "QLinearConv", "QLinearMatMul", "QuantizeLinear", "DequantizeLinear",
}
EXCLUDED_TYPES = {
    "INT4", "UINT4", "INT2", "UINT2", "FLOAT8E4M3FN", "FLOAT8E5M2", "FLOAT4E2M1", "INT16", "UINT16",
}
EXPECTED_EXCLUDED = {f"test_{name}" for name in (
    "dequantizelinear_e4m3fn", "dequantizelinear_e4m3fn_float16",
    "dequantizelinear_e4m3fn_zero_point", "dequantizelinear_e5m2", "quantizelinear_e4m3fn",
    "quantizelinear_e5m2",
    "dequantizelinear_uint16", "dequantizelinear_int16", "quantizelinear_uint16",
    "quantizelinear_int16", "quantizelinear_blocked_symmetric",
    "dequantizelinear_uint4", "dequantizelinear_int4", "dequantizelinear_uint2",
    "dequantizelinear_int2", "quantizelinear_uint4", "quantizelinear_int4",
    "quantizelinear_uint2", "quantizelinear_int2",
    "dequantizelinear_float4e2m1", "quantizelinear_float4e2m1",
)}
# fmt: on


def _value_types(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    return {
        onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)
        for v in [*graph.input, *graph.output]
    }


def _select():
    from onnx.backend.test.case import node

    with warnings.catch_warnings():  # some unrelated case generators overflow on purpose
        warnings.simplefilter("ignore")
        cases = node.collect_testcases(None)
    candidates = [
        c for c in cases if len(c.model.graph.node) == 1 and c.model.graph.node[0].op_type in OPS
    ]
    included = [c for c in candidates if not _value_types(c.model) & EXCLUDED_TYPES]
    excluded = [c for c in candidates if _value_types(c.model) & EXCLUDED_TYPES]
    return included, excluded


INCLUDED, EXCLUDED = _select()


def test_selection_unchanged():
    assert len(INCLUDED) == 60, sorted(c.name for c in INCLUDED)
    assert {c.name for c in EXCLUDED} == EXPECTED_EXCLUDED


@pytest.mark.parametrize("case", INCLUDED, ids=lambda c: c.name.removeprefix("test_"))
def test_node_case(case):
    compiled = tvm_sparse.compile(case.model, target="host")
    names = [v.name for v in case.model.graph.input]
    for inputs, expected in case.data_sets:
        got = compiled.run(dict(zip(names, inputs, strict=True)))
        assert len(got) == len(expected)
        for i, (out, ref) in enumerate(zip(got, expected, strict=True)):
            assert_close(out, ref, f"{case.name} output {i} ({case.model.graph.output[i].name})")
