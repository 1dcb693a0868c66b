"""bench/run.py moe: the MoE grouped GEMMs."""

from __future__ import annotations

import argparse
import statistics

import torch
from benchlib import (
    HIDDEN,
    NothingToRun,
    throughput,
    time_us,
)

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
