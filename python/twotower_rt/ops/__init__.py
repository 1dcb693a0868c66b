"""Ops: one function per kernel family, each with its plain-PyTorch ``*_ref`` beside it."""

from twotower_rt.ops.all_reduce import (
    CustomAllReduce,
    all_reduce_backend,
    all_reduce_ref,
    choose_algorithm,
)
from twotower_rt.ops.block_attention import (
    block_attention,
    block_attention_backend,
    block_attention_ref,
)
from twotower_rt.ops.mamba_decode import (
    mamba_decode_backend,
    mamba_decode_step,
    mamba_decode_step_ref,
)
from twotower_rt.ops.mask_sampling import (
    MaskSamplingOutput,
    mask_sampling,
    mask_sampling_backend,
    mask_sampling_ref,
)
from twotower_rt.ops.moe import moe_experts_backend
from twotower_rt.ops.rmsnorm import rms_norm, rms_norm_backend, rms_norm_ref
from twotower_rt.ops.sample_tokens import sample_tokens, sample_tokens_backend, sample_tokens_ref
from twotower_rt.ops.ssm_scan import ssm_scan, ssm_scan_backend, ssm_scan_ref

# Op name -> backend(device, dtype) -> (backend, reason). twotower_rt.env reports each entry; a new
# kernel family adds its own.
OP_BACKENDS = {
    "rms_norm": rms_norm_backend,
    "block_attention": block_attention_backend,
    "mask_sampling": mask_sampling_backend,
    "sample_tokens": sample_tokens_backend,
    "ssm_scan": ssm_scan_backend,
    "mamba_decode_step": mamba_decode_backend,
    "moe_experts": moe_experts_backend,
    "all_reduce": all_reduce_backend,
}

__all__ = [
    "OP_BACKENDS",
    "CustomAllReduce",
    "all_reduce_backend",
    "all_reduce_ref",
    "choose_algorithm",
    "MaskSamplingOutput",
    "block_attention",
    "block_attention_backend",
    "block_attention_ref",
    "mamba_decode_backend",
    "mamba_decode_step",
    "mamba_decode_step_ref",
    "mask_sampling",
    "mask_sampling_backend",
    "mask_sampling_ref",
    "moe_experts_backend",
    "rms_norm",
    "rms_norm_backend",
    "rms_norm_ref",
    "sample_tokens",
    "sample_tokens_backend",
    "sample_tokens_ref",
    "ssm_scan",
    "ssm_scan_backend",
    "ssm_scan_ref",
]
