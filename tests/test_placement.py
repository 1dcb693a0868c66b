"""Tower placement on the CPU: both towers on "cpu", but the denoiser reads only the mirror that
every context forward hands its rows to, so a hand-off that misses anything changes the golden
outputs."""

import pytest
import torch
from conftest import load_cases
from helpers import free_port, subprocess_env, wait_for_health

import twotower_rt
from twotower_rt.engine import Engine
from twotower_rt.parallel import place_towers

CASES = load_cases("cases.jsonl")


@pytest.mark.parametrize("prefill_chunk", [2048, 5])
def test_placed_towers_reproduce_the_golden_cases(golden_dir, prefill_chunk):
    model = place_towers(twotower_rt.load(golden_dir), "cpu", "cpu")
    engine = Engine(model, max_slots=3, context=256, prefill_chunk=prefill_chunk)
    assert engine.pool.cache.mirror is not None
    ids = {c["id"]: engine.add_request(c["input_ids"], c["mode"], **c["params"]) for c in CASES}
    engine.run()
    for c in CASES:
        out = engine.pop(ids[c["id"]])
        assert c["input_ids"] + out.generated == c["output_ids"], c["id"]
        if c["nfe"] is not None:
            assert out.nfe == c["nfe"], c["id"]


def test_the_denoiser_reads_the_mirror(golden_dir):
    """Spoil the context-side K/V after the hand-off: the denoiser, reading the mirror, is not
    affected; spoil the mirror instead and it is."""
    model = place_towers(twotower_rt.load(golden_dir), "cpu", "cpu")
    engine = Engine(model, max_slots=1, context=64)
    cache = engine.pool.cache
    prompt = CASES[0]["input_ids"]
    rid = engine.add_request(prompt, "mask_diffusion", max_new_tokens=16)
    engine.step()  # prefill and the last prompt token: handed off
    slots = torch.tensor([0])
    batch = cache.select(slots)
    block = torch.full((1, 16), 3)
    t = torch.ones(1)

    def logits():
        return model.lm.denoiser_logits(block, batch, prefix_len=batch.lengths,
                                        mamba_states=batch.mamba, t=t)  # fmt: skip

    before = logits()
    for k in cache.keys.values():
        k.normal_()
    torch.testing.assert_close(logits(), before, rtol=0, atol=0)
    for k in cache.mirror.keys.values():
        k.normal_()
    assert not torch.allclose(logits(), before)
    engine.abort(rid)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_placed_on_two_gpus_matches_one():
    model = twotower_rt.load(device="cuda:0", dtype="bfloat16")
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    want = Engine(model, max_slots=2, context=128).generate(
        prompts, "mask_diffusion", max_new_tokens=32, seed=[1, 2]
    )
    place_towers(model, "cuda:0", "cuda:1")
    got = Engine(model, max_slots=2, context=128).generate(
        prompts, "mask_diffusion", max_new_tokens=32, seed=[1, 2]
    )
    assert [o.generated for o in got] == [o.generated for o in want]


def test_serve_with_placed_towers(default_model):
    """`twotower-rt serve --place-towers cpu cpu`: a completion equals the unplaced engine's."""
    import signal
    import subprocess
    import sys

    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "twotower_rt", "serve", "--place-towers", "cpu", "cpu",
           "--port", str(port), "--max-slots", "2", "--context", "256"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        wait_for_health(proc, port, 60)
        body = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0.7, "seed": 4}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        (want,) = Engine(default_model, max_slots=1, context=256).generate(
            [default_model.encode(body["prompt"])],
            "mask_diffusion",
            max_new_tokens=16,
            temperature=0.7,
            seed=4,
            eos_token_id=[default_model.config.eos_token_id],
        )
        assert r.json()["choices"][0]["token_ids"] == want.generated
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
