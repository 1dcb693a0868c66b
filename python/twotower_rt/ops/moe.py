"""The routed experts of an MoE layer: the reference loop, and a grouped path without host
synchronisation (for the GPU and CUDA graphs).

Both compute, for tokens x (T, H) routed to expert_ids (T, k) with weights (T, k) fp32:

    routed[t] = sum over the token's k experts in increasing expert id of
                weight * down_e(relu(up_e(x[t]))^2)         (accumulated in fp32)

``moe_experts_ref`` loops over the experts that have tokens (it asks the host which ones: a sync)
and is what the CPU runs: bitwise the reference implementation's order. ``moe_experts_grouped``
sorts the T*k assignments by expert on the device (stable: token order within an expert), runs
one grouped GEMM for ``up`` and one for ``down`` over stacked expert weights (E, I, H) / (E, H, I)
with per-expert row offsets that stay on the device, and adds each token's k outputs in expert-id
order, so no value crosses to the host. Its grouped GEMM is ``torch._grouped_mm`` (CUTLASS on
Hopper, also present on the CPU), or any function with that signature (tests pass a per-group
loop to check the permutation logic exactly).
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


def grouped_mm_loop(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm``'s 2-D x 3-D case as a loop of matmuls (rows [offs[g-1], offs[g]) of a
    times b[g]): the exact per-group arithmetic of a plain matmul, for tests and as a fallback."""
    out = a.new_empty((a.shape[0], b.shape[2]))
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = a[start:end] @ b[g]
        start = end
    return out


def moe_experts_grouped(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    grouped_mm: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """x (T, H); expert_ids, weights (T, k); up (E, I, H) and down (E, H, I) in x's dtype, as the
    experts' ``up_proj.weight`` / ``down_proj.weight`` stacked. Returns fp32 (T, H)."""
    mm = grouped_mm or (lambda a, b, offs: torch._grouped_mm(a, b, offs=offs))
    T, k = expert_ids.shape
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # assignments grouped by expert, token order inside
    # Rows per expert by scatter_add (torch.bincount sizes its output from the data: a host sync).
    counts = torch.zeros(up.shape[0], dtype=torch.int64, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    offs = torch.cumsum(counts, 0).to(torch.int32)
    h = mm(x[order // k], up.transpose(1, 2), offs)
    y = mm(F.relu(h).square(), down.transpose(1, 2), offs)
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
    """Why ``torch._grouped_mm`` cannot run these experts here (None when it can)."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no _grouped_mm"
    if x.dtype != torch.bfloat16 or up.dtype != torch.bfloat16:
        return "the grouped GEMM path takes bfloat16 activations and weights"
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (9, 0):
        return "torch._grouped_mm needs an sm_90 or newer GPU"
    if x.shape[-1] % 8 or up.shape[1] % 8:
        return "hidden and intermediate sizes must be multiples of 8 (16-byte rows)"
    return None
