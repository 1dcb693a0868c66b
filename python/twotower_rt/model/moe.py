"""Mixture of experts (sigmoid router in float64, non-gated relu^2 experts, one shared expert) and
the dense relu^2 MLP of '-' layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _ext
from ..config import TwoTowerConfig
from ..ops.moe import (
    ExpertWeights,
    Fp8ExpertWeights,
    fold_shared_expert,
    grouped_unsupported_reason,
    moe_experts_grouped,
    moe_experts_ref,
    moe_experts_sorted,
    shared_unsupported_reason,
)
from . import cpu_fast
from .linear import Fp8Linear, make_linear


class Relu2MLP(nn.Module):
    """down(relu(up(x))^2): the routed experts, the shared expert and dense MLP layers."""

    tp = None  # a dense layer's tensor-parallel group (parallel/tp.py): down's partial sum reduced

    def __init__(self, cfg: TwoTowerConfig, hidden: int, intermediate: int):
        super().__init__()
        self.up_proj = make_linear(cfg, hidden, intermediate, cfg.mlp_bias)
        self.down_proj = make_linear(cfg, intermediate, hidden, cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.up_proj(x)
        _ext.stream_wait()  # a PyTorch op on a kernel's output (cpu_fast's stream)
        out = self.down_proj(F.relu(up).square())
        return out if self.tp is None else self.tp.all_reduce(out)


class Router(nn.Module):
    def __init__(self, cfg: TwoTowerConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.empty(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, hidden) -> (expert ids (T, k) int64, weights (T, k) fp32).

        Logits and scores in float64 so that the choice is the reference's; the choice is by the
        biased score, the weights use the unbiased one."""
        if cpu_fast.applies(x):
            return cpu_fast.router_forward(self, x)
        cfg = self.cfg
        scores = torch.sigmoid(F.linear(x.double(), self.weight.double()))
        choice_scores = scores + self.e_score_correction_bias.double()
        expert_ids = torch.topk(choice_scores, cfg.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, expert_ids)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return expert_ids, (weights * cfg.routed_scaling_factor).float()


class MoE(nn.Module):
    def __init__(self, cfg: TwoTowerConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(
            Relu2MLP(cfg, cfg.hidden_size, cfg.moe_intermediate_size)
            for _ in range(cfg.n_routed_experts)
        )
        if cfg.n_shared_experts:
            self.shared_experts = Relu2MLP(
                cfg, cfg.hidden_size, cfg.moe_shared_expert_intermediate_size
            )
        # Switch: the grouped path (ops.moe.moe_experts_grouped: no host sync, one grouped GEMM
        # per projection) where it can run (bf16: our kernel or torch._grouped_mm on sm_90; FP8:
        # our kernel only); off by default until its GPU tests have run on a GPU
        # (tests/test_moe.py, tests/test_moe_fp8.py). There the shared expert folds into the same
        # two grouped GEMMs (one extra group each) where it can (shared_fold_reason says why not);
        # in our kernels its relu^2 then acts on the fp32 accumulator before the one rounding to
        # bf16 (Relu2MLP rounds first), as it already does for the routed experts.
        self.grouped = False
        self._stacked: tuple[ExpertWeights, ExpertWeights] | None = None
        self._shared: tuple[ExpertWeights, ExpertWeights] | None = None
        self.shared_fold_reason: str | None = None

    def stacked_weights(self) -> tuple[ExpertWeights, ExpertWeights] | None:
        """(up (E, I, H), down (E, H, I)): the experts' weights in one tensor each (FP8 experts:
        an ops.moe.Fp8ExpertWeights each, weights and scales stacked), the experts' own
        parameters becoming views into them (no second copy). None for biased experts."""
        first = self.experts[0].up_proj
        if not isinstance(first, (nn.Linear, Fp8Linear)) or first.bias is not None:
            return None
        if self._stacked is None or self._stacked[0].device != first.weight.device:
            if isinstance(first, Fp8Linear):
                up = _stack_fp8([e.up_proj for e in self.experts])
                down = _stack_fp8([e.down_proj for e in self.experts])
            else:
                up = _stack([e.up_proj for e in self.experts], "weight")
                down = _stack([e.down_proj for e in self.experts], "weight")
            self._stacked = (up, down)
        return self._stacked

    def folded_shared_weights(self) -> tuple[ExpertWeights, ExpertWeights] | None:
        """The shared expert as the grouped GEMMs' extra group: (up (1, I_s, H), down (1, H, I_s))
        over its own parameters (views; FP8 scales presented at the routed experts' group size,
        ops.moe.fold_shared_expert). None without a shared expert or when it cannot fold, with
        the reason in ``shared_fold_reason``."""
        stacked = self.stacked_weights()
        if not self.cfg.n_shared_experts or stacked is None:
            self.shared_fold_reason = "no shared expert" if stacked else "biased experts"
            return None
        up_s, down_s = self.shared_experts.up_proj, self.shared_experts.down_proj
        if self._shared is not None and self._shared[0].device == up_s.weight.device:
            return self._shared
        self._shared = None
        if up_s.bias is not None or down_s.bias is not None:
            self.shared_fold_reason = "the shared expert has biases"
            return None
        try:
            self._shared = fold_shared_expert(*stacked, _one(up_s), _one(down_s))
            self.shared_fold_reason = None
        except ValueError as err:
            self.shared_fold_reason = str(err)
        return self._shared

    tp = None  # tensor-parallel group (parallel/tp.py): each rank a slice of every expert

    def _plain_experts(self) -> bool:
        """Unbiased full-precision experts (what moe_experts_sorted takes)."""
        first = self.experts[0].up_proj
        return isinstance(first, nn.Linear) and first.bias is None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if cpu_fast.applies(h) and not self.grouped:
            out = cpu_fast.moe_forward(self, h)  # None where the CPU kernel does not serve it
            if out is not None:
                return out
            _ext.stream_wait()  # PyTorch ops from here on (cpu_fast's stream)
        shape = h.shape
        x = h.reshape(-1, shape[-1])
        expert_ids, weights = self.gate(x)
        # Routed outputs accumulate in fp32, expert by expert in id order, then are cast.
        stacked = self.stacked_weights() if self.grouped else None
        if stacked is not None and grouped_unsupported_reason(x, *stacked) is None:
            shared = self.folded_shared_weights() if self.tp is None else None
            if shared is not None:
                reason = shared_unsupported_reason(x, *stacked, shared)
                if reason is None:  # the shared expert inside the same two grouped GEMMs
                    out = moe_experts_grouped(x, expert_ids, weights, *stacked, shared=shared)
                    return out.reshape(shape)
                self.shared_fold_reason = reason
            routed = moe_experts_grouped(x, expert_ids, weights, *stacked)
        elif cpu_fast.applies(x) and self._plain_experts():
            routed = moe_experts_sorted(x, expert_ids, weights, *self.stacked_weights())
        else:
            routed = moe_experts_ref(x, expert_ids, weights, self.experts)
        if self.tp is not None:  # every rank summed its slice of each expert
            routed = self.tp.all_reduce(routed)
        out = routed.to(h.dtype)
        if self.cfg.n_shared_experts:
            shared_out = self.shared_experts(x)
            out = out + (shared_out if self.tp is None else self.tp.all_reduce(shared_out))
        return out.reshape(shape)


def _one(linear: nn.Module) -> ExpertWeights:
    """A linear's weight as a one-expert stack (a view): (1, out, in), or FP8 with its scales."""
    if isinstance(linear, Fp8Linear):
        weight, scale = linear.weight[None], linear.weight_scale[None]
        return Fp8ExpertWeights.from_checkpoint(weight, scale, linear.block)
    return linear.weight[None]


def _stack(linears: list[nn.Module], name: str) -> torch.Tensor:
    """The parameter ``name`` of every module in one (E, ...) tensor, each module's own parameter
    becoming a view into it."""
    stacked = torch.stack([getattr(m, name).detach() for m in linears])
    for i, m in enumerate(linears):
        getattr(m, name).data = stacked[i]
    return stacked


def _stack_fp8(linears: list[Fp8Linear]) -> Fp8ExpertWeights:
    weight = _stack(linears, "weight")
    scale = _stack(linears, "weight_scale")
    return Fp8ExpertWeights.from_checkpoint(weight, scale, linears[0].block)


class DenseMLP(Relu2MLP):
    def __init__(self, cfg: TwoTowerConfig):
        super().__init__(cfg, cfg.hidden_size, cfg.intermediate_size)
