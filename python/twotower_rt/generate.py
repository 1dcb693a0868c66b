"""The three decoding modes over a batch of prompts of any lengths.

- ``ar``: the context tower and ``context_lm_head`` alone, one token per step (the base model).
- ``mock_ar``: per token, the denoiser reads the last context token against the context K/V minus
  that token and the Mamba state from before it; the context tower then takes the chosen token.
- ``mask_diffusion``: blocks of ``block_size`` mask tokens filled in at most ``steps_per_block``
  denoiser forwards each, then committed to the context tower in one pass.

Every mode starts with the reference's two-pass prefill (prompt[:-1] as a prefill, then the last
token through the one-token path). Each row has its own t, its own random stream (a Philox seed and
a counter offset, advanced only by the draws that row takes part in) and its own EOS; finished
rows leave the batch, and no row's output depends on the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .model.cache import ContextCache
from .model.tower import TwoTowerLM
from .ops.mask_sampling import mask_sampling
from .ops.sample_tokens import sample_tokens

MODES = ("ar", "mock_ar", "mask_diffusion")


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
    committed."""

    sequences: list[list[int]]
    nfe: list[int]
    prompt_lengths: list[int]
    finish_reason: list[str]
    commits_per_step: list[list[list[int]]] | None = None
    generated: list[list[int]] = field(init=False)

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


class _Batch:
    """The rows still generating: their original indices, caches and per-row state, kept
    aligned; ``keep`` drops finished rows from all of them at once."""

    def __init__(self, cache: ContextCache, rng, device):
        self.rows = torch.arange(cache.lengths.shape[0], device=device)
        self.cache = cache
        self.seed, self.offset = rng if rng is not None else (None, None)

    def keep(self, mask: torch.Tensor, *tensors: torch.Tensor):
        idx = torch.nonzero(mask).squeeze(1)
        self.rows = self.rows[idx]
        self.cache = self.cache.index_select(idx)
        if self.seed is not None:
            self.seed, self.offset = self.seed[idx], self.offset[idx]
        return [t.index_select(0, idx) if t is not None else None for t in tensors]


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


@torch.inference_mode()
def generate(lm: TwoTowerLM, input_ids, mode: str = "mask_diffusion", **params) -> GenerationOutput:
    p = SamplingParams(**params)
    prompts = check_input_ids(input_ids, lm.cfg.vocab_size)
    p.validate(mode, lm.cfg.vocab_size, len(prompts))
    b = len(prompts)
    out = [[] for _ in range(b)]
    nfe = [0] * b
    reason = ["length"] * b
    commits = [[] for _ in range(b)] if mode == "mask_diffusion" else None
    if p.max_new_tokens == 0:
        return GenerationOutput(
            [list(x) for x in prompts], nfe, [len(x) for x in prompts], reason, commits
        )

    device = lm.device
    capacity = max(len(x) for x in prompts) + p.max_new_tokens
    cache, hidden, before, last = _prefill(lm, prompts, capacity, keep_before=mode == "mock_ar")
    sampled = p.temperature > 0
    rng = row_rng(p.row_seeds(b), device) if sampled else None
    batch = _Batch(cache, rng, device)
    eos = torch.tensor(p.eos_ids, dtype=torch.long, device=device)

    if mode in ("ar", "mock_ar"):
        logits = lm.context_logits(hidden) if mode == "ar" else None
        for step in range(p.max_new_tokens):
            if mode == "mock_ar":
                cache = batch.cache
                logits = lm.denoiser_logits(
                    last[:, None],
                    cache,
                    prefix_len=cache.lengths - 1,
                    mamba_states=before,
                    t=None,
                )[:, -1]
                for r in batch.rows.tolist():
                    nfe[r] += 1
            token = sample_tokens(logits, p.temperature, p.top_k, p.top_p, batch.seed, batch.offset)
            if batch.offset is not None:
                batch.offset += 1
            done = torch.isin(token, eos)
            for r, tok, d in zip(batch.rows.tolist(), token.tolist(), done.tolist()):
                out[r].append(tok)
                if d:
                    reason[r] = "eos"
            if step == p.max_new_tokens - 1 or bool(done.all()):
                break
            if bool(done.any()):
                (token,) = batch.keep(~done, token)
            if mode == "mock_ar":  # the denoiser's next Mamba seed: the state before `token`
                before = batch.cache.snapshot_mamba()
                last = token
            hidden = lm.context_forward(token[:, None], batch.cache)
            if mode == "ar":
                logits = lm.context_logits(hidden[:, -1])
    else:
        S, T = p.block_size, p.steps_per_block
        n_blocks = p.max_new_tokens // S
        for blk in range(n_blocks):
            cache = batch.cache
            rows = batch.rows.tolist()
            block = torch.full((len(rows), S), p.mask_token_id, dtype=torch.long, device=device)
            for r in rows:
                commits[r].append([])
            for step in range(T):
                n_masked = (block == p.mask_token_id).sum(dim=-1)
                if not bool(n_masked.any()):
                    break
                t = n_masked.to(torch.float32) / S
                logits = lm.denoiser_logits(
                    block, cache, prefix_len=cache.lengths, mamba_states=cache.mamba, t=t
                )
                new_block = mask_sampling(
                    logits,
                    block,
                    mask_token_id=p.mask_token_id,
                    step=step,
                    steps_per_block=T,
                    confidence_threshold=p.confidence_threshold,
                    temperature=p.temperature,
                    seed=batch.seed,
                    offset=batch.offset,
                ).block
                if batch.offset is not None:  # only rows that took this step drew noise
                    batch.offset += n_masked > 0
                n_new = (new_block != block).sum(dim=-1).tolist()
                for r, active, c in zip(rows, n_masked.tolist(), n_new):
                    if active:
                        nfe[r] += 1
                        commits[r][-1].append(c)
                block = new_block
            done = torch.isin(block, eos).any(dim=-1)
            for r, ids, d in zip(rows, block.tolist(), done.tolist()):
                out[r].extend(ids)
                if d:
                    reason[r] = "eos"
            if blk == n_blocks - 1 or bool(done.all()):
                break
            if bool(done.any()):
                (block,) = batch.keep(~done, block)
            lm.context_forward(block, batch.cache)

    sequences = [list(x) + o for x, o in zip(prompts, out)]
    return GenerationOutput(sequences, nfe, [len(x) for x in prompts], reason, commits)
