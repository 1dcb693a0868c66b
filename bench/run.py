"""Kernel benchmarks: one subcommand per kernel family, defaults at the real model's shapes.

    python bench/run.py rmsnorm [--rows 16 64 256 1024] [--dtype bf16]
    python bench/run.py mask_sampling [--batch 1 16 64] [--block-size 16] [--vocab 131072]
    python bench/run.py sample_tokens [--batch 1 16 64] [--vocab 131072]
    python bench/run.py block_attention [--batch 1 16 64] [--context 1024 8192 32768]
    python bench/run.py mamba [--batch 1 16 64] [--dtype bf16]    # ssm_scan: decode, block, prefill
    python bench/run.py moe [--tokens 16 64 256 1024 2048]        # grouped experts (bf16, fp8)
    python bench/run.py all_reduce [--rows 16 256 1024 1536] [--world N]   # needs >= 2 GPUs
    python bench/run.py --check            # every family, few shapes, few repetitions
    python bench/run.py all                # every family's full sweep, one JSON
    python bench/run.py e2e [--layers N] [--weights fp8|bf16] [--batch ...] [--context ...]
                                           # the engine end to end (bench/e2e.py)

Each case: correctness against the family's PyTorch reference, then the median over --reps timed
replays of a CUDA graph holding --inner launches (so launch overhead is excluded; inputs are
L2-warm, as they are inside a forward pass), the same for the PyTorch reference, and derived GB/s
and TFLOP/s, quoted against the device-to-device copy bandwidth and bf16 matmul rate measured in
the same run. Prints a table; writes JSON to bench/results/<date>-<gpu>.json (or --out).

Exit codes: 0 all cases correct; 1 some case incorrect; 2 nothing to run here (no CUDA GPU, or the
kernels cannot run on it: the message says why). A family that cannot run here (all_reduce on one
GPU) is skipped with its reason (in the JSON's "skipped") when others ran.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# The real model (shared/spec/TWOTOWER.md): hidden 2688; Mamba-2 d_inner 4096, n_groups 8 -> the
# gated norm works on groups of 512. A denoise step runs 16 tokens per sequence: batch 1..64.
HIDDEN = 2688
D_INNER = 4096
NORM_GROUP = 512
ROWS = [16, 16 * 4, 16 * 16, 16 * 64]
# The real model's vocabulary; mask diffusion decides a 16-token block per sequence, mask token 3.
VOCAB = 131072
BLOCK = 16
BATCHES = [1, 16, 64]
MASK_TOKEN = 3


# --- timing -------------------------------------------------------------------------------------


def time_us(fn: Callable[[], Any], *, reps: int, inner: int, warmup: int = 3) -> float:
    """Median microseconds per call of ``fn``, from CUDA-event-timed replays of a CUDA graph that
    holds ``inner`` calls."""
    for _ in range(warmup):
        fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # capture needs the calls warmed up off the default stream
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / inner)
    del graph
    return statistics.median(times)


def _copy_us(numel: int, reps: int) -> tuple[float, int]:
    """The faster of a memcpy (a graph memcpy node, which may run on a copy engine) and an
    elementwise kernel that reads and writes the same bytes."""
    src = torch.empty(numel, device="cuda", dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    memcpy_us = time_us(lambda: dst.copy_(src), reps=reps, inner=2, warmup=2)
    kernel_us = time_us(lambda: torch.mul(src, 1.0, out=dst), reps=reps, inner=2, warmup=2)
    return min(memcpy_us, kernel_us), 2 * numel * 4


def _matmul_us(size: int, reps: int) -> tuple[float, int]:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    return time_us(lambda: a @ b, reps=reps, inner=2, warmup=2), 2 * size**3


def measure_peaks(quick: bool) -> dict[str, float]:
    """Device-to-device copy GB/s (bytes read + written) and bf16 matmul TFLOP/s."""
    reps = 5 if quick else 20
    copy_us, copy_bytes = _copy_us(2**28, reps)  # 1 GiB each way
    mm_us, mm_flops = _matmul_us(8192, reps)
    torch.cuda.empty_cache()
    return {
        "copy_gbps": round(copy_bytes / (copy_us * 1e-6) / 1e9, 1),
        "bf16_tflops": round(mm_flops / (mm_us * 1e-6) / 1e12, 1),
    }


def within_lowprec_error(out, ref32, lowprec) -> bool:
    """max|out - ref32| <= 2 * max|lowprec_torch - ref32| + atol (STYLE.md's criterion)."""
    if not torch.isfinite(out).all():
        return False
    err = (out.float() - ref32).abs().max().item()
    lowprec_err = (lowprec.float() - ref32).abs().max().item()
    return err <= 2 * lowprec_err + 1e-5 * max(1.0, ref32.abs().max().item())


def throughput(kernel_us: float, moved: int, flops: float, peaks: dict[str, float]) -> dict:
    """The derived figures of a result: bytes moved (the floor's count), GB/s and TFLOP/s at the
    measured time, and GB/s as a fraction of the measured copy bandwidth."""
    gbps = moved / (kernel_us * 1e-6) / 1e9
    return {
        "bytes": moved,
        "achieved_gbps": round(gbps, 1),
        "achieved_tflops": round(flops / (kernel_us * 1e-6) / 1e12, 4),
        "fraction_of_copy": round(gbps / peaks["copy_gbps"], 3),
    }


def require_kernel(op: str, backend: Callable, dtype: torch.dtype) -> None:
    """NothingToRun unless ``backend`` (an ops ``*_backend``) says the CUDA kernel runs here."""
    chosen, reason = backend("cuda", dtype)
    if chosen != "cuda":
        raise NothingToRun(f"{op}: the CUDA kernel does not run here: {reason}")


# --- rmsnorm ------------------------------------------------------------------------------------


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


# --- mask_sampling / sample_tokens --------------------------------------------------------------


def _rng_tensors(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    seed = torch.randint(0, 2**62, (batch,), device="cuda", generator=gen)
    offset = torch.randint(0, 2**40, (batch,), device="cuda", generator=gen)
    return seed, offset


def _ref_us(fn: Callable[[], Any], reps: int) -> float:
    """The references allocate gigabytes at the largest shapes (Philox in int64 tensors): time
    them one call per replay and fewer replays."""
    return time_us(fn, reps=max(3, min(reps, 10)), inner=1, warmup=1)


def run_mask_sampling(args: argparse.Namespace, quick: bool, peaks: dict[str, float]) -> list[dict]:
    from twotower_rt.ops import mask_sampling_backend

    require_kernel("mask_sampling", mask_sampling_backend, DTYPES[args.dtype])
    reps, inner = (10, 10) if quick else (args.reps, args.inner)
    batches = [args.batch[0], args.batch[-1]] if quick else args.batch
    return [
        bench_mask_sampling_case(
            batch=b,
            block_size=args.block_size,
            vocab=args.vocab,
            temperature=t,
            dtype_name=args.dtype,
            reps=reps,
            inner=inner,
            peaks=peaks,
        )  # fmt: skip
        for b in batches
        for t in args.temperature
    ]


def bench_mask_sampling_case(*, batch, block_size, vocab, temperature, dtype_name, reps, inner,
                             peaks):  # fmt: skip
    from twotower_rt.ops import mask_sampling, mask_sampling_ref
    from twotower_rt.ops.mask_sampling import allocate_output

    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device="cuda").manual_seed(batch * block_size + vocab)
    logits = (torch.randn(batch, block_size, vocab, device="cuda", generator=gen) * 3).to(dtype)
    block = torch.full((batch, block_size), MASK_TOKEN, device="cuda")  # step 0: all masked
    seed, offset = _rng_tensors(batch, gen)
    kw = dict(
        mask_token_id=MASK_TOKEN, step=0, steps_per_block=16, confidence_threshold=0.9,
        temperature=temperature, seed=seed, offset=offset,
    )  # fmt: skip
    out = allocate_output(batch, block_size, "cuda")
    out.prediction.fill_(-1)
    mask_sampling(logits, block, **kw, out=out)
    ref = mask_sampling_ref(logits.float(), block, **kw)
    # Near-ties may break differently in fp32; anything beyond that is a bug.
    agree = (out.prediction == ref.prediction).float().mean().item()
    same = out.prediction == ref.prediction
    conf_ok = torch.allclose(out.confidence[same], ref.confidence[same], rtol=1e-4, atol=1e-7)
    correct = agree >= 0.99 and conf_ok and bool((out.prediction != MASK_TOKEN).all())
    del ref

    kernel_us = time_us(lambda: mask_sampling(logits, block, **kw, out=out), reps=reps, inner=inner)
    ref_us = _ref_us(lambda: mask_sampling_ref(logits, block, **kw), reps)
    moved = logits.numel() * logits.element_size()  # floor: the logits once (all masked at step 0)
    return {
        "kernel": "mask_sampling",
        "shape": f"{batch}x{block_size}x{vocab} T={temperature:g} {dtype_name}",
        "dims": {
            "batch": batch,
            "block_size": block_size,
            "vocab": vocab,
            "temperature": temperature,
            "dtype": dtype_name,
        },
        "correct": correct,
        "prediction_agreement": round(agree, 5),
        "median_us": round(kernel_us, 3),
        "baseline": "torch mask_sampling_ref (eager ops, Philox in int64 ops, graph-timed)",
        "baseline_median_us": round(ref_us, 3),
        **throughput(kernel_us, moved, 0, peaks),
    }


def add_mask_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, nargs="+", default=BATCHES, help="sequences")
    parser.add_argument("--block-size", type=int, default=BLOCK, help="positions per sequence")
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--temperature", type=float, nargs="+", default=[0.0, 0.7])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="logits dtype")


SAMPLE_CONFIGS = [  # (temperature, top_k, top_p)
    (0.0, None, None),
    (0.8, None, None),
    (0.8, 50, None),
    (0.8, None, 0.9),
]


def run_sample_tokens(args: argparse.Namespace, quick: bool, peaks: dict[str, float]) -> list[dict]:
    from twotower_rt.ops import sample_tokens_backend

    require_kernel("sample_tokens", sample_tokens_backend, DTYPES[args.dtype])
    reps, inner = (10, 10) if quick else (args.reps, args.inner)
    batches = [args.batch[0], args.batch[-1]] if quick else args.batch
    return [
        bench_sample_tokens_case(
            batch=b,
            vocab=args.vocab,
            config=c,
            dtype_name=args.dtype,
            reps=reps,
            inner=inner,
            peaks=peaks,
            splits=splits,
        )  # fmt: skip
        for b in batches
        for c in SAMPLE_CONFIGS
        for splits in ((0, 1) if b == 1 else (0,))  # batch 1: split rows and one CTA per row
    ]


def bench_sample_tokens_case(*, batch, vocab, config, dtype_name, reps, inner, peaks, splits=0):
    from twotower_rt.ops import sample_tokens, sample_tokens_ref

    temperature, top_k, top_p = config
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device="cuda").manual_seed(batch + vocab)
    logits = (torch.randn(batch, vocab, device="cuda", generator=gen) * 3).to(dtype)
    seed, offset = _rng_tensors(batch, gen)
    out = torch.full((batch,), -1, dtype=torch.int64, device="cuda")

    def kernel():
        return sample_tokens(logits, temperature, top_k, top_p, seed, offset, out=out,
                             splits=splits)  # fmt: skip

    def reference():
        return sample_tokens_ref(logits, temperature, top_k, top_p, seed, offset)

    kernel()
    agree = out == sample_tokens_ref(logits.float(), temperature, top_k, top_p, seed, offset)
    correct = agree.float().mean().item() >= (1.0 if temperature == 0 else 0.98)
    kernel_us = time_us(kernel, reps=reps, inner=inner)
    ref_us = _ref_us(reference, reps)
    moved = logits.numel() * logits.element_size()
    name = "greedy" if temperature == 0 else f"T={temperature:g}"
    name += f" k={top_k}" if top_k else ""
    name += f" p={top_p:g}" if top_p else ""
    name += " one CTA per row" if splits == 1 else ""
    return {
        "kernel": "sample_tokens",
        "shape": f"{batch}x{vocab} {name} {dtype_name}",
        "dims": {
            "batch": batch,
            "vocab": vocab,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "dtype": dtype_name,
            "splits": splits,
        },
        "correct": correct,
        "median_us": round(kernel_us, 3),
        "baseline": "torch sample_tokens_ref (topk + cumsum filter, Gumbel-max, graph-timed)",
        "baseline_median_us": round(ref_us, 3),
        **throughput(kernel_us, moved, 0, peaks),
    }


def add_sample_tokens_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, nargs="+", default=BATCHES, help="sequences")
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="logits dtype")


# --- block_attention ----------------------------------------------------------------------------

# The real model's attention: 32 query heads over 2 KV heads of 128.
Q_HEADS, KV_HEADS, HEAD_DIM = 32, 2, 128
CONTEXTS = [1024, 8192, 32768]


def add_block_attention_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, nargs="+", default=BATCHES, help="sequences")
    parser.add_argument("--context", type=int, nargs="+", default=CONTEXTS, help="context keys")
    parser.add_argument("--block-size", type=int, default=BLOCK)
    parser.add_argument("--q-heads", type=int, default=Q_HEADS)
    parser.add_argument("--kv-heads", type=int, default=KV_HEADS)
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM)
    parser.add_argument(
        "--max-bytes", type=float, default=8e9, help="skip cases whose K/V cache exceeds this"
    )
    parser.add_argument(
        "--variant",
        nargs="+",
        default=["mma_sync", "wgmma"],
        help="kernel variants; wgmma (unverified) adds rows only for the shapes it covers",
    )


def run_block_attention(args: argparse.Namespace, quick: bool, peaks: dict[str, float]):
    from twotower_rt.ops import block_attention_backend
    from twotower_rt.ops.block_attention import kernel_variant

    require_kernel("block_attention", block_attention_backend, torch.bfloat16)
    reps, inner = (10, 5) if quick else (args.reps, max(1, args.inner // 4))
    batches = [1, 64] if quick else args.batch
    contexts = [8192] if quick else args.context
    results = []
    for seq, block in ((args.block_size, True), (1, False)):  # denoise step, AR decode
        for batch in batches:
            for context in contexts:
                cache_bytes = 2 * batch * context * args.kv_heads * args.head_dim * 2
                if cache_bytes > args.max_bytes:
                    continue
                for variant in args.variant:
                    shape = (seq, args.q_heads, args.kv_heads, args.head_dim)
                    if kernel_variant(variant, *shape)[0] != variant:
                        continue  # it would run (and time) another variant's kernel
                    results.append(
                        bench_block_attention_case(batch, seq, context, block, args, reps=reps,
                                                   inner=inner, peaks=peaks, variant=variant)
                    )  # fmt: skip
    return results


def bench_block_attention_case(
    batch, seq, context, block, args, *, reps, inner, peaks, variant="mma_sync"
):
    import torch.nn.functional as F

    from twotower_rt.ops import block_attention, block_attention_ref

    hq, hkv, d = args.q_heads, args.kv_heads, args.head_dim
    gen = torch.Generator(device="cuda").manual_seed(batch * context + seq)
    bf16 = torch.bfloat16
    q = torch.randn(batch, seq, hq, d, device="cuda", generator=gen).to(bf16)
    k_cache, v_cache = (
        torch.randn(batch, context, hkv, d, device="cuda", generator=gen).to(bf16) for _ in range(2)
    )
    k_block, v_block = (
        (torch.randn(batch, seq, hkv, d, device="cuda", generator=gen).to(bf16) for _ in range(2))
        if block
        else (None, None)
    )
    lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    block_attention(q, k_cache, v_cache, lens, k_block, v_block, out=out, variant=variant)

    # Baseline: torch SDPA (FlashAttention when it applies) on keys laid out as it likes best,
    # [cache ; block] concatenated beforehand (the concatenation is not timed).
    keys = torch.cat([k_cache, k_block], 1) if block else k_cache
    values = torch.cat([v_cache, v_block], 1) if block else v_cache
    qt, kt, vt = q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)

    def sdpa():
        return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

    correct = True
    if batch * context <= 64 * 8192:  # the fp32 reference materialises the scores
        rows = slice(0, min(batch, 4))
        f32 = lambda t: t[rows].float() if t is not None else None  # noqa: E731
        ref32 = block_attention_ref(f32(q), f32(k_cache), f32(v_cache), lens[rows],
                                    f32(k_block), f32(v_block))  # fmt: skip
        lowprec = sdpa().transpose(1, 2)[rows]
        correct = within_lowprec_error(out[rows], ref32, lowprec)
    kernel_us = time_us(
        lambda: block_attention(q, k_cache, v_cache, lens, k_block, v_block, out=out,
                                variant=variant),
        reps=reps,
        inner=inner,
    )  # fmt: skip
    ref_us = time_us(sdpa, reps=reps, inner=inner)
    keys_n = context + (seq if block else 0)
    # Floor: K and V read once (and q, out); 2 products of 2 * Hq * S * keys * D FLOPs each.
    moved = 2 * batch * keys_n * hkv * d * 2 + 2 * q.numel() * 2
    flops = 4 * batch * hq * seq * keys_n * d
    roofline_us = max(moved / (peaks["copy_gbps"] * 1e3), flops / (peaks["bf16_tflops"] * 1e6))
    mode = f"S={seq} block" if block else "decode"
    return {
        "kernel": "block_attention",
        "shape": f"B={batch} ctx={context} {mode} {hq}/{hkv}x{d}"
        + (f" {variant}" if variant != "mma_sync" else ""),
        "variant": variant,
        "dims": {
            "batch": batch,
            "seq": seq,
            "context": context,
            "block": block,
            "q_heads": hq,
            "kv_heads": hkv,
            "head_dim": d,
        },
        "correct": correct,
        "median_us": round(kernel_us, 3),
        "baseline": "torch SDPA (enable_gqa) on pre-concatenated K/V, same graph timing",
        "baseline_median_us": round(ref_us, 3),
        "flops": flops,
        **throughput(kernel_us, moved, flops, peaks),
        "fraction_of_roofline": round(roofline_us / kernel_us, 3),
    }


# --- mamba (ssm_scan) -----------------------------------------------------------------------------

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


# --- moe -----------------------------------------------------------------------------------------

# The real model's MoE layer: 128 routed experts (top 6) of 2688 -> 1856 -> 2688, relu^2, and the
# shared expert (2688 -> 3712 -> 2688), folded into the grouped GEMMs as one extra group.
MOE_EXPERTS, MOE_TOP_K, MOE_INTER, MOE_SHARED = 128, 6, 1856, 3712
MOE_TOKENS = [16, 64, 256, 1024, 2048]


def add_moe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, nargs="+", default=MOE_TOKENS, help="per forward")


def run_moe(args: argparse.Namespace, quick: bool, peaks: dict[str, float]):
    from twotower_rt.model.linear import quantize_weight
    from twotower_rt.ops.moe import (
        Fp8ExpertWeights,
        _cutlass_ready,
        fold_shared_expert,
        gemm_cutlass,
        gemm_cutlass_fp8,
        gemm_torch,
        grouped_unsupported_reason,
        shared_unsupported_reason,
    )

    probe = torch.empty(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    backends = {}
    if _cutlass_ready(probe):
        backends["cutlass"] = gemm_cutlass
    if hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability() >= (9, 0):
        backends["torch._grouped_mm"] = gemm_torch
    if not backends:
        raise NothingToRun("no grouped GEMM runs here (twotower_rt._C nor torch._grouped_mm)")
    reps, inner = (10, 3) if quick else (args.reps, max(1, args.inner // 4))
    tokens = [16, 2048] if quick else args.tokens
    gen = torch.Generator(device="cuda").manual_seed(0)
    E, H, inter = MOE_EXPERTS, HIDDEN, MOE_INTER
    up = (torch.randn(E, inter, H, device="cuda", generator=gen) * 0.02).bfloat16()
    down = (torch.randn(E, H, inter, device="cuda", generator=gen) * 0.02).bfloat16()
    up_s = (torch.randn(MOE_SHARED, H, device="cuda", generator=gen) * 0.02).bfloat16()
    down_s = (torch.randn(H, MOE_SHARED, device="cuda", generator=gen) * 0.02).bfloat16()
    shared = fold_shared_expert(up, down, up_s, down_s)
    rows = [
        bench_moe_case(t, up, down, name, gemm, reps=reps, inner=inner, peaks=peaks, shared=shared)
        for t in tokens
        for name, gemm in backends.items()
    ]

    # FP8 (e4m3, per-channel scales, the checkpoints' default) rows: the same weights quantized.
    def quantized(w: torch.Tensor) -> Fp8ExpertWeights:
        q, s = zip(*(quantize_weight(w[e], (1, 0)) for e in range(w.shape[0])))
        return Fp8ExpertWeights.from_checkpoint(torch.stack(q), torch.stack(s), (1, 0))

    up8, down8 = quantized(up), quantized(down)
    shared8 = fold_shared_expert(up8, down8, quantized(up_s[None]), quantized(down_s[None]))
    del up, down, shared
    if grouped_unsupported_reason(probe, up8, down8) is None:
        if shared_unsupported_reason(probe, up8, down8, shared8) is not None:
            shared8 = None  # the rows then time the routed experts alone
        bf16 = {r["dims"]["tokens"]: r["median_us"] for r in rows if r["backend"] == "cutlass"}
        for t in tokens:
            row = bench_moe_case(t, up8, down8, "cutlass fp8", gemm_cutlass_fp8, reps=reps,
                                 inner=inner, peaks=peaks, shared=shared8)  # fmt: skip
            row["bf16_grouped_median_us"] = bf16.get(t)
            rows.append(row)
    return rows


def bench_moe_case(tokens, up, down, backend, gemm, *, reps, inner, peaks, shared=None):
    """One row: the grouped routed experts, with ``shared`` (one-expert stacks from
    fold_shared_expert) the whole layer's experts, the shared one folded in as the extra group
    (torch._grouped_mm: as plain matmuls beside it); then also timed unfolded (grouped routed
    experts, then the shared expert as its own matmuls, as MoE.forward runs it without folding)."""
    from twotower_rt.ops.moe import moe_experts_grouped, moe_experts_ref

    E, inter, H = up.shape
    fp8 = not isinstance(up, torch.Tensor)  # ops.moe.Fp8ExpertWeights
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, H, device="cuda", generator=gen).bfloat16()
    scores = torch.rand(tokens, E, device="cuda", generator=gen)
    expert_ids = scores.topk(MOE_TOP_K, dim=-1).indices
    weights = torch.rand(tokens, MOE_TOP_K, device="cuda", generator=gen)

    def weight(w, e):  # FP8: dequantized at each call, as Fp8Linear does in the PyTorch path
        return w.dequantize(e, torch.bfloat16) if fp8 else w[e]

    def expert(e):
        return lambda rows: (
            torch.nn.functional.relu(rows @ weight(up, e).T).square() @ weight(down, e).T
        )

    experts = [expert(e) for e in range(E)]

    def shared_expert(rows):  # Relu2MLP / Fp8Linear's arithmetic
        up_s, down_s = shared
        h = torch.nn.functional.relu(rows @ weight(up_s, 0).T).square()
        return h @ weight(down_s, 0).T

    def grouped():
        return moe_experts_grouped(x, expert_ids, weights, up, down, gemm=gemm, shared=shared)

    def unfolded():
        routed = moe_experts_grouped(x, expert_ids, weights, up, down, gemm=gemm)
        return routed.to(x.dtype) + shared_expert(x)

    def reference():
        routed = moe_experts_ref(x, expert_ids, weights, experts)
        return routed if shared is None else routed.to(x.dtype) + shared_expert(x)

    got, want = grouped().float(), reference().float()
    scale = want.abs().max().item()
    correct = bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2 * scale))
    kernel_us = time_us(grouped, reps=reps, inner=inner)
    unfolded_us = time_us(unfolded, reps=reps, inner=inner) if shared is not None else None
    # The baseline loop asks the host which experts have tokens: time it eagerly (not in a graph).
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ref_times = []
    for _ in range(max(3, reps // 5)):
        start.record()
        reference()
        end.record()
        end.synchronize()
        ref_times.append(start.elapsed_time(end) * 1e3)
    touched = int(torch.unique(expert_ids).numel())
    # Floor: every touched expert's up and down weights read once (activations are small); FP8:
    # 1 byte a weight plus its fp32 scales.
    weight_bytes = 2 * inter * H * (1 if fp8 else 2)
    if fp8:
        weight_bytes += (up.scale[0].numel() + down.scale[0].numel()) * 4
    moved = touched * weight_bytes + 2 * tokens * H * 2
    flops = 2 * 2 * tokens * MOE_TOP_K * inter * H
    shared_inter = 0
    if shared is not None:  # the shared expert: every token, its weights always read
        shared_inter = shared[0].shape[1]
        moved += 2 * shared_inter * H * (1 if fp8 else 2)
        if fp8:
            moved += (shared[0].scale.numel() + shared[1].scale.numel()) * 4
        flops += 2 * 2 * tokens * shared_inter * H
    return {
        "kernel": "moe_experts",
        "shape": f"T={tokens} {backend} ({touched} of {E} experts)",
        "backend": backend,
        "dims": {
            "tokens": tokens,
            "experts": E,
            "top_k": MOE_TOP_K,
            "hidden": H,
            "intermediate": inter,
            "shared_intermediate": shared_inter,
            "experts_touched": touched,
        },
        "correct": correct,
        "median_us": round(kernel_us, 3),
        "unfolded_median_us": round(unfolded_us, 3) if unfolded_us is not None else None,
        "baseline": "torch loop over touched experts (eager, host-synchronised)"
        + (" + the shared expert's matmuls" if shared is not None else "")
        + (", FP8 dequantized per call as Fp8Linear" if fp8 else ""),
        "baseline_median_us": round(statistics.median(ref_times), 3),
        **throughput(kernel_us, moved, flops, peaks),
    }


# --- all_reduce -----------------------------------------------------------------------------------

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


# Family name -> (add its arguments, run it). A new kernel family adds one entry.
FAMILIES: dict[str, tuple[Callable, Callable]] = {
    "rmsnorm": (add_rmsnorm_args, run_rmsnorm),
    "block_attention": (add_block_attention_args, run_block_attention),
    "mask_sampling": (add_mask_sampling_args, run_mask_sampling),
    "sample_tokens": (add_sample_tokens_args, run_sample_tokens),
    "mamba": (add_mamba_args, run_mamba),
    "moe": (add_moe_args, run_moe),
    "all_reduce": (add_all_reduce_args, run_all_reduce),
}


# --- driver -------------------------------------------------------------------------------------


class NothingToRun(Exception):
    pass


def git_commit() -> str:
    """TWOTOWER_RT_COMMIT when set (gpu_check.sh passes it: the device machine's copy of the tree
    may carry a stale .git), else git's HEAD."""
    if os.environ.get("TWOTOWER_RT_COMMIT"):
        return os.environ["TWOTOWER_RT_COMMIT"]
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if result.returncode == 0:
            return result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def print_table(results: list[dict], peaks: dict[str, float]) -> None:
    print(
        f"\npeaks: copy {peaks['copy_gbps']:.0f} GB/s, bf16 matmul {peaks['bf16_tflops']:.0f} "
        "TFLOP/s (measured now)"
    )
    header = (
        f"{'kernel':<15} {'shape':<38} {'us':>8} {'ref us':>9} {'GB/s':>7} {'%copy':>6} "
        f"{'TF/s':>6}  ok"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['kernel']:<15} {r['shape']:<38} {r['median_us']:>8.2f} "
            f"{r['baseline_median_us']:>9.2f} {r['achieved_gbps']:>7.0f} "
            f"{100 * r['fraction_of_copy']:>5.0f}% {r['achieved_tflops']:>6.1f}  "
            f"{'yes' if r['correct'] else 'NO'}"
        )


def main_e2e(argv: list[str]) -> int:
    """``bench/run.py e2e``: the engine end to end (bench/e2e.py); its own JSON schema."""
    sys.path.insert(0, str(REPO / "bench"))
    import e2e

    parser = argparse.ArgumentParser(
        prog="bench/run.py e2e",
        description=e2e.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e2e.add_args(parser)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/run.py e2e: no CUDA GPU visible; use --device cpu for a smoke run",
              file=sys.stderr)  # fmt: skip
        return 2
    record = e2e.bench(args)
    now = datetime.datetime.now(datetime.timezone.utc)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    record = {"device": device, "date": now.isoformat(timespec="seconds"),
              "commit": git_commit(), "torch": torch.__version__, **record}  # fmt: skip
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    out = args.out or REPO / "bench" / "results" / f"{now:%Y-%m-%d}-{slug}-e2e.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["e2e"]:
        return main_e2e(argv[1:])

    def add_common(p: argparse.ArgumentParser, suppress: bool) -> None:
        # Accepted before and after the family name; SUPPRESS keeps a subparser from overwriting
        # a value given before it with its default.
        default = (lambda value: argparse.SUPPRESS) if suppress else (lambda value: value)
        p.add_argument(
            "--check",
            action="store_true",
            default=default(False),
            help="every family at a few shapes, few repetitions",
        )
        p.add_argument(
            "--out",
            type=Path,
            default=default(None),
            help="JSON path (default bench/results/<date>-<gpu>.json)",
        )
        p.add_argument("--reps", type=int, default=default(50), help="timed graph replays per case")
        p.add_argument("--inner", type=int, default=default(20), help="launches per graph replay")

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common(parser, suppress=False)
    sub = parser.add_subparsers(dest="family")
    for name, (add_args, _) in FAMILIES.items():
        family_parser = sub.add_parser(name, help=f"benchmark the {name} kernels")
        add_common(family_parser, suppress=True)
        add_args(family_parser)
    all_parser = sub.add_parser("all", help="every family's full sweep at its defaults")
    add_common(all_parser, suppress=True)
    args = parser.parse_args(argv)
    if not args.check and args.family is None:
        parser.error("name a kernel family or pass --check")

    if not torch.cuda.is_available():
        print(
            f"bench/run.py: no CUDA GPU visible to PyTorch {torch.__version__} "
            f"(CUDA {torch.version.cuda or 'none'}); nothing to time.",
            file=sys.stderr,
        )
        return 2

    families = list(FAMILIES) if args.check or args.family == "all" else [args.family]
    device = torch.cuda.get_device_name()
    print(f"device: {device}; timing: median of CUDA-graph replays, L2-warm inputs")
    peaks = measure_peaks(quick=args.check)
    results: list[dict] = []
    skipped: dict[str, str] = {}
    for name in families:
        add_args, run = FAMILIES[name]
        family_args = args
        if args.family != name:  # --check / all: this family's defaults
            family_parser = argparse.ArgumentParser()
            add_args(family_parser)
            family_args = family_parser.parse_args([])
        family_args.reps, family_args.inner = args.reps, args.inner
        try:
            results += run(family_args, args.check, peaks)
        except NothingToRun as exc:
            print(f"bench/run.py: {name}: {exc}", file=sys.stderr)
            skipped[name] = str(exc)
    if not results:
        return 2

    print_table(results, peaks)
    now = datetime.datetime.now(datetime.timezone.utc)
    record = {
        "device": device,
        "date": now.isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "timing": "median of CUDA-event-timed CUDA-graph replays, L2-warm inputs",
        "peak": peaks,
        "results": results,
        "skipped": skipped,
    }
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    out = args.out or REPO / "bench" / "results" / f"{now:%Y-%m-%d}-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["correct"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
