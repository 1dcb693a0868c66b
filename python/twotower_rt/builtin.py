"""A built-in tiny configuration with seeded random weights, so that everything runs on a fresh
machine with no checkpoint. Its text is meaningless; it exercises every layer kind and mode."""

from __future__ import annotations

import math

import torch

from .checkpoint import build_model, expected_shapes
from .config import TwoTowerConfig
from .model.tower import TwoTowerLM

BUILTIN_SEED = 20251126


def builtin_config(**overrides) -> TwoTowerConfig:
    """The dims of the golden tiny-a model (hidden 64, pattern MEM*EMEM*E, vocab 512)."""
    fields = dict(
        hidden_size=64,
        vocab_size=512,
        hybrid_override_pattern="MEM*EMEM*E",
        mamba_num_heads=8,
        mamba_head_dim=16,
        n_groups=2,
        ssm_state_size=16,
        conv_kernel=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=64,
        intermediate_size=32,
        source="<builtin tiny random>",
    )
    fields.update(overrides)
    return TwoTowerConfig(**fields)


def random_state_dict(cfg: TwoTowerConfig, seed: int = BUILTIN_SEED) -> dict[str, torch.Tensor]:
    """Seeded random fp32 weights with scales that keep activations O(1) and make the diffusion
    confidences straddle the usual thresholds (the heads are sharpened)."""
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std=1.0, mean=0.0):
        return torch.randn(shape, generator=g) * std + mean

    state = {}
    for name, shape in expected_shapes(cfg).items():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            t = normal(shape, 0.1, 1.0)
        elif leaf == "A_log":
            t = torch.log(torch.rand(shape, generator=g) * 15 + 1)
        elif leaf == "D":
            t = torch.rand(shape, generator=g) + 0.5
        elif leaf == "dt_bias":
            dt = torch.exp(torch.rand(shape, generator=g) * math.log(100.0) + math.log(1e-3))
            t = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
        elif name.startswith("scale_shift_tables"):
            t = torch.stack(
                [normal(shape[1:], 0.1), normal(shape[1:], 0.1), normal(shape[1:], 0.2, 1.0)]
            )
        elif leaf == "bias" or leaf == "e_score_correction_bias":
            t = normal(shape, 0.1)
        elif leaf == "weight" and name.endswith("conv1d.weight"):
            t = normal(shape, 0.5)
        elif name.endswith("embeddings.weight"):
            t = normal(shape)
        else:
            scale = 1 / math.sqrt(shape[-1])
            if "out_proj" in name or "down_proj" in name:
                scale *= 0.5
            elif "o_proj" in name:
                scale *= 1.5
            elif name == "context_lm_head.weight":
                scale *= 3.0
            elif name == "lm_head.weight":
                scale *= 8.0
            t = normal(shape, scale)
        state[name] = t.float()
    return state


def load_builtin(device="cpu", dtype=torch.float32, **overrides) -> TwoTowerLM:
    cfg = builtin_config(**overrides)
    state = {k: v.to(device=device, dtype=dtype) for k, v in random_state_dict(cfg).items()}
    return build_model(cfg, state)
