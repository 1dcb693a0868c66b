"""The Mamba-2 mixer's one-token decode step between in_proj and out_proj, fused into one kernel
(``csrc/include/twotower_rt/mamba_decode.cuh``): conv-state shift, depthwise conv, SiLU, the
state update and the gated RMSNorm. Beside it the reference, which is the mixer's own arithmetic
for n = 1 (tests/test_mamba_decode.py checks that against the mixer, bitwise).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from twotower_rt import _ext
from twotower_rt.ops.rmsnorm import rms_norm_ref
from twotower_rt.ops.ssm_scan import ssm_scan_ref

KERNEL_DTYPES = (torch.float32, torch.bfloat16)
KERNEL_STATE_SIZES = (16, 32, 64, 128, 256)
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


def mamba_decode_step_ref(
    zxbcdt, conv_state, conv_weight, conv_bias, dt_bias, A_log, D, ssm_state, norm_weight,
    eps: float, n_groups: int, time_step_limit=(0.0, math.inf),
):  # fmt: skip
    """See :func:`mamba_decode_step`; the mixer's arithmetic, step by step."""
    b = zxbcdt.shape[0]
    H, P, N = ssm_state.shape[1:]
    G, d_inner = n_groups, H * P
    conv_dim = d_inner + 2 * G * N
    K = conv_state.shape[-1]
    z, xBC, dt = torch.split(zxbcdt, [d_inner, conv_dim, H], dim=-1)
    window = torch.cat([conv_state[..., 1:], xBC[..., None].to(conv_state.dtype)], dim=-1)
    bias = conv_bias.float() if conv_bias is not None else None
    conv = F.conv1d(window.float(), conv_weight.reshape(conv_dim, 1, K).float(), bias,
                    groups=conv_dim)  # fmt: skip
    xBC = F.silu(conv).to(zxbcdt.dtype)[..., 0]  # (b, conv_dim)
    x, Bm, Cm = torch.split(xBC, [d_inner, G * N, G * N], dim=-1)
    dt = F.softplus(dt.float() + dt_bias.float())
    lo, hi = time_step_limit
    if lo > 0.0 or hi != math.inf:
        dt = dt.clamp(lo, hi)
    A = -torch.exp(A_log.float())
    y, new_ssm = ssm_scan_ref(x.reshape(b, 1, H, P), dt[:, None], A, Bm.reshape(b, 1, G, N),
                              Cm.reshape(b, 1, G, N), D, ssm_state)  # fmt: skip
    y = y.reshape(b, d_inner).to(zxbcdt.dtype)
    out = rms_norm_ref(y, norm_weight, eps, gate=z, group_size=d_inner // G)
    return out, window, new_ssm


def mamba_decode_step(
    zxbcdt: torch.Tensor,
    conv_state: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: torch.Tensor,
    ssm_state: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    n_groups: int,
    time_step_limit: tuple[float, float] = (0.0, math.inf),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token per sequence through the mixer's middle.

    Shapes: zxbcdt (b, d_inner + conv_dim + H), the in_proj output; conv_state (b, conv_dim, K)
    in zxbcdt's dtype; conv_weight (conv_dim, 1, K) or (conv_dim, K); conv_bias (conv_dim,) or
    None; dt_bias, A_log, D (H,); ssm_state (b, H, P, N) fp32; norm_weight (d_inner,).
    Returns (out (b, d_inner) for out_proj, the new conv state, the new SSM state); the inputs
    are not modified. CUDA tensors of one kernel dtype run the fused kernel; everything else runs
    :func:`mamba_decode_step_ref`.
    """
    args = (zxbcdt, conv_state, conv_weight, conv_bias, dt_bias, A_log, D, ssm_state,
            norm_weight)  # fmt: skip
    reason = _kernel_unsupported_reason(*args, n_groups)
    if reason is not None:
        return mamba_decode_step_ref(*args, eps, n_groups, time_step_limit)
    return _mamba_decode_cuda(*args, eps, n_groups, time_step_limit)


def mamba_decode_backend(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16
) -> tuple[str, str]:
    """``(backend, reason)``: "cuda" (the kernel), "torch" (mamba_decode_step_ref) or "none"."""
    return _ext.op_backend(
        device, dtype, ref="mamba_decode_step_ref", kernel_dtypes=KERNEL_DTYPES,
        op="mamba_decode_step",
    )  # fmt: skip


def _kernel_unsupported_reason(zxbcdt, conv_state, conv_weight, conv_bias, dt_bias, A_log, D,
                               ssm_state, norm_weight, n_groups) -> str | None:  # fmt: skip
    reason = _ext.cuda_unsupported_reason(zxbcdt.device, "mamba_decode_step")
    if reason is not None:
        return reason
    dtype = zxbcdt.dtype
    same = [conv_state, conv_weight, dt_bias, A_log, D, norm_weight]
    if conv_bias is not None:
        same.append(conv_bias)
    if dtype not in KERNEL_DTYPES or any(t.dtype != dtype for t in same):
        return "the kernel takes one dtype (float32 or bfloat16) for the row, states and params"
    if ssm_state.dtype != torch.float32 or ssm_state.shape[3] not in KERNEL_STATE_SIZES:
        return "the kernel takes an fp32 SSM state of size 16, 32, 64, 128 or 256"
    if ssm_state.shape[1] % n_groups or zxbcdt.shape[0] > 65535:
        return "groups must divide heads, batch <= 65535"
    if torch.is_grad_enabled() and any(t.requires_grad for t in [zxbcdt, *same, ssm_state]):
        return "the kernel has no backward; autograd needs the PyTorch path"
    return None


def _mamba_decode_cuda(zxbcdt, conv_state, conv_weight, conv_bias, dt_bias, A_log, D, ssm_state,
                       norm_weight, eps, n_groups, time_step_limit):  # fmt: skip
    C = _ext.require_cuda_op("mamba_decode_step", zxbcdt)
    b = zxbcdt.shape[0]
    H, P, N = ssm_state.shape[1:]
    if zxbcdt.stride(-1) != 1:
        zxbcdt = zxbcdt.contiguous()
    conv_state = conv_state.contiguous()
    conv_weight = conv_weight.contiguous()
    ssm_state = ssm_state.contiguous()
    tensors = [t.contiguous() if t is not None else None
               for t in (conv_bias, dt_bias, A_log, D, norm_weight)]  # fmt: skip
    conv_bias, dt_bias, A_log, D, norm_weight = tensors
    out = torch.empty((b, H * P), dtype=zxbcdt.dtype, device=zxbcdt.device)
    new_conv = torch.empty_like(conv_state)
    new_ssm = torch.empty_like(ssm_state)
    lo, hi = time_step_limit
    C.mamba_decode_step(
        zxbcdt=zxbcdt.data_ptr(), zxbcdt_stride=zxbcdt.stride(0), conv_state=conv_state.data_ptr(),
        conv_state_out=new_conv.data_ptr(), conv_weight=conv_weight.data_ptr(),
        conv_bias=conv_bias.data_ptr() if conv_bias is not None else 0,
        dt_bias=dt_bias.data_ptr(), A_log=A_log.data_ptr(), D=D.data_ptr(),
        ssm_state=ssm_state.data_ptr(), ssm_state_out=new_ssm.data_ptr(),
        norm_weight=norm_weight.data_ptr(), out=out.data_ptr(), batch=b, heads=H, head_dim=P,
        state_size=N, groups=n_groups, kernel=conv_state.shape[-1], eps=float(eps),
        dt_min=float(lo), dt_max=float(hi), dtype=_DTYPE_CODES[zxbcdt.dtype],
        device=zxbcdt.device.index if zxbcdt.device.index is not None
        else torch.cuda.current_device(),
        stream=torch.cuda.current_stream(zxbcdt.device).cuda_stream,
    )  # fmt: skip
    return out, new_conv, new_ssm
