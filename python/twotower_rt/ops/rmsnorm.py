"""RMSNorm with an optional SiLU gate and grouping: the op, and beside it its PyTorch reference.

The model uses it as the pre-norm of every layer (``rms_norm(x, w, 1e-5)``, N = hidden = 2688) and
as Mamba-2's gated norm (``rms_norm(y, w, eps, gate=z, group_size=d_inner // n_groups)``, N = 4096,
G = 512). The CUDA kernel is ``csrc/include/twotower_rt/rmsnorm.cuh``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from twotower_rt import _ext, fastpath

# What the CUDA kernel takes; other dtypes, and CPU tensors, run rms_norm_ref.
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_INT32_MAX = 2**31 - 1


def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    gate: torch.Tensor | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """Plain-PyTorch RMSNorm in fp32: the CPU path of :func:`rms_norm` and its test oracle.

    Same arguments and result as :func:`rms_norm` (without ``out``); no argument checks.
    """
    N = x.shape[-1]
    h = x.to(torch.float32)
    if gate is not None:
        h = h * torch.nn.functional.silu(gate.to(torch.float32))
    G = group_size or N
    h = h.view(*x.shape[:-1], N // G, G)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h.view(x.shape) * weight.to(torch.float32)).to(x.dtype)


def _rms_norm_cpu(x, weight, eps, gate, group_size):
    """:func:`rms_norm_ref` bitwise with fewer ops: the CPU fast path. A plain norm is
    ``F.rms_norm`` (the same composite ops, in one call); a gated one casts nothing already fp32
    and updates its own temporaries in place."""
    n = x.shape[-1]
    g = group_size or n
    if (
        weight.shape != (n,)
        or g <= 0
        or n % g
        or weight.device != x.device
        or (gate is not None and (gate.shape != x.shape or gate.device != x.device))
    ):
        _check_args(x, weight, gate, group_size, None)  # raises, naming what is wrong
    h = x if x.dtype == torch.float32 else x.float()
    w = weight if weight.dtype == torch.float32 else weight.float()
    if gate is None and g == n:
        out = F.rms_norm(h, (n,), w, eps)
    else:
        if gate is not None:
            h = h * F.silu(gate if gate.dtype == torch.float32 else gate.float())
        grouped = h.view(*x.shape[:-1], n // g, g)
        inv = torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True).add_(eps))
        out = (grouped * inv).view(x.shape).mul_(w)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    gate: torch.Tensor | None = None,
    group_size: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """RMSNorm over the last dimension, optionally gated and grouped, computed in fp32.

    ``h = x * silu(gate)`` (gate optional), then for each group of ``G = group_size`` consecutive
    elements of a row ``out = h * rsqrt(mean(h**2 over the group) + eps) * weight``.

    Shapes:
        x:      (..., N)   any float dtype; the CUDA kernel takes float32 and bfloat16
        weight: (N,)       float32 or bfloat16 for the kernel, any float for the reference
        gate:   (..., N)   same shape as x (and, for the kernel, its dtype), or None
        group_size: G, which must divide N; None (or 0) means G = N, a plain RMSNorm
        out:    (..., N)   x's shape, dtype and device; allocated when None. May be x itself.
        returns ``out``, dtype of x.

    CUDA tensors run ``twotower_rt._C`` when it is built for this GPU and the dtypes are supported
    (rows may have any stride, the last dimension must be contiguous or it is copied); everything
    else, CPU tensors included, runs :func:`rms_norm_ref`. ``twotower_rt.env.format_report()``
    says which path runs here and why.
    """
    if (
        out is None
        and fastpath.enabled()
        and x.device.type == "cpu"
        and x.dim() > 0
        and x.is_floating_point()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        return _rms_norm_cpu(x, weight, eps, gate, group_size)
    _check_args(x, weight, gate, group_size, out)
    if x.device.type != "cuda" or _kernel_unsupported_reason(x, weight, gate, group_size):
        result = rms_norm_ref(x, weight, eps, gate=gate, group_size=group_size)
        if out is None:
            return result
        return out.copy_(result)
    return _rms_norm_cuda(x, weight, eps, gate, group_size or x.shape[-1], out)


def rms_norm_backend(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16
) -> tuple[str, str]:
    """``(backend, reason)`` for rms_norm on tensors of ``dtype`` on ``device``.

    backend is ``"cuda"`` (the twotower_rt._C kernel), ``"torch"`` (rms_norm_ref) or ``"none"``
    (no such device here).
    """
    return _ext.op_backend(device, dtype, ref="rms_norm_ref", kernel_dtypes=KERNEL_DTYPES)


def _check_args(x, weight, gate, group_size, out) -> None:
    if x.dim() == 0:
        raise ValueError("rms_norm: x must have shape (..., N), got a 0-dim tensor")
    n = x.shape[-1]
    if n == 0:
        raise ValueError(
            f"rms_norm: x has shape {tuple(x.shape)}; the last dimension N must be > 0"
        )
    if not x.is_floating_point():
        raise TypeError(f"rms_norm: x must be a floating-point tensor, got {x.dtype}")
    if weight.shape != (n,):
        raise ValueError(
            f"rms_norm: weight must have shape ({n},) to match x.shape[-1], "
            f"got {tuple(weight.shape)}"
        )
    if weight.device != x.device:
        raise ValueError(f"rms_norm: weight is on {weight.device}, x on {x.device}")
    if gate is not None:
        if gate.shape != x.shape:
            raise ValueError(
                f"rms_norm: gate must have x's shape {tuple(x.shape)}, got {tuple(gate.shape)}"
            )
        if gate.device != x.device:
            raise ValueError(f"rms_norm: gate is on {gate.device}, x on {x.device}")
    if group_size is not None and group_size != 0 and (group_size < 0 or n % group_size != 0):
        raise ValueError(
            f"rms_norm: group_size must be a positive divisor of N = {n} (or None), "
            f"got {group_size}"
        )
    if out is not None:
        if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(
                f"rms_norm: out must match x (shape {tuple(x.shape)}, {x.dtype}, {x.device}), "
                f"got shape {tuple(out.shape)}, {out.dtype}, {out.device}"
            )


def _kernel_unsupported_reason(x, weight, gate, group_size) -> str | None:
    """None when the CUDA kernel can compute this call (x is already known to be on CUDA)."""
    reason = _ext.cuda_unsupported_reason(x.device)
    if reason is not None:
        return reason
    if x.dtype not in KERNEL_DTYPES or weight.dtype not in KERNEL_DTYPES:
        return f"dtypes x={x.dtype}, weight={weight.dtype}; the kernel takes float32 and bfloat16"
    if gate is not None and gate.dtype != x.dtype:
        return f"gate dtype {gate.dtype} differs from x dtype {x.dtype}"
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (gate is not None and gate.requires_grad)
    ):
        return "the kernel has no backward; autograd needs the PyTorch path"
    n = x.shape[-1]
    if n > _INT32_MAX or (x.numel() // n) * (n // (group_size or n)) > _INT32_MAX:
        return "over 2**31 - 1 elements per row or groups in all (the kernel's 32-bit indices)"
    return None


def _as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """(rows, n) with a unit column stride: a view when the leading dims collapse, else a copy."""
    if n > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, n)


def _rows_view(out: torch.Tensor, n: int) -> torch.Tensor | None:
    """``out`` as (rows, n) the kernel can write directly, or None (then it writes a temporary)."""
    if n > 1 and out.stride(-1) != 1:
        return None
    try:
        rows = out.view(-1, n)
    except RuntimeError:
        return None
    if rows.shape[0] > 1 and rows.stride(0) < n:  # expanded or overlapping rows
        return None
    return rows


_DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float32: "DTYPE_FLOAT32",
    torch.bfloat16: "DTYPE_BFLOAT16",
}


def _rms_norm_cuda(x, weight, eps, gate, group_size, out):
    C = _ext.require_cuda_op("rms_norm", x)
    n = x.shape[-1]
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = x.numel() // n
    if rows == 0:
        return out
    x_rows = _as_rows(x, n)
    gate_rows = _as_rows(gate, n) if gate is not None else None
    weight = weight if weight.stride(0) == 1 or n == 1 else weight.contiguous()
    out_rows = _rows_view(out, n)
    target = (
        out_rows if out_rows is not None else torch.empty((rows, n), dtype=x.dtype, device=x.device)
    )
    C.rms_norm(
        out=target.data_ptr(),
        x=x_rows.data_ptr(),
        gate=gate_rows.data_ptr() if gate_rows is not None else 0,
        weight=weight.data_ptr(),
        rows=rows,
        n=n,
        group_size=group_size,
        out_row_stride=target.stride(0),
        x_row_stride=x_rows.stride(0),
        gate_row_stride=gate_rows.stride(0) if gate_rows is not None else 0,
        eps=float(eps),
        dtype=getattr(C, _DTYPE_CODES[x.dtype]),
        weight_dtype=getattr(C, _DTYPE_CODES[weight.dtype]),
        device=x.device.index,
        stream=torch.cuda.current_stream(x.device).cuda_stream,
    )
    if out_rows is None:
        out.copy_(target.view(x.shape))
    return out


def modulated_rms_norm_ref(x, weight, scale, shift, eps: float, *, post: bool) -> torch.Tensor:
    """The denoiser's time-modulated pre-norm in PyTorch ops (``cpu_fast.tower_forward``'s):
    ``rms_norm(x * scale + shift)`` or, ``post``, ``rms_norm(x) * scale + shift``; x (b, n, H)
    fp32, weight (H,), scale (= 1 + the layer's scale) and shift (b, H)."""
    scale, shift = scale[:, None], shift[:, None]
    if post:
        return F.rms_norm(x, (x.shape[-1],), weight, eps) * scale + shift
    return F.rms_norm(x * scale + shift, (x.shape[-1],), weight, eps)


def modulated_rms_norm_cpu(x, weight, scale, shift, eps: float, *, post: bool) -> torch.Tensor:
    """:func:`modulated_rms_norm_ref` in one call of ``twotower_rt._cpu``
    (``csrc/cpu/norm_cpu.cpp``): float32 contiguous CPU tensors; agrees to float32 rounding
    (fused multiply-adds, its own summation order), each row alone. ``scale`` and ``shift`` None:
    a plain RMSNorm (:func:`rms_norm_cpu`)."""
    C = _ext.cpu_kernels()
    if C is None:
        raise RuntimeError(
            f"twotower_rt: CPU op 'modulated_rms_norm' cannot run: {_ext.cpu_kernels_error()}"
        )
    if x.dim() != 3:
        raise ValueError(f"modulated_rms_norm: x must be (b, n, hidden), got {tuple(x.shape)}")
    b, n, hidden = x.shape
    if (scale is None) != (shift is None):
        raise ValueError("modulated_rms_norm: give scale and shift together (or neither)")
    plain = scale is None
    f32 = torch.float32
    if not (  # one pass of cheap checks (a denoiser forward makes ten calls); details on failure
        x.dtype == weight.dtype == f32 and x.is_cpu and weight.is_cpu
        and weight.shape == (hidden,) and x.is_contiguous() and weight.is_contiguous()
        and (plain or (
            scale.dtype == shift.dtype == f32 and scale.is_cpu and shift.is_cpu
            and scale.shape == shift.shape == (b, hidden)
            and scale.is_contiguous() and shift.is_contiguous()))
    ):  # fmt: skip
        expected = [("x", x, (b, n, hidden)), ("weight", weight, (hidden,))]
        if not plain:
            expected += [("scale", scale, (b, hidden)), ("shift", shift, (b, hidden))]
        for name, t, shape in expected:
            if t.dtype != f32 or t.device.type != "cpu" or t.shape != shape:
                raise ValueError(
                    f"modulated_rms_norm: {name} must be a float32 CPU tensor of shape {shape}, "
                    f"got {t.dtype} on {t.device} of shape {tuple(t.shape)}"
                )
            if not t.is_contiguous():
                raise ValueError(f"modulated_rms_norm: {name} must be contiguous")
    out = torch.empty_like(x)
    _ext.keep(x, scale, shift, out)
    C.modulated_rms_norm(x.data_ptr(), weight.data_ptr(), 0 if plain else scale.data_ptr(),
                         0 if plain else shift.data_ptr(), out.data_ptr(), b * n, hidden, n, eps,
                         post)  # fmt: skip
    return out


def residual_add_cpu(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """A layer's residual update in one call of ``twotower_rt._cpu`` (``csrc/cpu/norm_cpu.cpp``):
    ``x + gate * y`` with one rounding (``torch.addcmul(x, gate, y)``'s on the x86-64 CPUs
    checked) or, gate None, ``x + y``; x and y (b, n, hidden) float32 contiguous CPU tensors,
    gate (b, 1, hidden) with unit column stride (a view of the denoiser's modulation). As a
    kernel call it can be queued on the kernels' stream (``_ext.cpu_stream``)."""
    C = _ext.cpu_kernels()
    if C is None:
        raise RuntimeError(
            f"twotower_rt: CPU op 'residual_add' cannot run: {_ext.cpu_kernels_error()}"
        )
    if x.dim() != 3:
        raise ValueError(f"residual_add: x must be (b, n, hidden), got {tuple(x.shape)}")
    b, n, hidden = x.shape
    f32 = torch.float32
    if not (
        x.dtype == y.dtype == f32 and x.is_cpu and y.is_cpu and y.shape == x.shape
        and x.is_contiguous() and y.is_contiguous()
        and (gate is None or (gate.dtype == f32 and gate.is_cpu and gate.shape == (b, 1, hidden)
                              and gate.stride(2) == 1 and (b == 1 or gate.stride(0) >= hidden)))
    ):  # fmt: skip
        raise ValueError(
            f"residual_add: x and y must be float32 contiguous CPU tensors of one shape and gate "
            f"None or float32 (b, 1, hidden) with unit column stride, got x {x.dtype} "
            f"{tuple(x.shape)}, y {y.dtype} {tuple(y.shape)}, gate "
            f"{None if gate is None else (gate.dtype, tuple(gate.shape), gate.stride())}"
        )
    out = torch.empty_like(x)
    _ext.keep(x, y, gate, out)
    C.residual_add(x.data_ptr(), y.data_ptr(), 0 if gate is None else gate.data_ptr(),
                   out.data_ptr(), b * n, hidden, n, 0 if gate is None else max(gate.stride(0),
                   hidden))  # fmt: skip
    return out


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """A plain RMSNorm, ``F.rms_norm(x, (hidden,), weight, eps)``, in one call of the CPU
    kernel: x (b, n, hidden) float32 contiguous; float32 rounding (the sum of squares in 16
    lanes), each row alone."""
    return modulated_rms_norm_cpu(x, weight, None, None, eps, post=False)
