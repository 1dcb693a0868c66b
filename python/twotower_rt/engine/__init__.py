"""Continuous batching: :class:`Engine` (requests at any time, one batched forward of each kind per
step) over a :class:`SlotPool` of cache memory planned up front (:func:`plan_pool`)."""

from .engine import Engine, RequestOutput
from .pool import PoolPlan, SlotPool, plan_pool, slot_bytes

__all__ = ["Engine", "PoolPlan", "RequestOutput", "SlotPool", "plan_pool", "slot_bytes"]
