"""Two builds of the CPU kernels, end to end: this checkout's ``twotower_rt._cpu`` against another
build of it, alternating in one process.

    python bench/kernels_ab.py BEFORE_SO [--data-dir .data] [--prompts 16] [--rounds 5]
        [--json-out bench/results/kernels_ab.json]

BEFORE_SO is the other build's ``_cpu*.so`` (build the older commit, copy its ``_cpu*.so`` out of
site-packages before rebuilding). It is loaded beside the installed one and swapped in as the
kernels ``_ext`` hands out; everything else (the Python, the model) is the same object. Three
timings, the builds alternating in each:

1. a projection (``ops.linear_cpu``) alone on the default model's shapes with bfloat16 weights,
   one kernel thread, in 16-float vectors (AVX-512 CPUs) and in 8-float ones (forced: what AVX2
   CPUs run), medians of microseconds, and whether both builds give the same bits;
2. and 3. ``bench/unused_work_ab.py``'s cases and clocks: the commit pass and denoiser forwards
   at batch 1 (thread CPU time, one kernel thread), then ``generate`` for ``ar`` and mask
   diffusion at gamma 0.8 over held-out prompts (process CPU time on one kernel thread, wall time
   on two), the tokens checked equal on both sides.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import importlib.util
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
from unused_work_ab import ab  # noqa: E402

from twotower_rt import _ext  # noqa: E402
from twotower_rt.ops.linear_cpu import k_major, linear_cpu  # noqa: E402
from twotower_rt.threads import set_kernel_threads  # noqa: E402

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


# (rows, in, out): a Mamba in_proj at an AR step, at a denoiser forward and at a 512-token prefill
# chunk; an out_proj and the head at a denoiser forward.
SHAPES = [(1, 192, 902), (16, 192, 902), (512, 192, 902), (16, 384, 192), (16, 192, 2048)]


def time_projections(side, rounds: int) -> dict:
    """Microseconds per ``linear_cpu`` call on each side, medians of ``rounds`` x 8 (20 calls
    each), the sides alternating; and whether the two sides' outputs are equal."""
    set_kernel_threads(1)
    wide = _ext.cpu_kernels().wide_vectors()
    g = torch.Generator().manual_seed(0)
    rows = {}
    for floats in (16, 8) if wide else (8,):
        for r, k, n in SHAPES:
            x = torch.randn(r, k, generator=g)
            w = k_major(torch.randn(n, k, generator=g).bfloat16().float())
            assert w.dtype == torch.bfloat16
            samples, outs = {s: [] for s in SIDES}, {}
            for i in range(rounds * 8 + 1):  # 0: the warm-up
                for s in SIDES:
                    with side(s):
                        C = _ext.cpu_kernels()
                        C.set_wide_vectors(int(floats == 16))
                        try:
                            outs[s] = linear_cpu(x, w, out_features=n)
                            t0 = time.perf_counter()
                            for _ in range(20):
                                linear_cpu(x, w, out_features=n)
                            if i:
                                samples[s].append((time.perf_counter() - t0) / 20 * 1e6)
                        finally:
                            C.set_wide_vectors(-1)
            before, after = (statistics.median(samples[s]) for s in SIDES)
            same = torch.equal(outs["before"], outs["after"])
            name = f"{r} x {k} x {n}, {floats}-float vectors"
            rows[name] = {"before_us": round(before, 2), "after_us": round(after, 2),
                          "speedup": round(before / after, 3),
                          "gmac_s_after": round(r * k * n / after / 1e3, 1),
                          "same_bits": same}  # fmt: skip
            print(name, rows[name], flush=True)
    return rows


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
    projections = time_projections(side, args.rounds)
    ab(args, "batch 1, the default model, two builds of the CPU kernels (before: "
             f"{Path(args.before_so).name} of another build; after: this checkout's), "
             "alternating in one process: commit pass and denoiser forward (thread CPU time, "
             "one kernel thread), and generate (64 new tokens per prompt)",
       side=side, sides=SIDES, extra={"projections_us": projections})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
