"""What the kernels' stream's bounded queue buys (cpu_fast.STREAM_BOUND_ROWS / STREAM_AHEAD):
mask diffusion on the shipped default model with the bound, without it, and on two kernel
threads in line, side by side in one process, with the page faults and system time of each.

    python bench/cpu_stream_bound.py [--data-dir .data] [--rounds 5] [--prompts 64]
        [--batches 1 4 64] [--json-out bench/results/cpu_stream_bound.json]

Without the bound, a forward whose kernels take longer than its Python (many rows) is queued
whole ahead of the stream's worker, every call's output a fresh allocation held to the forward's
end. For each batch size: ``--prompts`` of evaluate's held-out prompts (evenly spread) in groups
of the batch, mask diffusion at gamma 0.8, 64 new tokens, torch on one thread; a warm-up, then
``--rounds`` rounds in which the three configurations take turns (the order reversed every other
round). Per configuration: the median over rounds of the wall-clock seconds, tokens/s, and the
process's minor page faults and system CPU seconds (``getrusage``) over the round; per batch the
speed of the bound over no bound and over two kernel threads (ratios of the medians). The tokens
are the same in every configuration (tests/test_cpu_stream.py). Where no forward reaches the
bound's rows (batch 1 and 4 with evaluate's 32-token prompts and 16-token blocks: at most 124
rows), the two stream configurations are the same code, and their ratio measures the host's
noise."""

from __future__ import annotations

import argparse
import resource
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
from twotower_rt import _ext, threads  # noqa: E402
from twotower_rt.model import cpu_fast  # noqa: E402
from twotower_rt.train import evaluate as ev  # noqa: E402

GAMMA = 0.8
NO_BOUND = 1 << 62  # a STREAM_BOUND_ROWS no forward reaches


def configurations() -> dict:
    """name -> (evaluate's speed configuration, STREAM_BOUND_ROWS)."""
    return {"stream, bound": (ev.STREAM, cpu_fast.STREAM_BOUND_ROWS),
            "stream, no bound": (ev.STREAM, NO_BOUND),
            "2 kernel threads": (2, cpu_fast.STREAM_BOUND_ROWS)}  # fmt: skip


def measure(model, prompts, batch: int, rounds: int, new_tokens: int = ev.NEW_TOKENS) -> dict:
    """{configuration: {"wall_s", "tok_s", "minor_faults", "system_s", "rounds"}} for mask
    diffusion at ``batch`` (medians over ``rounds`` after a warm-up); the settings put back."""
    groups = [prompts[i : i + batch] for i in range(0, len(prompts) - batch + 1, batch)]
    groups = groups or [prompts]
    tokens = sum(len(g) for g in groups) * new_tokens
    configs = configurations()
    runs = {name: [] for name in configs}
    saved = threads.kernel_stream(), threads.kernel_threads(), cpu_fast.STREAM_BOUND_ROWS
    try:
        for r in range(rounds + 1):  # round 0: the warm-up
            order = list(configs) if r % 2 else list(reversed(configs))
            for name in order:
                config, bound = configs[name]
                ev.set_config(config)
                cpu_fast.STREAM_BOUND_ROWS = bound
                before, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                for group in groups:
                    ev.run_mode(model, group, "mask_diffusion", GAMMA, new_tokens)
                wall = time.perf_counter() - wall
                after = resource.getrusage(resource.RUSAGE_SELF)
                if r:
                    runs[name].append((wall, after.ru_minflt - before.ru_minflt,
                                       after.ru_stime - before.ru_stime))  # fmt: skip
    finally:
        threads.set_kernel_stream(saved[0])
        threads.set_kernel_threads(saved[1])
        cpu_fast.STREAM_BOUND_ROWS = saved[2]
    out = {}
    for name, rows in runs.items():
        wall = statistics.median(w for w, _, _ in rows)
        out[name] = {"wall_s": round(wall, 4), "tok_s": round(tokens / wall, 1),
                     "minor_faults": int(statistics.median(f for _, f, _ in rows)),
                     "system_s": round(statistics.median(s for _, _, s in rows), 3),
                     "rounds": [[round(w, 4), f, round(s, 3)] for w, f, s in rows]}  # fmt: skip
    bound = out["stream, bound"]["wall_s"]
    out["bound_vs_no_bound"] = round(out["stream, no bound"]["wall_s"] / bound, 3)
    out["bound_vs_2_kernel_threads"] = round(out["2 kernel threads"]["wall_s"] / bound, 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=str(REPO / ".data"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 64])
    ap.add_argument("--json-out", default=str(REPO / "bench/results/cpu_stream_bound.json"))
    args = ap.parse_args()
    if _ext.cpu_kernels() is None:
        print("cpu_stream_bound: needs the CPU kernels (twotower_rt._cpu)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    model = twotower_rt.load()
    prompts = ev.timing_prompts(model.tokenizer, args.data_dir, args.prompts)
    results = {}
    for batch in args.batches:
        cell = results[f"batch_{batch}"] = measure(model, prompts, batch, args.rounds)
        print(f"batch {batch}: " + "  ".join(
            f"{name} {c['tok_s']:.0f} tok/s, {c['minor_faults']} faults, {c['system_s']:.2f} s sys"
            for name, c in cell.items() if isinstance(c, dict)
        ) + f"; bound vs no bound {cell['bound_vs_no_bound']}x, vs 2 kernel threads "
            f"{cell['bound_vs_2_kernel_threads']}x", flush=True)  # fmt: skip
    report = {**report_header(), "rounds": args.rounds, "prompts": len(prompts),
              "mode": f"mask_diffusion@{GAMMA}", "stream_bound_rows": cpu_fast.STREAM_BOUND_ROWS,
              "stream_ahead": cpu_fast.STREAM_AHEAD, "results": results}  # fmt: skip
    write_report(args.json_out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
