"""The verified mode's acceptance rule (speculative decoding over a drafted block), in PyTorch.

A round's block is ``[pending, d_1, ..., d_{S-1}]``: the pending token (already the AR choice) and
S - 1 tokens the denoiser drafted. The context tower reads the block in one pass; its logits at
block position j are the AR model's prediction for position j + 1. The rule keeps the longest
prefix of drafts the AR model would have produced and then one AR token (the correction at the
first rejection, or a bonus token after a fully accepted block), so every round emits 1 to S
tokens.

- temperature 0: d_j is accepted while it equals the AR argmax (taken with ``sample_tokens`` at
  temperature 0, the op the ``ar`` mode draws with); the emitted tokens are those argmaxes.
- temperature > 0 (speculative sampling): with p_j the AR sampling distribution (softmax of
  logits / T, top-k / top-p filtered, as ``ar`` samples) and q_j the distribution d_j was drawn
  from, d_j is accepted with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection the
  emitted token is drawn from normalise(max(0, p_j - q_j)), after a full block from p_S. Each
  emitted token is then distributed exactly as AR sampling's given the tokens before it, whatever
  the draft (Leviathan et al. 2023), provided q_j is d_j's law given everything else the draft
  holds. A draft token fixed before the draft's last forward has no such law that is cheap to
  know (the commit rule chose it by its own confidence): it is verified with q_j = one_hot(d_j),
  which is exact for any proposal (accept with probability p_j(d_j), else draw from p_j without
  d_j). Tokens drawn by the last forward, where every still-masked position is committed whatever
  its confidence, are independent draws from that forward's softmax: their q_j is that softmax.

Random numbers: Philox (``ops.philox``) at the row's seed, uniforms at ``offset`` (acceptance, one
per position) and Gumbel noise at ``offset + 1`` (the emitted token's draw); the caller advances
the row's offset by ``VERIFY_OFFSETS`` per round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from twotower_rt.ops.philox import gumbel_ref, uniform_ref
from twotower_rt.ops.sample_tokens import filter_top_k_top_p, sample_tokens

VERIFY_OFFSETS = 2  # Philox offsets one round's verification takes


@dataclass
class VerifyOutput:
    """``tokens`` (B, S) int64: the round's emitted tokens, valid in [0, count); ``count`` (B,)
    int64 in [1, S] (accepted drafts + 1); ``next`` (B,): the last emitted token, the pending
    token of the next round."""

    tokens: torch.Tensor
    count: torch.Tensor
    next: torch.Tensor


def _leading(accept: torch.Tensor) -> torch.Tensor:
    """(B, n) bool -> (B,) how many leading entries are True."""
    return accept.to(torch.long).cumprod(dim=-1).sum(dim=-1)


def verify_greedy(ar_logits: torch.Tensor, block: torch.Tensor, draw=sample_tokens) -> VerifyOutput:
    """ar_logits (B, S, V): the context tower's logits over ``block`` (B, S) (position 0 the
    pending token). ``draw``: the AR mode's sampler (``sample_tokens`` or its vocabulary-parallel
    variant), at temperature 0."""
    B, S, V = ar_logits.shape
    choice = draw(ar_logits.reshape(B * S, V), 0.0).reshape(B, S)
    accepted = _leading(block[:, 1:] == choice[:, :-1])
    return VerifyOutput(choice, accepted + 1, choice.gather(1, accepted[:, None])[:, 0])


def ar_probs(ar_logits: torch.Tensor, temperature: float, top_k, top_p) -> torch.Tensor:
    """The distribution ``ar`` samples from at each position: softmax of the filtered logits / T."""
    scaled = ar_logits.to(torch.float32) / temperature
    return torch.softmax(filter_top_k_top_p(scaled, top_k, top_p), dim=-1)


def verify_sampled(
    p: torch.Tensor,
    q: torch.Tensor,
    block: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
) -> VerifyOutput:
    """Speculative sampling of one round.

    p: (B, S, V) fp32, the AR distributions at block positions 0..S-1 (position j predicts j + 1);
    q: (B, S - 1, V) fp32, the draft distributions of block positions 1..S-1 (one_hot(d_j) for a
       token fixed before the draft's last forward);
    block: (B, S) the pending token and the drafts; seed, offset: (B,) int64 Philox key/counter.
    """
    B, S, V = p.shape
    drafts = block[:, 1:]
    p_draft = p[:, :-1].gather(-1, drafts[..., None])[..., 0]  # (B, S - 1)
    q_draft = q.gather(-1, drafts[..., None])[..., 0]
    u = uniform_ref(seed, offset, S, 1)[:, :-1, 0]
    accepted = _leading(u * q_draft < p_draft)  # u < p / q, without dividing by a tiny q
    residual = torch.cat([(p[:, :-1] - q).clamp_min(0.0), p[:, -1:]], dim=1)  # (B, S, V)
    total = residual.sum(dim=-1, keepdim=True)
    # A residual that rounds to nothing (p == q up to fp32) is never drawn from in exact
    # arithmetic (the draft is then always accepted); fall back to p so the draw stays defined.
    residual = torch.where(total > 0, residual, p)
    noise = gumbel_ref(seed, offset + 1, S, V)
    drawn = (residual.log() + noise).argmax(dim=-1)  # (B, S): Gumbel-max over log(residual)
    nxt = drawn.gather(1, accepted[:, None])[:, 0]
    pos = torch.arange(S, device=block.device)[None, :]
    shifted = torch.cat([drafts, drafts[:, :1]], dim=1)  # emitted token j is draft j + 1
    tokens = torch.where(pos < accepted[:, None], shifted, nxt[:, None])
    return VerifyOutput(tokens, accepted + 1, nxt)


def draft_probs(
    draft_logits: torch.Tensor,
    block: torch.Tensor,
    last_drawn: torch.Tensor,
    mask_token_id: int,
    temperature: float,
) -> torch.Tensor:
    """q for :func:`verify_sampled`: the law of each draft token of ``block`` (B, S).

    draft_logits (B, S, V): the denoiser's logits of the draft's last forward; last_drawn (B, S)
    bool: the positions that forward drew (still masked before it). Those get the softmax that
    mask sampling drew them from (the mask token excluded, / T); the others one_hot(token).
    Returns (B, S - 1, V) for positions 1..S-1."""
    x = draft_logits[:, 1:].to(torch.float32, copy=True)
    x[..., mask_token_id] = float("-inf")
    drawn = torch.softmax(torch.log_softmax(x, dim=-1) / temperature, dim=-1)
    fixed = torch.nn.functional.one_hot(block[:, 1:], x.shape[-1]).to(torch.float32)
    return torch.where(last_drawn[:, 1:, None], drawn, fixed)
