"""Grouped-query attention without positional encoding, in the two ways the towers use it.

- context tower (``append=True``): the new tokens' K/V are written into the cache after each row's
  committed prefix and attend causally;
- denoiser (``append=False``): the block's own K/V are concatenated after the context prefix (read
  only) and every block position sees the whole prefix and the whole block (no mask at all).

Cache layout, per attention layer: keys and values (batch, capacity, kv_heads, head_dim), row r
valid in [0, lengths[r]).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import TwoTowerConfig


def attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """q (b, n, Hq, D); k, v (b, L, Hkv, D) with Hkv dividing Hq (query head h reads kv head
    h // (Hq / Hkv)); allowed (b, n, L) bool, at least one True per row.
    Softmax and both products in fp32; returns (b, n, Hq, D) in q's dtype."""
    b, n, hq, d = q.shape
    group = hq // k.shape[2]
    qf = q.float().reshape(b, n, k.shape[2], group, d)
    scores = torch.einsum("bnkgd,blkd->bkgnl", qf, k.float()) * (1.0 / math.sqrt(d))
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkgnl,blkd->bnkgd", probs, v.float())
    return out.reshape(b, n, hq, d).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TwoTowerConfig):
        super().__init__()
        self.cfg = cfg
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, hq * d, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=bias)
        self.o_proj = nn.Linear(hq * d, cfg.hidden_size, bias=bias)

    def forward(
        self,
        h: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        prefix_len: torch.Tensor,
        append: bool,
    ) -> torch.Tensor:
        """h (b, n, hidden); cache_k/v (b, capacity, Hkv, D); prefix_len (b,) committed tokens per
        row. With ``append`` the n new K/V are written at [prefix_len, prefix_len + n) (the caller
        advances the lengths); without, the cache is only read."""
        cfg = self.cfg
        b, n, _ = h.shape
        q = self.q_proj(h).view(b, n, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(h).view(b, n, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(h).view(b, n, cfg.num_key_value_heads, cfg.head_dim)
        dev = h.device
        new_pos = torch.arange(n, device=dev)[None, :]
        if append:
            pos = prefix_len[:, None] + new_pos  # (b, n)
            rows = torch.arange(b, device=dev)[:, None]
            cache_k[rows, pos] = k.to(cache_k.dtype)
            cache_v[rows, pos] = v.to(cache_v.dtype)
            span = int(prefix_len.max()) + n
            keys, values = cache_k[:, :span], cache_v[:, :span]
            key_pos = torch.arange(span, device=dev)[None, None, :]
            allowed = key_pos <= pos[:, :, None]  # causal; padding rows only see real keys
        else:
            span = int(prefix_len.max()) if b else 0
            keys = torch.cat([cache_k[:, :span].to(k.dtype), k], dim=1)
            values = torch.cat([cache_v[:, :span].to(v.dtype), v], dim=1)
            key_pos = torch.arange(span + n, device=dev)[None, None, :]
            in_prefix = key_pos < prefix_len[:, None, None]
            allowed = (in_prefix | (key_pos >= span)).expand(b, n, span + n)
        out = attention_ref(q, keys, values, allowed)
        return self.o_proj(out.reshape(b, n, -1))
