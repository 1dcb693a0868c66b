"""bench/issue15_sampled.py and ``train.evaluate``'s temperature: greedy rows are the evaluation's
own, sampled rows sample (every mode), and a seed repeats them."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import issue15_sampled  # noqa: E402

import twotower_rt  # noqa: E402
from twotower_rt.train import evaluate as ev  # noqa: E402

TEXTS = ("KING.\nWhat say you to this", "And God said unto Moses, Go", "O Romeo, Romeo, wherefore",
         "Enter two Gentlemen and a")  # fmt: skip


@pytest.fixture(scope="module")
def setup():
    model = twotower_rt.load(twotower_rt.api.DEFAULT_MODEL_DIR, device="cpu", dtype="float32")
    encoded = [model.encode(t) for t in TEXTS]
    prompts = [p[: min(map(len, encoded))] for p in encoded]  # the evaluation's prompts: one length
    truths = [model.encode(" and the rest of it is here, my lord")[:16] for _ in TEXTS]
    return model, prompts, truths


def test_greedy_block_is_the_evaluation_and_sampled_blocks_sample(setup):
    model, prompts, truths = setup
    blocks = issue15_sampled.run(model, prompts, truths, [0.8], [0.0, 1.0], [0, 1], new_tokens=32)
    assert [(b["temperature"], b["seed"]) for b in blocks] == [(0.0, None), (1.0, 0), (1.0, 1)]
    greedy = ev.evaluate(model, prompts, truths, 32, [("ar", None), ("mask_diffusion", 0.8)],
                         resamples=10)  # fmt: skip
    for got, want in zip(blocks[0]["rows"], greedy):
        assert got["ar_nll"] == want["ar_nll"] and got["distinct_2"] == want["distinct_2"]
    # Sampling at T = 1 moves AR's continuations away from its own argmax: a higher AR-NLL.
    assert blocks[1]["rows"][0]["ar_nll"] > blocks[0]["rows"][0]["ar_nll"]
    # Two seeds draw different text (AR and mask diffusion alike).
    for i in range(2):
        assert blocks[1]["rows"][i]["ar_nll"] != blocks[2]["rows"][i]["ar_nll"]


def test_a_seed_repeats_the_sampled_text(setup):
    model, prompts, _ = setup
    for mode, gamma in (("ar", None), ("mask_diffusion", 0.8)):
        a = ev.run_mode(model, prompts, mode, gamma, 32, temperature=1.0, seed=7)[0].generated
        b = ev.run_mode(model, prompts, mode, gamma, 32, temperature=1.0, seed=7)[0].generated
        g = ev.run_mode(model, prompts, mode, gamma, 32)[0].generated
        assert a == b and a != g, mode


def test_each_prompt_draws_from_its_own_stream(setup):
    # The same prompt twice: with one stream for every row the two would sample the same text
    # and half the corpus's bigrams would repeat; with a stream per row they differ.
    model, prompts, truths = setup
    block = issue15_sampled.run(model, [prompts[0]] * 2, truths[:2], [0.8], [1.0], [0], 32)[0]
    ar = block["rows"][0]
    assert ar["mode"] == "ar" and ar["distinct_2"] > 0.5
