"""The grouped GEMMs of the MoE layer's grouped path (``ops/moe.py``): ``gemm(a, w, offs, relu2,
extra=None)`` multiplies rows [offs[e-1], offs[e]) of a by expert e's weight, relu^2 optionally
fused, for bf16 stacks (E, N, K) or :class:`Fp8ExpertWeights`, plus an optional ``extra`` group
``(a_x, w_x)`` of its own rows, width and output (the folded shared expert).

- :func:`gemm_cutlass` / :func:`gemm_cutlass_fp8`: our CUTLASS kernels
  (``csrc/include/twotower_rt/moe_gemm.cuh``, ``moe_gemm_fp8.cuh``: FP8 weights dequantized in
  registers exactly as ``Fp8Linear`` does it, so the bytes streamed halve); relu^2 acts on the fp32
  accumulator before the one rounding.
- :func:`gemm_torch`: ``torch._grouped_mm`` (also on the CPU); it takes one width for all groups, so
  the extra group runs as plain matmuls.
- :func:`gemm_loop`: per-expert matmuls with the reference model's arithmetic (relu^2 after the
  rounding), which tests use to check the grouped path's logic exactly; :func:`gemm_fp8_ref` is the
  FP8 kernel's fp32 oracle.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP8_TILE_K = 64  # kMoeFp8TileK in moe_gemm_fp8.cuh: a scale block covers whole k tiles


@dataclass(frozen=True, eq=False)
class Fp8ExpertWeights:
    """The experts' FP8 weights of one projection, stacked, with their scales in the layout the
    FP8 grouped GEMM reads: weight (E, N, K) float8_e4m3fn; scale (E, ceil(K / group_size), N)
    float32, output channel fastest, one per output channel and group of ``group_size`` input
    columns (``group_size == K``: per-channel). Built by :meth:`from_checkpoint`."""

    weight: torch.Tensor
    scale: torch.Tensor
    group_size: int

    def __post_init__(self):
        E, N, K = self.weight.shape
        want = (E, math.ceil(K / self.group_size), N) if self.group_size > 0 else None
        if self.weight.dtype != torch.float8_e4m3fn or self.scale.dtype != torch.float32:
            raise ValueError(
                f"Fp8ExpertWeights: weight must be float8_e4m3fn and scale float32, got "
                f"{self.weight.dtype} and {self.scale.dtype}"
            )
        if want is None or tuple(self.scale.shape) != want:
            raise ValueError(
                f"Fp8ExpertWeights: scale of shape {tuple(self.scale.shape)} for weight "
                f"{tuple(self.weight.shape)} and group_size {self.group_size}: expected {want}"
            )

    @classmethod
    def from_checkpoint(
        cls, weight: torch.Tensor, weight_scale: torch.Tensor, block: tuple[int, int]
    ) -> Fp8ExpertWeights:
        """weight (E, N, K) and weight_scale (E, ceil(N / rows), ceil(K / cols)) as the experts'
        ``Fp8Linear`` store them (block ``(rows, cols)``, 0 meaning the whole extent). Scales are
        repeated over each block's rows and transposed; per-channel scales (rows 1, cols 0) are
        already in that layout and become a view, not a copy."""
        _, N, K = weight.shape
        rows = block[0] or N
        cols = block[1] or K
        scale = weight_scale
        if rows > 1:
            scale = scale.repeat_interleave(rows, dim=1)[:, :N]
        scale = scale.transpose(1, 2).contiguous()
        return cls(weight, scale, min(cols, K))

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def dequantize(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert e's (N, K) weight as ``Fp8Linear`` computes it: fp32 product, one rounding."""
        K = self.weight.shape[2]
        scale = self.scale[e].T.repeat_interleave(self.group_size, dim=1)[:, :K]
        return (self.weight[e].float() * scale).to(dtype)

    def regrouped(self, group_size: int) -> Fp8ExpertWeights:
        """The same weights with scales at ``group_size`` input columns each (the FP8 kernel has
        one group size for all its groups: the shared expert's scales take the routed experts').
        Dequantizes to the same values; raises ValueError when a chunk of ``group_size`` columns
        would straddle two of this stack's scale groups."""
        reason = self.regroup_reason(group_size)
        if reason is not None:
            raise ValueError(f"Fp8ExpertWeights.regrouped: {reason}")
        if group_size == self.group_size:
            return self
        K = self.weight.shape[2]
        chunks = math.ceil(K / group_size)
        which = torch.arange(chunks, device=self.scale.device) * group_size // self.group_size
        return Fp8ExpertWeights(self.weight, self.scale[:, which].contiguous(), group_size)

    def regroup_reason(self, group_size: int) -> str | None:
        """Why :meth:`regrouped` cannot present these scales at ``group_size`` (None if it can)."""
        K = self.weight.shape[2]
        if group_size <= 0:
            return f"group_size must be positive, got {group_size}"
        if self.group_size >= K or self.group_size % group_size == 0:
            return None
        return (
            f"scale groups of {self.group_size} of {K} input columns cannot be presented in "
            f"chunks of {group_size} (a chunk would straddle two scales)"
        )


ExpertWeights = torch.Tensor | Fp8ExpertWeights
# gemm(a, w, offs, relu2, extra=None) -> out, or (out, extra_out) when extra = (a_x, w_x) is given
Gemm = Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
Extra = tuple[torch.Tensor, ExpertWeights]  # (a_x (rows_x, K_x), w_x (1, N_x, K_x))


def _relu2(h: torch.Tensor) -> torch.Tensor:
    return F.relu(h).square()


def _weight(w: ExpertWeights, e: int, dtype: torch.dtype) -> torch.Tensor:
    return w.dequantize(e, dtype) if isinstance(w, Fp8ExpertWeights) else w[e]


def gemm_loop(
    a: torch.Tensor,
    w: ExpertWeights,
    offs: torch.Tensor,
    relu2: bool,
    extra: Extra | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Rows [offs[e-1], offs[e]) of a times w[e]^T, expert by expert (reads offs on the host); an
    FP8 stack is dequantized to a's dtype first, as ``Fp8Linear`` does. ``extra`` (a_x, w_x): one
    more group, a_x @ w_x[0]^T, returned second. relu^2 after the rounding, as the modules do."""
    out = a.new_empty((a.shape[0], w.shape[1]))
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = a[start:end] @ _weight(w, e, a.dtype).T
        start = end
    out = _relu2(out) if relu2 else out
    if extra is None:
        return out
    a_x, w_x = extra
    out_x = a_x @ _weight(w_x, 0, a_x.dtype).T
    return out, (_relu2(out_x) if relu2 else out_x)


def gemm_fp8_ref(
    a: torch.Tensor,
    w: Fp8ExpertWeights,
    offs: torch.Tensor,
    relu2: bool,
    extra: Extra | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The FP8 grouped GEMM's reference, in fp32: each expert's weight dequantized to a's dtype
    as the kernel and ``Fp8Linear`` do it, then rows [offs[e-1], offs[e]) of a (upcast) times it,
    relu^2 on the fp32 product. Returns fp32 (rows, N); rows past offs[-1] are zero. ``extra``
    (a_x, w_x): one more group, likewise, returned second."""
    out = torch.zeros((a.shape[0], w.shape[1]), dtype=torch.float32, device=a.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = a[start:end].float() @ w.dequantize(e, a.dtype).float().T
        start = end
    out = _relu2(out) if relu2 else out
    if extra is None:
        return out
    a_x, w_x = extra
    out_x = a_x.float() @ _weight(w_x, 0, a_x.dtype).float().T
    return out, (_relu2(out_x) if relu2 else out_x)


def gemm_torch(
    a: torch.Tensor,
    w: torch.Tensor,
    offs: torch.Tensor,
    relu2: bool,
    extra: Extra | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``torch._grouped_mm`` (CUTLASS inside PyTorch on Hopper), relu^2 after the rounding.
    ``torch._grouped_mm`` has one N and K for all groups, so ``extra`` (a_x, w_x) runs as a plain
    matmul beside it (a second launch: not folded), returned second."""
    out = torch._grouped_mm(a, w.transpose(1, 2), offs=offs)
    out = _relu2(out) if relu2 else out
    if extra is None:
        return out
    a_x, w_x = extra
    out_x = a_x @ w_x[0].T
    return out, (_relu2(out_x) if relu2 else out_x)


_workspaces: dict[tuple, torch.Tensor] = {}


def _extra_args(
    op: str, a: torch.Tensor, extra: Extra | None, fp8: bool
) -> tuple[dict, torch.Tensor | None, tuple]:
    """The kernels' extra_* keyword arguments for ``extra`` = (a_x, w_x), the extra output (bf16
    (rows_x, N_x), allocated here) and the tensors whose pointers they hold (keep them alive until
    the launch); ({}, None, ()) without one. a_x keeps its row stride."""
    if extra is None:
        return {}, None, ()
    a_x, w_x = extra
    if fp8 != isinstance(w_x, Fp8ExpertWeights) or w_x.shape[0] != 1:
        kind = "an Fp8ExpertWeights" if fp8 else "a bfloat16 tensor"
        raise ValueError(f"{op}: the extra group's weight must be {kind} of one expert (1, N, K)")
    _, n_x, k_x = w_x.shape
    if a_x.dtype != a.dtype or a_x.dim() != 2 or a_x.shape[1] != k_x:
        raise ValueError(
            f"{op}: the extra group's a must be {a.dtype} (rows, {k_x}), got {a_x.dtype} "
            f"{tuple(a_x.shape)}"
        )
    if a_x.stride(1) != 1 or a_x.stride(0) % 8 or a_x.data_ptr() % 16:  # 16-byte rows for TMA
        a_x = a_x.contiguous()
    out_x = torch.empty((a_x.shape[0], n_x), dtype=a.dtype, device=a.device)
    args = dict(
        extra_a=a_x.data_ptr(), extra_d=out_x.data_ptr(), extra_rows=a_x.shape[0], extra_n=n_x,
        extra_k=k_x, extra_lda=a_x.stride(0), extra_ldd=out_x.stride(0),
    )  # fmt: skip
    if fp8:
        weight, scale = w_x.weight.contiguous(), w_x.scale.contiguous()
        args.update(extra_w=weight.data_ptr(), extra_scales=scale.data_ptr())
        return args, out_x, (a_x, weight, scale)
    weight = w_x.contiguous()
    args.update(extra_w=weight.data_ptr())
    return args, out_x, (a_x, weight)


def gemm_cutlass(
    a: torch.Tensor,
    w: torch.Tensor,
    offs: torch.Tensor,
    relu2: bool,
    extra: Extra | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Our grouped GEMM (twotower_rt._C.moe_grouped_gemm): relu^2 fused into the epilogue, on the
    fp32 accumulator before the one rounding to bf16. ``extra`` (a_x, w_x (1, N_x, K_x)): one more
    group in the same launch (its own rows, width and output), returned second."""
    from twotower_rt import _ext

    C = _ext.require_cuda_op("moe_grouped_gemm", a)
    a = a.contiguous()
    w = w.contiguous()
    offs = offs.to(torch.int32).contiguous()
    experts, n, k = w.shape
    extra_args, out_x, _keep = _extra_args("gemm_cutlass", a, extra, fp8=False)
    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    key = (index, experts, relu2, extra is not None)
    if key not in _workspaces:
        size = C.moe_grouped_gemm_workspace_bytes(
            experts=experts, epilogue=int(relu2), device=index, extra_group=extra is not None
        )
        _workspaces[key] = torch.empty(size, dtype=torch.uint8, device=a.device)
    workspace = _workspaces[key]
    out = torch.empty((a.shape[0], n), dtype=a.dtype, device=a.device)
    C.moe_grouped_gemm(
        a=a.data_ptr(), w=w.data_ptr(), offsets=offs.data_ptr(), d=out.data_ptr(),
        workspace=workspace.data_ptr(), workspace_bytes=workspace.numel(), experts=experts,
        n=n, k=k, epilogue=int(relu2), device=index,
        stream=torch.cuda.current_stream(a.device).cuda_stream, **extra_args,
    )  # fmt: skip
    return out if extra is None else (out, out_x)


def gemm_cutlass_fp8(
    a: torch.Tensor,
    w: Fp8ExpertWeights,
    offs: torch.Tensor,
    relu2: bool,
    out: torch.Tensor | None = None,
    extra: Extra | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Our FP8-weight grouped GEMM (twotower_rt._C.moe_grouped_gemm_fp8): bf16 rows (sorted by
    expert, offs (E,) their cumulative counts) times each expert's e4m3 weight, dequantized in
    registers (fp32 scale product, one rounding to bf16); relu^2 fused on the fp32 accumulator.
    Writes bf16 (rows, N) into ``out`` (allocated when None, else contiguous) and returns it.
    ``extra`` (a_x, w_x): one more group in the same launch, w_x an :class:`Fp8ExpertWeights` of
    one expert whose scales are at w's group size (:meth:`Fp8ExpertWeights.regrouped`); its
    output is returned second."""
    from twotower_rt import _ext

    C = _ext.require_cuda_op("moe_grouped_gemm_fp8", a)
    experts, n, k = w.shape
    if a.dtype != torch.bfloat16 or a.dim() != 2 or a.shape[1] != k:
        raise ValueError(
            f"gemm_cutlass_fp8: a must be bfloat16 (rows, {k}), got {a.dtype} {tuple(a.shape)}"
        )
    if extra is not None and isinstance(extra[1], Fp8ExpertWeights):
        reason = _fp8_extra_reason(w, extra[1])
        if reason is not None:
            raise ValueError(f"gemm_cutlass_fp8: {reason}")
    extra_args, out_x, _keep = _extra_args("gemm_cutlass_fp8", a, extra, fp8=True)
    a = a.contiguous()
    weight = w.weight.contiguous()
    scale = w.scale.contiguous()
    offs = offs.to(torch.int32).contiguous()
    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    key = (index, experts, relu2, "fp8", extra is not None)
    if key not in _workspaces:
        size = C.moe_grouped_gemm_fp8_workspace_bytes(
            experts=experts, epilogue=int(relu2), device=index, extra_group=extra is not None
        )
        _workspaces[key] = torch.empty(size, dtype=torch.uint8, device=a.device)
    workspace = _workspaces[key]
    if out is None:
        out = torch.empty((a.shape[0], n), dtype=a.dtype, device=a.device)
    elif out.shape != (a.shape[0], n) or out.dtype != a.dtype or not out.is_contiguous():
        raise ValueError(
            f"gemm_cutlass_fp8: out must be contiguous bfloat16 {(a.shape[0], n)}, got "
            f"{out.dtype} {tuple(out.shape)}"
        )
    C.moe_grouped_gemm_fp8(
        a=a.data_ptr(), w=weight.data_ptr(), scales=scale.data_ptr(), offsets=offs.data_ptr(),
        d=out.data_ptr(), workspace=workspace.data_ptr(), workspace_bytes=workspace.numel(),
        experts=experts, n=n, k=k, group_size=w.group_size, epilogue=int(relu2), device=index,
        stream=torch.cuda.current_stream(a.device).cuda_stream, **extra_args,
    )  # fmt: skip
    return out if extra is None else (out, out_x)


def _fp8_extra_reason(w: Fp8ExpertWeights, w_x: ExpertWeights) -> str | None:
    """Why the FP8 kernel cannot run w_x as the extra group beside the experts w (None if it
    can)."""
    if not isinstance(w_x, Fp8ExpertWeights) or w_x.shape[0] != 1:
        return "the extra group's weight must be an Fp8ExpertWeights of one expert"
    _, n_x, k_x = w_x.shape
    if n_x % 16 or k_x % 16:
        return f"the extra group's sizes must be multiples of 16, got {n_x}, {k_x}"
    if w_x.group_size != w.group_size:
        return (
            f"the extra group's scales are in groups of {w_x.group_size} input columns, the "
            f"experts' of {w.group_size}: the kernel has one group size (regroup them first)"
        )
    if k_x > w.group_size and w.group_size % FP8_TILE_K:
        return (
            f"its K ({k_x}) exceeds the experts' scale group ({w.group_size}), which must then "
            f"be a multiple of {FP8_TILE_K} (the kernel reads one scale row per chunk of k tiles)"
        )
    return None
