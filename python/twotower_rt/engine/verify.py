"""The verified mode's round-closing step: the draft's last denoiser forward, the context pass over
the drafted block, the acceptance rule and the rollback, as one fixed-shape step of a batch of
slots.

A verified request's round is ``draft_steps`` denoiser forwards over its block ``[pending, mask,
..., mask]``: the first ``draft_steps - 1`` are the engine's ordinary ``denoise`` steps (the mask
diffusion commit rule with ``steps_per_block = draft_steps``), the last is this step's. Then the
context tower reads the whole block in one pass (``recorded_context_forward``), the rule of
``ops.verify_sampling`` keeps the accepted prefix and picks the next pending token, the context
rolls back to the pending token and the accepted drafts (``model.rollback``), and the slot's block
becomes ``[next pending, mask, ...]``. Everything stays on the device: the host reads the emitted
tokens and their count one step later, like every other step's outputs.

Each row keeps its own Philox stream: the last draft forward's noise at the row's offset (advanced
where its block still had masks, as ``denoise`` does), then ``VERIFY_OFFSETS`` for the
verification.
"""

from __future__ import annotations

import torch

from ..model.rollback import recorded_context_forward, roll_back
from ..ops.sample_tokens import sample_tokens
from ..ops.verify_sampling import (
    VERIFY_OFFSETS,
    ar_probs,
    draft_probs,
    verify_greedy,
    verify_sampled,
)


def make_verify_step(lm, pool, key, draw, decide):
    """The step for ``StepKey("verify", (block_size, mask_token_id, draft_steps,
    confidence_threshold, temperature, top_k, top_p))``; ``draw`` / ``decide``: the AR sampler and
    the mask-sampling decision the other steps use (plain or vocabulary-parallel)."""
    size, mask_id, steps, threshold, temperature, top_k, top_p = key.params
    cache, spare, blocks = pool.cache, pool.spare, pool.blocks(size)
    sampled = temperature > 0
    gather = lm.tp is not None and not lm.gather_logits  # the rule needs whole distributions

    greedy_draw = sample_tokens if gather else draw

    def whole(logits):
        return lm.tp.all_gather_last(logits) if gather else logits

    def step(slots):
        cache.lengths[spare] = 0  # padded rows append here: keep them inside its capacity
        block = blocks.index_select(0, slots)
        masked = block == mask_id
        n_masked = masked.sum(dim=-1)
        batch = cache.select(slots)
        draft_logits = lm.denoiser_logits(
            block, batch, prefix_len=batch.lengths, mamba_states=batch.mamba,
            t=n_masked.to(torch.float32) / size,
        )  # fmt: skip
        seed = pool.seeds.index_select(0, slots) if sampled else None
        offset = pool.offsets.index_select(0, slots) if sampled else None
        drafted = decide(
            draft_logits, block, mask_token_id=mask_id, step=steps - 1, steps_per_block=steps,
            confidence_threshold=threshold, temperature=temperature, seed=seed, offset=offset,
        ).block  # fmt: skip
        hidden, record = recorded_context_forward(lm, drafted.to(lm.context_device), batch)
        ar_logits = whole(lm.context_logits(hidden))
        if sampled:
            offset = offset + (n_masked > 0).to(torch.long)
            q = draft_probs(whole(draft_logits), drafted, masked, mask_id, temperature)
            p = ar_probs(ar_logits, temperature, top_k, top_p)
            out = verify_sampled(p, q, drafted, seed, offset)
            pool.offsets.index_copy_(0, slots, offset + VERIFY_OFFSETS)
        else:
            out = verify_greedy(ar_logits, drafted, greedy_draw)
        roll_back(lm, batch, record, out.count.to(batch.lengths.device))
        cache.store(batch, appended=size)
        pool.tokens.index_copy_(0, slots, out.next)
        fresh = torch.full_like(block, mask_id)
        fresh[:, 0] = out.next
        blocks.index_copy_(0, slots, fresh)
        return {"tokens": out.tokens, "count": out.count}

    return step
