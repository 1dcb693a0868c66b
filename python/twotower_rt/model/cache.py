"""The context tower's caches for a batch: K/V per attention layer, conv + SSM state per Mamba
layer, and each row's committed length. Allocated once at full capacity; nothing grows.

An engine keeps one cache as a pool of slots and runs each forward on some of them:
``pool.select(slots)`` is a batch over those rows whose K/V are the pool's own tensors (the
attention layers read and write them through ``slots``) and whose lengths and Mamba states are
gathered copies, which ``pool.store(batch)`` writes back after a context forward."""

from __future__ import annotations

import torch

from ..config import TwoTowerConfig
from .mamba import MambaState


class ContextCache:
    def __init__(
        self,
        lengths: torch.Tensor,
        keys: dict[int, torch.Tensor],
        values: dict[int, torch.Tensor],
        mamba: dict[int, MambaState],
        slots: torch.Tensor | None = None,
    ):
        self.lengths = lengths  # (b,) int64: committed tokens per row
        self.keys = keys  # layer -> (rows, capacity, kv_heads, head_dim)
        self.values = values
        self.mamba = mamba  # layer -> MambaState of (b, ...)
        # (b,) int64: row i's K/V live in row slots[i] of keys/values (a batch over a pool's
        # slots); None: row i is row i.
        self.slots = slots
        # A host-side bound on lengths, when the caller knows one: multi-token appends then size
        # their causal attention from it instead of reading lengths.max() back from the device.
        self.max_length: int | None = None
        # Tower placement (parallel/placement.py): a copy of the pool on the denoiser's device,
        # which store() brings up to date after every context forward (a batch: the mirror's).
        self.mirror: ContextCache | None = None

    @classmethod
    def allocate(
        cls, cfg: TwoTowerConfig, batch: int, capacity: int, dtype: torch.dtype, device
    ) -> ContextCache:
        keys, values, mamba = {}, {}, {}
        kv_shape = (batch, capacity, cfg.num_key_value_heads, cfg.head_dim)
        for i, kind in enumerate(cfg.layer_kinds):
            if kind == "attention":
                keys[i] = torch.zeros(kv_shape, dtype=dtype, device=device)
                values[i] = torch.zeros(kv_shape, dtype=dtype, device=device)
            elif kind == "mamba":
                mamba[i] = MambaState.zeros(cfg, batch, dtype, device)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        return cls(lengths, keys, values, mamba)

    @property
    def capacity(self) -> int:
        return next(iter(self.keys.values())).shape[1] if self.keys else 0

    def snapshot_mamba(self) -> dict[int, MambaState]:
        """A copy of every Mamba state as it is now (mock-AR needs the state before a token)."""
        return {i: s.clone() for i, s in self.mamba.items()}

    def select(self, slots: torch.Tensor, max_length: int | None = None) -> ContextCache:
        """A batch over this pool's rows ``slots`` (b,): K/V and SSM states shared (the kernels
        read and write them at the slots), lengths and conv states gathered copies (:meth:`store`
        writes them back, and the SSM states of the PyTorch path). ``max_length``: a bound on
        those rows' lengths that the caller knows on the host (see ``self.max_length``)."""
        if self.slots is not None:
            raise ValueError("select() takes a pool, not a batch selected from one")
        slots = slots.to(self.lengths.device)
        batch = ContextCache(
            self.lengths.index_select(0, slots),
            self.keys,
            self.values,
            {
                i: MambaState(s.conv.index_select(0, slots), s.ssm, slots)
                for i, s in self.mamba.items()
            },  # fmt: skip
            slots=slots,
        )
        batch.max_length = max_length
        if self.mirror is not None:
            batch.mirror = self.mirror.select(slots, max_length)
        return batch

    def store(self, batch: ContextCache, appended: int | None = None) -> None:
        """Write a :meth:`select`ed batch's lengths and Mamba states back into its pool rows;
        with a mirror, also hand the rows' new state to it: lengths, Mamba states and the K/V of
        the ``appended`` positions a context forward just wrote (device to device)."""
        rows = batch.slots
        before = self.lengths.index_select(0, rows) if self.mirror is not None else None
        self.lengths.index_copy_(0, rows, batch.lengths)
        for i, state in batch.mamba.items():
            self.mamba[i].conv.index_copy_(0, rows, state.conv)
            if state.ssm is not self.mamba[i].ssm:  # else updated in place already
                self.mamba[i].ssm.index_copy_(0, rows, state.gathered())
        if self.mirror is not None:
            if appended is None:
                raise ValueError("a cache with a mirror needs store(batch, appended=n)")
            self._hand_off(rows, before, appended)

    def _hand_off(self, rows: torch.Tensor, before: torch.Tensor, appended: int) -> None:
        m = self.mirror
        dev = m.lengths.device
        to = rows.to(dev)
        m.lengths.index_copy_(0, to, self.lengths.index_select(0, rows).to(dev))
        for i, state in self.mamba.items():
            m.mamba[i].conv.index_copy_(0, to, state.conv.index_select(0, rows).to(dev))
            m.mamba[i].ssm.index_copy_(0, to, state.ssm.index_select(0, rows).to(dev))
        if appended and self.keys:
            steps = torch.arange(appended, device=rows.device)
            pos = (before[:, None] + steps[None, :]).clamp_max(self.capacity - 1)  # (b, n)
            pos_m = pos.to(dev)
            for i in self.keys:
                m.keys[i][to[:, None], pos_m] = self.keys[i][rows[:, None], pos].to(dev)
                m.values[i][to[:, None], pos_m] = self.values[i][rows[:, None], pos].to(dev)

    def index_select(self, rows: torch.Tensor) -> ContextCache:
        """The cache of a subset of rows (a copy), e.g. when finished sequences leave a batch."""
        return ContextCache(
            self.lengths.index_select(0, rows),
            {i: k.index_select(0, rows) for i, k in self.keys.items()},
            {i: v.index_select(0, rows) for i, v in self.values.items()},
            {i: s.index_select(rows) for i, s in self.mamba.items()},
        )
