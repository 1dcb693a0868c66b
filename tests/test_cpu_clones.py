"""The CPU kernels give the same bits on every x86-64 instruction set (csrc/include/twotower_rt/
cpu_common.h): the sources are built here once for the baseline (SSE2: libm's fmaf) and once for
x86-64-v3 (AVX2 + FMA), each without the clones, and their results are compared bitwise with the
installed module's (whose clone this CPU picks: AVX-512 where it has it), each build at both vector
widths the kernels compute in (16 floats on AVX-512 CPUs, 8 on the others). Needs a C++ compiler,
pybind11 and Python's headers (the test extra brings pybind11), and the repository's csrc/."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import platform
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from test_block_attention_cpu import SHAPES as attention_shapes
from test_block_attention_cpu import _case as attention_case
from test_linear_cpu import SHAPES as linear_shapes
from test_linear_cpu import _case as linear_case
from test_mamba_cpu import _inputs as mamba_inputs
from test_mamba_cpu import _layer as mamba_layer
from test_moe_cpu import _weights as moe_case
from test_norm_cpu import _inputs as norm_inputs

from twotower_rt import _ext
from twotower_rt.ops.block_attention import block_attention_cpu
from twotower_rt.ops.linear_cpu import k_major, linear_cpu
from twotower_rt.ops.mamba_cpu import mamba_chunk
from twotower_rt.ops.mask_sampling import mask_decide_cpu
from twotower_rt.ops.moe_cpu import moe_forward
from twotower_rt.ops.rmsnorm import modulated_rms_norm_cpu, rms_norm_cpu

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")


def _why_not() -> str | None:
    if _ext.cpu_kernels() is None:
        return f"no CPU kernels: {_ext.cpu_kernels_error()}"
    if platform.machine() != "x86_64":
        return "the instruction-set clones are x86-64's"
    if not (CSRC / "cpu").is_dir():
        return f"no kernel sources at {CSRC}"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler"
    if importlib.util.find_spec("pybind11") is None:
        return "pybind11 is not installed (pip install -e .[test])"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        return "no Python headers"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict:
    """{name: module} for the baseline and (where this CPU runs it) the x86-64-v3 build, compiled
    side by side with the flags CMakeLists.txt gives _cpu."""
    import pybind11

    variants = {"baseline": []}
    if {"avx2", "fma", "bmi2"} <= _cpu_flags():
        variants["x86-64-v3"] = ["-march=x86-64-v3"]
    root = tmp_path_factory.mktemp("cpu_clones")
    sources = sorted(str(p) for p in (CSRC / "cpu").glob("*.cpp"))
    procs = {}
    for name, flags in variants.items():
        out = root / name / f"_cpu{SUFFIX}"
        out.parent.mkdir()
        cmd = [os.environ.get("CXX", "c++"), "-O3", "-DNDEBUG", "-std=c++17", "-fPIC", "-shared",
               "-ffp-contract=off", "-fopenmp-simd", "-fvisibility=hidden",
               "-DTWOTOWER_RT_NO_CLONES", '-DTWOTOWER_RT_VERSION="clones-test"', *flags,
               f"-I{CSRC / 'include'}", f"-I{pybind11.get_include()}",
               f"-I{sysconfig.get_paths()['include']}", *sources, "-o", str(out)]  # fmt: skip
        procs[name] = (out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    modules = {}
    for name, (out, proc) in procs.items():
        log = proc.communicate()[0].decode(errors="replace")
        assert proc.returncode == 0, f"building the {name} kernels failed:\n{log[-3000:]}"
        spec = importlib.util.spec_from_file_location(f"tt_clones_{name.replace('-', '_')}._cpu",
                                                      out)  # fmt: skip
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules[name] = module
    return modules


def _run_all(g: torch.Generator) -> list[torch.Tensor]:
    """Every kernel on random inputs (the kernel tests' own builders): the default model's shapes
    and awkward ones."""
    outs = []
    for H, P, N, G, K in ((6, 64, 32, 2, 4), (3, 5, 9, 1, 4), (2, 32, 8, 1, 3)):
        weights, conv_dim = mamba_layer(H, P, N, G, K)
        zx, conv, ssm = mamba_inputs(3, 16, H, P, N, conv_dim, K)
        for n_valid in (None, torch.tensor([16, 7, 1])):
            outs += mamba_chunk(zx, conv, ssm, weights, n_valid)
            outs += mamba_chunk(zx, conv, ssm, weights, n_valid, with_output=False)[1:]
    for E, hidden, inter, shared, k in ((8, 192, 128, 256, 2), (5, 70, 33, 19, 3)):
        weights = moe_case(E, hidden, inter, shared, k)
        x = torch.randn(19, hidden, generator=g)
        outs.append(moe_forward(x, weights))
        halves = {f: getattr(weights, f) for f in ("up", "down", "shared_up", "shared_down")}
        halves = {f: None if w is None else w.bfloat16() for f, w in halves.items()}
        outs.append(moe_forward(x, dataclasses.replace(weights, **halves)))
    for hidden in (192, 37):
        for post in (False, True):
            outs.append(modulated_rms_norm_cpu(*norm_inputs(3, 16, hidden), 1e-5, post=post))
        x, weight, _, _ = norm_inputs(3, 16, hidden)
        outs.append(rms_norm_cpu(x, weight, 1e-5))
    for rows, k, n in linear_shapes:
        x, weight, bias = linear_case(rows, k, n)
        outs.append(linear_cpu(x, k_major(weight), bias, out_features=n))
        outs.append(linear_cpu(x, weight.t().contiguous()))
        outs.append(linear_cpu(x, k_major(weight.bfloat16().float()), out_features=n))
    for B, S, hq, hkv, d, lens in attention_shapes:
        q, k, v, k_cache, v_cache, lens, slots = attention_case(B, S, hq, hkv, d, lens)
        outs.append(block_attention_cpu(q, k_cache, v_cache, lens, k, v, cache_slots=slots))
        outs.append(block_attention_cpu(q, k_cache, v_cache, lens, k, v, cache_slots=slots,
                                        causal=True, append=True))  # fmt: skip
    logits = torch.randn(3, 16, 2048, generator=g) * 4
    block = torch.where(torch.rand(3, 16, generator=g) < 0.6, 3, 7)
    decided = mask_decide_cpu(logits, block, mask_token_id=3, step=torch.tensor([0, 5, 14]),
                              steps_per_block=16, confidence_threshold=0.8)  # fmt: skip
    outs += list(decided)
    return outs


def test_every_instruction_set_and_vector_width_gives_the_same_bits(builds, monkeypatch):
    """Each build at both vector widths (cpu_common.h: wide_vectors; 16 floats is what AVX-512
    CPUs run, 8 what the others run), whatever this CPU has, against the installed module at 8."""
    reference = None
    for name, module in {"installed": _ext.cpu_kernels(), **builds}.items():
        monkeypatch.setattr(_ext, "_CPU", module)
        for wide in (0, 1):
            module.set_wide_vectors(wide)
            try:
                assert module.wide_vectors() == bool(wide)
                outs = _run_all(torch.Generator().manual_seed(0))
            finally:
                module.set_wide_vectors(-1)
            if reference is None:
                reference = outs
                assert len(reference) > 20
                continue
            for i, (a, b) in enumerate(zip(reference, outs, strict=True)):
                gap = (a.float() - b.float()).abs().max()
                assert torch.equal(a, b), (
                    f"output {i}: the {name} build with {16 if wide else 8}-float vectors differs "
                    f"by up to {gap}"
                )


# x86-64-v4 (the wide clone's target): AVX-512 F, BW, CD, DQ and VL on top of x86-64-v3.
V4_FLAGS = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma"}


def test_the_vector_width_is_the_cpus_unless_forced():
    C = _ext.cpu_kernels()
    assert C.wide_vectors() == (V4_FLAGS <= _cpu_flags())
    with pytest.raises(ValueError, match="set_wide_vectors"):
        C.set_wide_vectors(2)
    assert C.wide_vectors() == (V4_FLAGS <= _cpu_flags())


def test_the_builds_are_what_they_claim(builds):
    """Guards the comparison above against comparing a module with itself."""
    files = {Path(m.__file__).resolve() for m in builds.values()}
    assert len(files) == len(builds)
    assert Path(_ext.cpu_kernels().__file__).resolve() not in files
