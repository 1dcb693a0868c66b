"""The CPU kernels' threads (csrc/cpu/cpu_pool.cpp, threads.set_kernel_threads): every count gives
the one-thread bits (projections, MoE layers, whole generations); the setting's checks and its
environment variable; calls from two Python threads at once; a child made by fork()."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from test_block_attention_cpu import SHAPES as ATTENTION_SHAPES
from test_block_attention_cpu import _case as attention_case
from test_linear_cpu import SHAPES
from test_linear_cpu import _case as linear_case
from test_mamba_cpu import SHAPES as MAMBA_SHAPES
from test_mamba_cpu import _inputs as mamba_inputs
from test_mamba_cpu import _layer as mamba_layer
from test_moe_cpu import _weights as moe_case

from twotower_rt import _ext, threads
from twotower_rt.ops.block_attention import block_attention_cpu
from twotower_rt.ops.linear_cpu import k_major, linear_cpu
from twotower_rt.ops.mamba_cpu import mamba_chunk
from twotower_rt.ops.moe_cpu import moe_forward

pytestmark = pytest.mark.skipif(
    _ext.cpu_kernels() is None, reason=f"no CPU kernels: {_ext.cpu_kernels_error()}"
)

COUNTS = (2, 3, 5)
# Past the pool's threshold (cpu_pool.h kPoolMinWork), so these really split: a denoiser step's
# shapes, a batch's, an output count that is no multiple of a task's 128, a tiny row count.
BIG = [(16, 192, 902), (64, 192, 902), (16, 192, 2048), (9, 300, 1000), (1, 192, 2048),
       (2, 384, 129)]  # fmt: skip


@pytest.fixture
def kernel_threads():
    """Sets the kernels' threads for a test (starting from one) and puts back the count it
    found."""
    before = threads.kernel_threads()
    threads.set_kernel_threads(1)
    yield threads.set_kernel_threads
    threads.set_kernel_threads(before)


def test_the_setting(kernel_threads):
    assert threads.kernel_threads() == 1
    assert kernel_threads(3) == 3 and threads.kernel_threads() == 3
    assert kernel_threads(1) == 1 and threads.kernel_threads() == 1
    assert kernel_threads(None) == threads.available_cpus() == threads.kernel_threads()
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="kernel threads"):
            kernel_threads(bad)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        _ext.cpu_kernels().set_threads(0)


def test_the_environment_variable():
    parse = threads.kernel_threads_from_env
    assert parse(None) is None and parse("") is None and parse("  ") is None
    assert parse("4") == 4 and parse(" 2 ") == 2
    assert parse("auto") == parse("AUTO") == threads.available_cpus()
    for bad in ("0", "-2", "two", "1.5"):
        with pytest.raises(ValueError, match="TWOTOWER_RT_KERNEL_THREADS"):
            parse(bad)
    # At import: the variable, else torch's count (OMP_NUM_THREADS here); a bad value warns.
    code = "from twotower_rt import threads; print(threads.kernel_threads())"
    for value, want, warns in (("3", "3", False), ("x", "2", True), ("", "2", False),
                               (None, "2", False)):  # fmt: skip
        env = {**_env(), "OMP_NUM_THREADS": "2"}
        if value is not None:
            env["TWOTOWER_RT_KERNEL_THREADS"] = value
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env)  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == want
        assert ("TWOTOWER_RT_KERNEL_THREADS must be" in run.stderr) == warns


def test_the_command_line_sets_them(monkeypatch):
    """--kernel-threads wins; else the variable; else one with the kernels' stream (on by
    --kernel-stream, or by its default, auto, where threads.stream_auto holds and no count is
    given); else they follow --threads."""
    from twotower_rt import cli

    calls = []
    monkeypatch.setattr(threads, "set_threads", lambda n: calls.append(("torch", n)) or (n or 7))
    monkeypatch.setattr(threads, "set_kernel_threads", lambda n: calls.append(("kernels", n)))
    monkeypatch.setattr(threads, "set_kernel_stream", lambda on: calls.append(("stream", on)))
    monkeypatch.setattr(cli, "load", lambda *a, **k: "model")
    monkeypatch.delenv("TWOTOWER_RT_KERNEL_STREAM", raising=False)
    parser = argparse.ArgumentParser()
    cli._add_run_flags(parser)
    off, on = ("stream", False), ("stream", True)
    cases = [(["--threads", "3"], None, False, [("torch", 3), off, ("kernels", 3)]),
             ([], None, False, [("torch", None), off, ("kernels", 7)]),
             ([], None, True, [("torch", None), on, ("kernels", 1)]),
             (["--threads", "3"], None, True, [("torch", 3), off, ("kernels", 3)]),
             (["--kernel-stream"], None, False, [("torch", None), on, ("kernels", 1)]),
             (["--kernel-stream", "--kernel-threads", "2"], None, False,
              [("torch", None), on, ("kernels", 2)]),
             (["--threads", "1", "--kernel-threads", "2"], None, True,
              [("torch", 1), off, ("kernels", 2)]),
             (["--threads", "1"], "4", True, [("torch", 1), off])]  # fmt: skip
    for argv, env, auto, want in cases:
        calls.clear()
        monkeypatch.setattr(threads, "stream_auto", lambda auto=auto: auto)
        if env is None:
            monkeypatch.delenv("TWOTOWER_RT_KERNEL_THREADS", raising=False)
        else:
            monkeypatch.setenv("TWOTOWER_RT_KERNEL_THREADS", env)
        assert cli._load("x", parser.parse_args(argv)) == "model"
        assert calls == want, argv


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TWOTOWER_RT_KERNEL_THREADS"}


@pytest.mark.parametrize("rows,k,n", SHAPES + BIG)
def test_projection_bits_do_not_depend_on_the_threads(kernel_threads, rows, k, n):
    x, weight, bias = linear_case(rows, k, n, seed=3)
    weights = (k_major(weight), weight.t().contiguous(), k_major(weight.bfloat16().float()))
    want = [linear_cpu(x, w, b, out_features=n) for w in weights for b in (None, bias)]
    for count in COUNTS:
        kernel_threads(count)
        got = [linear_cpu(x, w, b, out_features=n) for w in weights for b in (None, bias)]
        assert all(torch.equal(a, b) for a, b in zip(got, want)), count


@pytest.mark.parametrize("case", [(8, 192, 128, 256, 2), (8, 192, 128, 0, 2), (7, 129, 64, 19, 3),
                                  (3, 64, 5, 64, 3)])  # fmt: skip
@pytest.mark.parametrize("tokens", [1, 4, 16, 19, 64])
def test_moe_bits_do_not_depend_on_the_threads(kernel_threads, case, tokens):
    weights = moe_case(*case, seed=4)
    names = ("up", "down", "shared_up", "shared_down")
    halves = dataclasses.replace(weights, **{
        f: None if getattr(weights, f) is None else getattr(weights, f).bfloat16() for f in names
    })  # fmt: skip
    x = torch.randn(tokens, case[1], generator=torch.Generator().manual_seed(tokens)) * 2
    want = [moe_forward(x, w) for w in (weights, halves)]
    for count in COUNTS:
        kernel_threads(count)
        assert all(torch.equal(moe_forward(x, w), v) for w, v in zip((weights, halves), want))


@pytest.mark.parametrize("shape", MAMBA_SHAPES)
@pytest.mark.parametrize("b,n", [(1, 16), (1, 1), (3, 16), (2, 5)])
def test_mamba_bits_do_not_depend_on_the_threads(kernel_threads, shape, b, n):
    """One sequence splits its heads, several their rows; with and without the output, ragged."""
    H, P, N, G, K = shape
    weights, conv_dim = mamba_layer(H, P, N, G, K)
    zx, conv, ssm = mamba_inputs(b, n, H, P, N, conv_dim, K)
    ragged = torch.tensor([max(1, n - 2 * r) for r in range(b)])
    calls = [(nv, out) for nv in (None, ragged) for out in (True, False)]

    def run():
        return [mamba_chunk(zx, conv, ssm, weights, nv, with_output=out) for nv, out in calls]

    want = run()
    for count in COUNTS:
        kernel_threads(count)
        for got, ref in zip(run(), want):
            assert all((a is None and r is None) or torch.equal(a, r) for a, r in zip(got, ref))


@pytest.mark.parametrize("shape", ATTENTION_SHAPES + [(1, 16, 6, 2, 32, [300]),
                                                     (3, 16, 6, 2, 32, [5, 300, 0])])  # fmt: skip
@pytest.mark.parametrize("append", [False, True])
def test_attention_bits_do_not_depend_on_the_threads(kernel_threads, shape, append):
    """Its (sequence, KV head) pairs split; an append writes the cache first: the outputs and the
    written caches are the one-thread ones."""
    q, k, v, k_cache, v_cache, lens, slots = attention_case(*shape)
    kw = dict(causal=True, append=True) if append else {}

    def run():
        kc, vc = k_cache.clone(), v_cache.clone()
        return block_attention_cpu(q, kc, vc, lens, k, v, cache_slots=slots, **kw), kc, vc

    want = run()
    for count in COUNTS:
        kernel_threads(count)
        assert all(torch.equal(a, b) for a, b in zip(run(), want))


@pytest.mark.parametrize("mode", ["ar", "mask_diffusion", "verified"])
def test_generation_does_not_depend_on_the_threads(kernel_threads, default_model, mode):
    prompts = [[5, 9, 100, 7, 300, 12], [44, 17, 8], [1000, 3, 250, 9, 9, 71, 20]]
    params = dict(max_new_tokens=32, temperature=0.0)
    if mode != "ar":
        params.update(block_size=16)
    want = default_model.generate(prompts, mode=mode, **params).generated
    kernel_threads(2)
    assert default_model.generate(prompts, mode=mode, **params).generated == want
    # and each prompt alone (the batch-1 shapes)
    assert [default_model.generate([p], mode=mode, **params).generated[0] for p in prompts] == want


def test_two_callers_at_once(kernel_threads):
    """A call made while another thread's call holds the workers runs on its own thread: both
    right, neither waits on the other's tasks."""
    kernel_threads(2)
    cases = [linear_case(16, 192, 2048, seed=s) for s in range(2)]
    kernel_threads(1)
    want = [linear_cpu(x, k_major(w), b) for x, w, b in cases]
    kernel_threads(2)
    got: dict[int, list] = {0: [], 1: []}

    def worker(i):
        x, w, b = cases[i]
        packed = k_major(w)
        for _ in range(200):
            got[i].append(linear_cpu(x, packed, b))

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in ts)
    for i in range(2):
        assert len(got[i]) == 200 and all(torch.equal(g, want[i]) for g in got[i])


FORK_SCRIPT = """
import os, sys, torch
torch.set_num_threads(1)  # no OpenMP pool in the parent: a forked child could hang in it
sys.path.insert(0, sys.argv[1])
from test_linear_cpu import _case
from twotower_rt import threads
from twotower_rt.ops.linear_cpu import k_major, linear_cpu
from twotower_rt.ops.mamba_cpu import mamba_chunk
x, w, b = _case(16, 192, 2048, seed=7)
w = k_major(w)
want = linear_cpu(x, w, b)
threads.set_kernel_threads(2)
assert torch.equal(linear_cpu(x, w, b), want)  # the workers are running
pid = os.fork()
if pid == 0:
    ok = threads.kernel_threads() == 2 and all(torch.equal(linear_cpu(x, w, b), want)
                                               for _ in range(50))
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
assert torch.equal(linear_cpu(x, w, b), want)  # and the parent's workers still run
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_forked_child_gets_its_own_workers():
    """fork() copies only the calling thread: the child must not wait on workers it does not
    have. It starts its own, as many."""
    tests = str(Path(__file__).parent)
    run = subprocess.run([sys.executable, "-c", FORK_SCRIPT, tests], capture_output=True,
                         text=True, timeout=120, env=_env())  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
