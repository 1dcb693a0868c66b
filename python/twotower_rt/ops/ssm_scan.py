"""Mamba-2's selective scan over a few tokens from a given state: the op, and beside it the plain
fp32 recurrence (``selective_scan_ref``) that is its CPU path and oracle.

The model runs it for the one-token decode step (n = 1, the new state kept) and for the
denoiser's context-seeded block scan (n = 16, the context state read once and never written). The
CUDA kernel is ``csrc/include/twotower_rt/ssm_scan.cuh``; it keeps the whole state in registers
across the tokens, so it suits short token runs, and the prefill keeps the PyTorch scans.
"""

from __future__ import annotations

import torch

from twotower_rt import _ext

KERNEL_DTYPES = (torch.float32, torch.bfloat16)
KERNEL_STATE_SIZES = (16, 32, 64, 128)
VARIANTS = {"lanes": 0, "rows": 1}
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


def selective_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    state: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 Mamba-2 recurrence, token by token.

    x (b, n, H, P); dt (b, n, H) already softplus'ed; A, D (H,); B, C (b, n, H, N) (already
    expanded from groups to heads); state (b, H, P, N) fp32, not modified; valid (b, n) bool or
    None: at an invalid position the state is carried through unchanged.
    Returns y (b, n, H, P) fp32 and the final state.
    """
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    if valid is not None:
        dt = dt.masked_fill(~valid[..., None], 0.0)
    decay = torch.exp(dt * A.float())  # (b, n, H)
    dtx = dt[..., None] * x  # (b, n, H, P)
    ys = []
    for i in range(x.shape[1]):
        state = state * decay[:, i, :, None, None] + dtx[:, i, :, :, None] * B[:, i, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, i]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape)
    return y + D.float()[:, None] * x, state


def ssm_scan_ref(x, dt, A, B, C, D, state, n_valid=None):
    """:func:`ssm_scan`'s arguments (B, C per group) through :func:`selective_scan_ref`."""
    heads, groups = x.shape[2], B.shape[2]
    B = B.repeat_interleave(heads // groups, dim=2)
    C = C.repeat_interleave(heads // groups, dim=2)
    valid = None
    if n_valid is not None:
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < n_valid[:, None]
    return selective_scan_ref(x, dt, A, B, C, D, state, valid)


def ssm_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    state: torch.Tensor,
    n_valid: torch.Tensor | None = None,
    *,
    keep_state: bool = True,
    variant: str = "lanes",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The selective scan of n tokens from ``state``.

    Shapes:
        x:     (b, n, H, P)   float32 or bfloat16 (any strides with a unit P stride)
        dt:    (b, n, H)      fp32, already softplus'ed (and clamped)
        A, D:  (H,)           A = -exp(A_log)
        B, C:  (b, n, G, N)   x's dtype; G divides H (head h reads group h // (H / G))
        state: (b, H, P, N)   fp32, not modified
        n_valid: (b,) int64 or None: tokens at or after n_valid[b] leave the state unchanged
        keep_state: False skips writing the final state (the denoiser's block scan): returns None.
        variant: the kernel's layout: "lanes" (a warp's lanes over a state row; measured) or
            "rows" (a thread per row slice, tokens staged in shared memory, for runs of several
            tokens; not yet run on a GPU). The PyTorch path ignores it.
        returns (y (b, n, H, P) fp32, final state (b, H, P, N) fp32 or None).

    CUDA tensors run the twotower_rt._C kernel when N is 16/32/64/128 and x, B, C share a kernel
    dtype; everything else runs :func:`ssm_scan_ref`.
    """
    _check_args(x, dt, A, B, C, D, state, n_valid)
    if variant not in VARIANTS:
        raise ValueError(f"ssm_scan: variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    reason = _kernel_unsupported_reason(x, B, C, state)
    if reason is not None:
        y, final = ssm_scan_ref(x, dt, A, B, C, D, state, n_valid)
        return y, final if keep_state else None
    return _ssm_scan_cuda(x, dt, A, B, C, D, state, n_valid, keep_state, VARIANTS[variant])


def ssm_scan_backend(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16
) -> tuple[str, str]:
    """``(backend, reason)``: "cuda" (the kernel), "torch" (ssm_scan_ref) or "none"."""
    backend, reason = _ext.op_backend(
        device, dtype, ref="ssm_scan_ref", kernel_dtypes=KERNEL_DTYPES, what="x, B, C",
        op="ssm_scan",
    )  # fmt: skip
    if backend == "cuda":
        reason += f", state size {'/'.join(map(str, KERNEL_STATE_SIZES))}"
    return backend, reason


def _check_args(x, dt, A, B, C, D, state, n_valid) -> None:
    if x.dim() != 4 or B.dim() != 4 or B.shape != C.shape:
        raise ValueError(f"ssm_scan: expected x (b, n, H, P) and B, C (b, n, G, N), got "
                         f"{tuple(x.shape)}, {tuple(B.shape)}, {tuple(C.shape)}")  # fmt: skip
    b, n, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    if B.shape[:2] != (b, n) or G == 0 or H % G:
        raise ValueError(f"ssm_scan: B {tuple(B.shape)} does not fit x {tuple(x.shape)} (same b, "
                         "n; groups dividing heads)")  # fmt: skip
    if dt.shape != (b, n, H) or A.shape != (H,) or D.shape != (H,):
        raise ValueError(f"ssm_scan: dt must be {(b, n, H)} and A, D ({H},), got "
                         f"{tuple(dt.shape)}, {tuple(A.shape)}, {tuple(D.shape)}")  # fmt: skip
    if state.shape != (b, H, P, N) or state.dtype != torch.float32:
        raise ValueError(f"ssm_scan: state must be {(b, H, P, N)} float32, got "
                         f"{tuple(state.shape)} {state.dtype}")  # fmt: skip
    if n_valid is not None and n_valid.shape != (b,):
        raise ValueError(f"ssm_scan: n_valid must be ({b},), got {tuple(n_valid.shape)}")
    for t in (dt, A, B, C, D, state, n_valid):
        if t is not None and t.device != x.device:
            raise ValueError("ssm_scan: all tensors must be on x's device")


def _kernel_unsupported_reason(x, B, C, state) -> str | None:
    reason = _ext.cuda_unsupported_reason(x.device, "ssm_scan")
    if reason is not None:
        return reason
    if x.dtype not in KERNEL_DTYPES or B.dtype != x.dtype or C.dtype != x.dtype:
        return f"dtypes x={x.dtype}, B={B.dtype}, C={C.dtype}; the kernel takes float32, bfloat16"
    if B.shape[3] not in KERNEL_STATE_SIZES:
        return f"state size {B.shape[3]}; the kernel takes {KERNEL_STATE_SIZES}"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, B, C, state)):
        return "the kernel has no backward; autograd needs the PyTorch path"
    if x.shape[0] > 65535 or x.shape[2] > 65535:
        return "batch or heads over 65535"
    return None


def _vector_ready(t: torch.Tensor, per_lane: int) -> torch.Tensor:
    """t itself when its last dim is unit-stride and the kernel's vector loads of ``per_lane``
    elements are aligned; else a fresh contiguous copy."""
    align = min(16, t.element_size() * per_lane)
    ok = (
        t.stride(-1) == 1
        and t.data_ptr() % align == 0
        and all(t.stride(i) % per_lane == 0 for i in range(t.dim() - 1))
    )
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def _ssm_scan_cuda(x, dt, A, B, C, D, state, n_valid, keep_state, variant):
    C_ext = _ext.require_cuda_op("ssm_scan", x)
    b, n, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    per_lane = max(1, N // 32)
    x = x if x.stride(3) == 1 else x.contiguous()
    B, C = _vector_ready(B, per_lane), _vector_ready(C, per_lane)
    dt = dt.float()
    dt = dt if dt.stride(2) == 1 else dt.contiguous()
    A, D = A.float().contiguous(), D.float().contiguous()
    state = state.contiguous()
    if state.data_ptr() % 16:
        state = state.clone()
    lens = n_valid.to(torch.int64).contiguous() if n_valid is not None else None
    y = torch.empty((b, n, H, P), dtype=torch.float32, device=x.device)
    final = torch.empty_like(state) if keep_state else None
    C_ext.ssm_scan(
        x=x.data_ptr(),
        x_strides=(x.stride(0), x.stride(1), x.stride(2)),
        dt=dt.data_ptr(),
        dt_strides=(dt.stride(0), dt.stride(1)),
        A=A.data_ptr(),
        D=D.data_ptr(),
        B=B.data_ptr(),
        b_strides=(B.stride(0), B.stride(1), B.stride(2)),
        C=C.data_ptr(),
        c_strides=(C.stride(0), C.stride(1), C.stride(2)),
        n_valid=lens.data_ptr() if lens is not None else 0,
        state=state.data_ptr(),
        state_out=final.data_ptr() if final is not None else 0,
        y=y.data_ptr(),
        batch=b,
        n=n,
        heads=H,
        groups=G,
        head_dim=P,
        state_size=N,
        dtype=_DTYPE_CODES[x.dtype],
        variant=variant,
        device=x.device.index if x.device.index is not None else torch.cuda.current_device(),
        stream=torch.cuda.current_stream(x.device).cuda_stream,
    )
    return y, final
