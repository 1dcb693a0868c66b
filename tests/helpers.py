"""Helpers shared by the test modules (not tests themselves).

- ``raw_view`` and ``install_fake_extension``: the CPU tests of the CUDA wrappers' plumbing put a
  stand-in for ``twotower_rt._C`` in place that reads the raw pointers and strides it is handed.
- ``assert_frequencies``: the samplers' distribution check.
- ``subprocess_env``, ``free_port``, ``wait_for_health``: tests that run ``python -m twotower_rt``
  in a child process (the CLI, batch, servers).
"""

import ctypes
import importlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def raw_view(ptr: int, shape, strides, dtype: torch.dtype) -> torch.Tensor:
    """The memory at raw address ``ptr`` as a tensor of ``shape`` / ``strides`` (elements)."""
    size = torch.empty((), dtype=dtype).element_size()
    numel = 1 + sum((n - 1) * st for n, st in zip(shape, strides))
    buffer = (ctypes.c_char * (numel * size)).from_address(ptr)
    return torch.frombuffer(buffer, dtype=dtype).as_strided(shape, strides)


def install_fake_extension(monkeypatch, fake, op_module: str | None = None):
    """Make the wrappers call ``fake`` instead of twotower_rt._C on CPU tensors: it replaces
    ``_ext.require_cuda_op`` and the CUDA stream/device queries (a 132-SM device), and, given the
    op's module name, that module's ``_kernel_unsupported_reason`` (so the wrapper takes its CUDA
    path).
    Returns ``fake``."""
    from twotower_rt import _ext

    monkeypatch.setattr(_ext, "require_cuda_op", lambda name, tensor: fake)
    monkeypatch.setattr(
        torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0)
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    props = SimpleNamespace(multi_processor_count=132, name="fake H100")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    if op_module is not None:
        module = importlib.import_module(op_module)
        monkeypatch.setattr(module, "_kernel_unsupported_reason", lambda *args: None)
    return fake


def assert_frequencies(counts, probs, sigmas=5.0):
    """Observed counts within ``sigmas`` binomial standard deviations of probs * n, and never a
    zero-probability token."""
    n = counts.sum()
    expected = probs * n
    std = torch.sqrt(n * probs * (1 - probs)).clamp_min(1e-9)
    assert torch.all((counts - expected).abs() <= sigmas * std + 1e-9), (counts, expected)
    assert torch.all(counts[probs == 0] == 0)


def subprocess_env(single_thread: bool = True) -> dict[str, str]:
    """The environment for ``python -m twotower_rt``: as is when the package the tests imported is
    the one a fresh interpreter finds (installed), else with its folder on PYTHONPATH.
    ``single_thread``: OMP_NUM_THREADS=1 (children beside the test process on 2 cores crawl)."""
    import twotower_rt

    env = dict(os.environ)
    probe = "import importlib.util as u; s = u.find_spec('twotower_rt'); print(s and s.origin)"
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           env=env, check=True).stdout.strip()  # fmt: skip
    here = Path(twotower_rt.__file__).resolve()
    if found == "None" or Path(found).resolve() != here:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(here.parents[1]),
                                                          env.get("PYTHONPATH")]))  # fmt: skip
    if single_thread:
        env["OMP_NUM_THREADS"] = "1"
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(proc: subprocess.Popen, port: int, timeout: float) -> None:
    """Until GET /health on 127.0.0.1:port answers 200; fails if ``proc`` exits or time runs out."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, f"the server did not come up in {timeout:g} s"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
