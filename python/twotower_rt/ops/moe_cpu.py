"""A whole MoE layer on the CPU in one call: the op (``twotower_rt._cpu``, the kernel in
``csrc/cpu/moe_cpu.cpp``), and beside it its PyTorch reference, the model's own eager math.

For the few tokens of a step the PyTorch path is ~30 small ops per layer (the float64 router, a
sort, a pair of matmuls per active expert, the shared expert, the scatter back). The kernel does
the same arithmetic token by token: the router in float64 (the reference's expert choice), the
experts and the shared expert in float32 from K-major weight copies. It agrees with the reference
to float32 rounding, not bitwise; each token is computed alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import _ext
from .linear_cpu import bf16_exact, dot_chain_ref, pair_words


@dataclass(frozen=True)
class MoeWeights:
    """A layer's weights for :func:`moe_forward`, checked once (:func:`moe_weights`)."""

    router_weight: torch.Tensor  # (E, hidden) float64
    score_bias: torch.Tensor  # (E,) float64
    # K-major: fp32, or bf16 (every expert weight a bf16 value), or int32 bfloat16 pairs
    # (:func:`dot_weights`: the experts by bfloat16 dot products)
    up: torch.Tensor  # (E, hidden, I); pairs (E, hidden / 2, I)
    down: torch.Tensor  # (E, I, hidden); pairs (E, I / 2, hidden)
    shared_up: torch.Tensor | None  # (hidden, I_s)
    shared_down: torch.Tensor | None  # (I_s, hidden)
    top_k: int
    norm_topk_prob: bool
    routed_scaling_factor: float


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"moe_weights: {message}")


def moe_weights(
    router_weight, score_bias, up, down, shared_up=None, shared_down=None, *, top_k: int,
    norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0,
) -> MoeWeights:  # fmt: skip
    """Bundle a layer's weights, given as the modules hold them: router (E, hidden) and bias
    (E,); experts' up (E, I, hidden) and down (E, hidden, I); the shared expert's up (I_s, hidden)
    and down (hidden, I_s), or None. Makes the float64 router and K-major copies once: bfloat16
    where every expert weight is a bfloat16 value (a bf16 checkpoint loaded as fp32), else fp32."""
    _require(
        router_weight.dim() == 2 and up.dim() == 3 and down.dim() == 3,
        "router_weight must be (E, hidden), up (E, I, hidden), down (E, hidden, I)",
    )
    E, hidden = router_weight.shape
    _require(up.shape[0] == E and up.shape[2] == hidden and down.shape == (E, hidden, up.shape[1]),
             f"expert shapes {tuple(up.shape)} / {tuple(down.shape)} do not match the router's "
             f"({E}, {hidden})")  # fmt: skip
    _require(score_bias.shape == (E,), f"score_bias must be ({E},), got {tuple(score_bias.shape)}")
    _require(0 < top_k <= E, f"top_k must be in [1, {E}], got {top_k}")
    _require((shared_up is None) == (shared_down is None), "give both shared projections or none")
    if shared_up is not None:
        shapes = f"{tuple(shared_up.shape)} / {tuple(shared_down.shape)}"
        _require(
            shared_up.dim() == 2
            and shared_up.shape[1] == hidden
            and shared_down.shape == (hidden, shared_up.shape[0]),
            f"shared expert shapes {shapes} do not match hidden {hidden}",
        )
    for name, t in (("router_weight", router_weight), ("up", up), ("down", down)):
        _require(t.device.type == "cpu", f"{name} must be on the CPU, got {t.device}")

    experts = [w.detach().float().transpose(-1, -2).contiguous() for w in (up, down)]
    if shared_up is not None:
        experts += [w.detach().float().t().contiguous() for w in (shared_up, shared_down)]
    if bf16_exact(*experts):  # the same arithmetic from half the bytes (linear_cpu.bf16_exact)
        experts = [w.bfloat16() for w in experts]
    shared = experts[2:] or [None, None]
    return MoeWeights(
        router_weight.detach().double().contiguous(), score_bias.detach().double().contiguous(),
        experts[0], experts[1], shared[0], shared[1],
        int(top_k), bool(norm_topk_prob), float(routed_scaling_factor),
    )  # fmt: skip


def dot_weights(weights: MoeWeights) -> MoeWeights | None:
    """``weights`` with the experts in bfloat16 pairs (``linear_cpu.pair_words``), for the
    kernel's bfloat16 dot products (AVX512_BF16; the inputs of each projection rounded to
    bfloat16, like ``linear_cpu.linear_dot_cpu``), or None where the sizes are not all multiples
    of 16 (the kernel's vectors)."""
    w = weights
    sizes = [w.up.shape[1], w.up.shape[2]] + ([] if w.shared_up is None else [w.shared_up.shape[1]])
    if any(n % 16 for n in sizes):
        return None
    pairs = [pair_words(t.float()) if t is not None else None
             for t in (w.up, w.down, w.shared_up, w.shared_down)]  # fmt: skip
    return MoeWeights(w.router_weight, w.score_bias, *pairs, w.top_k, w.norm_topk_prob,
                      w.routed_scaling_factor)  # fmt: skip


def moe_forward(x: torch.Tensor, weights: MoeWeights) -> torch.Tensor:
    """The MoE layer over tokens x (T, hidden) fp32 CPU, contiguous: the routed experts' weighted
    sum plus the shared expert, (T, hidden) fp32."""
    lib = _ext.cpu_kernels()
    if lib is None:
        raise RuntimeError(
            f"twotower_rt: CPU op 'moe_forward' cannot run: {_ext.cpu_kernels_error()}"
        )
    w = weights
    dot = w.up.dtype == torch.int32
    E, hidden, inter = w.up.shape
    if dot:
        hidden = w.down.shape[2]
    if x.dtype != torch.float32 or not x.is_cpu or x.dim() != 2 or x.shape[1] != hidden:
        raise ValueError(f"moe_forward: x must be a float32 CPU tensor (T, {hidden}), got "
                         f"{x.dtype} on {x.device} of shape {tuple(x.shape)}")  # fmt: skip
    if not x.is_contiguous():
        raise ValueError("moe_forward: x must be contiguous")
    out = x.new_empty(x.shape)
    shared = w.shared_up is not None
    _ext.keep(x, out)
    lib.moe_forward(
        x.data_ptr(), w.router_weight.data_ptr(), w.score_bias.data_ptr(), w.up.data_ptr(),
        w.down.data_ptr(), w.shared_up.data_ptr() if shared else 0,
        w.shared_down.data_ptr() if shared else 0, out.data_ptr(), x.shape[0], hidden, E, inter,
        w.shared_up.shape[1] if shared else 0, w.top_k, w.norm_topk_prob, w.routed_scaling_factor,
        w.up.dtype == torch.bfloat16, dot,
    )  # fmt: skip
    return out


def moe_forward_ref(x: torch.Tensor, weights: MoeWeights) -> torch.Tensor:
    """:func:`moe_forward` in plain PyTorch: ``Router.forward`` and ``MoE.forward``'s expert loop
    (experts added in id order onto zeros, then the shared expert); the kernel's test oracle."""
    w = weights
    scores = torch.sigmoid(F.linear(x.double(), w.router_weight))
    expert_ids = torch.topk(scores + w.score_bias, w.top_k, dim=-1).indices
    gate = scores.gather(1, expert_ids)
    if w.norm_topk_prob:
        gate = gate / (gate.sum(dim=-1, keepdim=True) + 1e-20)
    gate = (gate * w.routed_scaling_factor).float()
    if w.up.dtype == torch.int32:  # dot_weights: the bfloat16 dot products' chains
        return _moe_dot_ref(x, w, expert_ids, gate)
    up, down = w.up.float(), w.down.float()
    routed = torch.zeros_like(x)
    for e in range(up.shape[0]):
        token, slot = torch.nonzero(expert_ids == e, as_tuple=True)
        if len(token):
            h = F.relu(x[token] @ up[e]).square()
            routed.index_add_(0, token, (h @ down[e]) * gate[token, slot, None])
    if w.shared_up is not None:
        routed = routed + F.relu(x @ w.shared_up.float()).square() @ w.shared_down.float()
    return routed


def _unpair(words: torch.Tensor) -> torch.Tensor:
    """:func:`pair_words` undone: (..., K / 2, N) int32 -> (..., K, N) float32."""
    lo = (words << 16).view(torch.float32)
    hi = (words & -65536).view(torch.float32)  # 0xFFFF0000
    return torch.stack([lo, hi], dim=-2).flatten(-3, -2)


def _moe_dot_ref(x, w, expert_ids, gate):
    """The experts of :func:`moe_forward_ref` by ``linear_cpu.dot_chain_ref``: each MLP's
    projections as the dot products' chains, then the kernel's combination (experts in id order,
    then the shared expert)."""
    up, down = _unpair(w.up), _unpair(w.down)

    def mlp(rows, a, b):
        return dot_chain_ref(F.relu(dot_chain_ref(rows, a)).square(), b)

    routed = torch.zeros_like(x)
    for e in range(up.shape[0]):
        token, slot = torch.nonzero(expert_ids == e, as_tuple=True)
        if len(token):
            routed.index_add_(0, token, mlp(x[token], up[e], down[e]) * gate[token, slot, None])
    if w.shared_up is not None:
        routed = routed + mlp(x, _unpair(w.shared_up), _unpair(w.shared_down))
    return routed
