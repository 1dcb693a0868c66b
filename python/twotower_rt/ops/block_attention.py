"""Block attention (TWOTOWER.md section 3): the denoiser's attention, and with an empty block the
one-token AR decode. Per sequence b, the S queries attend, with no mask at all, over
``[k_cache[b, :context_lens[b]] ; k_block[b]]`` (and the same for V); GQA: query head h reads KV
head h // (Hq / Hkv). No positional encoding anywhere in the model.

Cache layout (the one the runtime keeps): ``(batch, capacity, kv_heads, head_dim)``, row b valid in
``[0, context_lens[b])``; what lies past a row's length is never read.

Only the PyTorch path exists so far: the CUDA kernel (CuTe/wgmma, split-KV with a log-sum-exp
merge) is still to be written, so CUDA tensors run :func:`block_attention_ref` too.
"""

from __future__ import annotations

import math

import torch


def attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """Masked GQA attention. q (b, n, Hq, D); k, v (b, L, Hkv, D) with Hkv dividing Hq;
    allowed (b, n, L) bool, at least one True per row. Softmax and both products in fp32;
    returns (b, n, Hq, D) in q's dtype."""
    b, n, hq, d = q.shape
    group = hq // k.shape[2]
    qf = q.float().reshape(b, n, k.shape[2], group, d)
    scores = torch.einsum("bnkgd,blkd->bkgnl", qf, k.float()) * (1.0 / math.sqrt(d))
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkgnl,blkd->bnkgd", probs, v.float())
    return out.reshape(b, n, hq, d).to(q.dtype)


def block_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    context_lens: torch.Tensor,
    k_block: torch.Tensor | None = None,
    v_block: torch.Tensor | None = None,
) -> torch.Tensor:
    """q (B, S, Hq, D); k_cache, v_cache (B, capacity, Hkv, D); context_lens (B,) int;
    k_block, v_block (B, S, Hkv, D) or None. Returns (B, S, Hq, D) in q's dtype.
    Every row needs at least one key (context_lens[b] > 0 or a block)."""
    B, S = q.shape[:2]
    span = int(context_lens.max()) if B else 0
    keys, values = k_cache[:, :span].to(q.dtype), v_cache[:, :span].to(q.dtype)
    n_block = 0
    if k_block is not None:
        keys = torch.cat([keys, k_block.to(q.dtype)], dim=1)
        values = torch.cat([values, v_block.to(q.dtype)], dim=1)
        n_block = k_block.shape[1]
    key_pos = torch.arange(span + n_block, device=q.device)[None, None, :]
    allowed = (key_pos < context_lens[:, None, None]) | (key_pos >= span)
    return attention_ref(q, keys, values, allowed.expand(B, S, span + n_block))


def block_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    context_lens: torch.Tensor,
    k_block: torch.Tensor | None = None,
    v_block: torch.Tensor | None = None,
) -> torch.Tensor:
    """See the module docstring; shapes as in :func:`block_attention_ref`."""
    if q.dim() != 4 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"block_attention: expected q (B, S, Hq, D) and k_cache/v_cache (B, L, Hkv, D) of one "
            f"shape, got {tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    B, S, hq, d = q.shape
    if k_cache.shape[0] != B or k_cache.shape[3] != d or hq % k_cache.shape[2]:
        raise ValueError(
            f"block_attention: k_cache {tuple(k_cache.shape)} does not fit q {tuple(q.shape)} "
            "(same batch and head_dim, kv_heads dividing the query heads)"
        )
    if context_lens.shape != (B,):
        raise ValueError(f"block_attention: context_lens must be ({B},), got "
                         f"{tuple(context_lens.shape)}")  # fmt: skip
    if (k_block is None) != (v_block is None):
        raise ValueError("block_attention: give both k_block and v_block, or neither")
    if k_block is not None and k_block.shape != (B, S, k_cache.shape[2], d):
        raise ValueError(f"block_attention: k_block must be {(B, S, k_cache.shape[2], d)}, got "
                         f"{tuple(k_block.shape)}")  # fmt: skip
    return block_attention_ref(q, k_cache, v_cache, context_lens, k_block, v_block)


def block_attention_backend(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16
) -> tuple[str, str]:
    """``(backend, reason)``: only the PyTorch path exists so far."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return "none", "no CUDA device visible to PyTorch"
    if device.type == "cuda":
        return "torch", "no CUDA kernel yet (issue 3): PyTorch path (block_attention_ref)"
    return "torch", f"{device.type} tensors run block_attention_ref"
