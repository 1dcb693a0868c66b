"""Running the engine on every rank of a tensor-parallel group, in lockstep, and launching it.

The model's forwards hold collectives, so every rank must make the same forwards in the same order:
each rank runs an identical :class:`~twotower_rt.engine.Engine` over its shard. Rank 0 takes the
requests (the server, the batch job, any caller: :class:`LockstepEngine` has the Engine's
interface) and, at each step, broadcasts what changed since the last one (requests added with
their resolved seeds, aborts) before stepping; the other ranks (:func:`follow`) replay it and make
the same step. Nothing but the requests crosses between ranks outside the model's collectives.

:func:`launch` starts the ranks: under ``torchrun`` (``WORLD_SIZE`` set, single- or multi-node)
this process is one of them; otherwise it spawns ``tp`` local processes (gloo on the CPU, NCCL with
one GPU each).
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..engine import Engine
from .tp import TPGroup, load_sharded


class LockstepEngine(Engine):
    """Rank 0's engine: every request change is recorded and broadcast before the next step."""

    def __init__(self, model, tp: TPGroup, **engine_args):
        super().__init__(model, **engine_args)
        self.tp = tp
        self._ops: list[tuple] = []

    def add_request(self, prompt, mode: str = "mask_diffusion", *, request_id=None, **params):
        rid = super().add_request(prompt, mode, request_id=request_id, **params)
        req = self._requests[rid]
        self._ops.append(("add", req.prompt, mode, rid, {**params, "seed": req.seed}))
        return rid

    def abort(self, request_id: str) -> None:
        super().abort(request_id)
        self._ops.append(("abort", request_id))

    def step(self):
        ops, self._ops = self._ops, []
        dist.broadcast_object_list([ops], src=0, group=self.tp.group)
        return super().step()

    def stop_followers(self) -> None:
        dist.broadcast_object_list([[("stop",)]], src=0, group=self.tp.group)


def follow(engine: Engine, tp: TPGroup) -> None:
    """Ranks > 0: replay rank 0's request changes and make the same steps, until it stops."""
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=tp.group)
        for op in box[0]:
            if op[0] == "stop":
                return
            if op[0] == "add":
                _, prompt, mode, rid, params = op
                engine.add_request(prompt, mode, request_id=rid, **params)
            elif op[0] == "abort":
                engine.abort(op[1])
        for out in engine.step():
            if out.finished:
                engine.pop(out.request_id)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tp: int, device: str, job: Callable, *args) -> None:
    """Run ``job(rank, group, device, *args)`` on every rank of a ``tp``-rank group (a module-level
    function: spawned processes import it). Under torchrun this process is one rank; else ``tp``
    local processes are spawned and this one waits for them."""
    if "WORLD_SIZE" in os.environ:
        _rank_main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device, job, args)
        return
    import torch.multiprocessing as mp

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    # Ctrl-C reaches every process of the terminal's group: rank 0 shuts down in order and stops
    # the others; this launcher just waits for them.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        mp.start_processes(_spawned, args=(tp, device, job, args), nprocs=tp, join=True,
                           start_method="spawn")  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, previous)


def _spawned(rank, world, device, job, args):
    _rank_main(rank, world, device, job, args)


def _rank_main(rank: int, world: int, device: str, job: Callable, args) -> None:
    cuda = device.startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    custom = None
    if cuda:  # small all-reduces through the kernels where the GPUs allow it (a collective call)
        from ..ops.all_reduce import CustomAllReduce

        custom = CustomAllReduce(device=torch.device(device))
        if not custom.enabled:
            custom = None
    tp = TPGroup(rank, world, custom=custom)
    try:
        job(rank, tp, device, *args)
        # Every rank past its last collective before any tears the group down: a rank that exits
        # while another is still in gloo/NCCL would abort that one.
        dist.barrier()
    finally:
        if custom is not None:
            custom.close()
        dist.destroy_process_group()


def sharded(model, tp: TPGroup):
    """This rank's shard of a loaded TwoTowerModel, as a TwoTowerModel (tokenizer kept)."""
    return model.with_lm(load_sharded(model, tp))


def run_ranks(rank: int, tp: TPGroup, engine_args: dict, lead: Callable[[Engine], None],
              model) -> None:  # fmt: skip
    """On every rank: the sharded model and its engine (the slot count agreed: the smallest any
    rank's memory allows); rank 0 runs ``lead(engine)`` and then stops the others, which follow it
    meanwhile."""
    from ..engine import plan_pool

    local = sharded(model, tp)
    if engine_args.get("max_slots") is None:
        plan = plan_pool(
            local.config,
            local.dtype,
            local.device,
            context=engine_args.get("context"),
            memory_budget=engine_args.get("memory_budget"),
            gpu_memory_utilization=engine_args.get("gpu_memory_utilization", 0.9),
        )
        slots = torch.tensor([plan.slots])
        dist.all_reduce(slots, op=dist.ReduceOp.MIN, group=tp.group)
        engine_args = {**engine_args, "max_slots": int(slots), "memory_budget": None}
    if rank == 0:
        engine = LockstepEngine(local, tp, **engine_args)
        try:
            lead(engine)
        finally:
            engine.stop_followers()
    else:
        # Rank 0 decides when to stop (a Ctrl-C there ends its job, then it stops the others):
        # interrupted in the middle of a collective, a follower would abort the group.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        follow(Engine(local, **engine_args), tp)


def serve_rank(rank, tp, device, model_path, dtype, engine_args, serve_args) -> None:
    """``twotower-rt serve --tp N``: every rank's part (rank 0 serves HTTP)."""
    from ..api import load
    from ..serve import serve

    model = load(model_path, device=device, dtype=dtype)
    run_ranks(rank, tp, engine_args, lambda engine: serve(model, engine=engine, **serve_args),
              model)  # fmt: skip


def batch_rank(rank, tp, device, model_path, dtype, engine_args, batch_args) -> None:
    """``twotower-rt batch --tp N``: every rank's part (rank 0 reads and writes the files)."""
    from ..api import load
    from ..batch import run_batch

    model = load(model_path, device=device, dtype=dtype)

    def lead(engine):
        summary = run_batch(model=engine.model, engine=engine, **batch_args)
        print(f"twotower-rt batch: {summary.describe()}", flush=True)

    run_ranks(rank, tp, engine_args, lead, model)
