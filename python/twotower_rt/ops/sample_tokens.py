"""The AR / mock-AR sampler (TWOTOWER.md section 4): the op, and beside it its PyTorch reference.

temperature <= 0 is argmax; otherwise logits / T, top-k, then the top-p nucleus, and a draw from
the renormalised rest, done as a Gumbel-max over the kept tokens with :mod:`twotower_rt.ops.philox`
noise at position 0 (so the CPU reference and the CUDA kernel pick the same token for the same seed
and offset). The CUDA kernel is ``csrc/include/twotower_rt/sample_tokens.cuh``: radix selection of
the cut-offs, no sort; one CTA per row, or, where the rows alone leave SMs idle (small batches),
each row split over several CTAs with the same result (``splits``).
"""

from __future__ import annotations

import torch

from twotower_rt import _ext
from twotower_rt.ops.philox import check_rng_args, gumbel_ref

KERNEL_DTYPES = (torch.float32, torch.bfloat16)
MAX_VOCAB = 2**23
# What splits=None means: 1 (one CTA per row, measured) until the split path's GPU test has run
# (tests/test_mask_sampling.py); then 0, automatic.
DEFAULT_SPLITS = 1


def filter_top_k_top_p(
    logits: torch.Tensor, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    """logits (b, V) -> same with the tokens outside the top-k / the top-p nucleus set to -inf.
    The nucleus is the smallest set of most likely tokens whose probability reaches top_p (at least
    one token), computed over the top-k survivors. This reference sorts the candidates (torch.topk);
    the kernel selects thresholds instead."""
    vocab = logits.shape[-1]
    k = vocab if top_k is None or top_k <= 0 else min(top_k, vocab)
    if k >= vocab and (top_p is None or top_p >= 1.0):
        return logits
    values, indices = torch.topk(logits, k, dim=-1)  # sorted, descending
    if top_p is not None and top_p < 1.0:
        probs = torch.softmax(values, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above
        values = values.masked_fill(before >= top_p, float("-inf"))
    out = torch.full_like(logits, float("-inf"))
    return out.scatter(-1, indices, values)


def sample_tokens_ref(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-PyTorch :func:`sample_tokens` in fp32: its CPU path and its test oracle."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    scaled = logits.to(torch.float32) / temperature
    kept = filter_top_k_top_p(scaled, top_k, top_p)
    noise = gumbel_ref(seed.to(logits.device), offset.to(logits.device), 1, logits.shape[-1])[:, 0]
    return (kept + noise).argmax(dim=-1)


def sample_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """One token per row.

    Shapes:
        logits: (B, V) float32 or bfloat16 for the kernel (any float for the reference)
        temperature: <= 0 is argmax (seed/offset unused); top_k: None or >= 1; top_p: None or
            in (0, 1]
        seed, offset: (B,) int64 tensors, required when temperature > 0 (per-row Philox key and
            counter offset; advance offset between draws)
        out: (B,) int64, allocated when None
        splits: the kernel's CTAs per row: 0 chooses (rows split only at small batch), 1 never
            splits, k > 1 about k slices per row, None: ``DEFAULT_SPLITS``. The token is the same
            either way (the split path's sums are exact integers).
        returns ``out``.
    """
    _check_args(logits, temperature, top_k, top_p, seed, offset)
    splits = DEFAULT_SPLITS if splits is None else splits
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 0:
        raise ValueError(f"sample_tokens: splits must be an int >= 0, got {splits!r}")
    if logits.device.type != "cuda" or _kernel_unsupported_reason(logits):
        result = sample_tokens_ref(logits, temperature, top_k, top_p, seed, offset)
        return result if out is None else out.copy_(result)
    return _sample_tokens_cuda(logits, temperature, top_k, top_p, seed, offset, out, splits)


def sample_tokens_backend(
    device: torch.device | str, dtype: torch.dtype = torch.float32
) -> tuple[str, str]:
    """``(backend, reason)``: "cuda" (the kernel), "torch" (sample_tokens_ref) or "none"."""
    return _ext.op_backend(
        device, dtype, ref="sample_tokens_ref", kernel_dtypes=KERNEL_DTYPES, what="logits"
    )


def _check_args(logits, temperature, top_k, top_p, seed, offset) -> None:
    if logits.dim() != 2 or not logits.is_floating_point() or logits.shape[-1] == 0:
        raise ValueError(
            f"sample_tokens: logits must be a floating-point (B, V) tensor with V > 0, got "
            f"{logits.dtype} of shape {tuple(logits.shape)}"
        )
    if not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"sample_tokens: temperature must be finite and >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"sample_tokens: top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"sample_tokens: top_p must be in (0, 1] or None, got {top_p}")
    if temperature > 0:
        check_rng_args("sample_tokens", seed, offset, logits.shape[0])


def _kernel_unsupported_reason(logits) -> str | None:
    reason = _ext.cuda_unsupported_reason(logits.device)
    if reason is not None:
        return reason
    if logits.dtype not in KERNEL_DTYPES:
        return f"logits dtype {logits.dtype}; the kernel takes float32 and bfloat16"
    if logits.shape[-1] > MAX_VOCAB:
        return f"vocabulary {logits.shape[-1]} > {MAX_VOCAB}"
    return None


_DTYPE_CODES = {torch.float32: "DTYPE_FLOAT32", torch.bfloat16: "DTYPE_BFLOAT16"}


def _sample_tokens_cuda(logits, temperature, top_k, top_p, seed, offset, out, splits=0):
    C = _ext.require_cuda_op("sample_tokens", logits)
    B, V = logits.shape
    device = logits.device
    if out is None:
        out = torch.empty((B,), dtype=torch.int64, device=device)
    if B == 0:
        return out
    if V > 1 and logits.stride(-1) != 1:
        logits = logits.contiguous()
    sampled = temperature > 0
    if sampled:
        seed, offset = seed.to(device).contiguous(), offset.to(device).contiguous()
    target = out if out.is_contiguous() else torch.empty((B,), dtype=torch.int64, device=device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    sms = torch.cuda.get_device_properties(index).multi_processor_count
    split_size = C.sample_tokens_split_size(batch=B, vocab=V, splits=splits, sm_count=sms)
    workspace = None
    if split_size:
        size = C.sample_tokens_workspace_bytes(batch=B, split_size=split_size)
        workspace = torch.empty(size, dtype=torch.uint8, device=device)
    C.sample_tokens(
        logits=logits.data_ptr(),
        logits_row_stride=logits.stride(0),
        seed=seed.data_ptr() if sampled else 0,
        offset=offset.data_ptr() if sampled else 0,
        out=target.data_ptr(),
        batch=B,
        vocab=V,
        top_k=0 if top_k is None else int(top_k),
        top_p=1.0 if top_p is None else float(top_p),
        temperature=float(temperature),
        split_size=split_size,
        workspace=workspace.data_ptr() if workspace is not None else 0,
        workspace_bytes=workspace.numel() if workspace is not None else 0,
        dtype=getattr(C, _DTYPE_CODES[logits.dtype]),
        device=index,
        stream=torch.cuda.current_stream(device).cuda_stream,
    )
    if target is not out:
        out.copy_(target)
    return out
