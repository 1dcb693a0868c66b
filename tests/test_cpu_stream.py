"""The CPU kernels' stream (csrc/cpu/cpu_stream.cpp, _ext.cpu_stream, threads.set_kernel_stream):
each forward's kernel calls queued on a worker thread while Python goes on, the waiting thread
and the idle worker sharing big calls; the residual kernel that lets a whole layer stack be
queued. The numbers must not change: generation with the stream is token for token the same as
without, at any batch, thread count, and from several threads or a forked child at once."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
from fractions import Fraction

import numpy as np
import pytest
import torch

import twotower_rt
from twotower_rt import _ext, env
from twotower_rt.ops.rmsnorm import residual_add_cpu
from twotower_rt.threads import kernel_stream, kernel_threads, set_kernel_stream, set_kernel_threads

C = _ext.cpu_kernels()
pytestmark = pytest.mark.skipif(C is None, reason="the CPU kernels are not built")

PROMPTS = [[5, 17, 300, 42, 9, 77, 1200, 8], [64, 952, 11], [100, 200, 300, 400, 500, 6]]
MODES = [("ar", {}), ("mask_diffusion", {"block_size": 16, "confidence_threshold": 0.8}),
         ("verified", {"block_size": 16})]  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return twotower_rt.load()


@pytest.fixture
def stream():
    """The stream on for the test, the settings restored after it."""
    before, threads = kernel_stream(), kernel_threads()
    set_kernel_stream(True)
    try:
        yield
    finally:
        set_kernel_stream(before)
        set_kernel_threads(threads)


def generate_all(model, batch: int) -> dict:
    out = {}
    for mode, params in MODES:
        rows = []
        for i in range(0, len(PROMPTS), batch):
            rows += model.generate(PROMPTS[i : i + batch], mode=mode, max_new_tokens=32,
                                   temperature=0.0, **params).generated  # fmt: skip
        out[mode] = rows
    return out


def fma32(x: float, g: float, y: float) -> np.float32:
    """x + g * y rounded once to float32 (exact rational arithmetic, nearest, ties to even)."""
    exact = Fraction(x) + Fraction(g) * Fraction(y)
    guess = np.float32(float(exact))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess,
                  np.nextafter(guess, np.float32(np.inf))]  # fmt: skip
    best = min(abs(Fraction(float(c)) - exact) for c in candidates)
    near = [c for c in candidates if abs(Fraction(float(c)) - exact) == best]
    if len(near) == 1:
        return near[0]
    return next(c for c in near if int(c.view(np.uint32)) % 2 == 0)  # the tie: even mantissa


@pytest.mark.parametrize("b,n,hidden", [(1, 16, 192), (3, 5, 37), (2, 1, 20)])
def test_residual_add_rounds_once(b, n, hidden):
    """x + gate * y with one rounding per element (checked against exact rational arithmetic),
    the gate a strided (b, 1, hidden) view as the denoiser's modulation gives it; x + y without
    a gate."""
    g = torch.Generator().manual_seed(b * 100 + n)
    x = torch.randn(b, n, hidden, generator=g) * 3
    y = torch.randn(b, n, hidden, generator=g) * 0.1
    table = torch.randn(b, 3, hidden, generator=g)
    gate = table[:, 2, None]  # row stride 3 * hidden
    out = residual_add_cpu(x, y, gate)
    xs, ys, gs = x.numpy(), y.numpy(), gate.numpy()
    expected = np.empty_like(xs)
    for i, j, k in np.ndindex(*xs.shape):
        expected[i, j, k] = fma32(float(xs[i, j, k]), float(gs[i, 0, k]), float(ys[i, j, k]))
    assert np.array_equal(out.numpy().view(np.uint32), expected.view(np.uint32))
    assert torch.equal(residual_add_cpu(x, y, None), x + y)


def test_residual_add_refuses_bad_inputs():
    x = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match="residual_add"):
        residual_add_cpu(x, torch.zeros(2, 8, 4).transpose(1, 2), None)  # not contiguous
    with pytest.raises(ValueError, match="residual_add"):
        residual_add_cpu(x, torch.zeros(2, 4, 9), None)
    with pytest.raises(ValueError, match="residual_add"):
        residual_add_cpu(x, x, torch.zeros(2, 8))  # gate (b, hidden), not (b, 1, hidden)
    with pytest.raises(ValueError, match="residual_add"):
        residual_add_cpu(x.double(), x.double(), None)


@pytest.mark.parametrize("threads", [1, 2])
def test_stream_generates_the_same_tokens(model, stream, threads):
    """Every mode, at batch 1 and 3, token for token what it writes without the stream, with the
    kernels on one thread (the stream's worker and the waiting caller share the big calls) and on
    two (the pool's worker beside them)."""
    set_kernel_stream(False)
    set_kernel_threads(1)
    expected = generate_all(model, 1)
    set_kernel_stream(True)
    set_kernel_threads(threads)
    for batch in (1, 3):
        assert generate_all(model, batch) == expected


def test_stream_bounded_generates_the_same_tokens(model, stream, monkeypatch):
    """With every forward's queue bounded (cpu_fast.STREAM_BOUND_ROWS down to one row, and the
    held tensors checked at every call), each mode still writes the same tokens: a wait lets go
    only of what the calls already run held."""
    from twotower_rt.model import cpu_fast

    set_kernel_stream(False)
    set_kernel_threads(1)
    expected = generate_all(model, 3)
    set_kernel_stream(True)
    monkeypatch.setattr(cpu_fast, "STREAM_BOUND_ROWS", 1)
    monkeypatch.setattr(cpu_fast, "STREAM_AHEAD", 0)
    monkeypatch.setattr(_ext, "_KEEP_CHECK", 1)
    assert generate_all(model, 3) == expected


def test_stream_drain_bounds_what_is_held(stream, monkeypatch):
    """A scope with max_ahead: when more calls than that are queued, the next kernel call waits
    for them and what was held for them is let go (the list of held tensors stays short), and
    the results are those of the calls in line; without it a scope holds every call's tensors."""
    monkeypatch.setattr(_ext, "_KEEP_CHECK", 1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 512, 4096, generator=g), torch.randn(1, 512, 4096, generator=g)
    expected = x.clone()
    for _ in range(12):
        expected = expected + y
    for max_ahead, short in ((0, True), (None, False)):
        longest = 0
        with _ext.cpu_stream(max_ahead):
            out = x
            for _ in range(12):  # each call a few ms: the worker falls behind the loop
                out = residual_add_cpu(out, y, None)
                longest = max(longest, len(_ext._stream_local.keep))
        assert torch.equal(out, expected)
        assert (longest < 12 * 4) == short, (max_ahead, longest)  # keep(x, y, gate, out) per call
    assert C.stream_drain_if_behind(0) is False  # outside a scope: nothing to wait for
    with pytest.raises(ValueError, match="max_pending"):
        C.stream_drain_if_behind(-1)


def test_stream_with_a_mamba_last_and_a_dense_layer(stream):
    """A stack whose last mixing layer is a Mamba layer (the denoiser's row selection then reads
    that layer's output: Tower.mix waits for the stream first) and with a dense MLP layer (its
    relu^2 between two kernel projections is a PyTorch op): the same tokens as without it."""
    from twotower_rt.api import TwoTowerModel
    from twotower_rt.train.model_init import SIZES, config_of, new_model

    dims = {**SIZES["tiny"], "hybrid_override_pattern": "M*E-ME", "intermediate_size": 96}
    lm = new_model(config_of(dims, 2048, "<test>"), seed=3)
    assert lm.denoiser_tower.layers[lm.denoiser_tower.last_mixer].kind == "mamba"
    small = TwoTowerModel(lm, "<test>")
    outputs = {}
    for on in (False, True):
        set_kernel_stream(on)
        outputs[on] = generate_all(small, 3)
    assert outputs[True] == outputs[False]


def test_stream_scope_queues_and_waits(stream):
    """Inside a scope kernel calls are queued (the thread's flag is up, the tensors they use are
    held); stream_wait lets PyTorch read their outputs; the end waits and drops what it held.
    Scopes nest: only the outermost waits and ends."""
    x, y = torch.randn(1, 16, 192), torch.randn(1, 16, 192)
    with _ext.cpu_stream() as queued:
        assert queued and C.stream_active()
        out = residual_add_cpu(x, y, None)
        assert any(t is out for t in _ext._stream_local.keep)
        with _ext.cpu_stream():
            twice = residual_add_cpu(out, y, None)
        assert C.stream_active()
        _ext.stream_wait()
        assert torch.equal(out, x + y)
    assert not C.stream_active() and _ext._stream_local.keep is None
    assert torch.equal(twice, (x + y) + y)
    set_kernel_stream(False)
    with _ext.cpu_stream() as queued:
        assert not queued and not C.stream_active()


def test_stream_error_reaches_the_scope_end(stream):
    """A queued call's error is raised when the scope ends (ValueError, the kernel's message);
    the thread's later calls in that scope are skipped; the next scope runs normally."""
    x, y = torch.randn(3, 192), torch.randn(3, 192)
    late = torch.full((3, 192), float("nan"))
    with pytest.raises(ValueError, match="rows must be a multiple of rows_per_seq"):
        with _ext.cpu_stream():
            _ext.keep(x, y, late)
            C.residual_add(x.data_ptr(), y.data_ptr(), 0, x.data_ptr(), 3, 192, 2, 0)  # bad
            C.residual_add(x.data_ptr(), y.data_ptr(), 0, late.data_ptr(), 3, 192, 1, 0)
    assert late.isnan().all()  # skipped after the error
    with _ext.cpu_stream():
        out = residual_add_cpu(x[None], y[None], None)
    assert torch.equal(out[0], x + y)


@pytest.mark.parametrize("queued", [True, False])
def test_two_threads_generate_their_own_tokens(model, stream, queued):
    """Two Python threads generating on one model at once each get their own tokens, with the
    stream (one worker for both) and without. (The verified mode's rollback recorded the context
    tower's in_proj outputs by hooks on the model, which took the other thread's too.)"""
    set_kernel_stream(queued)
    set_kernel_threads(1)
    expected = generate_all(model, 1)
    results, errors = {}, []

    def run(name):
        try:
            results[name] = generate_all(model, 1)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert not errors and all(not w.is_alive() for w in workers)
    assert results[0] == expected and results[1] == expected


def _child(model, queue):
    queue.put(model.generate([PROMPTS[0]], mode="mask_diffusion", max_new_tokens=16,
                             temperature=0.0, block_size=16).generated)  # fmt: skip


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_stream_in_a_forked_child(model, stream):
    """A child forked after the parent's stream started starts its own worker (the parent's
    thread does not exist there) instead of waiting for it forever. (torch on one thread: its
    OpenMP pool does not survive fork() either.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = model.generate([PROMPTS[0]], mode="mask_diffusion", max_new_tokens=16,
                                  temperature=0.0, block_size=16).generated  # fmt: skip
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_child, args=(model, queue))
        child.start()
        try:
            got = queue.get(timeout=120)
        finally:
            child.join(timeout=60)
            if child.is_alive():
                child.kill()
    finally:
        torch.set_num_threads(threads)
    assert got == expected and child.exitcode == 0


def test_kernel_stream_setting_and_report():
    """set_kernel_stream takes a bool; TWOTOWER_RT_KERNEL_STREAM=1 turns it on at import; the
    CPU report (every benchmark's record, `env`) says whether it is on."""
    with pytest.raises(ValueError, match="True or False"):
        set_kernel_stream(1)
    before = kernel_stream()
    try:
        assert set_kernel_stream(True) is True
        report = env.cpu_report("")
        assert report["cpu_kernel_stream"] is True
        assert "kernel stream on" in env.format_cpu(report)
        set_kernel_stream(False)
        assert env.cpu_report("")["cpu_kernel_stream"] is False
    finally:
        set_kernel_stream(before)
    code = "from twotower_rt.threads import kernel_stream; print(kernel_stream())"
    environ = {**os.environ, "TWOTOWER_RT_KERNEL_STREAM": "1"}
    environ = {**os.environ, "TWOTOWER_RT_KERNEL_STREAM": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=environ, check=True)  # fmt: skip
    assert run.stdout.strip() == "True"


def test_kernel_stream_from_env():
    """TWOTOWER_RT_KERNEL_STREAM's words: auto / on / off and their 1 / true / 0 / false
    spellings, any case and padding; unset or blank is None; anything else is an error."""
    from twotower_rt.threads import kernel_stream_from_env

    for value, want in [("auto", "auto"), (" AUTO ", "auto"), ("on", "on"), ("1", "on"),
                        ("True", "on"), ("off", "off"), ("0", "off"), ("false", "off"),
                        (None, None), ("", None), ("  ", None)]:  # fmt: skip
        assert kernel_stream_from_env(value) == want, value
    for bad in ("yes", "2", "onn"):
        with pytest.raises(ValueError, match="TWOTOWER_RT_KERNEL_STREAM must be"):
            kernel_stream_from_env(bad)


def _import_settings(cpus: int, **environ) -> tuple[str, str]:
    """(stdout, stderr) of a child that limits itself to ``cpus`` CPUs, imports twotower_rt with
    ``environ`` and prints its stream setting and kernel threads."""
    code = (f"import os; os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:{cpus}]); "
            "from twotower_rt.threads import kernel_stream, kernel_threads; "
            "print(kernel_stream(), kernel_threads())")  # fmt: skip
    env_ = {k: v for k, v in os.environ.items() if not k.startswith("TWOTOWER_RT_KERNEL")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env_, **environ}, check=True)  # fmt: skip
    return run.stdout.strip(), run.stderr


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no affinity call")
def test_kernel_stream_env_at_import():
    """At import, TWOTOWER_RT_KERNEL_STREAM=auto turns the stream on with exactly two CPUs
    (then with one kernel thread, unless TWOTOWER_RT_KERNEL_THREADS says otherwise) and leaves it
    off with one; =on turns it on anywhere; a bad value warns and leaves it off; unset is off."""
    assert _import_settings(1, TWOTOWER_RT_KERNEL_STREAM="auto")[0].startswith("False")
    assert _import_settings(1)[0].startswith("False")
    assert _import_settings(1, TWOTOWER_RT_KERNEL_STREAM="on")[0] == "True 1"
    out, err = _import_settings(1, TWOTOWER_RT_KERNEL_STREAM="sometimes")
    assert out.startswith("False") and "TWOTOWER_RT_KERNEL_STREAM must be" in err
    if len(os.sched_getaffinity(0)) >= 2:
        assert _import_settings(2, TWOTOWER_RT_KERNEL_STREAM="auto")[0] == "True 1"
        assert _import_settings(2, TWOTOWER_RT_KERNEL_STREAM="auto",
                                TWOTOWER_RT_KERNEL_THREADS="2")[0] == "True 2"  # fmt: skip
        assert _import_settings(2)[0].startswith("False")


def test_cli_kernel_stream_default(monkeypatch):
    """The command line's --kernel-stream: on / off when given; otherwise
    TWOTOWER_RT_KERNEL_STREAM, else auto, which is on only where threads.stream_auto holds and
    no thread or process count is given (--threads, --kernel-threads, TWOTOWER_RT_KERNEL_THREADS,
    --tp, --ray)."""
    from twotower_rt import cli, threads

    parser = cli.build_parser()
    monkeypatch.delenv("TWOTOWER_RT_KERNEL_STREAM", raising=False)
    monkeypatch.delenv("TWOTOWER_RT_KERNEL_THREADS", raising=False)

    def decide(*flags):
        return cli._kernel_stream(parser.parse_args(["generate", "--prompt", "x", *flags]))

    for auto in (True, False):
        monkeypatch.setattr(threads, "stream_auto", lambda auto=auto: auto)
        assert decide() is auto
        assert decide("--kernel-stream") is True
        assert decide("--no-kernel-stream") is False
        assert decide("--threads", "2") is False
        assert decide("--kernel-threads", "2") is False
        assert decide("--threads", "2", "--kernel-stream") is True
        monkeypatch.setenv("TWOTOWER_RT_KERNEL_THREADS", "2")
        assert decide() is False
        monkeypatch.delenv("TWOTOWER_RT_KERNEL_THREADS")
        monkeypatch.setenv("TWOTOWER_RT_KERNEL_STREAM", "off")
        assert decide() is False and decide("--kernel-stream") is True
        monkeypatch.setenv("TWOTOWER_RT_KERNEL_STREAM", "on")
        assert decide() is True and decide("--no-kernel-stream") is False
        monkeypatch.setenv("TWOTOWER_RT_KERNEL_STREAM", "auto")
        assert decide() is auto
        monkeypatch.setenv("TWOTOWER_RT_KERNEL_STREAM", "bogus")
        with pytest.raises(ValueError, match="TWOTOWER_RT_KERNEL_STREAM must be"):
            decide()
        monkeypatch.delenv("TWOTOWER_RT_KERNEL_STREAM")
    monkeypatch.setattr(threads, "stream_auto", lambda: True)
    serve = parser.parse_args(["serve", "--tp", "2"])
    assert cli._kernel_stream(serve) is False
    assert cli._kernel_stream(parser.parse_args(["serve"])) is True
    batch = parser.parse_args(["batch", "in.jsonl", "out.jsonl", "--ray"])
    assert cli._kernel_stream(batch) is False


def test_stream_auto():
    """auto means exactly two CPUs for this process, and the kernels built."""
    from twotower_rt import threads

    assert threads.stream_auto() == (threads.available_cpus() == 2)


def test_startup_summary_names_cpu_threads(model, stream):
    """serve's and batch's first line says, on the CPU, torch's and the kernels' threads and
    whether the kernels' stream is on."""
    from twotower_rt.api import startup_summary

    line = startup_summary(model)
    assert f"threads: torch {torch.get_num_threads()}, kernels {kernel_threads()}" in line
    assert line.endswith(", kernel stream on")
    set_kernel_stream(False)
    assert "kernel stream" not in startup_summary(model)


def test_env_reports_the_commands_stream(monkeypatch):
    """`twotower-rt env` says what generate / batch / serve will do about the stream, and why
    (a bad TWOTOWER_RT_KERNEL_STREAM is reported, not raised)."""
    from twotower_rt import threads

    monkeypatch.delenv("TWOTOWER_RT_KERNEL_STREAM", raising=False)
    monkeypatch.delenv("TWOTOWER_RT_KERNEL_THREADS", raising=False)
    monkeypatch.setattr(threads, "stream_auto", lambda: True)
    assert env._commands_kernel_stream() == "on (auto: 2 CPUs)"
    assert "generate / batch / serve: kernel stream on (auto: 2 CPUs)" in env.format_report()
    monkeypatch.setenv("TWOTOWER_RT_KERNEL_THREADS", "2")
    assert env._commands_kernel_stream().startswith("off (auto: a thread or process count")
    monkeypatch.setenv("TWOTOWER_RT_KERNEL_STREAM", "on")
    assert env._commands_kernel_stream() == "on (TWOTOWER_RT_KERNEL_STREAM=on)"
    monkeypatch.setenv("TWOTOWER_RT_KERNEL_STREAM", "maybe")
    assert env._commands_kernel_stream().startswith("error: TWOTOWER_RT_KERNEL_STREAM must be")
    monkeypatch.delenv("TWOTOWER_RT_KERNEL_STREAM")
    monkeypatch.delenv("TWOTOWER_RT_KERNEL_THREADS")
    monkeypatch.setattr(threads, "stream_auto", lambda: False)
    assert env._commands_kernel_stream().startswith("off (auto: ")
