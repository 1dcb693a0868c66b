"""Tensor parallelism on the CPU: TP = 2 and 4 processes (gloo on 127.0.0.1) running the golden
cases through the engine reproduce the reference outputs in all three modes, every rank the same;
and the sharding arithmetic on one process."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import load_cases

from twotower_rt.parallel import Shards, shard_state_dict

CASES = load_cases("cases.jsonl")


def _worker(rank, world, port, golden, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import twotower_rt
        from twotower_rt.engine import Engine
        from twotower_rt.parallel import TPGroup, load_sharded

        lm = load_sharded(twotower_rt.load(golden), TPGroup(rank, world))
        engine = Engine(lm, max_slots=4, context=256)
        cases = [json.loads(line) for line in open(os.path.join(golden, "cases.jsonl"))]
        ids = {c["id"]: engine.add_request(c["input_ids"], c["mode"], **c["params"])
               for c in cases}  # fmt: skip
        engine.run()
        out = {}
        for c in cases:
            o = engine.pop(ids[c["id"]])
            out[c["id"]] = (o.generated, o.nfe, o.commits_per_step, o.finish_reason)
        results.put((rank, out))
    except Exception as exc:  # reported to the test, not lost in a child's stderr
        results.put((rank, repr(exc)))
        raise
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 4])
def test_tp_reproduces_the_golden_cases(golden_dir, world):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, str(golden_dir), results))
             for r in range(world)]  # fmt: skip
    for p in procs:
        p.start()
    got = {}
    try:
        for _ in range(world):
            rank, out = results.get(timeout=300)
            got[rank] = out
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    for rank in range(world):
        assert isinstance(got[rank], dict), f"rank {rank} failed: {got[rank]}"
    for case in CASES:
        generated, nfe, commits, reason = got[0][case["id"]]
        assert case["input_ids"] + generated == case["output_ids"], case["id"]
        if case["nfe"] is not None:
            assert nfe == case["nfe"], case["id"]
        if case.get("commits_per_step") is not None:
            assert commits == case["commits_per_step"], case["id"]
        for rank in range(1, world):
            assert got[rank][case["id"]] == got[0][case["id"]], (rank, case["id"])


def test_shards_put_every_weight_somewhere(golden_model):
    """Concatenating the ranks' slices gives back every sliced weight; replicated ones are whole;
    the local configs' shapes are the slices' shapes."""
    from twotower_rt.checkpoint import expected_shapes

    cfg = golden_model.config
    state = golden_model.lm.state_dict()
    for world in (2, 4):
        shards = [shard_state_dict(state, cfg, r, world) for r in range(world)]
        for r, shard in enumerate(shards):
            local = Shards(cfg, world).local_config(r)
            shapes = {k: tuple(v) for k, v in expected_shapes(local).items()}
            for head in ("lm_head.weight", "context_lm_head.weight"):  # vocabulary-parallel
                shapes[head] = (cfg.vocab_size // world, cfg.hidden_size)
            assert {k: tuple(v.shape) for k, v in shard.items()} == shapes
        up = [s["context_tower.layers.1.mixer.experts.0.up_proj.weight"] for s in shards]
        expert = "context_tower.layers.1.mixer.experts.0.up_proj.weight"
        assert torch.equal(torch.cat(up), state[expert])
        head = torch.cat([s["lm_head.weight"] for s in shards])
        assert torch.equal(head, state["lm_head.weight"])
        embed = "context_tower.embeddings.weight"
        assert all(torch.equal(s[embed], state[embed]) for s in shards)


def test_unsupported_splits_are_refused(golden_model):
    cfg = golden_model.config
    with pytest.raises(ValueError, match="divisible by 3"):
        Shards(cfg, 3).check()
    with pytest.raises(ValueError, match="divisible by 8"):
        Shards(cfg, 8).check()
