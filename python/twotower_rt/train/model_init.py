"""The default model's dims and its training initialisation (standard Mamba-2 / GPT-style scales).
The model itself is the runtime's ``TwoTowerLM``: nothing here is a second implementation."""

from __future__ import annotations

import json
import math
import os

import torch

from ..checkpoint import build_model, expected_shapes
from ..config import TwoTowerConfig
from ..model.tower import TwoTowerLM
from .tokenizer import BOS_ID, EOS_ID, PAD_ID

SIZES = {
    # Same layer kinds as the released model (Mamba-2, GQA attention, MoE), small dims.
    "tiny": dict(
        hidden_size=192, hybrid_override_pattern="MEM*EMEM*E",
        mamba_num_heads=6, mamba_head_dim=64, n_groups=2, ssm_state_size=32, conv_kernel=4,
        num_attention_heads=6, num_key_value_heads=2, head_dim=32,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        moe_intermediate_size=128, moe_shared_expert_intermediate_size=256,
    ),
    # For a GPU: the same recipe, wider and deeper.
    "small": dict(
        hidden_size=512, hybrid_override_pattern="MEMEM*EMEMEM*EMEMEM*E",
        mamba_num_heads=16, mamba_head_dim=64, n_groups=4, ssm_state_size=64, conv_kernel=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64,
        n_routed_experts=16, num_experts_per_tok=2, n_shared_experts=1,
        moe_intermediate_size=512, moe_shared_expert_intermediate_size=1024,
    ),
}  # fmt: skip


def model_config(size: str, vocab_size: int) -> TwoTowerConfig:
    if size not in SIZES:
        raise ValueError(f"size {size!r} is not one of {sorted(SIZES)}")
    return config_of(SIZES[size], vocab_size, f"<train size {size}>")


def config_of(dims: dict, vocab_size: int, source: str) -> TwoTowerConfig:
    """The trainer's config for ``dims`` (a :data:`SIZES` entry's keys): its token ids and
    routing scale around them."""
    return TwoTowerConfig(
        vocab_size=vocab_size, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        routed_scaling_factor=1.0, source=source, **dims,
    )  # fmt: skip


def run_config(run_dir: str, vocab_size: int) -> TwoTowerConfig:
    """The model config of a training run: the size its stage 1 recorded in
    RUN/model_config.json."""
    with open(os.path.join(run_dir, "model_config.json")) as f:
        return model_config(json.load(f)["size"], vocab_size)


def init_state_dict(cfg: TwoTowerConfig, seed: int) -> dict[str, torch.Tensor]:
    """Fresh fp32 weights: N(0, 0.02) matrices, residual outputs scaled by 1/sqrt(2 * layers),
    Mamba A in [1, 16], dt in [1e-3, 1e-1], D = 1, norms 1, routing bias 0. The time conditioning
    starts as the identity modulation (shift 0, scale 0, gate 1 whatever t is)."""
    g = torch.Generator().manual_seed(seed)
    out_scale = 1 / math.sqrt(2 * cfg.num_layers)
    state = {}
    for name, shape in expected_shapes(cfg).items():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            t = torch.ones(shape)
        elif leaf == "A_log":
            t = torch.log(torch.rand(shape, generator=g) * 15 + 1)
        elif leaf == "D":
            t = torch.ones(shape)
        elif leaf == "dt_bias":
            dt = torch.exp(torch.rand(shape, generator=g) * math.log(100.0) + math.log(1e-3))
            t = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
        elif name.startswith("scale_shift_tables"):
            t = torch.zeros(shape)
            t[2] = 1.0  # gate
        elif name.startswith("t_block.1."):
            t = torch.zeros(shape)
        elif leaf in ("bias", "e_score_correction_bias"):
            t = torch.zeros(shape)
        elif name.endswith("conv1d.weight"):
            t = (torch.rand(shape, generator=g) * 2 - 1) / math.sqrt(shape[-1])
        else:
            std = 0.02
            if any(k in name for k in ("out_proj", "down_proj", "o_proj")):
                std *= out_scale
            t = torch.randn(shape, generator=g) * std
        state[name] = t.float()
    return state


def new_model(cfg: TwoTowerConfig, seed: int) -> TwoTowerLM:
    return build_model(cfg, init_state_dict(cfg, seed))


def set_scan_chunk(lm: TwoTowerLM, chunk: int) -> None:
    """Select the chunked scan (chunk > 0, training) or the reference scan (0) in every Mamba
    layer of both towers."""
    for tower in (lm.context_tower, lm.denoiser_tower):
        for block in tower.layers:
            if block.kind == "mamba":
                block.mixer.scan_chunk = chunk


def count_params(lm: TwoTowerLM) -> dict[str, int]:
    ctx = sum(p.numel() for n, p in lm.named_parameters() if n.startswith("context_"))
    return {"context": ctx, "total": sum(p.numel() for p in lm.parameters())}
