"""Per-step cost of the CPU path on the default model: the fast paths against the plain eager path.

    python bench/run.py cpu [--batch 1 16 64] [--reps 15] [--context 64] [--out FILE]

Every step the engine repeats, run through the engine's own step functions on a slot pool whose
sequences hold ``--context`` committed tokens:

- ``ar``: one AR decode step (context tower, one token per row, context head, greedy draw);
- ``denoise``: one denoiser forward over each row's 16-token block with the mask-sampling decision;
- ``commit``: the context pass over a finished 16-token block (the ``context_forward`` of a commit);
- ``mock``: one mock-AR step (context tower + denoiser, one token).

Each step runs ``--reps`` times with the fast paths on and ``--reps`` times with them off
(``twotower_rt.fastpath``: off is the plain eager path, the code as it was before the fast paths),
alternating, after a warm-up of both, with torch on one thread. Reported: the median per step of
the thread's CPU time (``time.thread_time``, robust to other processes on the machine) and of wall
time, and their ratio eager / fast. The ratio is measured in one process at one time, so it is
what to quote; absolute times move with the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

BLOCK = 16
MASK = 3
STEPS = ("ar", "denoise", "commit", "mock")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--reps", type=int, default=15, help="timed runs per step and path")
    parser.add_argument("--context", type=int, default=64, help="committed tokens per row")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")


def _engine(model, batch: int, context: int):
    """An engine whose ``batch`` slots each hold ``context`` committed random tokens, a pending
    token and a fully masked block."""
    from twotower_rt.engine.engine import Engine

    engine = Engine(model, max_slots=batch, context=context + 2 * BLOCK)
    slots = torch.tensor([engine.pool.acquire(seed=i) for i in range(batch)])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (batch, context), generator=g)
    cache = engine.pool.cache.select(slots, max_length=0)
    engine.lm.context_forward(ids, cache)
    engine.pool.cache.store(cache, appended=context)
    engine.pool.tokens[slots] = ids[:, -1]
    engine.pool.blocks(BLOCK)[slots] = MASK
    return engine, slots


def step_functions(engine, slots: torch.Tensor, context: int) -> dict[str, Callable[[], None]]:
    """One callable per step kind; each restores the pool's lengths / block first, so every call
    does the same work."""
    from twotower_rt.engine.steps import StepKey

    pool, run, lm = engine.pool, engine.runner.run, engine.lm
    lengths = pool.cache.lengths.clone()
    greedy = (0.0, None, None)

    def ar():
        pool.cache.lengths.copy_(lengths)
        run(StepKey("ar", greedy), {"slots": slots})

    def mock():
        pool.cache.lengths.copy_(lengths)
        run(StepKey("mock", greedy), {"slots": slots})

    def denoise():
        pool.blocks(BLOCK)[slots] = MASK
        key = StepKey("denoise", (BLOCK, MASK, BLOCK, 0.8, 0.0))
        run(key, {"slots": slots, "step": torch.zeros_like(slots)})

    def commit():
        pool.cache.lengths.copy_(lengths)
        ids = pool.blocks(BLOCK).index_select(0, slots)
        batch = pool.cache.select(slots, max_length=context)
        lm.context_forward(ids, batch)
        pool.cache.store(batch, appended=BLOCK)

    return {"ar": ar, "denoise": denoise, "commit": commit, "mock": mock}


def _timed(fn: Callable[[], None]) -> tuple[float, float]:
    cpu, wall = time.thread_time(), time.perf_counter()
    fn()
    return time.thread_time() - cpu, time.perf_counter() - wall


@torch.inference_mode()
def bench(args) -> dict:
    import twotower_rt
    from twotower_rt import fastpath

    torch.set_num_threads(args.threads)
    model = twotower_rt.load(args.model)
    rows = []
    for batch in args.batch:
        engine, slots = _engine(model, batch, args.context)
        fns = step_functions(engine, slots, args.context)
        for name in STEPS:
            fn = fns[name]
            samples = {True: [], False: []}
            for flag in (True, False, True, False):  # warm-up, both paths
                with fastpath.forced(flag):
                    fn()
            for _ in range(args.reps):
                for flag in (True, False):
                    with fastpath.forced(flag):
                        samples[flag].append(_timed(fn))
            fast_cpu = statistics.median(c for c, _ in samples[True]) * 1e3
            fast_wall = statistics.median(w for _, w in samples[True]) * 1e3
            eager_cpu = statistics.median(c for c, _ in samples[False]) * 1e3
            eager_wall = statistics.median(w for _, w in samples[False]) * 1e3
            rows.append({
                "batch": batch, "step": name,
                "fast_cpu_ms": round(fast_cpu, 3), "eager_cpu_ms": round(eager_cpu, 3),
                "fast_wall_ms": round(fast_wall, 3), "eager_wall_ms": round(eager_wall, 3),
                "speedup_cpu": round(eager_cpu / fast_cpu, 3),
                "speedup_wall": round(eager_wall / fast_wall, 3),
            })  # fmt: skip
        by_step = {r["step"]: r for r in rows if r["batch"] == batch}
        for path in ("fast", "eager"):
            ratio = by_step["denoise"][f"{path}_cpu_ms"] / by_step["ar"][f"{path}_cpu_ms"]
            rows.append({"batch": batch, "step": f"denoise/ar ({path})", "ratio": round(ratio, 3)})
    return {
        "what": "per-step CPU and wall time, fast paths on vs the plain eager path, same run",
        "model": args.model or "default (shipped)",
        "context": args.context,
        "torch_threads": args.threads,
        "reps": args.reps,
        "rows": rows,
    }


def print_table(record: dict) -> None:
    print(
        f"\n{'batch':>5} {'step':<8} {'fast ms':>9} {'eager ms':>9} {'x (cpu)':>8} {'x (wall)':>9}"
    )
    for r in record["rows"]:
        if "ratio" in r:
            print(f"{r['batch']:>5} {r['step']:<28} {r['ratio']:>6.2f}")
            continue
        print(
            f"{r['batch']:>5} {r['step']:<8} {r['fast_cpu_ms']:>9.2f} {r['eager_cpu_ms']:>9.2f} "
            f"{r['speedup_cpu']:>8.2f} {r['speedup_wall']:>9.2f}"
        )
