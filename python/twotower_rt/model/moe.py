"""Mixture of experts (sigmoid router in float64, non-gated relu^2 experts, one shared expert) and
the dense relu^2 MLP of '-' layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TwoTowerConfig
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

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        x = h.reshape(-1, shape[-1])
        expert_ids, weights = self.gate(x)
        # Routed outputs accumulate in fp32, expert by expert in id order, then are cast.
        routed = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in torch.unique(expert_ids).tolist():
            token_idx, slot = torch.nonzero(expert_ids == e, as_tuple=True)
            out = self.experts[e](x[token_idx]).float() * weights[token_idx, slot, None]
            routed.index_add_(0, token_idx, out)
        out = routed.to(h.dtype)
        if self.cfg.n_shared_experts:
            out = out + self.shared_experts(x)
        return out.reshape(shape)


class DenseMLP(Relu2MLP):
    def __init__(self, cfg: TwoTowerConfig):
        super().__init__(cfg, cfg.hidden_size, cfg.intermediate_size)
