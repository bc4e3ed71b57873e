"""LLVM IR helpers for the sparse recurrent kernels: a spin barrier between threads, lookups.

The sparse recurrent kernels run all time steps inside one ``pragma_parallel_launch_point``:
every thread runs the time loop, splits each step's work with a parallel loop over fixed
chunks, and meets the others at a barrier. TVM's own barrier (``TVMBackendParallelBarrier``)
yields to the OS on every poll and costs 1-3 us per step on this machine kind; this one polls
with ``pause`` and yields only after :data:`SPINS` polls (so a preempted peer still gets the
CPU), about 0.2-0.5 us per step.

Protocol: each chunk owns one counter (its own cache line) in an int32 buffer of
``chunks * STRIDE`` zeros. A chunk waits until every counter reaches ``n`` before its work of
phase ``n`` and sets its own counter to ``n + 1`` after it (a release store; the waits are
acquire loads). Chunks run by the same thread one after another never wait for each other's
future, so any thread count is safe, including one.

The helpers are LLVM IR imported with ``pragma_import_llvm`` (TVM inlines imported functions),
because TIR has no atomics and its vectorised indirect loads become 16 scalar loads: the
vector lookups are a hardware gather (:func:`gather16`) and a two-register permute over a
32-float window (:func:`window32`).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

#: int32 slots per counter: one 64-byte cache line each.
STRIDE = 16
#: pause-polls before a sched_yield (a few microseconds).
SPINS = 256

LLVM_IR = f"""
declare void @llvm.x86.sse2.pause()
declare i32 @sched_yield()
declare <16 x float> @llvm.masked.gather.v16f32.v16p0(<16 x ptr>, i32, <16 x i1>, <16 x float>)
declare <16 x float> @llvm.x86.avx512.vpermi2var.ps.512(<16 x float>, <16 x i32>, <16 x float>)

define void @tvm_sparse_arrive(ptr %sync, i32 %slot, i32 %value) {{
  %off = mul i32 %slot, {STRIDE}
  %p = getelementptr i32, ptr %sync, i32 %off
  store atomic i32 %value, ptr %p release, align 4
  ret void
}}

define void @tvm_sparse_wait(ptr %sync, i32 %n, i32 %value) {{
entry:
  br label %outer
outer:
  %i = phi i32 [0, %entry], [%i1, %next]
  %done = icmp sge i32 %i, %n
  br i1 %done, label %exit, label %start
start:
  %off = mul i32 %i, {STRIDE}
  %p = getelementptr i32, ptr %sync, i32 %off
  br label %poll
poll:
  %k = phi i32 [0, %start], [%k1, %pause], [0, %yield]
  %v = load atomic i32, ptr %p acquire, align 4
  %ok = icmp sge i32 %v, %value
  br i1 %ok, label %next, label %pause
pause:
  call void @llvm.x86.sse2.pause()
  %k1 = add i32 %k, 1
  %long = icmp sgt i32 %k1, {SPINS}
  br i1 %long, label %yield, label %poll
yield:
  %r = call i32 @sched_yield()
  br label %poll
next:
  %i1 = add i32 %i, 1
  br label %outer
exit:
  ret void
}}

define <16 x float> @tvm_sparse_gather16(ptr %base, i32 %offset, <16 x i32> %idx) {{
  %b = getelementptr float, ptr %base, i32 %offset
  %ptrs = getelementptr float, ptr %b, <16 x i32> %idx
  %v = call <16 x float> @llvm.masked.gather.v16f32.v16p0(<16 x ptr> %ptrs, i32 4,
                                                          <16 x i1> splat (i1 true),
                                                          <16 x float> poison)
  ret <16 x float> %v
}}

define <16 x float> @tvm_sparse_window32(ptr %base, i32 %offset, <16 x i32> %idx) {{
  %lo_p = getelementptr float, ptr %base, i32 %offset
  %hi_p = getelementptr float, ptr %lo_p, i32 16
  %lo = load <16 x float>, ptr %lo_p, align 4
  %hi = load <16 x float>, ptr %hi_p, align 4
  %v = call <16 x float> @llvm.x86.avx512.vpermi2var.ps.512(<16 x float> %lo, <16 x i32> %idx,
                                                             <16 x float> %hi)
  ret <16 x float> %v
}}
"""

#: The AttrStmt key that links :data:`LLVM_IR` into the function's LLVM module.
IMPORT = "pragma_import_llvm"


def wait(sync: tirx.Buffer, chunks: int, value) -> tirx.PrimExpr:
    """Block until all ``chunks`` counters of ``sync`` are at least ``value``."""
    return T.call_extern("void", "tvm_sparse_wait", sync.data, chunks, value)


def arrive(sync: tirx.Buffer, chunk, value) -> tirx.PrimExpr:
    """Publish that ``chunk`` finished phase ``value - 1`` (after all its stores)."""
    return T.call_extern("void", "tvm_sparse_arrive", sync.data, chunk, value)


def window32(buf: tirx.Buffer, offset, index: tirx.PrimExpr) -> tirx.PrimExpr:
    """``buf.flat[offset + index[j]]`` for ``index`` in 0..31: the 32 floats from ``offset``
    as two registers and one ``vpermi2ps`` (AVX-512F), no gather."""
    return T.call_extern("float32x16", "tvm_sparse_window32", buf.data, offset, index)


def gather16(buf: tirx.Buffer, offset, index: tirx.PrimExpr) -> tirx.PrimExpr:
    """``buf.flat[offset + index[j]]`` for the 16 lanes of the int32x16 ``index``: one
    ``vgatherdps``."""
    return T.call_extern("float32x16", "tvm_sparse_gather16", buf.data, offset, index)
