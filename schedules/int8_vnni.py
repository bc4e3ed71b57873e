"""The AVX512-VNNI dot-product intrinsic our int8 kernels tensorize to (16 lanes x 4 bytes).

TVM's own ``dot_16x4_vnni`` passes ``int32x16`` operands to ``llvm.x86.avx512.vpdpbusd.512``,
which LLVM 22 rejects (it now takes ``<64 x i8>``), and it broadcasts the activation. Ours
broadcasts the weight instead: lane ``l`` accumulates the 4 unsigned activation bytes
``A[l, 0:4]`` (16 consecutive activation columns, 4 reduction elements each, one 64-byte load)
times the 4 signed weight bytes ``B[0:4]`` shared by all lanes. That fits block-sparse weights
of any row count (one broadcast per block row) and lets LLVM fold the broadcast into
``vpdpbusd``'s memory operand (``{1to16}``).
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

LANES = 16  # int32 accumulators per zmm register
GROUP = 4  # reduction elements per vpdpbusd lane
INTRIN = "tvm_sparse_vnni_u8s8_16x4_bcast_b"


@T.prim_func(s_tir=True)
def _desc(
    A: T.Buffer((16, 4), "uint8", offset_factor=1),
    B: T.Buffer((4,), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:16, 0:4], B[0:4])
        T.writes(C[0:16])
        for i, k in T.grid(16, 4):
            with T.sblock("update"):
                vi, vk = T.axis.remap("SR", [i, k])
                C[vi] = C[vi] + T.cast(A[vi, vk], "int32") * T.cast(B[vk], "int32")


@T.prim_func(s_tir=True)
def _impl(
    A: T.Buffer((16, 4), "uint8", offset_factor=1),
    B: T.Buffer((4,), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:16, 0:4], B[0:4])
        T.writes(C[0:16])
        b_word = T.reinterpret(B.vload([0], "int8x4"), dtype="int32")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], "int32x16"),
            A.vload([0, 0], "uint8x64"),
            T.reinterpret(T.broadcast(b_word, 16), dtype="int8x64"),
            dtype="int32x16",
        )


def vpdpbusd(acc, unsigned, signed):
    """``acc`` (int32x16) plus, per lane, the dot product of 4 unsigned bytes of ``unsigned``
    with 4 signed bytes of ``signed`` (both 64-byte vectors), as kernels written in TIR call
    it directly."""
    return T.call_llvm_pure_intrin(
        "int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, unsigned, signed
    )


def broadcast_word(word, dtype: str):
    """A 32-bit word (4 bytes) repeated over the 16 lanes, as a 64-byte ``dtype`` vector."""
    return T.reinterpret(f"{dtype}x64", T.Broadcast(word, LANES))


def register() -> str:
    """Register the intrinsic once per process; returns its name."""
    if TensorIntrin.get(INTRIN, allow_missing=True) is None:
        TensorIntrin.register(INTRIN, _desc, _impl)
    return INTRIN
