"""What every benchmark family shares: the real model's shapes, timing by CUDA-graph replays, the
measured ceilings (copy bandwidth, bf16 matmul) and the derived GB/s and TFLOP/s."""

from __future__ import annotations

import statistics
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


class NothingToRun(Exception):
    """A family that cannot run here (its reason is printed and recorded)."""


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
