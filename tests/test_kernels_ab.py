"""bench/kernels_ab.py: another build of the CPU kernels loaded beside the installed one and
swapped in for its "before" side, then put back."""

import shutil
import sys
from pathlib import Path

import pytest
import torch

from twotower_rt import _ext
from twotower_rt.ops.linear_cpu import linear_cpu

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import kernels_ab  # noqa: E402

pytestmark = pytest.mark.skipif(
    _ext.cpu_kernels() is None, reason=f"no CPU kernels: {_ext.cpu_kernels_error()}"
)


def test_the_before_side_runs_the_other_build(tmp_path):
    installed = _ext.cpu_kernels()
    copy = tmp_path / Path(installed.__file__).name  # a copy: its own dlopen handle
    shutil.copy(installed.__file__, copy)
    other = kernels_ab.load_build(str(copy))
    assert other is not installed and other.__file__ == str(copy)
    x, w = torch.randn(3, 8), torch.randn(8, 16)
    want = linear_cpu(x, w)
    side = kernels_ab.make_side(other)
    with side("after"):
        assert _ext.cpu_kernels() is installed
    with side("before"):
        assert _ext.cpu_kernels() is other and _ext.cpu_kernels_module() is other
        got = linear_cpu(x, w)
    assert _ext.cpu_kernels() is installed and _ext.cpu_kernels_module() is installed
    assert torch.equal(got, want)


def test_a_file_that_is_not_a_build_is_refused(tmp_path):
    bad = tmp_path / "_cpu.so"
    bad.write_bytes(b"not an ELF file")
    with pytest.raises(ImportError):
        kernels_ab.load_build(str(bad))
