"""The three decoding modes over a batch of prompts of any lengths.

- ``ar``: the context tower and ``context_lm_head`` alone, one token per step (the base model).
- ``mock_ar``: per token, the denoiser reads the last context token against the context K/V minus
  that token and the Mamba state from before it; the context tower then takes the chosen token.
- ``mask_diffusion``: blocks of ``block_size`` mask tokens filled in at most ``steps_per_block``
  denoiser forwards each, then committed to the context tower in one pass.
- ``verified``: lossless speculative decoding with the two towers: the denoiser drafts a block in
  ``draft_steps`` forwards (the mask-diffusion rule), the context tower reads it in one pass and
  keeps the longest prefix AR would have produced plus one AR token (``engine/verify.py``). Greedy
  output is ``ar``'s; sampled output is distributed as ``ar``'s.

Every mode starts with the reference's two-pass prefill (prompt[:-1] as a prefill, then the last
token through the one-token path). Each row has its own t, its own random stream (a Philox seed and
a counter offset, advanced only by the draws that row takes part in) and its own EOS; finished
rows leave the batch, and no row's output depends on the others. :func:`generate` runs a batch
through the engine (``twotower_rt.engine``), which does the work; the parameters and the input
checks live in :mod:`twotower_rt.params` (re-exported here); this module keeps the output type and
the reference prefill (``_prefill``) that tests and tools build on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .model.cache import ContextCache
from .model.tower import TwoTowerLM
from .params import (  # noqa: F401 -- the public names, kept importable from here
    MODES,
    VERIFIED_SPARE_BLOCKS,
    SamplingParams,
    check_input_ids,
)


@dataclass
class GenerationOutput:
    """Per row: ``sequences`` prompt + generated ids (like the reference's output), ``nfe`` the
    denoiser forwards it took part in (0 in ``ar``), ``finish_reason`` "eos" or "length", and in
    mask_diffusion ``commits_per_step``: per block, how many positions each executed step
    committed; in verified ``accepted_per_round``: per round, how many drafts were accepted (the
    round emitted one more)."""

    sequences: list[list[int]]
    nfe: list[int]
    prompt_lengths: list[int]
    finish_reason: list[str]
    commits_per_step: list[list[list[int]]] | None = None
    accepted_per_round: list[list[int]] | None = None
    generated: list[list[int]] = field(init=False)
    texts: list[str] | None = None  # the generated text per row (TwoTowerModel with a tokenizer)

    def __post_init__(self) -> None:
        self.generated = [s[n:] for s, n in zip(self.sequences, self.prompt_lengths)]


def row_rng(seeds, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (seed, offset) int64 tensors on ``device`` for ``seeds`` (ints in [0, 2**63)); the
    offsets start at 0. A draw is a pure function of (seed, offset, position, token): a row draws
    the same numbers whatever else shares its batch, and the caller advances a row's offset after
    each draw it takes part in."""
    seed = torch.tensor([int(s) for s in seeds], dtype=torch.int64, device=device)
    return seed, torch.zeros_like(seed)


def _prefill(lm: TwoTowerLM, prompts: list[list[int]], capacity: int, keep_before: bool):
    """The two-pass prefill. Returns the cache, the last prompt position's normed hidden state
    (b, hidden) and, if asked, the Mamba states from before the last prompt token."""
    device = lm.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    cache = ContextCache.allocate(lm.cfg, len(prompts), capacity, lm.dtype, device)
    head = max(len(p) for p in prompts) - 1
    if head > 0:
        ids = torch.tensor([p[:-1] + [0] * (head - len(p) + 1) for p in prompts], device=device)
        lm.context_forward(ids, cache, n_valid=lengths - 1, hidden=False)
    before = cache.snapshot_mamba() if keep_before else None
    last = torch.tensor([[p[-1]] for p in prompts], device=device)
    hidden = lm.context_forward(last, cache)
    return cache, hidden[:, -1], before, last[:, 0]


def generate(lm: TwoTowerLM, input_ids, mode: str = "mask_diffusion", **params) -> GenerationOutput:
    """Every prompt through a :class:`twotower_rt.engine.Engine` sized for exactly this batch (one
    slot per prompt, the longest prompt plus max_new_tokens of context), run to completion."""
    from .engine import Engine

    p = SamplingParams(**params)
    prompts = check_input_ids(input_ids, lm.cfg.vocab_size)
    p.validate(mode, lm.cfg.vocab_size, len(prompts))
    lengths = [len(x) for x in prompts]
    seeds = p.row_seeds(len(prompts)) if p.temperature > 0 else [0] * len(prompts)
    context = max(lengths) + p.max_new_tokens
    if mode == "verified":
        context += VERIFIED_SPARE_BLOCKS * p.block_size
    engine = Engine(lm, max_slots=len(prompts), context=max(context, 2))
    params = {**params, "seed": seeds}
    outs = engine.generate(prompts, mode, **params)
    return GenerationOutput(
        [x + o.generated for x, o in zip(prompts, outs)],
        [o.nfe for o in outs],
        lengths,
        [o.finish_reason for o in outs],
        [o.commits_per_step for o in outs] if mode == "mask_diffusion" else None,
        [o.accepted_per_round for o in outs] if mode == "verified" else None,
    )
