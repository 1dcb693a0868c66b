"""bench/run.py all_reduce: the custom all-reduce (two or more GPUs)."""

from __future__ import annotations

import argparse
import os

import torch
from benchlib import (
    HIDDEN,
    NothingToRun,
    require_kernel,
    time_us,
)

# Messages: one 16-token block at hidden 2688 (a denoise step at batch 1), batch 16 and 64 of them,
# and the IPC buffer's size.
ALL_REDUCE_ROWS = [16, 16 * 16, 16 * 64, 1536]


def add_all_reduce_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, nargs="+", default=ALL_REDUCE_ROWS, help="tokens")
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--world", type=int, default=0, help="GPUs (default: all, at most 8)")


def run_all_reduce(args: argparse.Namespace, quick: bool, peaks: dict[str, float]):
    from twotower_rt.ops import all_reduce_backend

    world = args.world or min(8, torch.cuda.device_count())
    if world < 2 or world > torch.cuda.device_count():
        raise NothingToRun(
            f"all_reduce needs 2 to 8 GPUs of this host; {torch.cuda.device_count()} visible"
        )
    require_kernel("all_reduce", all_reduce_backend, torch.bfloat16)
    import tempfile

    import torch.multiprocessing as mp

    rows = args.rows[:2] if quick else args.rows
    reps, inner = (10, 10) if quick else (args.reps, args.inner)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        job = (world, os.path.join(tmp, "init"), rows, args.hidden, reps, inner, peaks)
        procs = [
            ctx.Process(target=_all_reduce_worker, args=(rank, job, results))
            for rank in range(world)
        ]
        for proc in procs:
            proc.start()
        outcome = results.get(timeout=600)
        for proc in procs:
            proc.join(timeout=60)
    if isinstance(outcome, tuple):
        raise NothingToRun(outcome[1])
    if isinstance(outcome, str):
        raise RuntimeError(f"all_reduce benchmark failed:\n{outcome}")
    return outcome


def _all_reduce_worker(rank, job, results):
    """One rank of the all-reduce benchmark (NCCL group); rank 0 reports. Times the custom
    one-shot and two-shot kernels and NCCL on the same bf16 messages, each in a CUDA graph."""
    import traceback

    import torch.distributed as dist

    from twotower_rt.ops import CustomAllReduce, all_reduce_ref

    world, init_file, rows_list, hidden, reps, inner, peaks = job
    try:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank,
                                world_size=world, device_id=torch.device("cuda", rank))  # fmt: skip
        ar = CustomAllReduce(device=rank)
        if not ar.enabled:
            raise NothingToRun(f"the custom all-reduce is off: {ar.reason}")
        out_rows = []
        for rows in rows_list:
            x = torch.randn(rows, hidden, device="cuda", generator=None).bfloat16()
            out = torch.empty_like(x)
            parts = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(parts, x)
            want = all_reduce_ref(parts)
            timings = {}
            for algo in ("one_shot", "two_shot"):
                ar.all_reduce(x, out=out, algorithm=algo)
                torch.cuda.synchronize()
                correct = torch.equal(out, want)
                dist.barrier()
                us = time_us(lambda a=algo, x=x, o=out: ar.all_reduce(x, out=o, algorithm=a),
                             reps=reps, inner=inner)  # fmt: skip
                timings[algo] = (us, correct)
            nccl_buf = x.clone()
            dist.barrier()
            nccl_us = time_us(lambda t=nccl_buf: dist.all_reduce(t), reps=reps, inner=inner)
            nbytes = x.numel() * 2
            for algo, (us, correct) in timings.items():
                # Bus bytes as nccl-tests count them for all-reduce: 2 (N - 1) / N x the message.
                bus = 2 * (world - 1) / world * nbytes
                out_rows.append({
                    "kernel": "all_reduce",
                    "shape": f"{rows}x{hidden} bf16 {algo} x{world}",
                    "dims": {"rows": rows, "hidden": hidden, "world": world, "algorithm": algo},
                    "correct": bool(correct),
                    "median_us": round(us, 3),
                    "baseline": "torch.distributed.all_reduce (NCCL), same graph timing",
                    "baseline_median_us": round(nccl_us, 3),
                    "bytes": nbytes,
                    "achieved_gbps": round(bus / (us * 1e-6) / 1e9, 1),
                    "achieved_tflops": 0.0,
                    "fraction_of_copy": round(bus / (us * 1e-6) / 1e9 / peaks["copy_gbps"], 3),
                })  # fmt: skip
        ar.close()
        dist.destroy_process_group()
        if rank == 0:
            results.put(out_rows)
    except NothingToRun as exc:
        results.put(("skip", str(exc)))
    except BaseException:
        results.put(traceback.format_exc())
