"""Grouped-query attention without positional encoding, in the two ways the towers use it.

- context tower (``append=True``): the new tokens' K/V are written into the cache after each row's
  committed prefix and attend causally (one new token, the AR decode step, is block_attention with
  no block over the prefix and itself);
- denoiser (``append=False``): the block's own K/V are concatenated after the context prefix (read
  only) and every block position sees the whole prefix and the whole block (no mask at all).

Cache layout, per attention layer: keys and values (rows, capacity, kv_heads, head_dim), sequence
b's in row slots[b] (an engine's slot pool) or row b, valid in [0, lengths[b]).

On the CPU fast path with the CPU kernels built and a float32 model, both run as one call of
``ops.block_attention.block_attention_cpu``'s kernel (the append's write included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _ext
from ..config import TwoTowerConfig
from ..ops.block_attention import (
    attention_cpu_run,
    attention_ref,
    block_attention,
    block_attention_ref,
)
from . import cpu_fast
from .linear import make_linear


def prefix_causal_attention(q, keys, values, allowed):
    """The context tower's multi-token append (prefill chunks, block commits): the reference's
    fp32 attention on the CPU; on a GPU torch's SDPA with the boolean mask (its memory-efficient
    kernel: no (b, heads, n, keys) fp32 scores in memory, which at an 8k context would take GBs)."""
    if not q.is_cuda:
        return attention_ref(q, keys, values, allowed)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys.to(q.dtype).transpose(1, 2), values.to(q.dtype).transpose(1, 2),
        attn_mask=allowed[:, None], enable_gqa=True,
    )  # fmt: skip
    return out.transpose(1, 2)


class Attention(nn.Module):
    tp = None  # tensor-parallel group (parallel/tp.py): o_proj's partial sum reduced

    def __init__(self, cfg: TwoTowerConfig):
        super().__init__()
        self.cfg = cfg
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = make_linear(cfg, cfg.hidden_size, hq * d, bias)
        self.k_proj = make_linear(cfg, cfg.hidden_size, hkv * d, bias)
        self.v_proj = make_linear(cfg, cfg.hidden_size, hkv * d, bias)
        self.o_proj = make_linear(cfg, hq * d, cfg.hidden_size, bias)

    def _plain_projections(self) -> bool:
        """Full-precision, unbiased q/k/v projections (what cpu_fast.qkv fuses)."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        return all(isinstance(p, nn.Linear) and p.bias is None for p in projections)

    def forward(
        self,
        h: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        prefix_len: torch.Tensor,
        append: bool,
        slots: torch.Tensor | None = None,
        max_prefix: int | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """h (b, n, hidden); cache_k/v (rows, capacity, Hkv, D); prefix_len (b,) committed tokens
        per sequence; slots (b,) the cache row of each sequence, or None (row b). With ``append``
        the n new K/V are written at [prefix_len, prefix_len + n) (the caller advances the
        lengths); without, the cache is only read. max_prefix: a host-side bound on prefix_len
        (saves reading its max back from the device for a multi-token append). rows (n',) int:
        return the output at these block positions alone, (b, n', hidden) (o_proj runs on them
        alone; every position still attends and is attended to)."""
        cfg = self.cfg
        b, n, _ = h.shape
        fast, (q, k, v) = self._qkv(h)
        q = q.view(b, n, cfg.num_attention_heads, cfg.head_dim)
        kernels = _ext.cpu_kernels() if fast else None
        if kernels is not None and h.dtype == cache_k.dtype == cache_v.dtype == torch.float32 \
                and cache_k.is_contiguous() and cache_v.is_contiguous():  # fmt: skip
            # One kernel call: the append's cache write, the context tower's causal block or
            # the denoiser's whole block (an AR step is a causal block of one).
            out = attention_cpu_run(kernels, q, cache_k, cache_v, prefix_len, k, v, slots,
                                    causal=append, append=append)  # fmt: skip
        elif not append:
            _ext.stream_wait()  # PyTorch ops (cpu_fast's stream)
            attend = block_attention_ref if fast else block_attention  # the CPU path, unchecked
            out = attend(q, cache_k, cache_v, prefix_len, k, v, cache_slots=slots)
        else:
            _ext.stream_wait()
            dev = h.device
            pos = _write_kv(k, v, cache_k, cache_v, prefix_len, slots)
            if n == 1:  # AR decode: the one new token sees the whole prefix and itself
                attend = block_attention_ref if fast else block_attention
                out = attend(q, cache_k, cache_v, prefix_len + 1, cache_slots=slots)
            else:
                span = (int(prefix_len.max()) if max_prefix is None else max_prefix) + n
                if slots is None:
                    keys, values = cache_k[:, :span], cache_v[:, :span]
                else:
                    keys, values = cache_k[slots, :span], cache_v[slots, :span]
                key_pos = torch.arange(span, device=dev)[None, None, :]
                allowed = key_pos <= pos[:, :, None]  # causal; padding rows only see real keys
                out = prefix_causal_attention(q, keys, values, allowed)
        out = out.reshape(b, n, -1)
        if rows is not None:
            _ext.stream_wait()  # a PyTorch op on a kernel's output (cpu_fast's stream)
            out = out.index_select(1, rows)
        out = self.o_proj(out)
        return out if self.tp is None else self.tp.all_reduce(out)

    def _qkv(self, h: torch.Tensor) -> tuple[bool, tuple[torch.Tensor, ...]]:
        """(whether the CPU fast path runs, (q, k, v)), k and v (b, n, Hkv, D)."""
        b, n, _ = h.shape
        fast = cpu_fast.applies(h) and self._plain_projections()
        if fast:  # q, k and v in one matmul
            q, k, v = cpu_fast.qkv(self, h)
        else:
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        shape = (b, n, self.cfg.num_key_value_heads, self.cfg.head_dim)
        return fast, (q, k.view(shape), v.view(shape))

    def append_kv(
        self,
        h: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        prefix_len: torch.Tensor,
        slots: torch.Tensor | None = None,
    ) -> None:
        """The cache write of :meth:`forward` with ``append`` and nothing else: the n new K/V of
        h (b, n, hidden) at [prefix_len, prefix_len + n), the values forward writes, bitwise
        (the same projections); no attention, no o_proj. For a context pass whose output nobody
        reads (``Tower.forward`` with ``outputs=False``)."""
        _, (_, k, v) = self._qkv(h)
        _ext.stream_wait()  # PyTorch ops on a kernel's output (cpu_fast's stream)
        _write_kv(k, v, cache_k, cache_v, prefix_len, slots)


def _write_kv(k, v, cache_k, cache_v, prefix_len, slots) -> torch.Tensor:
    """k and v (b, n, Hkv, D) into the caches at [prefix_len, prefix_len + n) of each sequence's
    row; returns those positions (b, n)."""
    b, n = k.shape[:2]
    pos = prefix_len[:, None] + torch.arange(n, device=k.device)[None, :]
    at = (slots if slots is not None else torch.arange(b, device=k.device))[:, None]
    cache_k[at, pos] = k.to(cache_k.dtype)
    cache_v[at, pos] = v.to(cache_v.dtype)
    return pos
