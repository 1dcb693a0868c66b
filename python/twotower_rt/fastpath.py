"""The switch for the CPU fast paths: the same numbers as the plain PyTorch references, with fewer
and cheaper ops (a token loop of one op per token in the seeded scan, a 4-tap conv as a sum, the MoE
experts without host round trips, fused norms).

On by default. ``TWOTOWER_RT_FAST_PATH=0`` in the environment, :func:`set_enabled` or the
:func:`disabled` context manager turn them off, which leaves the plain eager path: what the
benchmark (``bench/run.py cpu``) times side by side, and what the tests compare against.

Each fast path is exact where its docstring says so (bitwise equal to its reference, tested), or
else states its tolerance; none of them changes which row's numbers depend on which other rows, so
a sequence's output never depends on what it is batched with.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

_enabled = os.environ.get("TWOTOWER_RT_FAST_PATH", "1").strip().lower() not in ("0", "off", "false")


def enabled() -> bool:
    """Whether the CPU fast paths run."""
    return _enabled


def set_enabled(flag: bool) -> None:
    global _enabled
    _enabled = bool(flag)


@contextlib.contextmanager
def forced(flag: bool) -> Iterator[None]:
    """Run the block with the fast paths on (True) or off (False), then restore the switch."""
    global _enabled
    before = _enabled
    _enabled = bool(flag)
    try:
        yield
    finally:
        _enabled = before


def disabled() -> contextlib.AbstractContextManager[None]:
    """Run the block on the plain eager path (the references), then restore the switch."""
    return forced(False)
