"""bench/run.py rmsnorm: RMSNorm (gated, grouped)."""

from __future__ import annotations

import argparse

import torch
from benchlib import (
    D_INNER,
    DTYPES,
    HIDDEN,
    NORM_GROUP,
    ROWS,
    require_kernel,
    throughput,
    time_us,
    within_lowprec_error,
)


def rmsnorm_cases(args: argparse.Namespace, quick: bool):
    rows_list = [ROWS[0], ROWS[-1]] if quick else args.rows
    dtype = DTYPES[args.dtype]
    for rows in rows_list:
        yield {"rows": rows, "n": args.hidden, "group_size": None, "gated": False, "dtype": dtype}
    for rows in rows_list:
        yield {
            "rows": rows,
            "n": args.d_inner,
            "group_size": args.group,
            "gated": True,
            "dtype": dtype,
        }


def run_rmsnorm(args: argparse.Namespace, quick: bool, peaks: dict[str, float]) -> list[dict]:
    from twotower_rt.ops import rms_norm_backend

    require_kernel("rms_norm", rms_norm_backend, DTYPES[args.dtype])
    reps, inner = (10, 10) if quick else (args.reps, args.inner)
    return [
        bench_rmsnorm_case(**case, dtype_name=args.dtype, reps=reps, inner=inner, peaks=peaks)
        for case in rmsnorm_cases(args, quick)
    ]


def bench_rmsnorm_case(*, rows, n, group_size, gated, dtype, dtype_name, reps, inner, peaks):
    from twotower_rt.ops import rms_norm, rms_norm_ref

    eps = 1e-5
    gen = torch.Generator(device="cuda").manual_seed(rows * n)
    x = torch.randn(rows, n, device="cuda", generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(n, device="cuda", generator=gen)).to(dtype)
    gate = torch.randn(rows, n, device="cuda", generator=gen).to(dtype) if gated else None
    out = torch.full_like(x, float("nan"))

    rms_norm(x, weight, eps, gate=gate, group_size=group_size, out=out)
    f32 = lambda t: t.float() if t is not None else None  # noqa: E731
    ref32 = rms_norm_ref(f32(x), f32(weight), eps, gate=f32(gate), group_size=group_size)
    lowprec = rms_norm_ref(x, weight, eps, gate=gate, group_size=group_size)
    correct = within_lowprec_error(out, ref32, lowprec)

    kernel_us = time_us(
        lambda: rms_norm(x, weight, eps, gate=gate, group_size=group_size, out=out),
        reps=reps,
        inner=inner,
    )
    ref_us = time_us(
        lambda: rms_norm_ref(x, weight, eps, gate=gate, group_size=group_size),
        reps=reps,
        inner=inner,
    )
    # Floor: x (and gate) read once, out written once, weight read once.
    moved = rows * n * x.element_size() * (3 if gated else 2) + n * weight.element_size()
    # Nominal FLOPs per element: square + add, scale by rstd and by weight (4); the gate adds silu
    # (exp, add, divide) and a multiply (4).
    flops = rows * n * (8 if gated else 4)
    shape = f"{rows}x{n}" + (f" g{group_size}" if group_size else "") + (" gated" if gated else "")
    return {
        "kernel": "rms_norm",
        "shape": f"{shape} {dtype_name}",
        "dims": {
            "rows": rows,
            "n": n,
            "group_size": group_size,
            "gated": gated,
            "dtype": dtype_name,
        },
        "correct": correct,
        "median_us": round(kernel_us, 3),
        "baseline": "torch rms_norm_ref (eager ops, same graph timing)",
        "baseline_median_us": round(ref_us, 3),
        **throughput(kernel_us, moved, flops, peaks),
    }


def add_rmsnorm_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, nargs="+", default=ROWS, help="tokens (rows)")
    parser.add_argument("--hidden", type=int, default=HIDDEN, help="pre-norm row length")
    parser.add_argument("--d-inner", type=int, default=D_INNER, help="gated-norm row length")
    parser.add_argument("--group", type=int, default=NORM_GROUP, help="gated-norm group size")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
