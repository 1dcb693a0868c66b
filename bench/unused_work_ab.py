"""What skipping unread work buys: the commit pass and the denoiser forward with and without it.

    python bench/unused_work_ab.py [--data-dir .data] [--prompts 16] [--rounds 5]
        [--json-out bench/results/unused_work_ab.json]

Two skips, both bitwise (tests/test_unused_work.py):

- a context pass whose hidden states nobody reads (a block commit, a prefill chunk) stops once the
  cache is written: the last attention layer writes its K/V and nothing after it runs (in the
  default model's ``MEM*EMEM*E``: that layer's attention and o_proj, the last MoE, norm_f);
- a denoiser forward runs the layers after its last attention layer (o_proj, the last MoE, norm_f,
  the head) only on the positions still masked.

"Off" is the code before them, put back in this process: ``context_forward`` always asked for its
hidden states, ``cpu_fast.needed_positions`` answering None (the tail over every position; the
head still on the masked rows alone, as before). Both sides run alternating in one process, torch
and the CPU kernels on one thread, each side's step timed by the thread's CPU time over 5 calls
(medians of ``--rounds`` x 8); then ``generate`` over ``--prompts`` held-out prompts (evaluate's,
evenly spread, 64 new tokens, batch 1) for ``ar`` and mask diffusion at gamma 0.8, process CPU time
on one kernel thread and wall time on two, the sides and modes alternating, ``--rounds`` rounds
after a warm-up. The tokens are checked equal on both sides.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
from cpu_steps import BLOCK, MASK  # noqa: E402
from cpu_steps import _engine as engine_with_context  # noqa: E402
from issue15_distill import report_header, write_report  # noqa: E402

import twotower_rt  # noqa: E402
from twotower_rt.model import cpu_fast  # noqa: E402
from twotower_rt.model.tower import TwoTowerLM  # noqa: E402
from twotower_rt.threads import set_kernel_threads  # noqa: E402
from twotower_rt.train import evaluate as ev  # noqa: E402

SIDES = ("off", "on")


@contextlib.contextmanager
def side(name: str):
    """``on``: the code as it is; ``off``: both skips undone (see the module docstring)."""
    if name == "on":
        yield
        return
    forward, positions = TwoTowerLM.context_forward, cpu_fast.needed_positions

    def full_pass(self, ids, cache, n_valid=None, *, hidden=True):
        return forward(self, ids, cache, n_valid, hidden=True)

    TwoTowerLM.context_forward, cpu_fast.needed_positions = full_pass, lambda needed: None
    try:
        yield
    finally:
        TwoTowerLM.context_forward, cpu_fast.needed_positions = forward, positions


def step_cases(model) -> dict:
    """Callables of one batch-1 step each, on an engine whose slot holds 64 committed tokens: the
    commit pass, and a denoiser forward with k of its 16 positions masked (the last k: a block
    decoded left to right leaves its end masked)."""
    from twotower_rt.engine.steps import StepKey

    engine, slots = engine_with_context(model, 1, 64)
    pool, lm = engine.pool, engine.lm
    lengths = pool.cache.lengths.clone()
    words = torch.randint(4, model.config.vocab_size, (1, BLOCK),
                          generator=torch.Generator().manual_seed(0))  # fmt: skip

    def commit():
        pool.cache.lengths.copy_(lengths)
        batch = pool.cache.select(slots, max_length=64)
        lm.context_forward(pool.blocks(BLOCK).index_select(0, slots), batch, hidden=False)
        pool.cache.store(batch, appended=BLOCK)

    def denoise(k):
        block = words.clone()
        block[:, BLOCK - k :] = MASK

        def run():
            pool.blocks(BLOCK)[slots] = block
            key = StepKey("denoise", (BLOCK, MASK, BLOCK, 0.8, 0.0))
            engine.runner.run(key, {"slots": slots, "step": torch.zeros_like(slots)})

        return run

    return {"commit pass": commit, **{f"denoise, {k} of 16 masked": denoise(k) for k in (16, 8, 4)}}


def time_steps(model, rounds: int, side=side, sides=SIDES) -> dict:
    """Each case's step on each side (``side(name)``: a context manager), alternating; the first
    of ``sides`` is the baseline."""
    cases = step_cases(model)
    set_kernel_threads(1)
    samples = {(name, s): [] for name in cases for s in sides}
    for r in range(rounds * 8 + 1):  # round 0: the warm-up
        for name, fn in cases.items():
            for s in sides:
                with side(s):
                    t0 = time.thread_time()
                    for _ in range(5):
                        fn()
                    if r:
                        samples[(name, s)].append((time.thread_time() - t0) / 5)
    rows = {}
    a, b = sides
    for name in cases:
        off, on = (statistics.median(samples[(name, s)]) * 1e3 for s in sides)
        rows[name] = {f"{a}_ms": round(off, 3), f"{b}_ms": round(on, 3),
                      "speedup": round(off / on, 3)}  # fmt: skip
        print(f"{name:26s} {a} {off:.3f} ms  {b} {on:.3f} ms  {off / on:.3f}x", flush=True)
    return rows


def time_generate(model, prompts, rounds: int, side=side, sides=SIDES) -> dict:
    modes = (("ar", None), ("mask_diffusion", 0.8))
    tokens = len(prompts) * ev.NEW_TOKENS

    def once(mode, gamma, threads):
        clock = time.process_time if threads == 1 else time.perf_counter
        t0, out = clock(), []
        for p in prompts:
            out.append(ev.run_mode(model, [p], mode, gamma, ev.NEW_TOKENS)[0].generated[0])
        return clock() - t0, out

    times, seen = {}, {}
    for r in range(rounds + 1):
        for threads in (1, 2):
            set_kernel_threads(threads)
            for mode, gamma in modes:
                for s in sides:
                    with side(s):
                        t, out = once(mode, gamma, threads)
                    seen.setdefault((mode, s), out)
                    if r:
                        times.setdefault((threads, mode, s), []).append(t)
    same = all(seen[(m, sides[0])] == seen[(m, sides[1])] for m, _ in modes)
    rows = {}
    for threads in (1, 2):
        row = {}
        for mode, _ in modes:
            for s in sides:
                row[f"{mode} {s} tok/s"] = round(
                    tokens / statistics.median(times[(threads, mode, s)])
                )
        for s in sides:
            row[f"mask_diffusion / ar, {s}"] = round(
                row[f"mask_diffusion {s} tok/s"] / row[f"ar {s} tok/s"], 3
            )
        key = "1 kernel thread (process CPU tok/s)" if threads == 1 else "2 kernel threads (wall)"
        rows[key] = row
        print(key, row, flush=True)
    return {"same_tokens": same, "rates": rows}


def ab(args, what: str, side=side, sides=SIDES, extra=None) -> None:
    """Both timings of ``sides`` (``args``: data_dir, prompts, rounds, json_out), one report."""
    torch.set_num_threads(1)
    model = twotower_rt.load()
    with torch.inference_mode():
        steps = time_steps(model, args.rounds, side=side, sides=sides)
    prompts = ev.timing_prompts(model.tokenizer, args.data_dir, args.prompts)
    generate = time_generate(model, prompts, args.rounds, side=side, sides=sides)
    write_report(args.json_out, {
        **report_header(),
        "what": what,
        "prompts": len(prompts),
        "rounds": args.rounds,
        **(extra or {}),
        "steps_ms": steps,
        "generate": generate,
    })  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=".data")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json-out", default="bench/results/unused_work_ab.json")
    args = ap.parse_args()
    ab(args, "batch 1, the default model: commit pass and denoiser forward (thread CPU time, one "
             "kernel thread), and generate (64 new tokens per prompt), with the skips of unread "
             "work off (the code before) and on, alternating in one process")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
