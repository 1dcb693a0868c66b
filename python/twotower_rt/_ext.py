"""The compiled extensions, if there are any, and why not if there are none.

``twotower_rt._C`` (the CUDA kernels) is optional: without it (no CUDA compiler at build time, or
``TWOTOWER_RT_BUILD_CUDA=OFF``) every op runs its PyTorch path. Importing it needs no GPU and no
driver. ``twotower_rt._cpu`` (the CPU kernels, built wherever a C++ compiler is, unless
``TWOTOWER_RT_BUILD_CPU=OFF``) is optional too: without it the CPU runs its PyTorch fast paths.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
import warnings
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch

_C: ModuleType | None
_import_error: str | None

try:
    _C = importlib.import_module("twotower_rt._C")
except ModuleNotFoundError as exc:
    if exc.name != "twotower_rt._C":
        raise
    _C = None
    _import_error = (
        "twotower_rt._C is not built: the package was installed without its CUDA extension "
        "(no CUDA compiler at build time, or TWOTOWER_RT_BUILD_CUDA=OFF)"
    )
except ImportError as exc:  # built, but it does not load (ABI, missing library, ...)
    _C = None
    _import_error = f"twotower_rt._C failed to import: {exc}"
else:
    _import_error = None

_loaded: tuple[ModuleType | None, str | None] = (_C, _import_error)


def _import_cpu() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module("twotower_rt._cpu"), None
    except ModuleNotFoundError as exc:
        if exc.name != "twotower_rt._cpu":
            raise
        return None, (
            "twotower_rt._cpu is not built: the package was installed without its CPU kernels "
            "(no C++ compiler at build time, or TWOTOWER_RT_BUILD_CPU=OFF)"
        )
    except ImportError as exc:
        return None, f"twotower_rt._cpu failed to import: {exc}"


_CPU, _cpu_error = _import_cpu()
_cpu_loaded = (_CPU, _cpu_error)


def _stream_from_env() -> bool:
    """The kernels' stream at import: TWOTOWER_RT_KERNEL_STREAM (``threads.kernel_stream_from_env``;
    ``auto`` is ``threads.stream_auto``), else off. A bad value warns and leaves it off."""
    from .threads import available_cpus, kernel_stream_from_env

    try:
        choice = kernel_stream_from_env(os.environ.get("TWOTOWER_RT_KERNEL_STREAM"))
    except ValueError as exc:
        warnings.warn(f"twotower_rt: {exc}; the CPU kernels' stream stays off", stacklevel=2)
        return False
    if choice == "auto":  # (threads.stream_auto, before this module is complete)
        return _CPU is not None and available_cpus() == 2
    return choice == "on"


def _kernel_threads_from_env(stream: bool) -> None:
    """The CPU kernels' threads at import: TWOTOWER_RT_KERNEL_THREADS, else one with the stream
    on (its worker and the waiting thread are the two), else torch's thread count (its default,
    or OMP_NUM_THREADS as Ray and batch schedulers set it). A bad value warns and falls back:
    an import should not fail on it."""
    from .threads import kernel_threads_from_env

    try:
        threads = kernel_threads_from_env(os.environ.get("TWOTOWER_RT_KERNEL_THREADS"))
    except ValueError as exc:
        warnings.warn(f"twotower_rt: {exc}; the CPU kernels follow torch's thread count",
                      stacklevel=2)  # fmt: skip
        threads = None
    if _CPU is not None:
        _CPU.set_threads(threads or (1 if stream else max(1, torch.get_num_threads())))


_stream = [_stream_from_env()]
_kernel_threads_from_env(_stream[0])


def set_kernels_enabled(enabled: bool) -> None:
    """Turn the compiled kernels off (every op takes its PyTorch path, as without ``_C``) or back
    on: for the plain-PyTorch baseline of a benchmark, or to rule the kernels out when debugging.
    Ops read this at each call."""
    global _C, _import_error, _CPU, _cpu_error
    if enabled:
        _C, _import_error = _loaded
        _CPU, _cpu_error = _cpu_loaded
    else:
        _C, _import_error = None, "the compiled kernels are turned off (set_kernels_enabled)"
        _CPU, _cpu_error = None, _import_error


# --- the CPU kernels' stream ------------------------------------------------------------------
# csrc/include/twotower_rt/cpu_stream.h: inside ``cpu_stream()`` the calling thread's kernel calls
# are queued on one worker thread and run there in order, while Python goes on to the next call;
# the scope's end waits for them. The Python between the kernels of a forward then runs on one
# core while the kernels run on another. The numbers do not change (the same calls, in the same
# order). Off by default in the library; ``threads.set_kernel_stream`` or
# TWOTOWER_RT_KERNEL_STREAM=on|auto (read above, into ``_stream``) turn it on. The command line's
# default is auto (cli.py: _load).
_stream_local = threading.local()


def stream_enabled() -> bool:
    """Whether :func:`cpu_stream` queues (the setting, and the kernels built)."""
    return _stream[0] and _CPU is not None


def set_stream_enabled(enabled: bool) -> None:
    _stream[0] = bool(enabled)
    module = _cpu_loaded[0]
    if module is not None:  # the calls outside a scope share with the worker only while it is on
        module.stream_set_sharing(_stream[0])


set_stream_enabled(_stream[0])  # TWOTOWER_RT_KERNEL_STREAM's, into the kernels too


@contextlib.contextmanager
def cpu_stream(max_ahead: int | None = None) -> Iterator[bool]:
    """Queue the calling thread's CPU kernel calls of the block on the kernels' stream and wait
    for them at its end (raising the first kernel error as ValueError); yields whether it queues
    (False: the stream is off, the calls run as usual). Inside it no kernel output may be read:
    a PyTorch op on one reads memory the worker may not have written yet. Every op wrapper
    passes the tensors a call reads and writes to :func:`keep`, which holds them until the end
    (Python would otherwise free a temporary whose call has not run yet). Scopes nest.

    ``max_ahead`` (the outermost scope's counts): at most that many calls may wait in the queue
    when this thread queues the next one; more, and it waits for them all (helping with them) and
    lets go of what it held. For calls whose kernels take longer than their Python (many rows);
    None: no bound."""
    lib = _CPU
    if lib is None or not _stream[0]:
        yield False
        return
    outer = getattr(_stream_local, "keep", None) is None
    if outer:
        _stream_local.keep = []
        _stream_local.max_ahead = max_ahead
        _stream_local.check_at = _KEEP_CHECK if max_ahead is not None else -1
    lib.stream_begin()
    try:
        yield True
    finally:
        try:
            lib.stream_end()
        finally:
            if outer:
                _stream_local.keep = None


def stream_wait() -> None:
    """Inside a :func:`cpu_stream` scope of this thread, wait until its queued kernel calls have
    run, so that a PyTorch op may read their outputs (the scope stays open); nothing outside one.
    What :func:`keep` held for them is let go."""
    held = getattr(_stream_local, "keep", None)
    if held is not None and _CPU is not None:
        _CPU.stream_wait()
        held.clear()


# With a scope's max_ahead, keep() asks every _KEEP_CHECK tensors held whether more than that
# many calls are still queued. Where the kernels are slower than the Python (a forward over many
# rows), the caller would otherwise queue a whole forward ahead, each call's output a fresh
# allocation held to the scope's end: on the 2-core VM mask diffusion at batch 64 then made ~7x
# the page faults and ~10x the system time of the kernels in line, and ran 0.8x as fast.
_KEEP_CHECK = 16


def keep(*tensors) -> None:
    """Hold ``tensors`` until the enclosing :func:`cpu_stream` scope ends (nothing outside one),
    or until a wait has seen the calls queued before them run (then the caller's next call, for
    which they are passed, has not been queued yet: they are held again)."""
    held = getattr(_stream_local, "keep", None)
    if held is None:
        return
    held.extend(tensors)
    if 0 <= _stream_local.check_at <= len(held):
        if _CPU.stream_drain_if_behind(_stream_local.max_ahead):
            held[:] = tensors
        _stream_local.check_at = len(held) + _KEEP_CHECK


@contextlib.contextmanager
def kernels_disabled() -> Iterator[None]:
    """Run the block with the compiled kernels off (:func:`set_kernels_enabled`), then turn them
    back on."""
    set_kernels_enabled(False)
    try:
        yield
    finally:
        set_kernels_enabled(True)


def cpu_kernels() -> ModuleType | None:
    """``twotower_rt._cpu``, or None when it is not there (or the kernels are turned off)."""
    return _CPU


def cpu_kernels_module() -> ModuleType | None:
    """``twotower_rt._cpu`` as loaded, even while the kernels are turned off
    (:func:`set_kernels_enabled`): for settings such as its threads."""
    return _cpu_loaded[0]


def cpu_kernels_error() -> str | None:
    """Why ``twotower_rt._cpu`` is unavailable, or None when it is available."""
    return _cpu_error


def extension_available() -> bool:
    """True when ``twotower_rt._C`` imported (says nothing about a GPU being present)."""
    return _C is not None


def extension_error() -> str | None:
    """Why ``twotower_rt._C`` is unavailable, or None when it is available."""
    return _import_error


def extension_module() -> ModuleType | None:
    return _C


@functools.cache
def extension_info() -> dict[str, Any]:
    """``{"available": bool, "error": str | None, **build_info}``; archs like ``["90a"]``."""
    info: dict[str, Any] = {
        "available": _C is not None,
        "error": _import_error,
        "cpu_kernels": _CPU is not None,
        "cpu_kernels_error": _cpu_error,
    }
    if _C is not None:
        info.update(_C.build_info())
        info["cuda_driver_version"] = _C.cuda_driver_version()
    return info


def _parse_arch(arch: str) -> tuple[int, int, bool]:
    """``"90a"`` -> ``(9, 0, True)``: major, minor, arch-specific."""
    specific = arch.endswith(("a", "f"))
    digits = arch.rstrip("af")
    return int(digits[:-1]), int(digits[-1]), specific


def arch_runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether cubin built for ``arch`` (no PTX) loads on a GPU of ``capability``.

    Arch-specific targets (``90a``) run only on that exact chip; plain ones (``80``) on the same
    major version with an equal or newer minor.
    """
    major, minor, specific = _parse_arch(arch)
    if specific:
        return capability == (major, minor)
    return capability[0] == major and capability[1] >= minor


def built_archs() -> list[str]:
    return list(extension_info().get("archs", [])) if _C is not None else []


def _sm(arch_or_capability: str | tuple[int, int]) -> str:
    if isinstance(arch_or_capability, tuple):
        return f"sm_{arch_or_capability[0]}{arch_or_capability[1]}"
    return f"sm_{arch_or_capability}"


@functools.cache
def _device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def cuda_unsupported_reason(device: torch.device, op: str | None = None) -> str | None:
    """Why the extension's kernels (or, given its name, the kernel ``op``) cannot run on
    ``device``; None when they can."""
    if device.type != "cuda":
        return f"tensor is on {device.type}, the CUDA kernels need a CUDA tensor"
    if _C is None:
        return _import_error
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = _device_capability(index)
    archs = built_archs()
    if not any(arch_runs_on(arch, capability) for arch in archs):
        built = ", ".join(_sm(a) for a in archs) or "no architecture"
        return (
            f"the CUDA kernels are built for {built}; {_device_name(index)} (cuda:{index}) "
            f"is {_sm(capability)}"
        )
    if op is not None and not hasattr(_C, op):
        return (
            f"twotower_rt._C was built without {op} (the attention and MoE kernels need the "
            "CUTLASS headers at build time)"
        )
    return None


def op_backend(
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    ref: str,
    kernel_dtypes: tuple[torch.dtype, ...],
    what: str = "",
    op: str | None = None,
) -> tuple[str, str]:
    """``(backend, reason)`` for an op on ``dtype`` tensors on ``device``: ``"cuda"`` (the
    twotower_rt._C kernel), ``"torch"`` (its PyTorch reference, named ``ref``) or ``"none"`` (no
    such device here). ``what`` names the kernel's dtype-checked input in messages ("logits");
    ``op``, the kernel's name in _C, which a build may lack."""
    device = torch.device(device)
    if device.type != "cuda":
        return "torch", f"{device.type} tensors run {ref}"
    if not torch.cuda.is_available():
        if extension_available():
            archs = ", ".join(f"sm_{a}" for a in built_archs())
            return "none", f"no CUDA device visible to PyTorch (the kernel is built for {archs})"
        return "none", f"no CUDA device visible to PyTorch; {extension_error()}"
    names = " and ".join(_dtype_name(d) for d in kernel_dtypes)
    suffix = f" {what}" if what else ""
    reason = cuda_unsupported_reason(device, op)
    if reason is None and dtype not in kernel_dtypes:
        reason = f"the kernel takes {names}{suffix}, not {_dtype_name(dtype)}"
    if reason is not None:
        return "torch", f"{reason}: PyTorch path ({ref})"
    return "cuda", f"twotower_rt._C kernel ({', '.join(map(_dtype_name, kernel_dtypes))}{suffix})"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def require_cuda_op(name: str, tensor: torch.Tensor) -> ModuleType:
    """The ``_C`` module, or a RuntimeError saying why op ``name`` cannot run on ``tensor``."""
    reason = cuda_unsupported_reason(tensor.device)
    if reason is not None:
        raise RuntimeError(f"twotower_rt: CUDA op {name!r} cannot run: {reason}")
    assert _C is not None
    return _C
