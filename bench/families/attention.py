"""bench/run.py attention: block_attention."""

from __future__ import annotations

import argparse

import torch
from benchlib import (
    BATCHES,
    BLOCK,
    require_kernel,
    throughput,
    time_us,
    within_lowprec_error,
)

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
