"""The samplers over vocabulary-parallel logits: each rank holds the logits of its slice of the
vocabulary, and what crosses between ranks is a few numbers per position, never the logits.

Mask diffusion (the semantics of :func:`~twotower_rt.ops.mask_sampling.mask_sampling_ref`):

1. each rank: the max and the sum of exp(x - max) of its slice (the mask token forced down where
   its slice holds it); all-gathered, every rank has the global log-sum-exp;
2. each rank: its best position-wise candidate, argmax of logp (temperature 0) or of
   logp / T + gumbel (Philox noise at the *global* vocabulary index, so the draws are the
   single-process ones), with the logp of it; all-gathered, the best over ranks (ties: the lower
   index, i.e. the lower rank) is the prediction and exp(its logp) the confidence;
3. every rank: the commit rule on the same numbers, so every rank's block is the same.

The AR sampler (:func:`~twotower_rt.ops.sample_tokens.sample_tokens_ref`) the same way for greedy
and plain temperature draws; with top-k or top-p the ranks all-gather the logits (those cut-offs
need the whole distribution) and sample as one process does.
"""

from __future__ import annotations

import torch

from ..ops.mask_sampling import MASKED_LOGIT, MaskSamplingOutput, decide
from ..ops.philox import gumbel_ref
from ..ops.sample_tokens import sample_tokens


def _gumbel_slice(seed, offset, positions: int, start: int, count: int) -> torch.Tensor:
    """The Gumbel noise of vocabulary entries [start, start + count) (the full-vocabulary stream
    restricted to the slice: quads from start // 4)."""
    first = start // 4 * 4
    noise = gumbel_ref(seed, offset, positions, start - first + count, quad_start=first // 4)
    return noise[..., start - first :]


def _log_sum_exp(stats: torch.Tensor) -> torch.Tensor:
    """stats (world, 2, ...): each rank's (max, sum of exp(x - max)) -> the global log-sum-exp."""
    maxes, sums = stats[:, 0], stats[:, 1]
    top = maxes.max(dim=0).values
    return top + torch.log((sums * torch.exp(maxes - top)).sum(dim=0))


def _best(cands: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cands (world, 3, ...): each rank's (score, global index, logp); the best over ranks (first
    rank on ties, whose indices are lower) -> (index, logp)."""
    scores = cands[:, 0]
    rank = (scores == scores.max(dim=0, keepdim=True).values).to(torch.int8).argmax(dim=0)
    pick = cands.gather(0, rank[None, None].expand(1, *cands.shape[1:]))[0]
    return pick[1].to(torch.int64), pick[2]


def _gather(tp, t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` stacked on a new first dim, in rank order."""
    return tp.all_gather_last(t[..., None]).movedim(-1, 0)


def tp_mask_sampling(
    logits: torch.Tensor,
    block: torch.Tensor,
    *,
    mask_token_id: int,
    step,
    steps_per_block: int,
    confidence_threshold: float,
    temperature: float = 0.0,
    seed: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    tp,
    vocab_start: int,
) -> MaskSamplingOutput:
    """``mask_sampling`` over this rank's logits (B, S, V / world) of vocabulary entries
    [vocab_start, vocab_start + V / world); the same output on every rank."""
    B, S, V = logits.shape
    x = logits.to(torch.float32, copy=True)
    if vocab_start <= mask_token_id < vocab_start + V:
        x[..., mask_token_id - vocab_start] = MASKED_LOGIT
    top = x.max(dim=-1).values
    sums = torch.exp(x - top[..., None]).sum(dim=-1)
    lse = _log_sum_exp(_gather(tp, torch.stack([top, sums])))
    logp = x - lse[..., None]
    score = logp
    if temperature > 0:
        score = logp / temperature + _gumbel_slice(seed.to(x.device), offset.to(x.device), S,
                                                   vocab_start, V)  # fmt: skip
    local = score.argmax(dim=-1)
    cand = torch.stack([score.gather(-1, local[..., None])[..., 0],
                        (local + vocab_start).to(torch.float32),
                        logp.gather(-1, local[..., None])[..., 0]])  # fmt: skip
    if vocab_start + V > 2**24:
        raise ValueError("vocabulary indices past 2**24 do not survive the float32 exchange")
    prediction, best_logp = _best(_gather(tp, cand))
    return decide(
        prediction,
        best_logp.exp(),
        block,
        mask_token_id=mask_token_id,
        step=step,
        steps_per_block=steps_per_block,
        confidence_threshold=confidence_threshold,
    )


def tp_sample_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    *,
    tp,
    vocab_start: int,
) -> torch.Tensor:
    """``sample_tokens`` over this rank's logits (B, V / world); the same token on every rank."""
    if top_k is not None or (top_p is not None and top_p < 1):
        return sample_tokens(tp.all_gather_last(logits), temperature, top_k, top_p, seed, offset)
    x = logits.to(torch.float32)
    if temperature > 0:
        noise = _gumbel_slice(seed.to(x.device), offset.to(x.device), 1, vocab_start,
                              x.shape[-1])[:, 0]  # fmt: skip
        x = x / temperature + noise
    local = x.argmax(dim=-1)
    cand = torch.stack([x.gather(-1, local[:, None])[:, 0], (local + vocab_start).float(),
                        torch.zeros_like(x[:, 0])])  # fmt: skip
    token, _ = _best(_gather(tp, cand))
    return token
