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
through the engine (``twotower_rt.engine``), which does the work; this module keeps the parameters,
the input checks and the reference prefill (``_prefill``) that tests and tools build on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .model.cache import ContextCache
from .model.tower import TwoTowerLM

MODES = ("ar", "mock_ar", "mask_diffusion", "verified")
# A verified round's context pass writes K/V for a whole block before rolling back, and one more
# round may be launched before the host reads the last one: the context a request needs past
# prompt + max_new_tokens, in blocks.
VERIFIED_SPARE_BLOCKS = 2


@dataclass
class SamplingParams:
    """Decoding parameters: the reference's names and defaults, plus ``seed``."""

    max_new_tokens: int = 128
    block_size: int = 16
    steps_per_block: int = 16
    mask_token_id: int = 3
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    confidence_threshold: float = 0.9
    draft_steps: int = 1
    eos_token_id: int | list[int] | None = None
    seed: int | list[int] | None = None

    def validate(self, mode: str, vocab_size: int, batch: int) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")

        def integer(name: str, low: int) -> int:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
            return value

        integer("max_new_tokens", 0)
        integer("block_size", 1)
        integer("steps_per_block", 1)
        integer("mask_token_id", 0)
        integer("draft_steps", 1)
        if mode == "verified" and self.block_size < 2:
            raise ValueError(
                f"block_size must be >= 2 in verified mode (the pending token and at least one "
                f"draft), got {self.block_size}"
            )
        if self.mask_token_id >= vocab_size:
            raise ValueError(
                f"mask_token_id {self.mask_token_id} is outside the vocabulary [0, {vocab_size})"
            )
        if mode == "mask_diffusion" and self.max_new_tokens % self.block_size:
            raise ValueError(
                f"max_new_tokens ({self.max_new_tokens}) must be a multiple of block_size "
                f"({self.block_size}) in mask_diffusion mode: generation runs in whole blocks"
            )
        if not _is_number(self.temperature) or not 0 <= self.temperature < math.inf:
            raise ValueError(
                f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if self.top_k is not None:
            integer("top_k", 1)
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_number(self.confidence_threshold) or not math.isfinite(
            self.confidence_threshold
        ):
            raise ValueError(
                f"confidence_threshold must be a finite number, got {self.confidence_threshold!r}"
            )
        for eos in self.eos_ids:
            if not isinstance(eos, int) or isinstance(eos, bool) or not 0 <= eos < vocab_size:
                raise ValueError(f"eos_token_id {eos!r} is not a token id in [0, {vocab_size})")
        if isinstance(self.seed, (list, tuple)):
            if len(self.seed) != batch:
                raise ValueError(f"seed has {len(self.seed)} entries for {batch} prompts")
            seeds = list(self.seed)
        else:
            seeds = [self.seed]
        for s in seeds:
            if s is not None and (not isinstance(s, int) or isinstance(s, bool) or s < 0):
                raise ValueError(f"seed must be a non-negative integer, got {s!r}")

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, (list, tuple)):
            return list(self.eos_token_id)
        return [self.eos_token_id]

    def row_seeds(self, batch: int) -> list[int]:
        if isinstance(self.seed, (list, tuple)):
            return [int(s) for s in self.seed]
        if self.seed is None:  # fresh entropy per row, reproducible under torch.manual_seed
            return [int(s) for s in torch.randint(0, 2**62, (batch,))]
        return [self.seed] * batch


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


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


def check_input_ids(input_ids, vocab_size: int) -> list[list[int]]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids tensor must be 2-D (batch, length), got {input_ids.dim()}")
        input_ids = input_ids.tolist()
    if not isinstance(input_ids, (list, tuple)) or not input_ids:
        raise ValueError("input_ids must be a non-empty list of token-id lists, one per prompt")
    rows = []
    for r, row in enumerate(input_ids):
        if isinstance(row, int):
            raise ValueError(
                "input_ids must be a list of token-id lists (one per prompt); "
                "wrap a single prompt as [ids]"
            )
        if not isinstance(row, (list, tuple)) or not row:
            raise ValueError(f"input_ids[{r}] must be a non-empty list of token ids")
        for i, tok in enumerate(row):
            if not isinstance(tok, int) or isinstance(tok, bool) or not 0 <= tok < vocab_size:
                raise ValueError(
                    f"input_ids[{r}][{i}] = {tok!r} is not a token id in [0, {vocab_size})"
                )
        rows.append([int(t) for t in row])
    return rows


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
        lm.context_forward(ids, cache, n_valid=lengths - 1)
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
