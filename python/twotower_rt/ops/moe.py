"""The routed experts of an MoE layer: the reference loop, and a grouped path without host
synchronisation (for the GPU and CUDA graphs), whose grouped GEMM is our CUTLASS kernel
(``csrc/include/twotower_rt/moe_gemm.cuh``, relu^2 fused) or ``torch._grouped_mm``.

Both compute, for tokens x (T, H) routed to expert_ids (T, k) with weights (T, k) fp32:

    routed[t] = sum over the token's k experts in increasing expert id of
                weight * down_e(relu(up_e(x[t]))^2)         (accumulated in fp32)

``moe_experts_ref`` loops over the experts that have tokens (it asks the host which ones: a sync)
and is what the CPU runs: bitwise the reference implementation's order. ``moe_experts_grouped``
sorts the T*k assignments by expert on the device (stable: token order within an expert), runs
one grouped GEMM for ``up`` and one for ``down`` over stacked expert weights (E, I, H) / (E, H, I)
with per-expert row offsets that stay on the device, and adds each token's k outputs in expert-id
order, so no value crosses to the host. Its grouped GEMM ``gemm(a, w, offsets, relu2)`` is
:func:`gemm_cutlass` (ours, sm_90a), :func:`gemm_torch` (``torch._grouped_mm``, also on the CPU) or
:func:`gemm_loop` (per-expert matmuls: the reference's arithmetic, which tests use to check the
permutation logic exactly).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def moe_experts_ref(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    experts: Sequence[torch.nn.Module],
) -> torch.Tensor:
    """The loop: every expert that has tokens, in id order, accumulating into fp32 (T, H)."""
    routed = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(expert_ids).tolist():
        token_idx, slot = torch.nonzero(expert_ids == e, as_tuple=True)
        out = experts[e](x[token_idx]).float() * weights[token_idx, slot, None]
        routed.index_add_(0, token_idx, out)
    return routed


Gemm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


def _relu2(h: torch.Tensor) -> torch.Tensor:
    return F.relu(h).square()


def gemm_loop(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, relu2: bool) -> torch.Tensor:
    """Rows [offs[e-1], offs[e]) of a times w[e]^T, expert by expert (reads offs on the host)."""
    out = a.new_empty((a.shape[0], w.shape[1]))
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = a[start:end] @ w[e].T
        start = end
    return _relu2(out) if relu2 else out


def gemm_torch(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, relu2: bool) -> torch.Tensor:
    """``torch._grouped_mm`` (CUTLASS inside PyTorch on Hopper), relu^2 after the rounding."""
    out = torch._grouped_mm(a, w.transpose(1, 2), offs=offs)
    return _relu2(out) if relu2 else out


_workspaces: dict[tuple, torch.Tensor] = {}


def gemm_cutlass(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, relu2: bool) -> torch.Tensor:
    """Our grouped GEMM (twotower_rt._C.moe_grouped_gemm): relu^2 fused into the epilogue, on the
    fp32 accumulator before the one rounding to bf16."""
    from twotower_rt import _ext

    C = _ext.require_cuda_op("moe_grouped_gemm", a)
    a = a.contiguous()
    w = w.contiguous()
    offs = offs.to(torch.int32).contiguous()
    experts, n, k = w.shape
    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    key = (index, experts, relu2)
    if key not in _workspaces:
        size = C.moe_grouped_gemm_workspace_bytes(experts=experts, epilogue=int(relu2),
                                                  device=index)  # fmt: skip
        _workspaces[key] = torch.empty(size, dtype=torch.uint8, device=a.device)
    workspace = _workspaces[key]
    out = torch.empty((a.shape[0], n), dtype=a.dtype, device=a.device)
    C.moe_grouped_gemm(
        a=a.data_ptr(), w=w.data_ptr(), offsets=offs.data_ptr(), d=out.data_ptr(),
        workspace=workspace.data_ptr(), workspace_bytes=workspace.numel(), experts=experts,
        n=n, k=k, epilogue=int(relu2), device=index,
        stream=torch.cuda.current_stream(a.device).cuda_stream,
    )  # fmt: skip
    return out


def moe_experts_grouped(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    gemm: Gemm | None = None,
) -> torch.Tensor:
    """x (T, H); expert_ids, weights (T, k); up (E, I, H) and down (E, H, I) in x's dtype, as the
    experts' ``up_proj.weight`` / ``down_proj.weight`` stacked. ``gemm`` defaults to
    :func:`grouped_gemm_for` of the inputs. Returns fp32 (T, H)."""
    gemm = gemm or grouped_gemm_for(x, up)
    if gemm is None:
        raise ValueError(
            f"moe_experts_grouped: no grouped GEMM here: {grouped_unsupported_reason(x, up)}"
        )
    T, k = expert_ids.shape
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # assignments grouped by expert, token order inside
    # Rows per expert by scatter_add (torch.bincount sizes its output from the data: a host sync).
    counts = torch.zeros(up.shape[0], dtype=torch.int64, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    offs = torch.cumsum(counts, 0).to(torch.int32)
    h = gemm(x[order // k], up, offs, True)
    y = gemm(h, down, offs, False)
    y = y.float() * weights.reshape(-1)[order, None]
    per_slot = torch.empty_like(y)
    per_slot[order] = y  # back to (token, slot) order
    per_slot = per_slot.view(T, k, -1)
    by_expert = torch.argsort(expert_ids, dim=1, stable=True)  # a token's slots by expert id
    per_slot = per_slot.gather(1, by_expert[..., None].expand_as(per_slot))
    routed = per_slot[:, 0]
    for j in range(1, k):
        routed = routed + per_slot[:, j]
    return routed


def grouped_unsupported_reason(x: torch.Tensor, up: torch.Tensor) -> str | None:
    """Why no grouped GEMM can run these experts here (None when one can)."""
    if x.dtype != torch.bfloat16 or up.dtype != torch.bfloat16:
        return "the grouped GEMM path takes bfloat16 activations and weights"
    if x.shape[-1] % 8 or up.shape[1] % 8:
        return "hidden and intermediate sizes must be multiples of 8 (16-byte rows)"
    if _cutlass_ready(x):
        return None
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no _grouped_mm and the CUTLASS kernel cannot run"
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (9, 0):
        return "torch._grouped_mm needs an sm_90 or newer GPU"
    return None


def _cutlass_ready(x: torch.Tensor) -> bool:
    from twotower_rt import _ext

    return (
        x.device.type == "cuda"
        and _ext.cuda_unsupported_reason(x.device, "moe_grouped_gemm") is None
    )


def grouped_gemm_for(x: torch.Tensor, up: torch.Tensor) -> Gemm | None:
    """Our kernel where it runs, else torch._grouped_mm, else None."""
    if grouped_unsupported_reason(x, up) is not None:
        return None
    return gemm_cutlass if _cutlass_ready(x) else gemm_torch


def moe_experts_backend(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16
) -> tuple[str, str]:
    """``(backend, reason)`` for the env report: "cuda" (our grouped GEMM), "torch" (the loop, or
    torch._grouped_mm) or "none". The grouped path runs only where ``MoE.grouped`` is set."""
    from twotower_rt import _ext

    backend, reason = _ext.op_backend(
        device, dtype, ref="moe_experts_ref", kernel_dtypes=(torch.bfloat16,),
        op="moe_grouped_gemm",
    )  # fmt: skip
    if backend != "none":
        reason += "; the grouped path runs only with MoE.grouped (off by default)"
    return backend, reason
