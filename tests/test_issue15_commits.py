"""bench/issue15_commits.py: the per-commit log of a mask-diffusion generation (which step
committed each token, forced or above the threshold, at the frontier or ahead of it)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import issue15_commits  # noqa: E402

import twotower_rt  # noqa: E402
from twotower_rt.engine import steps as engine_steps  # noqa: E402
from twotower_rt.train.evaluate import ar_token_scores  # noqa: E402
from twotower_rt.train.tokenizer import MASK_ID  # noqa: E402


def test_commits_of_classifies_by_hand():
    M = MASK_ID
    b0 = torch.full((16,), M)
    b1 = b0.clone()
    b1[[0, 1, 5]] = torch.tensor([10, 11, 15])  # step 1: 0, 1 (frontier, then ahead) and 5
    b2 = b1.clone()
    b2[2:5] = torch.tensor([12, 13, 14])
    b2[6:] = torch.arange(16, 26)  # step 2: the rest; 2 is the frontier now
    conf1 = torch.full((16,), 0.5)
    conf1[[0, 1, 5]] = torch.tensor([0.99, 0.85, 0.6])
    conf2 = torch.full((16,), 0.9)
    conf2[2] = 0.8  # exactly gamma: forced
    steps = [(b0, b1, conf1), (b1, b2, conf2), (b0, b0.clone().fill_(7), torch.ones(16))]
    recs = issue15_commits.commits_of(steps, gamma=0.8)
    by_pos = {r["pos"]: r for r in recs}
    assert sorted(by_pos) == list(range(32))  # the third step starts the second block
    assert by_pos[0]["frontier"] and not by_pos[0]["forced"]
    assert not by_pos[1]["frontier"]  # position 0 was masked before this step
    assert by_pos[5]["forced"] and not by_pos[5]["frontier"]
    assert by_pos[2]["frontier"] and by_pos[2]["forced"]
    assert not by_pos[3]["frontier"] and by_pos[16]["frontier"]


def test_a_real_generation_is_logged_token_by_token():
    model = twotower_rt.load()
    prompt = model.encode("KING.\nWhat say you to this?\n\nQUEEN.\n")
    decide = engine_steps.mask_sampling
    gen, steps, nfe = issue15_commits.generate_logged(model, prompt, 0.8, 32)
    assert engine_steps.mask_sampling is decide  # the engine's op is put back
    # The engine may run a step on a block already complete (or past the end) and drop it; nfe
    # counts the others.
    assert len(gen) == 32 and 0 < nfe <= len(steps)
    recs = [r for r in issue15_commits.commits_of(steps, 0.8) if r["pos"] < 32]
    assert sorted(r["pos"] for r in recs) == list(range(32))  # each token committed once
    for r in recs:
        assert r["forced"] == (r["confidence"] <= 0.8)
    # Without the log the same tokens come out.
    plain = model.generate([prompt], mode="mask_diffusion", max_new_tokens=32, temperature=0.0,
                           block_size=16, steps_per_block=16, confidence_threshold=0.8)  # fmt: skip
    assert list(plain.generated[0]) == gen


@pytest.mark.parametrize("gamma", [0.5, 0.9])
def test_ar_scores_are_the_context_towers(gamma):
    model = twotower_rt.load()
    prompt = model.encode("Enter the KING.\n\n")
    gen = issue15_commits.generate_logged(model, prompt, gamma, 16)[0]
    nll, agree = ar_token_scores(model.lm, [prompt], [gen])
    full = torch.tensor([prompt + gen])
    logits = model.lm.context_logits(model.lm.context_forward(full[:, :-1], _cache(model, full)))
    logp = torch.log_softmax(logits, -1)[0, len(prompt) - 1 :]
    want = -logp.gather(-1, torch.tensor(gen)[:, None]).squeeze(-1)
    torch.testing.assert_close(nll[0], want)
    assert torch.equal(agree[0], logp.argmax(-1) == torch.tensor(gen))


def _cache(model, seqs):
    from twotower_rt.model.cache import ContextCache

    lm = model.lm
    return ContextCache.allocate(lm.cfg, seqs.shape[0], seqs.shape[1], lm.dtype, lm.device)
