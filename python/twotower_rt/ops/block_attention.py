"""Block attention (TWOTOWER.md section 3): the denoiser's attention, and with an empty block the
one-token AR decode. Per sequence b, the S queries attend, with no mask at all, over
``[k_cache[b, :context_lens[b]] ; k_block[b]]`` (and the same for V); GQA: query head h reads KV
head h // (Hq / Hkv). No positional encoding anywhere in the model.

Cache layout (the one the runtime keeps): ``(cache rows, capacity, kv_heads, head_dim)``; sequence b
reads cache row ``cache_slots[b]`` (default b), valid in ``[0, context_lens[b])``; what lies past a
row's length is never read. A pool of slots (the engine's) and a plain per-batch cache are the same
layout.

CUDA bfloat16 tensors run the kernel ``csrc/include/twotower_rt/block_attention.cuh`` (mma.sync
tensor cores, split-KV with a log2-sum-exp merge; head_dim 32, 64 or 128); everything else runs
:func:`block_attention_ref`. The model's CPU fast path (float32, CPU kernels built) calls
:func:`block_attention_cpu`'s kernel instead (``csrc/cpu/attention_cpu.cpp``), which also does the
context tower's causal append, cache write included. The split count comes from
:func:`plan_splits`, which depends only on shapes and the GPU's SM count (never on the device-side
lengths), so a captured CUDA graph stays valid as lengths change.

``variant="wgmma"`` asks for the Hopper warpgroup-MMA kernel of the denoise step
(``csrc/include/twotower_rt/block_attention_sm90.cuh``, head_dim 128). It is compiled but has never
run on a GPU: unverified, so off by default. :func:`kernel_variant` says which kernel a shape gets.
"""

from __future__ import annotations

import functools
import math

import torch

from twotower_rt import _ext

KERNEL_DTYPES = (torch.bfloat16,)
KERNEL_HEAD_DIMS = (32, 64, 128)
MAX_SPLITS = 256  # csrc block_attention::kMaxSplits
_BLOCK_N = 64  # keys per tile in the kernel
_DECODE_ROWS = 16  # rows per KV head at or below which the one-warp kernel runs
VARIANTS = ("mma_sync", "wgmma")  # the kernel's variant codes 0, 1 (csrc/block_attention.cu)
WGMMA_HEAD_DIMS = (128,)


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
    *,
    cache_slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """q (B, S, Hq, D); k_cache, v_cache (rows, capacity, Hkv, D); context_lens (B,) int;
    k_block, v_block (B, S, Hkv, D) or None; cache_slots (B,) int or None (row b).
    Returns (B, S, Hq, D) in q's dtype. Every row needs at least one key (context_lens[b] > 0 or
    a block); the kernel gives zeros for a row without any, this gives NaN."""
    B, S = q.shape[:2]
    span = int(context_lens.max()) if B else 0
    rows = cache_slots.long() if cache_slots is not None else slice(None)
    keys, values = k_cache[rows, :span].to(q.dtype), v_cache[rows, :span].to(q.dtype)
    n_block = 0
    if k_block is not None:
        keys = torch.cat([keys, k_block.to(q.dtype)], dim=1)
        values = torch.cat([values, v_block.to(q.dtype)], dim=1)
        n_block = k_block.shape[1]
    key_pos = torch.arange(span + n_block, device=q.device)[None, None, :]
    allowed = (key_pos < context_lens[:, None, None]) | (key_pos >= span)
    return attention_ref(q, keys, values, allowed.expand(B, S, span + n_block))


def block_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    context_lens: torch.Tensor,
    k_block: torch.Tensor | None = None,
    v_block: torch.Tensor | None = None,
    *,
    cache_slots: torch.Tensor | None = None,
    causal: bool = False,
    append: bool = False,
) -> torch.Tensor:
    """:func:`block_attention_ref` in one call of ``twotower_rt._cpu``
    (``csrc/cpu/attention_cpu.cpp``), float32 CPU tensors: q (B, S, Hq, D) and k_block, v_block
    (B, S, Hkv, D) with contiguous heads, k_block and v_block with the same strides (views of a
    fused q/k/v projection qualify); the caches contiguous; context_lens and cache_slots (B,)
    int. With ``causal`` query s sees block keys [0, s] (the context tower's append) instead of
    all S; with
    ``append`` the block's K/V are first written into the cache at [context_lens, + S). Agrees
    with the reference to float32 rounding, each query alone; a query without keys gets zeros."""
    C = _ext.cpu_kernels()
    if C is None:
        raise RuntimeError(
            f"twotower_rt: CPU op 'block_attention' cannot run: {_ext.cpu_kernels_error()}"
        )
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"block_attention_cpu: q must be (B, S, Hq, D) and the caches (rows, "
                         f"capacity, Hkv, D) alike, got {tuple(q.shape)}, {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")  # fmt: skip
    B, S, hq, d = q.shape
    hkv = k_cache.shape[2]
    if k_cache.shape[3] != d or hq % hkv:
        raise ValueError(f"block_attention_cpu: cache heads {tuple(k_cache.shape[2:])} do not fit "
                         f"q's ({hq}, {d})")  # fmt: skip
    if (k_block is None) != (v_block is None) or (append and k_block is None):
        raise ValueError("block_attention_cpu: give k_block and v_block together (append needs "
                         "them)")  # fmt: skip
    named = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache)]
    if k_block is not None:
        named += [("k_block", k_block), ("v_block", v_block)]
        if k_block.shape != (B, S, hkv, d) or v_block.shape != k_block.shape:
            raise ValueError(f"block_attention_cpu: k_block and v_block must be {(B, S, hkv, d)}, "
                             f"got {tuple(k_block.shape)} and {tuple(v_block.shape)}")  # fmt: skip
        if k_block.stride() != v_block.stride() or not _heads_contiguous(k_block):
            raise ValueError("block_attention_cpu: k_block and v_block need the same strides and "
                             "contiguous heads")  # fmt: skip
    for name, t in named:
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"block_attention_cpu: {name} must be a float32 CPU tensor, got "
                             f"{t.dtype} on {t.device}")  # fmt: skip
    if not _heads_contiguous(q):
        raise ValueError("block_attention_cpu: q needs contiguous heads")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("block_attention_cpu: the caches must be contiguous")
    for name, t in (("context_lens", context_lens), ("cache_slots", cache_slots)):
        if t is not None and (t.shape != (B,) or t.device.type != "cpu"
                              or t.dtype not in (torch.int32, torch.int64)):  # fmt: skip
            raise ValueError(f"block_attention_cpu: {name} must be a ({B},) int CPU tensor, got "
                             f"{t.dtype} on {t.device} of shape {tuple(t.shape)}")  # fmt: skip
    return attention_cpu_run(C, q, k_cache, v_cache, context_lens, k_block, v_block, cache_slots,
                             causal=causal, append=append)  # fmt: skip


def _heads_contiguous(t: torch.Tensor) -> bool:
    """(B, S, H, D) whose H x D values of each token are contiguous (any token strides)."""
    _, _, H, D = t.shape
    return (t.stride(3) == 1 or D == 1) and (t.stride(2) == D or H == 1)


def attention_cpu_run(C, q, k_cache, v_cache, context_lens, k_block, v_block, cache_slots, *,
                      causal: bool, append: bool) -> torch.Tensor:  # fmt: skip
    """:func:`block_attention_cpu` without its tensor checks, for the model's attention (whose
    tensors are the kernel's by construction); the kernel still checks every length and slot
    before it reads or writes. ``C``: the loaded ``twotower_rt._cpu``."""
    B, S, hq, d = q.shape
    rows, capacity, hkv, _ = k_cache.shape
    if context_lens.dtype != torch.int64 or not context_lens.is_contiguous():
        context_lens = context_lens.long().contiguous()
    if cache_slots is not None and (cache_slots.dtype != torch.int64
                                    or not cache_slots.is_contiguous()):  # fmt: skip
        cache_slots = cache_slots.long().contiguous()
    out = q.new_empty((B, S, hq, d))
    block = k_block is not None
    _ext.keep(q, context_lens, cache_slots, k_block, v_block, out)
    C.block_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), context_lens.data_ptr(),
        0 if cache_slots is None else cache_slots.data_ptr(),
        k_block.data_ptr() if block else 0, v_block.data_ptr() if block else 0, out.data_ptr(),
        B, S, hq, hkv, d, capacity, rows, q.stride(1), q.stride(0),
        k_block.stride(1) if block else 0, k_block.stride(0) if block else 0,
        1.0 / math.sqrt(d), causal, append,
    )  # fmt: skip
    return out


def block_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    context_lens: torch.Tensor,
    k_block: torch.Tensor | None = None,
    v_block: torch.Tensor | None = None,
    *,
    cache_slots: torch.Tensor | None = None,
    max_context_len: int | None = None,
    out: torch.Tensor | None = None,
    variant: str = "mma_sync",
) -> torch.Tensor:
    """Attention of the S block queries over each sequence's context and its block.

    Shapes:
        q:            (B, S, Hq, D)
        k_cache, v_cache: (rows, capacity, Hkv, D); Hkv divides Hq; rows = B without cache_slots
        context_lens: (B,) int32/int64 on q's device, each in [0, capacity]
        k_block, v_block: (B, S, Hkv, D) or both None (AR decode: S = 1, no block)
        cache_slots:  (B,) int, the cache row of each sequence (an engine's slot pool), or None
        max_context_len: a host-side upper bound on context_lens; only the kernel's split count
                      depends on it (default: capacity). Never read from the device.
        out:          (B, S, Hq, D) in q's dtype, written in place; allocated when None.
        variant:      which CUDA kernel: "mma_sync" (default, measured) or "wgmma" (Hopper
                      warpgroup MMAs for the denoise step, head_dim 128; UNVERIFIED on a GPU).
                      Shapes wgmma does not cover run mma_sync (:func:`kernel_variant` says why);
                      the PyTorch path ignores it.
        returns out.

    CUDA bfloat16 inputs with head_dim 32/64/128 run the twotower_rt._C kernel (any strides with
    a unit last-dim stride and 16-byte aligned rows; anything else is copied first); other inputs
    run :func:`block_attention_ref`. ``block_attention_backend`` says which, and why.
    """
    _check_args(q, k_cache, v_cache, context_lens, k_block, v_block, cache_slots, out)
    if variant not in VARIANTS:
        raise ValueError(f"block_attention: variant must be one of {VARIANTS}, got {variant!r}")
    reason = _kernel_unsupported_reason(q, k_cache, v_cache, k_block, v_block)
    if reason is not None:
        result = block_attention_ref(
            q, k_cache, v_cache, context_lens, k_block, v_block, cache_slots=cache_slots
        )
        return result if out is None else out.copy_(result)
    variant, _ = kernel_variant(variant, q.shape[1], q.shape[2], k_cache.shape[2], q.shape[3])
    args = (q, k_cache, v_cache, context_lens, k_block, v_block, cache_slots, max_context_len, out)
    return _block_attention_cuda(*args, variant)


def kernel_variant(
    variant: str, seq: int, q_heads: int, kv_heads: int, head_dim: int
) -> tuple[str, str | None]:
    """``(variant that runs, why it is not the one asked for, or None)`` for a CUDA call of this
    shape. The wgmma kernel covers the denoise step at head_dim 128: 64-row warpgroup tiles of the
    ``seq * q_heads / kv_heads`` rows of a KV head; at or below 16 such rows (decode) most of a tile
    would be padding, and the mma.sync decode kernel (four key warps over 16 rows) is the fit."""
    if variant not in VARIANTS:
        raise ValueError(f"block_attention: variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "wgmma":
        if head_dim not in WGMMA_HEAD_DIMS:
            built = "/".join(map(str, WGMMA_HEAD_DIMS))
            return "mma_sync", f"the wgmma kernel is built for head_dim {built}, not {head_dim}"
        rows = seq * (q_heads // kv_heads)
        if rows <= _DECODE_ROWS:
            return "mma_sync", (
                f"{rows} query rows per KV head (decode): the wgmma kernel's 64-row tiles would be "
                "mostly padding; the mma.sync decode kernel runs"
            )
    return variant, None


def plan_splits(
    batch: int,
    seq: int,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    max_keys: int,
    num_sms: int,
) -> int:
    """How many splits of each sequence's keys the kernel runs. Each split of a (sequence, KV head,
    row tile) is one CTA doing 1/splits of the work; the GPU holds ``slots`` CTAs at once (SMs x
    CTAs per SM by shared memory), so the time goes as ceil(CTAs / slots) / splits: splitting
    further must cut that by 10% to pay for the partials and their merge. No split is
    shorter than two tiles, nor than ``rows`` keys, below which writing and merging its fp32
    partial output (rows x head_dim x 4 bytes) would cost more than the K/V it summarises (keys x
    head_dim x 4 bytes). A pure function of shapes, tested on the CPU."""
    rows = seq * (q_heads // kv_heads)
    block_m = 16 if rows <= _DECODE_ROWS else 64
    row_tiles = -(-rows // block_m)
    smem = (block_m + 4 * _BLOCK_N) * head_dim * 2
    ctas_per_sm = max(1, min(16, (227 * 1024) // (smem + 1024)))
    ctas = batch * kv_heads * row_tiles
    key_tiles = max(1, -(-max_keys // _BLOCK_N))
    min_tiles = max(2, -(-rows // _BLOCK_N))
    most = max(1, min(key_tiles // min_tiles, MAX_SPLITS))
    slots = num_sms * ctas_per_sm
    ctas = max(ctas, 1)
    best, best_time = 1, -(-ctas // slots)
    for splits in range(2, most + 1):
        time = -(-ctas * splits // slots) / splits
        if time < 0.9 * best_time:  # worth the partials and the merge
            best, best_time = splits, time
    return best


def block_attention_backend(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16
) -> tuple[str, str]:
    """``(backend, reason)``: "cuda" (the kernel), "torch" (block_attention_ref) or "none"."""
    backend, reason = _ext.op_backend(
        device, dtype, ref="block_attention_ref", kernel_dtypes=KERNEL_DTYPES, op="block_attention"
    )
    if backend == "cuda":
        reason += f", head_dim {'/'.join(map(str, KERNEL_HEAD_DIMS))}"
    return backend, reason


def _check_args(q, k_cache, v_cache, context_lens, k_block, v_block, cache_slots, out) -> None:
    if q.dim() != 4 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"block_attention: expected q (B, S, Hq, D) and k_cache/v_cache (rows, L, Hkv, D) of "
            f"one shape, got {tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    B, S, hq, d = q.shape
    rows_ok = k_cache.shape[0] == B if cache_slots is None else k_cache.shape[0] > 0
    if not rows_ok or k_cache.shape[3] != d or hq % k_cache.shape[2]:
        raise ValueError(
            f"block_attention: k_cache {tuple(k_cache.shape)} does not fit q {tuple(q.shape)} "
            "(same batch, or cache_slots, and head_dim, kv_heads dividing the query heads)"
        )
    if context_lens.shape != (B,) or context_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_attention: context_lens must be ({B},) int32/int64, got "
                         f"{tuple(context_lens.shape)} {context_lens.dtype}")  # fmt: skip
    if cache_slots is not None and (
        cache_slots.shape != (B,) or cache_slots.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(f"block_attention: cache_slots must be ({B},) int32/int64, got "
                         f"{tuple(cache_slots.shape)} {cache_slots.dtype}")  # fmt: skip
    if (k_block is None) != (v_block is None):
        raise ValueError("block_attention: give both k_block and v_block, or neither")
    if k_block is not None and (
        k_block.shape != (B, S, k_cache.shape[2], d) or v_block.shape != k_block.shape
    ):
        raise ValueError(f"block_attention: k_block and v_block must be "
                         f"{(B, S, k_cache.shape[2], d)}, got {tuple(k_block.shape)}, "
                         f"{tuple(v_block.shape)}")  # fmt: skip
    tensors = [k_cache, v_cache, context_lens, k_block, v_block, cache_slots, out]
    if any(t is not None and t.device != q.device for t in tensors):
        raise ValueError("block_attention: all tensors must be on q's device")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise ValueError(f"block_attention: out must be {tuple(q.shape)} {q.dtype}, got "
                         f"{tuple(out.shape)} {out.dtype}")  # fmt: skip


def _kernel_unsupported_reason(q, k_cache, v_cache, k_block, v_block) -> str | None:
    reason = _ext.cuda_unsupported_reason(q.device, "block_attention")
    if reason is not None:
        return reason
    tensors = [q, k_cache, v_cache] + ([k_block, v_block] if k_block is not None else [])
    if any(t.dtype != torch.bfloat16 for t in tensors):
        return "the kernel takes bfloat16 q, caches and block K/V"
    if q.shape[3] not in KERNEL_HEAD_DIMS:
        return f"head_dim {q.shape[3]}; the kernel is built for {KERNEL_HEAD_DIMS}"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "the kernel has no backward; autograd needs the PyTorch path"
    if q.shape[0] * k_cache.shape[2] > 65535:
        return "batch * kv_heads > 65535"
    return None


def _kernel_view(t: torch.Tensor) -> torch.Tensor:
    """t itself when the kernel can read it (unit last stride, 16-byte aligned rows), else a
    fresh contiguous copy (a clone: ``contiguous()`` would keep a misaligned start)."""
    ok = (
        t.stride(3) == 1
        and t.data_ptr() % 16 == 0
        and all(t.stride(i) % 8 == 0 or t.shape[i] == 1 for i in range(3))
    )
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    # A size-1 dimension is never stepped over: report 0 so odd strides there pass the checks.
    return tuple(t.stride(i) if t.shape[i] > 1 else 0 for i in range(3))


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _block_attention_cuda(
    q, k_cache, v_cache, context_lens, k_block, v_block, cache_slots, max_context_len, out, variant
):
    C = _ext.require_cuda_op("block_attention", q)
    B, S, hq, d = q.shape
    hkv, capacity = k_cache.shape[2], k_cache.shape[1]
    q, k_cache, v_cache = _kernel_view(q), _kernel_view(k_cache), _kernel_view(v_cache)
    if k_block is not None:
        k_block, v_block = _kernel_view(k_block), _kernel_view(v_block)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    writable = (
        out.stride(3) == 1
        and out.data_ptr() % 4 == 0
        and all(out.stride(i) % 2 == 0 or out.shape[i] == 1 for i in range(3))
    )  # the kernel stores pairs of bf16
    target = out if writable else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lens = context_lens.to(torch.int32).contiguous()
    slots = cache_slots.to(torch.int32).contiguous() if cache_slots is not None else None
    bound = capacity if max_context_len is None else max(0, min(int(max_context_len), capacity))
    block_len = S if k_block is not None else 0
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    splits = plan_splits(B, S, hq, hkv, d, bound + block_len, _num_sms(index))
    partial_out = partial_lse = None
    if splits > 1:
        partial_out = torch.empty((splits, B, S, hq, d), dtype=torch.float32, device=q.device)
        partial_lse = torch.empty((splits, B, S, hq), dtype=torch.float32, device=q.device)
    no_block = (0, 0, 0)
    C.block_attention(
        q=q.data_ptr(),
        q_strides=_strides(q),
        k_cache=k_cache.data_ptr(),
        k_cache_strides=_strides(k_cache),
        v_cache=v_cache.data_ptr(),
        v_cache_strides=_strides(v_cache),
        context_lens=lens.data_ptr(),
        cache_slots=slots.data_ptr() if slots is not None else 0,
        k_block=k_block.data_ptr() if k_block is not None else 0,
        k_block_strides=_strides(k_block) if k_block is not None else no_block,
        v_block=v_block.data_ptr() if v_block is not None else 0,
        v_block_strides=_strides(v_block) if v_block is not None else no_block,
        out=target.data_ptr(),
        out_strides=_strides(target),
        partial_out=partial_out.data_ptr() if partial_out is not None else 0,
        partial_lse=partial_lse.data_ptr() if partial_lse is not None else 0,
        batch=B,
        seq=S,
        q_heads=hq,
        kv_heads=hkv,
        head_dim=d,
        block_len=block_len,
        num_splits=splits,
        softmax_scale=1.0 / math.sqrt(d),
        variant=VARIANTS.index(variant),
        device=index,
        stream=torch.cuda.current_stream(q.device).cuda_stream,
    )
    return out if target is out else out.copy_(target)
