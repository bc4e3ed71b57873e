"""tvm_sparse.target: the target spellings the API and the CLI accept."""

from __future__ import annotations

import pytest

from tvm_sparse.errors import TvmSparseError
from tvm_sparse.target import num_cores, resolve_target


def test_host_uses_this_cpu_and_all_cores():
    target = resolve_target("host")
    assert target.kind.name == "llvm" and int(target.attrs["num-cores"]) == num_cores()


def test_cpu_name_and_json_dict():
    assert str(resolve_target("znver4").attrs["mcpu"]) == "znver4"
    target = resolve_target('{"kind": "llvm", "mcpu": "znver4", "num-cores": 8}')
    assert str(target.attrs["mcpu"]) == "znver4" and int(target.attrs["num-cores"]) == 8


@pytest.mark.parametrize(
    "text, message", [("not-a-cpu", "not a CPU LLVM knows"), ("{bad", "not a valid JSON dict")]
)
def test_bad_targets_name_the_argument(text, message):
    with pytest.raises(TvmSparseError, match=message):
        resolve_target(text)
