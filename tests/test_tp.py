"""Tensor parallelism on the CPU: TP = 2 and 4 processes (gloo on 127.0.0.1) running the golden
cases through the engine reproduce the reference outputs in all three modes, every rank the same;
and the sharding arithmetic on one process."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import load_cases
from helpers import free_port, subprocess_env, wait_for_health

from twotower_rt.parallel import Shards, shard_state_dict

CASES = load_cases("cases.jsonl")


def _worker(rank, world, port, golden, results, model_dir=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import twotower_rt
        from twotower_rt.engine import Engine
        from twotower_rt.parallel import TPGroup, load_sharded

        lm = load_sharded(twotower_rt.load(model_dir or golden), TPGroup(rank, world))
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
        dist.barrier()  # no rank leaves while another is still in a collective
    except Exception as exc:  # reported to the test, not lost in a child's stderr
        results.put((rank, repr(exc)))
        raise
    finally:
        dist.destroy_process_group()


def _run_ranks(world, golden_dir, model_dir=None):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, str(golden_dir), results,
                                               model_dir)) for r in range(world)]  # fmt: skip
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
    return got


@pytest.mark.parametrize("world", [2, 4])
def test_tp_reproduces_the_golden_cases(golden_dir, world):
    got = _run_ranks(world, golden_dir)
    for case in CASES:
        generated, nfe, commits, reason = got[0][case["id"]]
        assert case["input_ids"] + generated == case["output_ids"], case["id"]
        if case["nfe"] is not None:
            assert nfe == case["nfe"], case["id"]
        if case.get("commits_per_step") is not None:
            assert commits == case["commits_per_step"], case["id"]
        for rank in range(1, world):
            assert got[rank][case["id"]] == got[0][case["id"]], (rank, case["id"])


def test_tp_runs_fp8_checkpoints(golden_dir, tmp_path):
    """An FP8 copy of the golden model (one scale per output channel) over TP = 2 gives the
    tokens the same FP8 model gives in one process."""
    import twotower_rt
    from twotower_rt.engine import Engine
    from twotower_rt.quantize import quantize_checkpoint

    fp8 = tmp_path / "fp8"
    quantize_checkpoint(golden_dir, fp8, (1, 0))
    got = _run_ranks(2, golden_dir, str(fp8))
    engine = Engine(twotower_rt.load(fp8), max_slots=4, context=256)
    ids = {c["id"]: engine.add_request(c["input_ids"], c["mode"], **c["params"]) for c in CASES}
    engine.run()
    for case in CASES:
        out = engine.pop(ids[case["id"]])
        assert got[0][case["id"]][0] == out.generated, case["id"]
        assert got[1][case["id"]] == got[0][case["id"]]


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


def test_batch_with_tp_2_matches_one_process(tmp_path):
    """`twotower-rt batch --tp 2` (two spawned gloo ranks in lockstep) writes the same tokens as
    one process, greedy and sampled, in every mode."""
    import subprocess
    import sys

    modes = ("ar", "mock_ar", "mask_diffusion")
    rows = [{"id": i, "prompt": ["ROMEO. But soft", "And it came to pass"][i % 2],
             "mode": modes[i % 3], "temperature": 0.8 if i % 2 else 0.0, "seed": i}
            for i in range(6)]  # fmt: skip
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    outs = []
    for tp in ("1", "2"):
        out = tmp_path / f"out{tp}.jsonl"
        cmd = [
            sys.executable,
            "-m",
            "twotower_rt",
            "batch",
            str(src),
            str(out),
            "--tp",
            tp,
            "--max-new-tokens",
            "16",
            "--max-slots",
            "4",
            "--context",
            "128",
            "--no-progress",
        ]
        done = subprocess.run(
            cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        outs.append({json.loads(line)["id"]: json.loads(line)["token_ids"]
                     for line in out.read_text().splitlines()})  # fmt: skip
    assert len(outs[0]) == 6 and outs[0] == outs[1]


def test_serve_with_tp_2(default_model):
    """`twotower-rt serve --tp 2`: rank 0 serves HTTP, rank 1 follows; a completion equals the
    one-process engine's; SIGINT stops both ranks."""
    import signal
    import subprocess
    import sys

    import httpx

    from twotower_rt.engine import Engine

    port = free_port()
    cmd = [sys.executable, "-m", "twotower_rt", "serve", "--tp", "2", "--port", str(port),
           "--max-slots", "4", "--context", "256"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        wait_for_health(proc, port, 120)
        body = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0.7, "seed": 3}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        engine = Engine(default_model, max_slots=1, context=256)
        (want,) = engine.generate([default_model.encode(body["prompt"])], "mask_diffusion",
                                  max_new_tokens=16, temperature=0.7, seed=3,
                                  eos_token_id=[default_model.config.eos_token_id])  # fmt: skip
        assert r.json()["choices"][0]["token_ids"] == want.generated[:16]
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: every process of the group gets it
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    stderr = proc.stderr.read().decode()
    assert proc.returncode == 0, stderr[-2000:]  # an orderly stop: rank 0 stopped its follower
    assert "terminate called" not in stderr


def test_tp_group_hands_cuda_tensors_to_the_custom_all_reduce():
    """On GPUs the group's all-reduces go to the kernels' CustomAllReduce (which itself falls
    back to torch.distributed for what it cannot take)."""
    from types import SimpleNamespace

    from twotower_rt.parallel import TPGroup

    calls = []
    custom = SimpleNamespace(all_reduce=lambda t, out: calls.append((t, out)) or out)
    group = TPGroup(0, 2, custom=custom)
    fake_cuda = SimpleNamespace(is_cuda=True)
    assert group.all_reduce(fake_cuda) is fake_cuda and calls == [(fake_cuda, fake_cuda)]
