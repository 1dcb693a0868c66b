"""all_reduce: the algorithm choice and the reference on the CPU, the torch.distributed fallback
with two CPU processes, and the custom IPC kernels with two processes on a GPU (they share one GPU
where there is only one: processes on one device map each other's memory like peers do)."""

import math
import os
import queue
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from twotower_rt.ops.all_reduce import (
    DEFAULT_BUFFER_BYTES,
    ONE_SHOT_MAX_BYTES,
    CustomAllReduce,
    all_reduce_backend,
    all_reduce_ref,
    choose_algorithm,
)

# --- choice and reference -------------------------------------------------------------------------


def choose(nbytes, world=2, dtype=torch.bfloat16, aligned=True, available=True, **kw):
    return choose_algorithm(
        nbytes, world, dtype=dtype, aligned=aligned, custom_available=available, **kw
    )[0]


def test_choice_by_size_and_world():
    hidden_block = 16 * 2688 * 2  # one 16-token block at the real hidden size, bf16: 86 KB
    for world in (2, 4, 6, 8):
        assert choose(hidden_block, world) == "one_shot"
        assert choose(ONE_SHOT_MAX_BYTES[world], world) == "one_shot"
        assert choose(ONE_SHOT_MAX_BYTES[world] + 16, world) == "two_shot"
    assert choose(DEFAULT_BUFFER_BYTES) == "two_shot"
    assert choose(DEFAULT_BUFFER_BYTES + 16) == "torch"
    assert choose(1 << 20, buffer_bytes=1 << 19) == "torch"


def test_choice_falls_back_for_what_the_kernel_cannot_take():
    assert choose(1024, available=False) == "torch"
    assert choose(1024, dtype=torch.float16) == "torch"
    assert choose(1024, dtype=torch.float32) == "one_shot"
    assert choose(1000) == "torch"  # not a multiple of 16 bytes
    assert choose(1024, aligned=False) == "torch"
    algo, reason = choose_algorithm(1024, 2, dtype=torch.int32, aligned=True, custom_available=True)
    assert algo == "torch" and "int32" in reason


def test_reference_adds_in_rank_order_in_fp32():
    g = torch.Generator().manual_seed(0)
    xs = [(torch.randn(1000, generator=g) * 10 ** (3 * i)).bfloat16() for i in range(3)]
    want = ((xs[0].float() + xs[1].float()) + xs[2].float()).bfloat16()
    assert torch.equal(all_reduce_ref(xs), want)
    # Not the same as another order in general: the order is part of the contract.
    other = ((xs[2].float() + xs[1].float()) + xs[0].float()).bfloat16()
    assert torch.equal(all_reduce_ref(xs[::-1]), other)


def test_backend_report():
    backend, reason = all_reduce_backend("cpu", torch.float32)
    assert backend == "torch" and "torch.distributed" in reason


# --- several processes ----------------------------------------------------------------------------


def _worker(rank, world, init_file, body, results):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world)  # fmt: skip
        try:
            results.put((rank, "ok", globals()[body](rank, world)))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def run_processes(body: str, world: int, tmp_path, timeout: float = 240.0) -> list:
    """Runs ``body(rank, world)`` in ``world`` spawned processes joined by a gloo group; returns
    their results by rank, or fails with the first traceback."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_file = os.path.join(tmp_path, "dist_init")
    procs = [
        ctx.Process(target=_worker, args=(r, world, init_file, body, results)) for r in range(world)
    ]
    for p in procs:
        p.start()
    got = {}
    try:
        for _ in range(world):
            rank, status, payload = results.get(timeout=timeout)
            if status != "ok":
                pytest.fail(f"rank {rank} failed:\n{payload}")
            got[rank] = payload
    except queue.Empty:
        pytest.fail(f"the {world} processes did not finish within {timeout} s")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [got[r] for r in range(world)]


def _cpu_fallback_body(rank, world):
    ar = CustomAllReduce(device="cpu")
    assert not ar.enabled and "not a CUDA GPU" in ar.reason
    x = torch.arange(12, dtype=torch.float32) * (rank + 1)
    out = ar.all_reduce(x)
    assert out is not x and torch.equal(x, torch.arange(12, dtype=torch.float32) * (rank + 1))
    ar.close()
    return out


def test_fallback_to_torch_distributed_on_cpu(tmp_path):
    outs = run_processes("_cpu_fallback_body", 2, tmp_path, timeout=120)
    want = torch.arange(12, dtype=torch.float32) * 3
    assert all(torch.equal(o, want) for o in outs)


# --- the custom kernels on a GPU ------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)


def _gathered(x: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Every rank's ``x`` (through gloo, as exact float32 on the CPU)."""
    parts = [torch.empty(x.shape, dtype=torch.float32) for _ in range(world)]
    dist.all_gather(parts, x.float().cpu())
    return parts


def _gpu_body(rank, world):
    device = rank % torch.cuda.device_count()
    torch.cuda.set_device(device)
    ar = CustomAllReduce(device=device)
    assert ar.enabled, ar.reason
    checked = 0
    for dtype in (torch.bfloat16, torch.float32):
        for numel in (8, 16 * 2688, 3 * 8 * 1001, 1 << 20):
            for algorithm in ("one_shot", "two_shot"):
                g = torch.Generator().manual_seed(numel * 7 + rank)
                x = (torch.randn(numel, generator=g) * (rank + 1)).to(dtype).cuda()
                out = torch.full_like(x, math.nan)
                assert ar.all_reduce(x, out=out, algorithm=algorithm) is out
                torch.cuda.synchronize()
                inputs = [p.to(dtype) for p in _gathered(x, world)]
                assert torch.equal(out.cpu(), all_reduce_ref(inputs)), (dtype, numel, algorithm)
                outs = _gathered(out, world)
                assert all(torch.equal(o, outs[0]) for o in outs), "ranks disagree"
                checked += 1
    # In place, and the automatic choice for one 16-token block at hidden 2688.
    x = torch.randn(16, 2688, device="cuda").bfloat16()
    assert ar.algorithm(x)[0] == "one_shot"
    inputs = [p.bfloat16() for p in _gathered(x, world)]
    assert ar.all_reduce(x, out=x) is x
    assert torch.equal(x.cpu(), all_reduce_ref(inputs))
    # Inside a CUDA graph: replays see new inputs, flags keep counting on the device.
    static_in = torch.zeros(16, 2688, device="cuda", dtype=torch.bfloat16)
    static_out = torch.empty_like(static_in)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ar.all_reduce(static_in, out=static_out)
    for step in range(3):
        g = torch.Generator().manual_seed(100 * step + rank)
        static_in.copy_(torch.randn(16, 2688, generator=g).bfloat16())
        graph.replay()
        torch.cuda.synchronize()
        inputs = [p.bfloat16() for p in _gathered(static_in, world)]
        assert torch.equal(static_out.cpu(), all_reduce_ref(inputs)), f"replay {step}"
    ar.close()
    return checked


@pytest.mark.gpu
@needs_gpu
def test_custom_kernels_two_processes(tmp_path):
    from twotower_rt.ops import all_reduce_backend as backend

    chosen, reason = backend("cuda", torch.bfloat16)
    if chosen != "cuda":
        pytest.skip(f"the CUDA kernel does not run here: {reason}")
    assert run_processes("_gpu_body", 2, tmp_path, timeout=120) == [16, 16]
