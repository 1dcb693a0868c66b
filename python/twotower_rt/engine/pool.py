"""The engine's cache memory: every slot's context K/V and Mamba states, allocated once, up front.

A slot holds one sequence of up to ``context`` tokens (prompt + generation): its K/V in every
attention layer, its conv and SSM state in every Mamba layer, and a second copy of those states for
mock-AR (the denoiser reads the state from before the last token). Admission takes a free slot and
never more memory, so a generation cannot run out of memory half-way; a request that could never
fit a slot is refused when it is submitted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import TwoTowerConfig
from ..model.cache import ContextCache
from ..model.mamba import MambaState

DEFAULT_CPU_SLOTS = 8
DEFAULT_CONTEXT = 4096
MAX_SLOTS = 1024


def slot_bytes(cfg: TwoTowerConfig, context: int, dtype: torch.dtype) -> int:
    """Bytes one slot takes: K and V of ``context`` tokens per attention layer, and two copies
    (current and mock-AR's "before") of each Mamba layer's conv (dtype) and SSM (fp32) state."""
    size = torch.empty((), dtype=dtype).element_size()
    kinds = cfg.layer_kinds
    kv = 2 * context * cfg.num_key_value_heads * cfg.head_dim * size
    conv = cfg.mamba_conv_dim * cfg.conv_kernel * size
    ssm = cfg.mamba_num_heads * cfg.mamba_head_dim * cfg.ssm_state_size * 4
    return kinds.count("attention") * kv + kinds.count("mamba") * 2 * (conv + ssm) + 8


@dataclass(frozen=True)
class PoolPlan:
    """How many sequences and how much context fit: what the engine reports when it starts."""

    slots: int
    context: int  # tokens per slot (prompt + generated)
    bytes_per_slot: int
    budget_bytes: int | None  # what the plan was cut from (None: slots given)

    @property
    def pool_bytes(self) -> int:
        """Bytes allocated: the slots and one spare (the padded rows of bucketed steps)."""
        return (self.slots + 1) * self.bytes_per_slot

    def describe(self) -> str:
        budget = (
            "" if self.budget_bytes is None else f" of a {self.budget_bytes / 2**30:.2f} GiB budget"
        )
        return (
            f"cache pool: {self.slots} sequences x {self.context} tokens "
            f"({self.bytes_per_slot / 2**20:.2f} MiB each; {self.pool_bytes / 2**30:.3f} GiB "
            f"with the spare slot{budget})"
        )


def plan_pool(
    cfg: TwoTowerConfig,
    dtype: torch.dtype,
    device: torch.device,
    *,
    max_slots: int | None = None,
    context: int | None = None,
    memory_budget: int | None = None,
    gpu_memory_utilization: float = 0.9,
) -> PoolPlan:
    """The pool for these limits. ``context`` defaults to 4096 tokens. The slot count is
    ``max_slots`` when given (refused if it exceeds an explicit budget), else as many as fit
    ``memory_budget`` bytes; on a GPU the default budget is what stays free up to
    ``gpu_memory_utilization`` of its memory (the weights are already loaded), on the CPU the
    default is 8 slots."""
    context = DEFAULT_CONTEXT if context is None else context
    if not isinstance(context, int) or isinstance(context, bool) or context < 2:
        raise ValueError(f"context must be an integer >= 2 tokens, got {context!r}")
    if max_slots is not None and (
        not isinstance(max_slots, int) or isinstance(max_slots, bool) or not 1 <= max_slots
    ):
        raise ValueError(f"max_slots must be an integer >= 1, got {max_slots!r}")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    per_slot = slot_bytes(cfg, context, dtype)
    budget = memory_budget
    if budget is None and max_slots is None:
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            budget = int(free - (1 - gpu_memory_utilization) * total)
        else:
            return PoolPlan(DEFAULT_CPU_SLOTS, context, per_slot, None)
    if budget is None:
        return PoolPlan(max_slots, context, per_slot, None)
    fit = min(budget // per_slot - 1, MAX_SLOTS) if budget > 0 else 0  # one spare slot
    if max_slots is not None:
        if max_slots > fit:
            need = (max_slots + 1) * per_slot / 2**30
            raise ValueError(
                f"{max_slots} slots of {context} tokens (and a spare) need {need:.2f} GiB; the "
                f"budget of {budget / 2**30:.2f} GiB holds {max(fit, 0)}"
            )
        fit = max_slots
    if fit < 1:
        raise ValueError(
            f"not one sequence of {context} tokens fits the cache budget of {budget / 2**20:.1f} "
            f"MiB (one needs {per_slot / 2**20:.1f} MiB, and as much for the spare slot): lower "
            "context or raise the budget"
        )
    return PoolPlan(fit, context, per_slot, budget)


class SlotPool:
    """The allocated pool, one row per slot plus ``spare`` (the last row, which no request owns
    and the padded rows of a bucketed step point at):

    - ``cache``: a ContextCache (K/V, Mamba states, lengths); ``before``: mock-AR's Mamba states;
    - ``tokens``: each slot's pending token (AR, mock-AR: the next one to feed, drawn by the last
      step on the device); ``seeds`` and ``offsets``: its Philox key and counter, advanced on the
      device by the draws it takes part in; ``blocks(size)``: its current diffusion block.

    What a step needs of a sequence lives here, on the device, so the steps run back to back
    without the host reading anything in between."""

    def __init__(self, cfg: TwoTowerConfig, plan: PoolPlan, dtype: torch.dtype, device,
                 context_device=None, mirror: bool = False):  # fmt: skip
        """``device``: the denoiser's (and the step state's); ``context_device``: the context
        tower's, where ``cache`` lives (None: the same). With ``mirror`` (tower placement) the
        cache has a copy on ``device`` that every context forward hands its new rows to."""
        self.plan = plan
        rows = plan.slots + 1
        self.spare = plan.slots
        context_device = device if context_device is None else context_device
        self.cache = ContextCache.allocate(cfg, rows, plan.context, dtype, context_device)
        if mirror:
            self.cache.mirror = ContextCache.allocate(cfg, rows, plan.context, dtype, device)
        self.before = {i: MambaState.zeros(cfg, rows, dtype, device) for i in self.cache.mamba}
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.seeds = torch.zeros(rows, dtype=torch.long, device=device)
        self.offsets = torch.zeros(rows, dtype=torch.long, device=device)
        self._blocks: dict[int, torch.Tensor] = {}
        self._free = list(range(plan.slots - 1, -1, -1))  # pop() hands out slot 0 first

    @property
    def free(self) -> int:
        return len(self._free)

    def blocks(self, size: int) -> torch.Tensor:
        """(rows, size) int64: each slot's current block of ``size`` tokens (made on first use)."""
        if size not in self._blocks:
            self._blocks[size] = self.tokens.new_zeros((self.spare + 1, size))
        return self._blocks[size]

    def acquire(self, seed: int = 0) -> int:
        """A free slot, reset: length 0, zero Mamba states (K/V past the length are never read),
        its Philox seed set and counter at 0."""
        slot = self._free.pop()
        for cache in (self.cache, self.cache.mirror):
            if cache is None:
                continue
            cache.lengths[slot] = 0
            for state in cache.mamba.values():
                state.conv[slot].zero_()
                state.ssm[slot].zero_()
        self.seeds[slot] = seed
        self.offsets[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def save_before(self, slots: torch.Tensor) -> None:
        """Mock-AR: keep these slots' current Mamba states as the state before their next token."""
        here = slots.to(self.cache.lengths.device)
        for i, state in self.cache.mamba.items():
            dev = self.before[i].ssm.device
            self.before[i].conv.index_copy_(0, slots, state.conv.index_select(0, here).to(dev))
            self.before[i].ssm.index_copy_(0, slots, state.ssm.index_select(0, here).to(dev))

    def before_states(self, slots: torch.Tensor) -> dict[int, MambaState]:
        """Mock-AR's states of these slots, as rows of the pool (read in place)."""
        return {i: MambaState(s.conv.index_select(0, slots), s.ssm, slots)
                for i, s in self.before.items()}  # fmt: skip
