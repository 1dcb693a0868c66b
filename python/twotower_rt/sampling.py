"""Token choice: the AR sampler (temperature, top-k, top-p) and the mask-diffusion commit rule.

Randomness is per sequence (one generator per row, seeded from the request), so a row draws the
same numbers whatever else shares its batch.
"""

from __future__ import annotations

import torch

MASKED_LOGIT = -1e12  # the mask token's logit in diffusion scoring, as in the reference


def make_generators(seeds: list[int], device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def filter_top_k_top_p(
    logits: torch.Tensor, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    """logits (b, V) -> same with the tokens outside the top-k / the top-p nucleus set to -inf.
    The nucleus is the smallest set of most likely tokens whose probability reaches top_p (at least
    one token). Only the top-k candidates are sorted when top_k is given."""
    vocab = logits.shape[-1]
    k = vocab if top_k is None else min(top_k, vocab)
    if k >= vocab and (top_p is None or top_p >= 1.0):
        return logits
    values, indices = torch.topk(logits, k, dim=-1)  # sorted, descending
    if top_p is not None and top_p < 1.0:
        probs = torch.softmax(values, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above
        values = values.masked_fill(before >= top_p, float("-inf"))
    out = torch.full_like(logits, float("-inf"))
    return out.scatter(-1, indices, values)


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """AR / mock-AR choice: logits (b, V) fp32 -> token ids (b,). temperature <= 0 is argmax."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_top_k_top_p(logits / temperature, top_k, top_p), dim=-1)
    return torch.cat(
        [torch.multinomial(probs[r], 1, generator=generators[r]) for r in range(len(probs))]
    )


def diffusion_step(
    logits: torch.Tensor,
    block: torch.Tensor,
    *,
    mask_token_id: int,
    step: int,
    steps_per_block: int,
    confidence_threshold: float,
    temperature: float = 0.0,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """One mask-diffusion decision for every row: returns the new block (b, S).

    Scores log_softmax(logits) with the mask token forced to -1e12; prediction = argmax (Gumbel-max
    of logp / temperature when temperature > 0); confidence = the untempered probability of the
    prediction. Commits k = max(#conf > threshold or 1, ceil(n_masked / (T - step))) of the masked
    positions, highest confidence first (all of them on the last step); the rest stay masked.
    Rows with nothing masked are returned unchanged."""
    masked = block == mask_token_id
    logits = logits.clone()
    logits[..., mask_token_id] = MASKED_LOGIT
    logp = torch.log_softmax(logits, dim=-1)
    pred = logp.argmax(dim=-1)
    if temperature > 0:
        # Noise only for rows that still have masked positions: a row's generator must advance
        # the same whether or not other rows keep the batch stepping.
        for r in torch.nonzero(masked.any(dim=-1)).squeeze(1).tolist():
            pred[r] = (logp[r] / temperature + _gumbel(logp[r], generators[r])).argmax(dim=-1)
    conf = logp.gather(-1, pred[..., None]).squeeze(-1).exp()

    n_masked = masked.sum(dim=-1)  # (b,)
    if step == steps_per_block - 1:
        k = n_masked
    else:
        n_above = (masked & (conf > confidence_threshold)).sum(dim=-1)
        k = torch.where(n_above > 0, n_above, torch.ones_like(n_above))
        remaining = steps_per_block - step
        k = torch.maximum(k, (n_masked + remaining - 1) // remaining)
        k = torch.minimum(k, n_masked)
    # Rank masked positions by confidence, highest first; committed positions rank last.
    ranked = torch.where(masked, conf, torch.full_like(conf, float("-inf")))
    order = torch.argsort(ranked, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(block.shape[-1], device=block.device).expand_as(order)
    )
    commit = masked & (rank < k[:, None])
    return torch.where(commit, pred, block)


def _gumbel(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(like.shape, generator=generator, device=like.device, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    exponential = -torch.log(u.clamp_min(tiny))  # Exp(1) draws
    return -torch.log(exponential.clamp_min(tiny))
