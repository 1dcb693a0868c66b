"""Token choice for generate.py: the AR sampler and one mask-diffusion step, over the ops in
:mod:`twotower_rt.ops` (one implementation of the commit rule: ``ops.mask_sampling``).

Randomness is counter-based and per sequence: each row has an int64 seed (the Philox key) and an
int64 offset (the counter), both (b,) device tensors. A draw is a pure function of (seed, offset,
position, token), so a row draws the same numbers whatever else shares its batch; the caller
advances a row's offset after each draw it takes part in.
"""

from __future__ import annotations

import torch

from .ops.mask_sampling import MASKED_LOGIT, mask_sampling
from .ops.sample_tokens import filter_top_k_top_p, sample_tokens

__all__ = ["MASKED_LOGIT", "diffusion_step", "filter_top_k_top_p", "row_rng", "sample_next"]


def row_rng(seeds, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (seed, offset) int64 tensors on ``device`` for ``seeds`` (ints in [0, 2**63)); the
    offsets start at 0."""
    seed = torch.tensor([int(s) for s in seeds], dtype=torch.int64, device=device)
    return seed, torch.zeros_like(seed)


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """AR / mock-AR choice: logits (b, V) -> token ids (b,). temperature <= 0 is argmax; otherwise
    a draw from softmax(logits / T) after top-k / top-p, with the rows' (seed, offset)."""
    return sample_tokens(logits, temperature, top_k, top_p, seed, offset)


def diffusion_step(
    logits: torch.Tensor,
    block: torch.Tensor,
    *,
    mask_token_id: int,
    step: int,
    steps_per_block: int,
    confidence_threshold: float,
    temperature: float = 0.0,
    seed: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """One mask-diffusion decision for every row: logits (b, S, V), block (b, S) -> the new block.

    See :func:`twotower_rt.ops.mask_sampling`: prediction = argmax (Gumbel-max of logp / T at
    temperature T > 0), confidence = its untempered probability; commits
    k = max(#conf > threshold or 1, ceil(n_masked / (T - step))) of the masked positions, highest
    confidence first (all of them on the last step). Rows with nothing masked come back unchanged.
    """
    return mask_sampling(
        logits,
        block,
        mask_token_id=mask_token_id,
        step=step,
        steps_per_block=steps_per_block,
        confidence_threshold=confidence_threshold,
        temperature=temperature,
        seed=seed,
        offset=offset,
    ).block
