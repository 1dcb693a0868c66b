"""Per-step cost of the CPU path on the default model: the fast paths against the plain eager path.

    python bench/run.py cpu [--batch 1 16 64] [--reps 15] [--context 64] [--out FILE]

Every step the engine repeats, run through the engine's own step functions on a slot pool whose
sequences hold ``--context`` committed tokens:

- ``ar``: one AR decode step (context tower, one token per row, context head, greedy draw);
- ``denoise``: one denoiser forward over each row's 16-token block with the mask-sampling decision;
- ``commit``: the context pass over a finished 16-token block (the ``context_forward`` of a commit);
- ``mock``: one mock-AR step (context tower + denoiser, one token).

Each step runs ``--reps`` times on each of three paths, alternating, after a warm-up of all, with
torch on one thread: ``fast`` (the fast paths with the CPU kernels of ``twotower_rt._cpu``, where
built: what runs by default), ``fast_no_kernels`` (the fast paths in PyTorch ops alone) and
``eager`` (``twotower_rt.fastpath`` off: the plain eager path, the code as it was before the fast
paths); and, with ``--kernel-threads N`` > 1 (default 2), ``fast_threads``: ``fast`` with the
CPU kernels on N threads (``threads.set_kernel_threads``; the other paths on one). Reported: the
median per step of the thread's CPU time (``time.thread_time``, robust to other processes on the
machine) and of wall time, and the ratios eager / fast and fast_no_kernels / fast; for
``fast_threads`` wall time alone (the calling thread's CPU time leaves the workers' out). The
ratios are measured in one process at one time, so they are what to quote; absolute times move
with the machine.
"""

from __future__ import annotations

import argparse
import contextlib
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
    parser.add_argument("--kernel-threads", type=int, default=2,
                        help="a fourth path: fast with the CPU kernels on this many threads "
                             "(timed by wall-clock; 1: no such path)")  # fmt: skip


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
        lm.context_forward(ids, batch, hidden=False)
        pool.cache.store(batch, appended=BLOCK)

    return {"ar": ar, "denoise": denoise, "commit": commit, "mock": mock}


# fast: the fast paths with the CPU kernels (twotower_rt._cpu, where built); fast_no_kernels: the
# fast paths in PyTorch ops alone; eager: the plain eager path (the code before the fast paths).
PATHS = ("fast", "fast_no_kernels", "eager")


def macs_per_token(cfg, context: int) -> dict[str, int]:
    """Multiply-adds of one token through a tower and its head, from the config: the
    projections, the active experts (top-k routed + shared + router), the attention over
    ``context`` earlier tokens, the conv and the scan; norms and elementwise maps left out."""
    h, kinds = cfg.hidden_size, cfg.layer_kinds
    macs = {"mamba": 0, "attention": 0, "moe": 0, "mlp": 0}
    H, P, N = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    for kind in kinds:
        if kind == "mamba":  # in_proj, out_proj, the conv, the scan (decay, input, output)
            macs[kind] += (h * cfg.mamba_in_proj_dim + cfg.mamba_d_inner * h
                           + cfg.mamba_conv_dim * cfg.conv_kernel + 3 * H * P * N)  # fmt: skip
        elif kind == "attention":  # q, k, v, o; q.k and p.v over the context
            qo = cfg.num_attention_heads * cfg.head_dim
            macs[kind] += h * qkv + qo * h + 2 * qo * context
        elif kind == "moe":
            macs[kind] += (h * cfg.n_routed_experts
                           + cfg.num_experts_per_tok * 2 * h * cfg.moe_intermediate_size
                           + cfg.n_shared_experts * 2 * h
                           * cfg.moe_shared_expert_intermediate_size)  # fmt: skip
        else:
            macs[kind] += 2 * h * cfg.intermediate_size
    macs["head"] = h * cfg.vocab_size
    macs["total"] = sum(macs.values())
    return macs


def matmul_peak_gflops(threads: int, size: int = 768, reps: int = 5) -> float:
    """This CPU's fp32 matmul rate on ``threads`` threads (median of ``reps`` square matmuls
    of ``size``), in GFLOP/s: the rate no step can beat."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    clock = time.thread_time if threads == 1 else time.perf_counter
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t0 = clock()
        torch.mm(a, b)
        times.append(clock() - t0)
    return 2 * size**3 / statistics.median(times) / 1e9


def arithmetic_floor(cfg, context: int, threads: int, ar_ms: float) -> dict:
    """How cheap a batch-1 denoiser forward can get next to an AR step: it does the AR step's
    work for 16 tokens instead of one, so with the same per-step overhead it costs at least an AR
    step plus 15 tokens' arithmetic at the peak matmul rate."""
    macs = macs_per_token(cfg, context + BLOCK)
    peak = matmul_peak_gflops(threads)
    extra_ms = (BLOCK - 1) * 2 * macs["total"] / (peak * 1e9) * 1e3
    return {
        "what": "denoise/ar floor at batch 1: (ar step + 15 tokens of arithmetic at this CPU's "
        "peak fp32 matmul rate) / ar step",
        "macs_per_token": macs,
        "peak_matmul_gflops": round(peak, 1),
        "extra_tokens_ms_at_peak": round(extra_ms, 3),
        "ar_fast_cpu_ms": round(ar_ms, 3),
        "denoise_over_ar_floor": round((ar_ms + extra_ms) / ar_ms, 3),
    }


def _path(path: str, kernel_threads: int) -> contextlib.ExitStack:
    from twotower_rt import _ext, fastpath, threads

    threads.set_kernel_threads(kernel_threads if path == "fast_threads" else 1)
    path = "fast" if path == "fast_threads" else path
    stack = contextlib.ExitStack()
    if path != "fast":
        stack.enter_context(_ext.kernels_disabled())
    stack.enter_context(fastpath.forced(path != "eager"))
    return stack


def _timed(fn: Callable[[], None]) -> tuple[float, float]:
    cpu, wall = time.thread_time(), time.perf_counter()
    fn()
    return time.thread_time() - cpu, time.perf_counter() - wall


@torch.inference_mode()
def bench(args) -> dict:
    import twotower_rt
    from twotower_rt import _ext

    torch.set_num_threads(args.threads)
    model = twotower_rt.load(args.model)
    paths = PATHS + (("fast_threads",) if args.kernel_threads > 1 else ())
    rows = []
    for batch in args.batch:
        engine, slots = _engine(model, batch, args.context)
        fns = step_functions(engine, slots, args.context)
        for name in STEPS:
            fn = fns[name]
            samples = {path: [] for path in paths}
            for path in paths * 2:  # warm-up, every path
                with _path(path, args.kernel_threads):
                    fn()
            for _ in range(args.reps):
                for path in paths:
                    with _path(path, args.kernel_threads):
                        samples[path].append(_timed(fn))
            cpu = {p: statistics.median(c for c, _ in samples[p]) * 1e3 for p in paths}
            wall = {p: statistics.median(w for _, w in samples[p]) * 1e3 for p in paths}
            threaded = {}
            if "fast_threads" in paths:  # (the main thread's CPU time misses the workers')
                threaded = {
                    "fast_threads_wall_ms": round(wall["fast_threads"], 3),
                    "threads_speedup_wall": round(wall["fast"] / wall["fast_threads"], 3),
                }
            rows.append({
                "batch": batch, "step": name,
                "fast_cpu_ms": round(cpu["fast"], 3), "eager_cpu_ms": round(cpu["eager"], 3),
                "fast_wall_ms": round(wall["fast"], 3), "eager_wall_ms": round(wall["eager"], 3),
                "speedup_cpu": round(cpu["eager"] / cpu["fast"], 3),
                "speedup_wall": round(wall["eager"] / wall["fast"], 3),
                "fast_no_kernels_cpu_ms": round(cpu["fast_no_kernels"], 3),
                "kernels_speedup_cpu": round(cpu["fast_no_kernels"] / cpu["fast"], 3),
                **threaded,
            })  # fmt: skip
        by_step = {r["step"]: r for r in rows if r["batch"] == batch}
        for path in ("fast", "eager"):
            ratio = by_step["denoise"][f"{path}_cpu_ms"] / by_step["ar"][f"{path}_cpu_ms"]
            rows.append({"batch": batch, "step": f"denoise/ar ({path})", "ratio": round(ratio, 3)})
        if "fast_threads" in paths:
            key = "fast_threads_wall_ms"
            ratio = by_step["denoise"][key] / by_step["ar"][key]
            name = f"denoise/ar (fast, {args.kernel_threads} kernel threads, wall)"
            rows.append({"batch": batch, "step": name, "ratio": round(ratio, 3)})
    floor = None
    if 1 in args.batch:
        ar = next(r for r in rows if r["batch"] == 1 and r["step"] == "ar")
        floor = arithmetic_floor(model.config, args.context, args.threads, ar["fast_cpu_ms"])
    return {
        "what": "per-step CPU and wall time, fast paths on (with and without the CPU kernels) vs "
        "the plain eager path, same run",
        "cpu_kernels": _ext.cpu_kernels() is not None,
        "model": args.model or "default (shipped)",
        "context": args.context,
        "torch_threads": args.threads,
        "kernel_threads": {"fast_threads": args.kernel_threads, "other paths": 1},
        "reps": args.reps,
        "rows": rows,
        "floor": floor,
    }


def print_table(record: dict) -> None:
    print(
        f"\n{'batch':>5} {'step':<8} {'fast ms':>9} {'no-kern ms':>10} {'eager ms':>9} "
        f"{'x (cpu)':>8} {'x (wall)':>9} {'kern x':>7}"
    )
    for r in record["rows"]:
        if "ratio" in r:
            print(f"{r['batch']:>5} {r['step']:<28} {r['ratio']:>6.2f}")
            continue
        print(
            f"{r['batch']:>5} {r['step']:<8} {r['fast_cpu_ms']:>9.2f} "
            f"{r['fast_no_kernels_cpu_ms']:>10.2f} {r['eager_cpu_ms']:>9.2f} "
            f"{r['speedup_cpu']:>8.2f} {r['speedup_wall']:>9.2f} {r['kernels_speedup_cpu']:>7.2f}"
            + (f"  {record['kernel_threads']['fast_threads']} kernel threads: "
               f"{r['fast_threads_wall_ms']:.2f} ms wall ({r['threads_speedup_wall']:.2f}x)"
               if "fast_threads_wall_ms" in r else "")
        )  # fmt: skip
    floor = record.get("floor")
    if floor:
        print(
            f"floor at batch 1: {floor['macs_per_token']['total'] / 1e6:.2f} MMAC per token, "
            f"peak matmul {floor['peak_matmul_gflops']:.0f} GFLOP/s -> 15 more tokens cost "
            f">= {floor['extra_tokens_ms_at_peak']:.2f} ms: denoise/ar >= "
            f"{floor['denoise_over_ar_floor']:.2f} at this AR step"
        )
