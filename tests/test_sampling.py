"""The AR sampler and the mask-diffusion commit rule, by distribution and by hand-made cases."""

import math

import pytest
import torch
from helpers import assert_frequencies

from twotower_rt.generate import row_rng
from twotower_rt.ops.mask_sampling import mask_sampling
from twotower_rt.ops.sample_tokens import filter_top_k_top_p
from twotower_rt.ops.sample_tokens import sample_tokens as sample_next


def diffusion_step(logits, block, **kwargs):
    """One mask-diffusion step as generate() takes it: the new block."""
    return mask_sampling(logits, block, **kwargs).block


MASK = 3


def draw_many(logits_row, n_rows, draws, **kw):
    """n_rows seeds x draws offsets of one distribution -> counts per token."""
    seed, _ = row_rng(range(1000, 1000 + n_rows), "cpu")
    logits = logits_row.expand(n_rows, -1).clone()
    counts = torch.zeros(logits_row.shape[-1])
    for draw in range(draws):
        offset = torch.full_like(seed, draw)
        counts += torch.bincount(
            sample_next(logits, seed=seed, offset=offset, **kw), minlength=logits.shape[-1]
        )
    return counts


def test_greedy_is_argmax():
    logits = torch.randn(7, 50)
    assert torch.equal(sample_next(logits, temperature=0.0), logits.argmax(-1))


def test_temperature_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    counts = draw_many(logits, 20, 400, temperature=0.7)
    assert_frequencies(counts, torch.softmax(logits / 0.7, -1))


def test_top_k_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, 1.5])
    counts = draw_many(logits, 20, 300, temperature=1.0, top_k=3)
    probs = torch.tensor([math.exp(2.0), math.exp(1.0), 0, 0, 0, math.exp(1.5)])
    assert_frequencies(counts, probs / probs.sum())


def test_top_p_distribution():
    probs = torch.tensor([0.10, 0.50, 0.15, 0.25])
    # Sorted: 0.5, 0.25 (cum 0.75 >= 0.7 -> stop): the nucleus is tokens 1 and 3.
    counts = draw_many(probs.log(), 20, 300, temperature=1.0, top_p=0.7)
    assert_frequencies(counts, torch.tensor([0.0, 0.5, 0.0, 0.25]) / 0.75)


def test_top_k_top_p_keep_at_least_one_and_never_minus_inf_drawn():
    logits = torch.randn(4, 300)
    logits[:, 7] = float("-inf")
    filtered = filter_top_k_top_p(logits, top_k=5, top_p=1e-6)
    assert torch.equal((filtered > float("-inf")).sum(-1), torch.ones(4, dtype=torch.long))
    seed, offset = row_rng(range(4), "cpu")
    for _ in range(50):
        assert not (sample_next(logits, 2.0, seed=seed, offset=offset) == 7).any()
        offset += 1


def logits_with_confidence(top_tokens, confidences, vocab=8):
    """Logits whose softmax over the non-mask tokens gives token top_tokens[i] probability
    confidences[i] at position i, the rest spread evenly; the mask token gets a huge logit (it
    must be ignored)."""
    rows = []
    for tok, c in zip(top_tokens, confidences):
        p = torch.full((vocab,), (1 - c) / (vocab - 2))
        p[tok] = c
        p[MASK] = 1.0  # placeholder, overwritten below
        row = p.log()
        row[MASK] = 50.0
        rows.append(row)
    return torch.stack(rows)[None]


def step(logits, block, step_idx, steps=4, threshold=0.9, **kw):
    return diffusion_step(
        logits,
        torch.tensor([block]),
        mask_token_id=MASK,
        step=step_idx,
        steps_per_block=steps,
        confidence_threshold=threshold,
        **kw,
    )[0].tolist()


def test_commit_above_threshold():
    logits = logits_with_confidence([4, 5, 6, 7, 4, 5], [0.95, 0.5, 0.92, 0.3, 0.91, 0.2])
    # 3 above 0.9; the schedule asks ceil(6 / 4) = 2 -> commit the 3 confident ones.
    assert step(logits, [MASK] * 6, 0) == [4, MASK, 6, MASK, 4, MASK]


def test_commit_schedule_floor():
    logits = logits_with_confidence([4, 5, 6, 7, 4, 5], [0.5, 0.6, 0.7, 0.3, 0.4, 0.2])
    # none above 0.9 -> k = max(1, ceil(6 / (4 - 1))) = 2: the two most confident (0.7, 0.6).
    assert step(logits, [MASK] * 6, 1) == [MASK, 5, 6, MASK, MASK, MASK]
    # at least one even when the schedule asks less: ceil(6 / 16) = 1
    assert step(logits, [MASK] * 6, 0, steps=16) == [MASK, MASK, 6, MASK, MASK, MASK]


def test_threshold_is_strict():
    logits = logits_with_confidence([4, 5], [0.75, 0.5])
    # exactly at the threshold does not count -> only the schedule's 1
    out = step(logits, [MASK, MASK], 0, steps=16, threshold=0.75 * (1 - 1e-7) + 1e-6)
    assert out == [4, MASK]


def test_last_step_commits_everything_and_committed_stay():
    logits = logits_with_confidence([4, 5, 6, 7], [0.3, 0.35, 0.4, 0.45])
    assert step(logits, [MASK, 2, MASK, 1], 3) == [4, 2, 6, 1]
    # committed positions are never revisited, even when confident elsewhere
    assert step(logits, [0, MASK, 2, MASK], 0, threshold=0.0) == [0, 5, 2, 7]


def test_rows_are_independent():
    a = logits_with_confidence([4, 5, 6], [0.95, 0.1, 0.2])
    b = logits_with_confidence([7, 6, 5], [0.1, 0.2, 0.3])
    both = diffusion_step(
        torch.cat([a, b]),
        torch.tensor([[MASK] * 3, [MASK, 1, MASK]]),
        mask_token_id=MASK,
        step=0,
        steps_per_block=16,
        confidence_threshold=0.9,
    )
    assert both.tolist() == [[4, MASK, MASK], [MASK, 1, 5]]


def test_gumbel_prediction_distribution_and_untempered_confidence():
    """At temperature T the prediction follows softmax(logp / T) over non-mask tokens; the mask
    token (largest raw logit) is never drawn."""
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 8)
    logits[..., MASK] = 30.0
    seed, offset = row_rng([11], "cpu")
    counts = torch.zeros(8)
    for _ in range(6000):
        new = diffusion_step(
            logits,
            torch.tensor([[MASK]]),
            mask_token_id=MASK,
            step=0,
            steps_per_block=1,
            confidence_threshold=0.9,
            temperature=0.8,
            seed=seed,
            offset=offset,
        )
        offset += 1
        counts[new[0, 0]] += 1
    masked_logits = logits[0, 0].clone()
    masked_logits[MASK] = float("-inf")
    assert_frequencies(counts, torch.softmax(masked_logits / 0.8, -1))


def test_gumbel_confidence_is_untempered():
    # At a tiny temperature both predictions are the top tokens; tempered, both would have
    # confidence ~1 > 0.9, but the rule uses the untempered 0.99 and 0.6: only one commits.
    logits = logits_with_confidence([4, 5], [0.99, 0.6])
    seed, offset = row_rng([5], "cpu")
    out = step(logits, [MASK, MASK], 0, steps=16, temperature=1e-3, seed=seed, offset=offset)
    assert out == [4, MASK]


@pytest.mark.parametrize(
    "n_masked, steps, step_idx, want",
    [
        (16, 16, 0, 1),
        (16, 4, 0, 4),
        (15, 4, 1, 5),
        (5, 4, 2, 3),
        (7, 16, 15, 7),
    ],
)
def test_ceil_schedule(n_masked, steps, step_idx, want):
    """With no confident position, exactly ceil(n / (T - step)) commit (all on the last step)."""
    S = 16
    logits = logits_with_confidence([4] * S, torch.linspace(0.2, 0.3, S).tolist())
    block = [MASK] * n_masked + [0] * (S - n_masked)
    out = step(logits, block, step_idx, steps=steps)
    assert sum(t != MASK for t in out[:n_masked]) == want
    # the committed ones are the most confident masked positions (confidence rises with index)
    committed = [i for i in range(n_masked) if out[i] != MASK]
    assert committed == list(range(n_masked - want, n_masked))
