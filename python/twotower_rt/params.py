"""Decoding parameters and input checks: :class:`SamplingParams`, the modes, the bounds every
entry point (``generate``, the engine, the server's and the batch job's request models) applies,
and :func:`check_input_ids`. A leaf module: it imports nothing of the runtime, so ``generate``, the
engine and the protocol layer all import it one way."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MODES = ("ar", "mock_ar", "mask_diffusion", "verified")
# A verified round's context pass writes K/V for a whole block before rolling back, and one more
# round may be launched before the host reads the last one: the context a request needs past
# prompt + max_new_tokens, in blocks.
VERIFIED_SPARE_BLOCKS = 2
SEED_LIMIT = 2**63  # seeds live in int64 tensors (the Philox key)
MAX_STEPS_PER_BLOCK = 2**16  # past block_size every step commits one token anyway (draft_steps too)


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

        def integer(name: str, low: int, high: int | None = None) -> int:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
            if high is not None and value > high:
                raise ValueError(f"{name} must be <= {high}, got {value}")
            return value

        integer("max_new_tokens", 0)
        integer("block_size", 1)
        integer("steps_per_block", 1, MAX_STEPS_PER_BLOCK)
        integer("mask_token_id", 0)
        integer("draft_steps", 1, MAX_STEPS_PER_BLOCK)
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
            if s is not None and s >= SEED_LIMIT:
                raise ValueError(f"seed must be < 2**63, got {s}")

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
