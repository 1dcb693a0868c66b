"""Two builds of the CPU kernels, end to end: this checkout's ``twotower_rt._cpu`` against another
build of it, alternating in one process.

    python bench/kernels_ab.py BEFORE_SO [--data-dir .data] [--prompts 16] [--rounds 5]
        [--json-out bench/results/kernels_ab.json]

BEFORE_SO is the other build's ``_cpu*.so`` (build the older commit, copy its ``_cpu*.so`` out of
site-packages before rebuilding). It is loaded beside the installed one and swapped in as the
kernels ``_ext`` hands out; everything else (the Python, the model) is the same object. The cases
and clocks are ``bench/unused_work_ab.py``'s: the commit pass and denoiser forwards at batch 1
(thread CPU time, one kernel thread), then ``generate`` for ``ar`` and mask diffusion at gamma 0.8
over held-out prompts (process CPU time on one kernel thread, wall time on two); the tokens are
checked equal on both sides, the kernels being meant to give the same bits.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "bench"))

from unused_work_ab import ab  # noqa: E402

from twotower_rt import _ext  # noqa: E402

SIDES = ("before", "after")


def load_build(path: str):
    """The extension module at ``path``, under a name of its own (its init is ``PyInit__cpu``)."""
    loader = importlib.machinery.ExtensionFileLoader("kernels_ab_before._cpu", path)
    spec = importlib.util.spec_from_file_location("kernels_ab_before._cpu", path, loader=loader)
    if spec is None:
        raise SystemExit(f"not an extension module: {path}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def make_side(before):
    """``side(name)``: the installed kernels for "after", ``before``'s for "before" (with the
    installed build's thread count)."""

    @contextlib.contextmanager
    def side(name: str):
        if name == "after":
            yield
            return
        cpu, loaded = _ext._CPU, _ext._cpu_loaded
        before.set_threads(loaded[0].threads())
        _ext._CPU, _ext._cpu_loaded = before, (before, None)
        try:
            yield
        finally:
            _ext._CPU, _ext._cpu_loaded = cpu, loaded

    return side


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before_so", help="the other build's _cpu*.so")
    ap.add_argument("--data-dir", default=".data")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json-out", default="bench/results/kernels_ab.json")
    args = ap.parse_args()
    if _ext.cpu_kernels() is None:
        raise SystemExit(f"no CPU kernels installed: {_ext.cpu_kernels_error()}")
    side = make_side(load_build(args.before_so))
    ab(args, "batch 1, the default model, two builds of the CPU kernels (before: "
             f"{Path(args.before_so).name} of another build; after: this checkout's), "
             "alternating in one process: commit pass and denoiser forward (thread CPU time, "
             "one kernel thread), and generate (64 new tokens per prompt)",
       side=side, sides=SIDES)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
