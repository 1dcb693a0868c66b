"""Mixture of experts (sigmoid router in float64, non-gated relu^2 experts, one shared expert) and
the dense relu^2 MLP of '-' layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TwoTowerConfig
from ..ops.moe import grouped_unsupported_reason, moe_experts_grouped, moe_experts_ref
from .linear import make_linear


class Relu2MLP(nn.Module):
    """down(relu(up(x))^2): the routed experts, the shared expert and dense MLP layers."""

    def __init__(self, cfg: TwoTowerConfig, hidden: int, intermediate: int):
        super().__init__()
        self.up_proj = make_linear(cfg, hidden, intermediate, cfg.mlp_bias)
        self.down_proj = make_linear(cfg, intermediate, hidden, cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.relu(self.up_proj(x)).square())


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
        # per projection) where it can run (bf16, torch._grouped_mm, sm_90); off by default until
        # its GPU tests have run on a GPU (tests/test_moe.py).
        self.grouped = False
        self._stacked: tuple[torch.Tensor, torch.Tensor] | None = None

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(up (E, I, H), down (E, H, I)): the experts' weights in one tensor each, the experts'
        own parameters becoming views into them (no second copy). None for FP8 or biased experts."""
        first = self.experts[0]
        if not isinstance(first.up_proj, nn.Linear) or first.up_proj.bias is not None:
            return None
        if self._stacked is None or self._stacked[0].device != first.up_proj.weight.device:
            up = torch.stack([e.up_proj.weight.detach() for e in self.experts])
            down = torch.stack([e.down_proj.weight.detach() for e in self.experts])
            for i, expert in enumerate(self.experts):
                expert.up_proj.weight.data = up[i]
                expert.down_proj.weight.data = down[i]
            self._stacked = (up, down)
        return self._stacked

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        x = h.reshape(-1, shape[-1])
        expert_ids, weights = self.gate(x)
        # Routed outputs accumulate in fp32, expert by expert in id order, then are cast.
        stacked = self.stacked_weights() if self.grouped else None
        if stacked is not None and grouped_unsupported_reason(x, stacked[0]) is None:
            routed = moe_experts_grouped(x, expert_ids, weights, *stacked)
        else:
            routed = moe_experts_ref(x, expert_ids, weights, self.experts)
        out = routed.to(h.dtype)
        if self.cfg.n_shared_experts:
            out = out + self.shared_experts(x)
        return out.reshape(shape)


class DenseMLP(Relu2MLP):
    def __init__(self, cfg: TwoTowerConfig):
        super().__init__(cfg, cfg.hidden_size, cfg.intermediate_size)
