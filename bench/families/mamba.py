"""bench/run.py mamba: the Mamba-2 scan and decode step."""

from __future__ import annotations

import argparse

import torch
from benchlib import (
    BATCHES,
    BLOCK,
    D_INNER,
    DTYPES,
    HIDDEN,
    require_kernel,
    throughput,
    time_us,
)

# The real model's Mamba-2 layer: 64 heads x 64, state 128, 8 groups; in_proj 2688 -> 10304 and
# out_proj 4096 -> 2688 in bf16 are the layer's weights a scan should be small against.
MAMBA_HEADS, MAMBA_HEAD_DIM, MAMBA_STATE, MAMBA_GROUPS = 64, 64, 128, 8
MAMBA_PROJ_BYTES = (HIDDEN * (2 * D_INNER + 2 * MAMBA_GROUPS * MAMBA_STATE + MAMBA_HEADS)
                    + D_INNER * HIDDEN) * 2  # fmt: skip


def add_mamba_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, nargs="+", default=BATCHES, help="sequences")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="x, B, C dtype")


def run_mamba(args: argparse.Namespace, quick: bool, peaks: dict[str, float]):
    from twotower_rt.ops import ssm_scan_backend

    require_kernel("ssm_scan", ssm_scan_backend, DTYPES[args.dtype])
    reps, inner = (10, 10) if quick else (args.reps, args.inner)
    batches = [1, 64] if quick else args.batch
    results = [
        bench_ssm_scan_case(batch, n, keep, variant, args, reps=reps, inner=inner, peaks=peaks)
        for n, keep in ((1, True), (BLOCK, False))  # decode step; denoiser block
        for variant in ("lanes", "rows")
        for batch in batches
    ]
    results += [
        bench_ssm_prefill_case(batch, n, chunk, args, reps=min(reps, 5), inner=2, peaks=peaks)
        for batch in ([1] if quick else PREFILL_BATCHES)
        for n in ([8192] if quick else PREFILL_TOKENS)
        for chunk in (0, None)  # in one piece; chunked as plan_scan_chunk picks
    ]
    from twotower_rt.ops import mamba_decode_backend

    if mamba_decode_backend("cuda", DTYPES[args.dtype])[0] == "cuda":
        results += [
            bench_mamba_decode_case(batch, args, reps=reps, inner=inner, peaks=peaks)
            for batch in batches
        ]
    return results


def bench_mamba_decode_case(batch, args, *, reps, inner, peaks):
    """The fused one-token step (conv, scan, gated norm) against its PyTorch reference."""
    from twotower_rt.ops import mamba_decode_step, mamba_decode_step_ref

    H, P, N, G, K = MAMBA_HEADS, MAMBA_HEAD_DIM, MAMBA_STATE, MAMBA_GROUPS, 4
    dtype = DTYPES[args.dtype]
    d_inner, conv_dim = H * P, H * P + 2 * G * N
    gen = torch.Generator(device="cuda").manual_seed(batch)

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(dt)

    zxbcdt = rand(batch, d_inner + conv_dim + H)
    conv_state, conv_w, conv_b = (
        rand(batch, conv_dim, K),
        rand(conv_dim, 1, K, scale=0.5),
        rand(conv_dim),
    )
    dt_bias, A_log, D = rand(H), rand(H, scale=0.5), rand(H)
    ssm, norm_w = rand(batch, H, P, N, dt=torch.float32), rand(d_inner)
    call = (zxbcdt, conv_state, conv_w, conv_b, dt_bias, A_log, D, ssm, norm_w, 1e-5, G)
    got, want = mamba_decode_step(*call), mamba_decode_step_ref(*call)
    correct = bool(torch.allclose(got[0].float(), want[0].float(), rtol=2e-2, atol=2e-2))
    correct &= bool(torch.allclose(got[2], want[2], rtol=2e-2, atol=2e-2))
    kernel_us = time_us(lambda: mamba_decode_step(*call), reps=reps, inner=inner)
    ref_us = time_us(lambda: mamba_decode_step_ref(*call), reps=reps, inner=inner)
    # Floor: the SSM state read and written, the conv state read and written, the row and out.
    moved = 2 * ssm.numel() * 4 + 2 * conv_state.numel() * conv_state.element_size()
    moved += (zxbcdt.numel() + batch * d_inner) * zxbcdt.element_size()
    return {
        "kernel": "mamba_decode_step",
        "shape": f"B={batch} fused decode {H}x{P}x{N} g{G} {args.dtype}",
        "dims": {"batch": batch, "heads": H, "head_dim": P, "state": N, "groups": G},
        "correct": correct,
        "median_us": round(kernel_us, 3),
        "baseline": "torch mamba_decode_step_ref (the mixer's ops, same graph timing)",
        "baseline_median_us": round(ref_us, 3),
        **throughput(kernel_us, moved, 0, peaks),
        "layer_projections_floor_us": round(MAMBA_PROJ_BYTES / (peaks["copy_gbps"] * 1e3), 2),
    }


PREFILL_BATCHES, PREFILL_TOKENS = [1, 16], [1024, 8192]


def _scan_inputs(batch, n, dtype, seed):
    """x, dt, A, B, C, D, state as the mixer makes them (x, B, C views into one xBC tensor)."""
    H, P, N, G = MAMBA_HEADS, MAMBA_HEAD_DIM, MAMBA_STATE, MAMBA_GROUPS
    gen = torch.Generator(device="cuda").manual_seed(seed)
    xbc = torch.randn(batch, n, H * P + 2 * G * N, device="cuda", generator=gen).to(dtype)
    x = xbc[..., : H * P].view(batch, n, H, P)
    B = xbc[..., H * P : H * P + G * N].view(batch, n, G, N)
    C = xbc[..., H * P + G * N :].view(batch, n, G, N)
    dt = torch.nn.functional.softplus(torch.randn(batch, n, H, device="cuda", generator=gen) - 2)
    A = -torch.exp(torch.rand(H, device="cuda", generator=gen) * 2)
    D = torch.randn(H, device="cuda", generator=gen)
    state = torch.randn(batch, H, P, N, device="cuda", generator=gen)
    return x, dt, A, B, C, D, state


def bench_ssm_prefill_case(batch, n, chunk, args, *, reps, inner, peaks):
    """The prefill / block-extension scan of n tokens from a state, in one piece (chunk 0) or
    chunked (None: plan_scan_chunk's choice), against the best PyTorch scan for long runs: the
    trainer's SSD-style selective_scan_chunked (chunk 64)."""
    from twotower_rt.model.mamba import selective_scan_chunked
    from twotower_rt.ops import ssm_scan, ssm_scan_ref
    from twotower_rt.ops.ssm_scan import plan_scan_chunk

    H, P, N, G = MAMBA_HEADS, MAMBA_HEAD_DIM, MAMBA_STATE, MAMBA_GROUPS
    x, dt, A, B, C, D, state = _scan_inputs(batch, n, DTYPES[args.dtype], batch * 100 + n)
    Bh, Ch = B.repeat_interleave(H // G, dim=2), C.repeat_interleave(H // G, dim=2)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    used = plan_scan_chunk(batch, n, H, P, N, sms) if chunk is None else chunk

    def run():
        return ssm_scan(x, dt, A, B, C, D, state, chunk=chunk)

    y, final = run()
    y_ref, final_ref = ssm_scan_ref(x, dt, A, B, C, D, state)
    correct = bool(torch.allclose(y, y_ref, rtol=1e-3, atol=1e-3))
    correct &= bool(torch.allclose(final, final_ref, rtol=1e-3, atol=1e-3))
    del y_ref, final_ref
    kernel_us = time_us(run, reps=reps, inner=inner)
    ref_us = time_us(lambda: selective_scan_chunked(x, dt, A, Bh, Ch, D, state, chunk=64),
                     reps=reps, inner=inner)  # fmt: skip
    # Floor: the state read and written once; x, B, C, dt read, y written. The chunked scan moves
    # more (x, B, C twice, the chunk states three times) but the floor is the op's.
    moved = 2 * state.numel() * 4 + (x.numel() + B.numel() + C.numel()) * x.element_size()
    moved += y.numel() * 4 + dt.numel() * 4
    flops = 4 * state.numel() * n
    how = f"chunk {used}" if used else "one piece"
    return {
        "kernel": "ssm_scan",
        "shape": f"B={batch} prefill of {n} ({how}) {H}x{P}x{N} {args.dtype}",
        "variant": "lanes",
        "dims": dict(batch=batch, n=n, heads=H, head_dim=P, state=N, groups=G, chunk=used),
        "correct": correct,
        "median_us": round(kernel_us, 3),
        "baseline": "torch selective_scan_chunked (SSD form, chunk 64, same graph timing)",
        "baseline_median_us": round(ref_us, 3),
        **throughput(kernel_us, moved, flops, peaks),
    }


def bench_ssm_scan_case(batch, n, keep_state, variant, args, *, reps, inner, peaks):
    from twotower_rt.ops import ssm_scan, ssm_scan_ref

    H, P, N, G = MAMBA_HEADS, MAMBA_HEAD_DIM, MAMBA_STATE, MAMBA_GROUPS
    x, dt, A, B, C, D, state = _scan_inputs(batch, n, DTYPES[args.dtype], batch * 100 + n)
    y, final = ssm_scan(x, dt, A, B, C, D, state, keep_state=keep_state, variant=variant)
    y_ref, final_ref = ssm_scan_ref(x, dt, A, B, C, D, state)
    correct = bool(torch.allclose(y, y_ref, rtol=1e-4, atol=1e-4))
    if keep_state:
        correct &= bool(torch.allclose(final, final_ref, rtol=1e-4, atol=1e-4))
    kernel_us = time_us(
        lambda: ssm_scan(x, dt, A, B, C, D, state, keep_state=keep_state, variant=variant),
        reps=reps, inner=inner,
    )  # fmt: skip
    ref_us = time_us(lambda: ssm_scan_ref(x, dt, A, B, C, D, state), reps=reps, inner=inner)
    # Floor: the state read once (and written once when kept); x, B, C read, y written, dt read.
    state_bytes = state.numel() * 4
    moved = state_bytes * (2 if keep_state else 1)
    moved += (x.numel() + B.numel() + C.numel()) * x.element_size()
    moved += y.numel() * 4 + dt.numel() * 4
    # 4 FLOPs per state element and token (decay, input, and the C dot product).
    flops = 4 * state.numel() * n
    proj_us = MAMBA_PROJ_BYTES / (peaks["copy_gbps"] * 1e3)
    mode = "decode step" if keep_state else f"block of {n}, state read only"
    return {
        "kernel": "ssm_scan",
        "shape": f"B={batch} {mode} {H}x{P}x{N} {args.dtype} {variant}",
        "variant": variant,
        "dims": {
            "batch": batch,
            "n": n,
            "heads": H,
            "head_dim": P,
            "state": N,
            "groups": G,
            "keep_state": keep_state,
        },
        "correct": correct,
        "median_us": round(kernel_us, 3),
        "baseline": "torch ssm_scan_ref (per-token recurrence, same graph timing)",
        "baseline_median_us": round(ref_us, 3),
        **throughput(kernel_us, moved, flops, peaks),
        "layer_projections_floor_us": round(proj_us, 2),
    }
