"""One mask-diffusion decision (TWOTOWER.md section 4): the op, and beside it its PyTorch reference.

Per position: the mask token's logit forced to -1e12, log-softmax, the prediction (argmax, or
Gumbel-max of logp / T at temperature T > 0 with :mod:`twotower_rt.ops.philox` noise), its
untempered probability as the confidence. Per sequence: the commit rule (threshold, at least
one, the ceil schedule, everything on the last step) over the masked positions. The CUDA kernel is
``csrc/include/twotower_rt/mask_sampling.cuh``; it keeps the whole decision on the device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from twotower_rt import _ext, fastpath
from twotower_rt.ops.philox import check_rng_args, gumbel_ref

MASKED_LOGIT = -1e12  # the mask token's logit in diffusion scoring, as in the reference
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
MAX_BLOCK_SIZE = 1024  # the kernel's positions per sequence (one thread each in the commit phase)
MAX_VOCAB = 2**30 - 1


class MaskSamplingOutput(NamedTuple):
    """Result of :func:`mask_sampling`, shapes (B, S) unless noted.

    block:         int64, the block after this step (committed predictions written in)
    masked:        bool, positions still masked after this step
    num_committed: int64 (B,), positions committed by this step
    prediction:    int64, the prediction at every position (the token itself where committed before)
    confidence:    float32, exp(logp[prediction]) at masked positions, +inf where committed before
    """

    block: torch.Tensor
    masked: torch.Tensor
    num_committed: torch.Tensor
    prediction: torch.Tensor
    confidence: torch.Tensor


def _per_row(value, batch: int, device, name: str) -> torch.Tensor:
    """An int or a (B,) / 0-dim integer tensor -> a (B,) int64 tensor on `device`."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype == torch.bool:
            raise TypeError(f"mask_sampling: {name} must be an integer tensor, got {value.dtype}")
        if value.dim() == 0:
            value = value.expand(batch)
        if value.shape != (batch,):
            raise ValueError(
                f"mask_sampling: {name} must have shape ({batch},), got {tuple(value.shape)}"
            )
        return value.to(device=device, dtype=torch.int64)
    return torch.full((batch,), int(value), dtype=torch.int64, device=device)


def commit_rule(
    confidence: torch.Tensor,
    masked: torch.Tensor,
    step: torch.Tensor,
    steps_per_block: int,
    confidence_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec's commit rule: confidence (B, S) float, masked (B, S) bool, step (B,) int64 ->
    (commit (B, S) bool, k (B,) int64). Ties in confidence commit the lower position first."""
    n_masked = masked.sum(dim=-1)
    n_above = (masked & (confidence > confidence_threshold)).sum(dim=-1)
    remaining = (steps_per_block - step).clamp_min(1)
    k = torch.maximum(
        torch.where(n_above > 0, n_above, torch.ones_like(n_above)),
        (n_masked + remaining - 1) // remaining,
    )
    k = torch.where(step >= steps_per_block - 1, n_masked, torch.minimum(k, n_masked))
    ranked = torch.where(masked, confidence, torch.full_like(confidence, float("-inf")))
    order = torch.argsort(ranked, dim=-1, descending=True, stable=True)
    positions = torch.arange(masked.shape[-1], device=masked.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return masked & (rank < k[:, None]), k


def mask_sampling_ref(
    logits: torch.Tensor,
    block: torch.Tensor,
    *,
    mask_token_id: int,
    step,
    steps_per_block: int,
    confidence_threshold: float,
    temperature: float = 0.0,
    seed: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> MaskSamplingOutput:
    """Plain-PyTorch :func:`mask_sampling` in fp32: its CPU path and its test oracle. Same
    arguments and result (without ``out``); no argument checks."""
    B, S, V = logits.shape
    x = logits.to(torch.float32, copy=True)
    x[..., mask_token_id] = MASKED_LOGIT
    logp = torch.log_softmax(x, dim=-1)
    if temperature > 0:
        noise = gumbel_ref(seed.to(logits.device), offset.to(logits.device), S, V)
        prediction = (logp / temperature + noise).argmax(dim=-1)
    else:
        prediction = logp.argmax(dim=-1)
    confidence = logp.gather(-1, prediction[..., None]).squeeze(-1).exp()
    return decide(
        prediction,
        confidence,
        block,
        mask_token_id=mask_token_id,
        step=step,
        steps_per_block=steps_per_block,
        confidence_threshold=confidence_threshold,
    )


def decide(prediction, confidence, block, *, mask_token_id, step, steps_per_block,
           confidence_threshold) -> MaskSamplingOutput:  # fmt: skip
    """The commit rule and the remasking, from each position's prediction and confidence (B, S)
    (the last part of :func:`mask_sampling_ref`; the vocabulary-parallel sampler's too)."""
    masked = block == mask_token_id
    step = _per_row(step, block.shape[0], block.device, "step")
    commit, k = commit_rule(confidence, masked, step, steps_per_block, confidence_threshold)
    prediction = torch.where(masked, prediction, block)
    confidence = torch.where(masked, confidence, torch.full_like(confidence, float("inf")))
    return MaskSamplingOutput(
        block=torch.where(commit, prediction, block),
        masked=masked & ~commit,
        num_committed=k,
        prediction=prediction,
        confidence=confidence,
    )


def mask_sampling(
    logits: torch.Tensor,
    block: torch.Tensor,
    *,
    mask_token_id: int,
    step,
    steps_per_block: int,
    confidence_threshold: float,
    temperature: float = 0.0,
    seed: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    out: MaskSamplingOutput | None = None,
) -> MaskSamplingOutput:
    """One mask-diffusion step for every sequence of a batch of blocks.

    Shapes:
        logits: (B, S, V)  the denoiser's logits, float32 or bfloat16 for the kernel (any float for
                           the reference); the vocabulary dimension must be contiguous or it is
                           copied, the other two may have any stride
        block:  (B, S)     int64 token ids, ``mask_token_id`` where still masked
        step:   int, or a (B,) int64 tensor: this step's index within the block, 0-based (per
                sequence, so sequences at different steps can share a launch); a step >=
                ``steps_per_block - 1`` commits every masked position
        seed, offset: (B,) int64 tensors, required when temperature > 0: the Philox key and the
                counter offset of each sequence (see :mod:`twotower_rt.ops.philox`). The op only
                reads them; advance ``offset`` between steps (``offset += 1``) for fresh noise.
        out:    a :class:`MaskSamplingOutput` of preallocated tensors (shapes and dtypes as
                returned; all contiguous); ``out.block`` may be ``block`` itself. Allocated when
                None.
        returns the :class:`MaskSamplingOutput`.

    CUDA tensors run ``twotower_rt._C`` when it is built for this GPU (no host synchronisation:
    the commit decision stays on the device); greedy float32 CPU tensors run ``twotower_rt._cpu``
    where it is built and the fast paths are on (:func:`mask_decide_cpu`); everything else runs
    :func:`mask_sampling_ref`.
    """
    _check_args(logits, block, mask_token_id, steps_per_block, temperature, seed, offset)
    B, S, V = logits.shape
    if _cpu_kernel_applies(logits, block, temperature):  # arguments checked above
        result = _mask_decide_cpu(logits, block, mask_token_id, step, steps_per_block,
                                  confidence_threshold)  # fmt: skip
    elif logits.device.type != "cuda" or _kernel_unsupported_reason(logits, block, out):
        result = mask_sampling_ref(
            logits,
            block,
            mask_token_id=mask_token_id,
            step=step,
            steps_per_block=steps_per_block,
            confidence_threshold=confidence_threshold,
            temperature=temperature,
            seed=seed,
            offset=offset,
        )
    else:
        return _mask_sampling_cuda(
            logits, block, mask_token_id, step, steps_per_block, confidence_threshold,
            temperature, seed, offset, out,
        )  # fmt: skip
    if out is None:
        return result
    for dst, src in zip(out, result):
        dst.copy_(src)
    return out


def _cpu_kernel_applies(logits, block, temperature) -> bool:
    return (temperature == 0 and logits.device.type == "cpu" and logits.dtype == torch.float32
            and block.device.type == "cpu" and fastpath.enabled()
            and _ext.cpu_kernels() is not None)  # fmt: skip


def mask_decide_cpu(
    logits: torch.Tensor, block: torch.Tensor, *, mask_token_id: int, step, steps_per_block: int,
    confidence_threshold: float,
) -> MaskSamplingOutput:  # fmt: skip
    """:func:`mask_sampling` at temperature 0 on the CPU in one call of ``twotower_rt._cpu``
    (``csrc/cpu/mask_decide_cpu.cpp``): float32 (B, S, V) logits and an int64 (B, S) block on
    the CPU. Agrees with :func:`mask_sampling_ref` to float32 rounding (its sum of exponentials
    has its own order and exp): the confidences to a few ulp, so a commit decision can differ
    only where a confidence is within that of the threshold or of another; a prediction only
    where two logits round to the same log-probability. Confidences of positions committed
    before are +inf and not computed."""
    if _ext.cpu_kernels() is None:
        raise RuntimeError(f"mask_decide_cpu: twotower_rt._cpu is unavailable: "
                           f"{_ext.cpu_kernels_error()}")  # fmt: skip
    if not logits.is_cpu or logits.dtype != torch.float32:
        raise ValueError(f"mask_decide_cpu: logits must be a float32 CPU tensor, got "
                         f"{logits.dtype} on {logits.device}")  # fmt: skip
    _check_args(logits, block, mask_token_id, steps_per_block, 0.0, None, None)
    return _mask_decide_cpu(logits, block, mask_token_id, step, steps_per_block,
                            confidence_threshold)  # fmt: skip


def _mask_decide_cpu(logits, block, mask_token_id, step, steps_per_block, confidence_threshold):
    """:func:`mask_decide_cpu` once its arguments are checked (``mask_sampling`` checks them
    itself before it dispatches here)."""
    C = _ext.cpu_kernels()
    B, S, V = logits.shape
    logits, block = logits.contiguous(), block.contiguous()
    step = _per_row(step, B, block.device, "step").contiguous()
    out = allocate_output(B, S, logits.device)
    C.mask_decide(
        logits=logits.data_ptr(), block=block.data_ptr(), step=step.data_ptr(),
        out_block=out.block.data_ptr(), out_masked=out.masked.data_ptr(),
        out_num_committed=out.num_committed.data_ptr(),
        out_prediction=out.prediction.data_ptr(), out_confidence=out.confidence.data_ptr(),
        batch=B, block_size=S, vocab=V, mask_token_id=int(mask_token_id),
        steps_per_block=int(steps_per_block), confidence_threshold=float(confidence_threshold),
    )  # fmt: skip
    return out


def allocate_output(batch: int, block_size: int, device) -> MaskSamplingOutput:
    """Empty output tensors for :func:`mask_sampling` (for ``out=``, e.g. in a CUDA graph)."""
    shape = (batch, block_size)
    return MaskSamplingOutput(
        block=torch.empty(shape, dtype=torch.int64, device=device),
        masked=torch.empty(shape, dtype=torch.bool, device=device),
        num_committed=torch.empty((batch,), dtype=torch.int64, device=device),
        prediction=torch.empty(shape, dtype=torch.int64, device=device),
        confidence=torch.empty(shape, dtype=torch.float32, device=device),
    )


def mask_sampling_backend(
    device: torch.device | str, dtype: torch.dtype = torch.float32
) -> tuple[str, str]:
    """``(backend, reason)``: "cuda" (the kernel), "torch" (mask_sampling_ref) or "none"."""
    return _ext.op_backend(
        device, dtype, ref="mask_sampling_ref", kernel_dtypes=KERNEL_DTYPES, what="logits"
    )


def _check_args(logits, block, mask_token_id, steps_per_block, temperature, seed, offset) -> None:
    if logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(
            f"mask_sampling: logits must be a floating-point (B, S, V) tensor, got "
            f"{logits.dtype} of shape {tuple(logits.shape)}"
        )
    B, S, V = logits.shape
    if block.shape != (B, S) or block.dtype != torch.int64 or block.device != logits.device:
        raise ValueError(
            f"mask_sampling: block must be an int64 ({B}, {S}) tensor on {logits.device}, got "
            f"{block.dtype} of shape {tuple(block.shape)} on {block.device}"
        )
    if V == 0 or not 0 <= mask_token_id < V:
        raise ValueError(f"mask_sampling: mask_token_id {mask_token_id} is outside [0, {V})")
    if steps_per_block < 1:
        raise ValueError(f"mask_sampling: steps_per_block must be >= 1, got {steps_per_block}")
    if not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"mask_sampling: temperature must be finite and >= 0, got {temperature}")
    if temperature > 0:
        check_rng_args("mask_sampling", seed, offset, B)


def _kernel_unsupported_reason(logits, block, out) -> str | None:
    reason = _ext.cuda_unsupported_reason(logits.device)
    if reason is not None:
        return reason
    if logits.dtype not in KERNEL_DTYPES:
        return f"logits dtype {logits.dtype}; the kernel takes float32 and bfloat16"
    B, S, V = logits.shape
    if S > MAX_BLOCK_SIZE or V > MAX_VOCAB:
        return f"block size {S} > {MAX_BLOCK_SIZE} or vocabulary {V} > {MAX_VOCAB}"
    if out is not None and not all(t.is_contiguous() for t in out):
        return "out tensors must be contiguous for the kernel"
    return None


_DTYPE_CODES = {torch.float32: "DTYPE_FLOAT32", torch.bfloat16: "DTYPE_BFLOAT16"}


def _mask_sampling_cuda(
    logits, block, mask_token_id, step, steps_per_block, confidence_threshold, temperature, seed,
    offset, out,
):  # fmt: skip
    C = _ext.require_cuda_op("mask_sampling", logits)
    B, S, V = logits.shape
    device = logits.device
    if out is None:
        out = allocate_output(B, S, device)
    if B == 0 or S == 0:
        return out
    if V > 1 and logits.stride(-1) != 1:
        logits = logits.contiguous()
    if S > 1 and block.stride(-1) != 1:
        block = block.contiguous()
    step = _per_row(step, B, device, "step")
    sampled = temperature > 0
    if sampled:
        seed, offset = seed.to(device).contiguous(), offset.to(device).contiguous()
    workspace_bytes = C.mask_sampling_workspace_bytes(B, S, V)
    workspace = torch.empty(workspace_bytes // 4, dtype=torch.float32, device=device)
    C.mask_sampling(
        logits=logits.data_ptr(),
        logits_batch_stride=logits.stride(0),
        logits_position_stride=logits.stride(1),
        block=block.data_ptr(),
        block_row_stride=block.stride(0),
        step=step.data_ptr(),
        seed=seed.data_ptr() if sampled else 0,
        offset=offset.data_ptr() if sampled else 0,
        out_block=out.block.data_ptr(),
        out_masked=out.masked.data_ptr(),
        out_num_committed=out.num_committed.data_ptr(),
        out_prediction=out.prediction.data_ptr(),
        out_confidence=out.confidence.data_ptr(),
        workspace=workspace.data_ptr(),
        workspace_bytes=workspace_bytes,
        batch=B,
        block_size=S,
        vocab=V,
        mask_token_id=mask_token_id,
        steps_per_block=steps_per_block,
        confidence_threshold=float(confidence_threshold),
        temperature=float(temperature),
        dtype=getattr(C, _DTYPE_CODES[logits.dtype]),
        device=device.index if device.index is not None else torch.cuda.current_device(),
        stream=torch.cuda.current_stream(device).cuda_stream,
    )
    return out
