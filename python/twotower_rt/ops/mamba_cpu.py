"""The Mamba-2 mixer's middle on the CPU in one call: the op (``twotower_rt._cpu``, the kernel in
``csrc/cpu/mamba_cpu.cpp``), and beside it its PyTorch reference, the model's own eager math.

Between ``in_proj`` and ``out_proj`` a Mamba layer runs ~30 small ops per call (conv, SiLU,
softplus, the token-by-token scan, the gated norm); on the small models the CPU serves, their
launch costs are most of a step. The kernel does the same arithmetic per sequence in one pass.
Its numbers agree with the reference to float32 rounding (its exp and its dot products are its
own), not bitwise; each sequence is computed alone, so batching never changes a row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import _ext
from .rmsnorm import rms_norm_ref
from .ssm_scan import selective_scan_ref


def available(x: torch.Tensor) -> bool:
    """Whether :func:`mamba_chunk` runs its kernel for ``x`` (fp32, on the CPU, _cpu built)."""
    return _ext.cpu_kernels() is not None and x.dtype == torch.float32 and x.device.type == "cpu"


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...], dtype=torch.float32) -> None:
    if t.dtype != dtype or not t.is_cpu or t.shape != shape:
        raise ValueError(
            f"mamba_chunk: {name} must be a {dtype} CPU tensor of shape {shape}, "
            f"got {t.dtype} on {t.device} of shape {tuple(t.shape)}"
        )
    if not t.is_contiguous():
        raise ValueError(f"mamba_chunk: {name} must be contiguous")


@dataclass(frozen=True)
class MambaWeights:
    """A layer's constants for :func:`mamba_chunk`, checked once (:func:`mamba_weights`)."""

    conv_taps: torch.Tensor  # (K, conv_dim), time-major
    conv_bias: torch.Tensor | None  # (conv_dim,)
    dt_bias: torch.Tensor  # (H,)
    A: torch.Tensor  # (H,): -exp(A_log)
    D: torch.Tensor  # (H,)
    norm_weight: torch.Tensor  # (d_inner,)
    heads: int
    head_dim: int
    state_size: int
    groups: int
    eps: float
    time_step_limit: tuple[float, float]


def mamba_weights(
    conv_taps, conv_bias, dt_bias, A, D, norm_weight, *, heads: int, groups: int, eps: float,
    time_step_limit: tuple[float, float] = (0.0, math.inf),
) -> MambaWeights:  # fmt: skip
    """Check a layer's constants (all fp32 CPU, contiguous; shapes as in :func:`mamba_chunk`) and
    bundle them for it."""
    if conv_taps.dim() != 2 or norm_weight.dim() != 1 or heads <= 0 or groups <= 0 \
            or heads % groups or norm_weight.shape[0] % heads:  # fmt: skip
        raise ValueError(
            f"mamba_weights: conv_taps must be (K, conv_dim) and norm_weight (heads * head_dim,) "
            f"with heads a multiple of groups; got {tuple(conv_taps.shape)}, "
            f"{tuple(norm_weight.shape)}, heads {heads}, groups {groups}"
        )
    K, conv_dim = conv_taps.shape
    d_inner = norm_weight.shape[0]
    P = d_inner // heads
    N, rest = divmod(conv_dim - d_inner, 2 * groups)
    if N <= 0 or rest:
        raise ValueError(
            f"mamba_weights: conv_dim {conv_dim} is not d_inner {d_inner} + 2 * groups {groups} "
            "* state_size"
        )
    _check("conv_taps", conv_taps, (K, conv_dim))
    if conv_bias is not None:
        _check("conv_bias", conv_bias, (conv_dim,))
    for name, t in (("dt_bias", dt_bias), ("A", A), ("D", D)):
        _check(name, t, (heads,))
    _check("norm_weight", norm_weight, (d_inner,))
    lo, hi = time_step_limit
    return MambaWeights(conv_taps, conv_bias, dt_bias, A, D, norm_weight, heads, P, N, groups,
                        float(eps), (float(lo), float(hi)))  # fmt: skip


def mamba_chunk(
    zxbcdt: torch.Tensor,
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
    weights: MambaWeights,
    n_valid: torch.Tensor | None = None,
    with_output: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The mixer's middle over n tokens of b sequences, all fp32 CPU tensors.

    Shapes (H heads, P head_dim, N state_size, G groups, K taps; d_inner = H * P,
    conv_dim = d_inner + 2 * G * N):
        zxbcdt:      (b, n, d_inner + conv_dim + H)  in_proj's output [z | xBC | dt]
        conv_state:  (b, conv_dim, K)  the last K raw xBC columns, oldest first
        ssm_state:   (b, H, P, N)      not modified
        weights:     the layer's constants (:func:`mamba_weights`): the conv taps (K, conv_dim)
                     and bias, dt_bias, A = -exp(A_log), D (H,), the gated norm's weight (d_inner,)
        n_valid:     (b,) int64 in [0, n] or None: row r's tokens past n_valid[r] are padding
    Returns (out (b, n, d_inner) the gated normed y, or None without ``with_output``; the conv
    state (b, conv_dim, K) and SSM state (b, H, P, N) after each row's n_valid tokens). Without
    ``with_output`` (a rollback's replay) only the states are computed, up to n_valid.
    """
    lib = _ext.cpu_kernels()
    if lib is None:
        raise RuntimeError(
            f"twotower_rt: CPU op 'mamba_chunk' cannot run: {_ext.cpu_kernels_error()}"
        )
    w = weights
    H, P, N, G = w.heads, w.head_dim, w.state_size, w.groups
    K, conv_dim = w.conv_taps.shape
    d_inner = H * P
    if zxbcdt.dim() != 3:
        raise ValueError(f"mamba_chunk: zxbcdt must be (b, n, proj), got {tuple(zxbcdt.shape)}")
    b, n, _ = zxbcdt.shape
    _check("zxbcdt", zxbcdt, (b, n, d_inner + conv_dim + H))
    _check("conv_state", conv_state, (b, conv_dim, K))
    _check("ssm_state", ssm_state, (b, H, P, N))
    if n_valid is not None:
        _check("n_valid", n_valid, (b,), torch.int64)
    out = zxbcdt.new_empty((b, n, d_inner)) if with_output else None
    conv_out = zxbcdt.new_empty((b, conv_dim, K))
    ssm_out = zxbcdt.new_empty((b, H, P, N))
    _ext.keep(zxbcdt, conv_state, ssm_state, n_valid, out, conv_out, ssm_out)
    lib.mamba_chunk(
        zxbcdt.data_ptr(), conv_state.data_ptr(), ssm_state.data_ptr(), w.conv_taps.data_ptr(),
        0 if w.conv_bias is None else w.conv_bias.data_ptr(), w.dt_bias.data_ptr(),
        w.A.data_ptr(), w.D.data_ptr(), w.norm_weight.data_ptr(),
        0 if n_valid is None else n_valid.data_ptr(), 0 if out is None else out.data_ptr(),
        conv_out.data_ptr(), ssm_out.data_ptr(), b, n, H, P, N, G, K, d_inner // G, w.eps,
        *w.time_step_limit,
    )  # fmt: skip
    return out, conv_out, ssm_out


def mamba_chunk_ref(zxbcdt, conv_state, ssm_state, weights: MambaWeights, n_valid=None,
                    with_output=True):  # fmt: skip
    """:func:`mamba_chunk` in plain PyTorch: ``Mamba2Mixer.forward``'s eager ops (F.conv1d, the
    per-token ``selective_scan_ref``, ``rms_norm_ref``); the kernel's test oracle."""
    w = weights
    conv_taps, conv_bias, dt_bias, A, D = w.conv_taps, w.conv_bias, w.dt_bias, w.A, w.D
    b, n, _ = zxbcdt.shape
    _, H, P, N = ssm_state.shape
    K, conv_dim = conv_taps.shape
    d_inner, G, eps, time_step_limit = H * P, w.groups, w.eps, w.time_step_limit
    z, xBC, dt = torch.split(zxbcdt, [d_inner, conv_dim, H], dim=-1)
    valid = None
    if n_valid is not None:
        valid = torch.arange(n)[None, :] < n_valid[:, None]
        xBC = xBC.masked_fill(~valid[..., None], 0.0)
    raw = xBC.transpose(1, 2)
    history = torch.cat([conv_state, raw], dim=-1)  # (b, conv_dim, K + n)
    weight = conv_taps.t()[:, None, :]  # (conv_dim, 1, K)
    xBC = F.silu(F.conv1d(history[..., 1:], weight, conv_bias, groups=conv_dim)).transpose(1, 2)
    ends = torch.full((b,), n) if n_valid is None else n_valid
    cols = ends[:, None] + torch.arange(K)[None, :]
    new_conv = history.gather(2, cols[:, None, :].expand(b, conv_dim, K))
    x, Bm, Cm = torch.split(xBC, [d_inner, G * N, G * N], dim=-1)
    dt = F.softplus(dt + dt_bias)
    lo, hi = time_step_limit
    if lo > 0.0 or hi != math.inf:
        dt = dt.clamp(lo, hi)
    Bh = Bm.reshape(b, n, G, N).repeat_interleave(H // G, dim=2)
    Ch = Cm.reshape(b, n, G, N).repeat_interleave(H // G, dim=2)
    y, new_ssm = selective_scan_ref(x.reshape(b, n, H, P), dt, A, Bh, Ch, D, ssm_state, valid)
    out = None
    if with_output:
        out = rms_norm_ref(y.reshape(b, n, d_inner), w.norm_weight, eps, gate=z,
                           group_size=d_inner // G)  # fmt: skip
    return out, new_conv, new_ssm
