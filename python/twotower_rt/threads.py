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
