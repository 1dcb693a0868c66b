"""bench/run.py sampling: mask_sampling and sample_tokens."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from benchlib import (
    BATCHES,
    BLOCK,
    DTYPES,
    MASK_TOKEN,
    VOCAB,
    require_kernel,
    throughput,
    time_us,
)


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
