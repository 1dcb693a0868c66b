"""How many CPU threads torch may use: the CPUs this process may run on, unless told otherwise.

torch's default is every core of the machine, whatever the process's affinity (taskset, cgroups
cpusets) allows; on a shared or pinned machine its OpenMP threads then compete for too few cores,
and a small job runs 10-100x slower. ``set_threads(None)`` uses the affinity instead.
"""

from __future__ import annotations

import os

import torch


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), or os.cpu_count() where the OS has
    no affinity call."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads`` (None: :func:`available_cpus`); returns the
    number set. ValueError for a count below 1."""
    if threads is None:
        threads = available_cpus()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def kernel_threads() -> int:
    """Threads the CPU kernels (``twotower_rt._cpu``) use, the calling thread included: from
    import on ``TWOTOWER_RT_KERNEL_THREADS``, else torch's thread count then; then whatever
    :func:`set_kernel_threads` set."""
    from . import _ext

    module = _ext.cpu_kernels_module()
    return 1 if module is None else module.threads()


def set_kernel_threads(threads: int | None = None) -> int:
    """Let the CPU kernels split a call over ``threads`` threads (None: :func:`available_cpus`);
    returns the number set (1 where the kernels are not built).

    A projection splits its outputs, an MoE layer its routing and experts, a Mamba layer its heads
    or sequences, the attention its (sequence, KV head) pairs; each output is computed as one
    thread computes it, so results are bitwise the same at every count. Calls under ~96 K
    multiply-adds (most of an AR step's at batch 1) stay on the calling thread. Between calls a
    worker spins up to ~2 ms before it sleeps, so the cores it takes are busy while a model runs.
    Separate from torch's threads (:func:`set_threads`), which the kernels do not use."""
    if threads is None:
        threads = available_cpus()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"kernel threads must be an integer >= 1, got {threads!r}")
    from . import _ext

    module = _ext.cpu_kernels_module()
    if module is None:
        return 1
    module.set_threads(threads)
    return threads


STREAM_CHOICES = ("auto", "on", "off")


def stream_auto() -> bool:
    """What ``auto`` means for the kernels' stream: on where this process may run on exactly two
    CPUs (:func:`available_cpus`) and the kernels are built. There the stream's worker and the
    calling thread take the two cores, and on the 2-core VM it was measured on it beat two kernel
    threads in line at batch 1 and 4 and about matched them at batch 64 (mask diffusion; `ar`
    gained there too: ``bench/results/cpu_stream.json``); with one CPU the two threads would
    share it, and with more the kernel threads have cores to use."""
    from . import _ext

    return _ext.cpu_kernels() is not None and available_cpus() == 2


def kernel_stream_from_env(value: str | None) -> str | None:
    """``TWOTOWER_RT_KERNEL_STREAM``: ``auto``, ``on`` (or 1 / true) or ``off`` (or 0 / false),
    returned as one of :data:`STREAM_CHOICES`; None when unset or empty. ValueError otherwise."""
    if value is None or not value.strip():
        return None
    word = value.strip().lower()
    word = {"1": "on", "true": "on", "0": "off", "false": "off"}.get(word, word)
    if word not in STREAM_CHOICES:
        raise ValueError(f"TWOTOWER_RT_KERNEL_STREAM must be auto, on/1/true or off/0/false, got "
                         f"{value!r}")  # fmt: skip
    return word


def resolve_kernel_stream(flag: bool | None = None, counts_given: bool = False) -> tuple[bool, str]:
    """What a command (generate, batch, serve) does about the kernels' stream: (on, why). ``flag``:
    its --kernel-stream / --no-kernel-stream (None: neither), then TWOTOWER_RT_KERNEL_STREAM, then
    ``auto``: on where :func:`stream_auto` holds, unless a thread or process count is given
    (``counts_given``: --threads, --kernel-threads, --tp, --ray; or TWOTOWER_RT_KERNEL_THREADS).
    ValueError for a bad TWOTOWER_RT_KERNEL_STREAM (the command line is explicit)."""
    if flag is not None:
        return flag, "--kernel-stream" if flag else "--no-kernel-stream"
    choice = kernel_stream_from_env(os.environ.get("TWOTOWER_RT_KERNEL_STREAM"))
    if choice is not None and choice != "auto":
        return choice == "on", f"TWOTOWER_RT_KERNEL_STREAM={choice}"
    if counts_given or os.environ.get("TWOTOWER_RT_KERNEL_THREADS", "").strip():
        return False, "auto: a thread or process count is given"
    if stream_auto():
        return True, "auto: 2 CPUs"
    return False, f"auto: {available_cpus()} CPU(s), not 2, or no CPU kernels"


def kernel_stream() -> bool:
    """Whether the CPU kernels run on their stream (:func:`set_kernel_stream`)."""
    from . import _ext

    return _ext.stream_enabled()


def set_kernel_stream(enabled: bool) -> bool:
    """Queue each forward's CPU kernel calls on one worker thread (``_ext.cpu_stream``), which
    runs them while the calling thread goes on with the Python between them: on two cores the
    two overlap, where otherwise each waits for the other. The numbers do not change (the same
    calls in the same order). Off by default in the library (TWOTOWER_RT_KERNEL_STREAM=on or auto
    sets it at import, see :func:`kernel_stream_from_env`); the command line's default is
    ``auto`` (:func:`stream_auto`). Between calls the worker spins up to ~2 ms before it sleeps.
    Returns the setting in effect (False where the kernels are not built). With the stream on,
    one kernel thread (:func:`set_kernel_threads`) is the usual setting: the worker and the
    thread that waits for it are the two."""
    from . import _ext

    if not isinstance(enabled, bool):
        raise ValueError(f"set_kernel_stream takes True or False, got {enabled!r}")
    _ext.set_stream_enabled(enabled)
    return _ext.stream_enabled()


def kernel_threads_from_env(value: str | None) -> int | None:
    """``TWOTOWER_RT_KERNEL_THREADS``: an integer >= 1, or ``auto`` (the affinity's CPUs); None
    when unset or empty. ValueError otherwise."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.lower() == "auto":
        return available_cpus()
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"TWOTOWER_RT_KERNEL_THREADS must be an integer >= 1 or 'auto', got "
                         f"{value!r}")  # fmt: skip
    return threads
