"""The CPU kernels' vector width, side by side: 8 floats (what CPUs without AVX-512 run since the
kernels took their width from the CPU) against 16 (what every CPU ran before), forced with
``twotower_rt._cpu.set_wide_vectors``. Both give the same bits (tests/test_cpu_clones.py), so this
is a pure speed A/B; on an AVX-512 CPU the 16-float row is what it runs.

    python bench/cpu_vector_width.py [--data-dir .data] [--rounds 2] [--prompts 16]
        [--json-out bench/results/cpu_vector_width.json]

1. A projection (``ops.linear_cpu``) of the default model's widest shapes at 1, 16 and 512 rows,
   one kernel thread, each width and ``torch.mm`` (MKL) beside it: microseconds, medians.
2. ``train.evaluate.measure_speed`` at batch 1 (``ar`` and ``mask_diffusion`` at gamma 0.8) on
   the default model over ``--prompts`` of evaluate's timed prompts, the kernels on one thread and
   on two; the widths take turns, ``--rounds`` times each.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
from issue15_distill import report_header, write_report  # noqa: E402

import twotower_rt  # noqa: E402
from twotower_rt import _ext  # noqa: E402
from twotower_rt.ops import linear_cpu  # noqa: E402
from twotower_rt.threads import set_kernel_threads  # noqa: E402
from twotower_rt.train import evaluate as ev  # noqa: E402

WIDTHS = {8: 0, 16: 1}  # floats per vector -> set_wide_vectors
SHAPES = [(192, 902), (384, 192), (192, 2048)]  # Mamba in_proj, out_proj, the LM head
MODES = [("ar", None), ("mask_diffusion", 0.8)]


def time_us(fn, reps: int, inner: int) -> float:
    """Median microseconds per call over ``reps`` timings of ``inner`` calls, after a warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t) / inner * 1e6)
    return statistics.median(times)


def projections(C) -> list[dict]:
    set_kernel_threads(1)
    rows_out = []
    for rows in (1, 16, 512):
        for k, n in SHAPES:
            x, w = torch.randn(rows, k), torch.randn(n, k)
            weight = linear_cpu.k_major(w)
            row = {"rows": rows, "in": k, "out": n}
            inner = max(1, 2000 // rows)
            for width, flag in WIDTHS.items():
                C.set_wide_vectors(flag)
                kernel = functools.partial(linear_cpu.run, C, x, weight, None, n)
                row[f"us_{width}"] = time_us(kernel, reps=7, inner=inner)
            C.set_wide_vectors(-1)
            row["us_mkl"] = time_us(lambda x=x, w=w: torch.mm(x, w.t()), reps=7, inner=inner)
            row["speedup_8_over_16"] = row["us_16"] / row["us_8"]
            print(row, flush=True)
            rows_out.append(row)
    return rows_out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=".data")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--json-out", default="bench/results/cpu_vector_width.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    C = _ext.cpu_kernels()
    if C is None:
        raise SystemExit(f"no CPU kernels: {_ext.cpu_kernels_error()}")
    ops = projections(C)
    model = twotower_rt.load(None, device="cpu", dtype="float32")
    prompts = ev.timing_prompts(model.tokenizer, args.data_dir, args.prompts)
    runs = {width: [] for width in WIDTHS}
    try:
        for r in range(args.rounds):
            for width, flag in WIDTHS.items():
                C.set_wide_vectors(flag)
                with contextlib.redirect_stdout(io.StringIO()):
                    s = ev.measure_speed(model, prompts, ev.NEW_TOKENS, 3, (1, 2), MODES,
                                         batches=(1,))  # fmt: skip
                row = {f"{mode}_{rate}_{k}": s[k]["batch_1"][mode][rate]
                       for k, rate in ((1, "cpu_tok_s"), (2, "tok_s"))
                       for mode in ("ar", "mask_diffusion@0.8")}  # fmt: skip
                runs[width].append(row)
                print(f"round {r}, {width}-float vectors: {row}", flush=True)
    finally:
        C.set_wide_vectors(-1)
    summary = {
        key: statistics.median(a[key] / b[key] for a, b in zip(runs[8], runs[16]))
        for key in runs[8][0]
    }
    print("8-float over 16-float vectors (median of the rounds):", summary)
    write_report(args.json_out, {
        **report_header(),
        "issue": "15 (the speed comparison on this CPU)",
        "wide_vectors_by_default": C.wide_vectors(),
        "projections_us": ops,
        "batch_1_tok_s": runs,
        "speedup_8_over_16": summary,
        "prompts": args.prompts,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
