"""Issue 14's question "does torch.compile pay on the CPU path?", measured on one step.

    python bench/cpu_compile_probe.py [--reps 30] [--out bench/results/cpu_compile_probe.json]

One denoiser forward of the default model at batch 1 (a 16-token block over a 28-token context,
torch on one thread), three ways in one process, alternating per round: the CPU fast path (the
default), the plain eager path (``fastpath.disabled()``) and ``torch.compile`` of the plain eager
path (inductor, static shapes; the fast path's cached constants do not trace). Reported: the
compile time, the median thread CPU time of each, the graph breaks dynamo reports, and whether the
compiled logits are bitwise the eager ones (and their argmax equal).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch._dynamo.utils  # the graph-break counters

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/cpu_compile_probe.json")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import twotower_rt
    from twotower_rt import fastpath
    from twotower_rt.env import cpu_report
    from twotower_rt.generate import _prefill

    model = twotower_rt.load()
    lm = model.lm
    with torch.inference_mode():
        cache, *_ = _prefill(lm, [model.encode("ROMEO. But soft, what light")], 128, False)
        block = torch.full((1, 16), 3)
        block[0, 0] = model.encode("ROMEO")[0]
        t = torch.tensor([15 / 16])

        def fast():
            return lm.denoiser_logits(block, cache, prefix_len=cache.lengths,
                                      mamba_states=cache.mamba, t=t)  # fmt: skip

        def eager():
            with fastpath.disabled():
                return fast()

        torch._dynamo.reset()
        t0 = time.perf_counter()
        compiled = torch.compile(eager, dynamic=False)
        got = compiled()
        compile_s = time.perf_counter() - t0
        breaks = torch._dynamo.utils.counters["graph_break"]
        want = eager()
        times = {"fast": [], "eager": [], "compiled": []}
        fns = {"fast": fast, "eager": eager, "compiled": compiled}
        for _ in range(3):
            for fn in fns.values():
                fn()
        for _ in range(args.reps):
            for name, fn in fns.items():
                c = time.thread_time()
                fn()
                times[name].append((time.thread_time() - c) * 1e3)
    ms = {k: round(statistics.median(v), 3) for k, v in times.items()}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()  # fmt: skip
    record = {
        "what": __doc__.strip().splitlines()[0],
        "command": "python bench/cpu_compile_probe.py --reps " + str(args.reps),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_report(),
            "torch": torch.__version__,
            "torch_threads": 1,
        },  # fmt: skip
        "compile_seconds": round(compile_s, 1),
        "median_cpu_ms": ms,
        "compiled_vs_fast": round(ms["fast"] / ms["compiled"], 3),
        "compiled_vs_eager": round(ms["eager"] / ms["compiled"], 3),
        "graph_breaks": {k.splitlines()[0]: v for k, v in breaks.items()},
        "bitwise_equal_to_eager": bool(torch.equal(got, want)),
        "max_abs_diff": float((got - want).abs().max()),
        "argmax_equal": bool(torch.equal(got.argmax(-1), want.argmax(-1))),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
