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
order, so no value crosses to the host. Its grouped GEMMs (``ops/moe_gemm.py``) are our CUTLASS
kernels (bf16, or FP8 weights stacked as :class:`Fp8ExpertWeights`), ``torch._grouped_mm``, or
:func:`gemm_loop` (per-expert matmuls: the reference's arithmetic, which tests use to check the
permutation logic exactly).

The shared expert folds in (``moe_experts_grouped(..., shared=(up_s, down_s))``, one-expert stacks
from :func:`fold_shared_expert`): it is one extra group in both grouped GEMMs (M = T tokens in
token order, N = I_s up, K = I_s down, its own weights, no copy), and the result is the MoE
layer's output, combined as the reference does: ``routed.to(x.dtype) + shared``. In our kernels
relu^2 acts on the fp32 accumulator before the one rounding, for the shared expert as for the
routed ones; :func:`gemm_loop` keeps the module's order, so in fp32 it is the module bitwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .moe_gemm import (  # noqa: F401  (re-exported: the grouped path's GEMM backends)
    FP8_TILE_K,
    ExpertWeights,
    Fp8ExpertWeights,
    Gemm,
    _fp8_extra_reason,
    gemm_cutlass,
    gemm_cutlass_fp8,
    gemm_fp8_ref,
    gemm_loop,
    gemm_torch,
)


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


def moe_experts_sorted(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """:func:`moe_experts_ref` bitwise, for the CPU: the T*k assignments sorted by expert (stable:
    token order inside an expert), each active expert's rows as one contiguous slice through the
    same two matmuls and relu^2 as its module, the gate weights in one product, and one
    ``index_add_`` in sorted order, which adds each token's outputs in expert-id order onto zeros
    as the loop does. No per-expert masks or ``nonzero``; one host read of the counts (free on the
    CPU). x (T, H); expert_ids, weights (T, k); up (E, I, H), down (E, H, I) unbiased, in x's
    dtype (:meth:`MoE.stacked_weights`). Returns fp32 (T, H)."""
    T, k = expert_ids.shape
    if T == 1:  # one token (an AR step at batch 1): its experts in id order, nothing to sort
        routed = None
        for e, w in sorted(zip(expert_ids[0].tolist(), weights[0].tolist())):
            h = F.relu(torch.mm(x, up[e].t())).square_()
            out = torch.mm(h, down[e].t()).float() * w
            routed = out if routed is None else routed + out  # onto zeros, as the loop adds
        return routed
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // k
    rows = x.index_select(0, token)
    out = x.new_empty((T * k, down.shape[1]))
    start = 0
    for e, count in enumerate(torch.bincount(flat, minlength=up.shape[0]).tolist()):
        if count:
            end = start + count
            h = F.relu(torch.mm(rows[start:end], up[e].t())).square_()
            torch.mm(h, down[e].t(), out=out[start:end])
            start = end
    out = out.float() * weights.reshape(-1)[order, None]
    routed = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return routed.index_add_(0, token, out)


def moe_experts_grouped(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    up: ExpertWeights,
    down: ExpertWeights,
    gemm: Gemm | None = None,
    shared: tuple[ExpertWeights, ExpertWeights] | None = None,
) -> torch.Tensor:
    """x (T, H); expert_ids, weights (T, k); up (E, I, H) and down (E, H, I) in x's dtype, as the
    experts' ``up_proj.weight`` / ``down_proj.weight`` stacked, or both :class:`Fp8ExpertWeights`.
    ``gemm`` defaults to :func:`grouped_gemm_for` of the inputs. Returns fp32 (T, H), the routed
    sum.

    ``shared`` (up_s (1, I_s, H), down_s (1, H, I_s)) from :func:`fold_shared_expert`: the shared
    expert runs as the extra group of both GEMMs (every token, in token order), and the return is
    the layer's output in x's dtype, ``routed.to(x.dtype) + shared(x)`` as the reference combines
    them."""
    if gemm is None:
        if shared is None:
            reason = grouped_unsupported_reason(x, up, down)
        else:
            reason = shared_unsupported_reason(x, up, down, shared)
        if reason is not None:
            raise ValueError(f"moe_experts_grouped: no grouped GEMM here: {reason}")
        gemm = grouped_gemm_for(x, up, down)
    T, k = expert_ids.shape
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # assignments grouped by expert, token order inside
    # Rows per expert by scatter_add (torch.bincount sizes its output from the data: a host sync).
    counts = torch.zeros(up.shape[0], dtype=torch.int64, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    offs = torch.cumsum(counts, 0).to(torch.int32)
    if shared is None:
        h = gemm(x[order // k], up, offs, True)
        y = gemm(h, down, offs, False)
    else:
        h, h_shared = gemm(x[order // k], up, offs, True, extra=(x, shared[0]))
        y, y_shared = gemm(h, down, offs, False, extra=(h_shared, shared[1]))
    y = y.float() * weights.reshape(-1)[order, None]
    per_slot = torch.empty_like(y)
    per_slot[order] = y  # back to (token, slot) order
    per_slot = per_slot.view(T, k, -1)
    by_expert = torch.argsort(expert_ids, dim=1, stable=True)  # a token's slots by expert id
    per_slot = per_slot.gather(1, by_expert[..., None].expand_as(per_slot))
    routed = per_slot[:, 0]
    for j in range(1, k):
        routed = routed + per_slot[:, j]
    return routed if shared is None else routed.to(x.dtype) + y_shared.to(x.dtype)


def fold_shared_expert(
    up: ExpertWeights,
    down: ExpertWeights,
    shared_up: ExpertWeights,
    shared_down: ExpertWeights,
) -> tuple[ExpertWeights, ExpertWeights]:
    """The shared expert as the extra group of the routed experts' grouped GEMMs: its up (I_s, H)
    and down (H, I_s) weights (2-D tensors, or :class:`Fp8ExpertWeights` of one expert) as
    one-expert stacks (views, no copy), FP8 scales presented at the routed stacks' group sizes
    (:meth:`Fp8ExpertWeights.regrouped`: the FP8 kernel has one group size for all groups). Raises
    ValueError saying why when they cannot fold."""
    fp8 = isinstance(up, Fp8ExpertWeights)
    folded = []
    for name, w, w_s in (("up", up, shared_up), ("down", down, shared_down)):
        if fp8 != isinstance(w_s, Fp8ExpertWeights):
            kind = "FP8" if fp8 else "unquantized"
            raise ValueError(f"fold_shared_expert: {name}: {kind} experts need a {kind} shared one")
        if fp8:
            if w_s.shape[0] != 1:
                raise ValueError(f"fold_shared_expert: {name}: one shared expert, got {w_s.shape}")
            reason = w_s.regroup_reason(w.group_size)
            if reason is not None:
                raise ValueError(f"fold_shared_expert: {name}: {reason}")
            folded.append(w_s.regrouped(w.group_size))
        else:
            if w_s.dtype != w.dtype:
                raise ValueError(
                    f"fold_shared_expert: {name}: shared weight {w_s.dtype}, experts {w.dtype}"
                )
            folded.append(w_s if w_s.dim() == 3 else w_s[None])
    up_s, down_s = folded
    H = up.shape[2]
    if (up_s.shape[0], up_s.shape[2], down_s.shape[0], down_s.shape[1]) != (1, H, 1, H) or (
        down_s.shape[2] != up_s.shape[1]
    ):
        raise ValueError(
            f"fold_shared_expert: shared up {tuple(up_s.shape)} and down {tuple(down_s.shape)} "
            f"must be (1, I_s, {H}) and (1, {H}, I_s)"
        )
    return up_s, down_s


def shared_unsupported_reason(
    x: torch.Tensor,
    up: ExpertWeights,
    down: ExpertWeights,
    shared: tuple[ExpertWeights, ExpertWeights],
) -> str | None:
    """Why the grouped GEMM :func:`grouped_gemm_for` picks cannot take the folded shared expert
    (from :func:`fold_shared_expert`) as its extra group (None when it can, or when that GEMM is
    torch._grouped_mm, which runs it as plain matmuls)."""
    reason = grouped_unsupported_reason(x, up, down)
    if reason is not None:
        return reason
    up_s, down_s = shared
    if isinstance(up, Fp8ExpertWeights):
        for name, w, w_s in (("up", up, up_s), ("down", down, down_s)):
            reason = _fp8_extra_reason(w, w_s)
            if reason is not None:
                return f"{name}: {reason}"
        return None
    if up_s.dtype != torch.bfloat16 or down_s.dtype != torch.bfloat16:
        return "the shared expert's weights must be bfloat16"
    if up_s.shape[1] % 8:
        return f"the shared intermediate size must be a multiple of 8, got {up_s.shape[1]}"
    return None


def grouped_unsupported_reason(
    x: torch.Tensor, up: ExpertWeights, down: ExpertWeights | None = None
) -> str | None:
    """Why no grouped GEMM can run these experts here (None when one can)."""
    if isinstance(up, Fp8ExpertWeights):
        return _fp8_unsupported_reason(x, up, down)
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


def _fp8_unsupported_reason(
    x: torch.Tensor, up: Fp8ExpertWeights, down: ExpertWeights | None
) -> str | None:
    from twotower_rt import _ext

    if x.dtype != torch.bfloat16:
        return "the FP8 grouped GEMM takes bfloat16 activations"
    for name, w in (("up", up), ("down", down)):
        if w is None:
            continue
        if not isinstance(w, Fp8ExpertWeights):
            return f"{name}: FP8 up needs FP8 down weights"
        _, n, k = w.shape
        if n % 16 or k % 16:
            return f"{name}: hidden and intermediate sizes must be multiples of 16, got {n}, {k}"
        if w.group_size != k and w.group_size % FP8_TILE_K:
            return (
                f"{name}: FP8 scale blocks of {w.group_size} input columns: the FP8 grouped GEMM "
                f"takes per-channel scales (block cols 0) or blocks of a multiple of {FP8_TILE_K}"
            )
    if x.device.type != "cuda":
        return "FP8 experts take the grouped path only on CUDA (_C.moe_grouped_gemm_fp8)"
    return _ext.cuda_unsupported_reason(x.device, "moe_grouped_gemm_fp8")


def grouped_gemm_for(
    x: torch.Tensor, up: ExpertWeights, down: ExpertWeights | None = None
) -> Gemm | None:
    """Our kernel where it runs, else torch._grouped_mm (bf16 weights only), else None."""
    if grouped_unsupported_reason(x, up, down) is not None:
        return None
    if isinstance(up, Fp8ExpertWeights):
        return gemm_cutlass_fp8
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
