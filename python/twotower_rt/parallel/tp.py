"""Tensor parallelism over the ranks of a ``torch.distributed`` group (NCCL on GPUs, gloo on CPUs).

Each rank holds a :class:`TwoTowerLM` built from its *local* config (its share of the heads and
intermediate sizes) with its slices of the weights (:func:`shard_state_dict`), so every module runs
unchanged on smaller shapes; a few hooks (``module.tp``) add the collectives:

- attention: each rank its query heads and the KV heads they read (replicated when there are
  fewer KV heads than ranks); ``o_proj`` is row-parallel: its partial output is all-reduced;
- Mamba-2: each rank its heads, with the B/C groups they read (replicated when there are fewer
  groups than ranks) and their conv channels; ``out_proj`` row-parallel; where a gated-norm group
  spans ranks its sum of squares is all-reduced;
- MoE and dense MLPs: every expert's intermediate split (``up`` column-, ``down`` row-parallel);
  the router stays whole (its float64 choice is the same on every rank); the routed fp32 sum is
  all-reduced before its cast, the shared expert's output after;
- the two LM heads vocabulary-parallel: each rank its slice of the vocabulary; the engine's
  samplers exchange a few numbers per position, not the logits (parallel/sampling.py), and decide
  identically on every rank;
- embeddings, norms and the time conditioning replicated.

On GPUs of one node the all-reduces go through the kernels' custom all-reduce where it is set up
(``TPGroup.custom``; the lockstep launcher creates it), else NCCL.

Every rank runs the same engine on the same requests and seeds, so they call the collectives in the
same order and take the same decisions; rank 0 reports. Launch with ``torchrun`` (one process per
GPU; multi-node through torchrun's rendezvous, nothing of ours underneath).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import TwoTowerConfig


@dataclass(frozen=True)
class TPGroup:
    """This rank's place in a tensor-parallel group and its collectives. ``custom``: the kernels'
    :class:`~twotower_rt.ops.all_reduce.CustomAllReduce` of the group (GPUs of one node): it takes
    the small messages (one-shot / two-shot over CUDA IPC, bitwise the same sum on every rank) and
    hands the rest to torch.distributed."""

    rank: int
    world: int
    group: object = None  # a torch.distributed process group (None: the default one)
    custom: object = None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.custom is not None and t.is_cuda:
            return self.custom.all_reduce(t, out=t)
        dist.all_reduce(t, group=self.group)
        return t

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` concatenated along the last dim, in rank order."""
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


@dataclass(frozen=True)
class Shards:
    """How the model's dimensions split over ``world`` ranks (per rank, contiguous ranges)."""

    cfg: TwoTowerConfig
    world: int

    def check(self) -> None:
        cfg, w = self.cfg, self.world
        needs = {
            "num_attention_heads": cfg.num_attention_heads,
            "mamba_num_heads": cfg.mamba_num_heads,
            "moe_intermediate_size": cfg.moe_intermediate_size,
            "vocab_size": cfg.vocab_size,
        }
        if cfg.n_shared_experts:
            needs["moe_shared_expert_intermediate_size"] = cfg.moe_shared_expert_intermediate_size
        if cfg.intermediate_size:
            needs["intermediate_size"] = cfg.intermediate_size
        bad = [f"{k}={v}" for k, v in needs.items() if v % w]
        if bad:
            raise ValueError(f"tensor parallelism over {w} ranks needs these divisible by {w}: "
                             f"{', '.join(bad)}")  # fmt: skip
        # A rank's query heads must all read one KV head when there are fewer KV heads than
        # ranks (the KV head is then replicated); the same for Mamba heads and their B/C groups.
        for name, whole, heads in (
            ("KV heads", cfg.num_key_value_heads, cfg.num_attention_heads),
            ("Mamba groups", cfg.n_groups, cfg.mamba_num_heads),
        ):
            per, local = heads // whole, heads // w
            if whole % w and per % local:
                raise ValueError(f"{name}: {whole} over {w} ranks: a rank's heads must share one")
        if cfg.use_bias or cfg.attention_bias or cfg.mlp_bias:
            raise ValueError("tensor parallelism does not take biased projections yet")
        if cfg.fp8_weight_block not in (None, (1, 0)):
            raise ValueError("tensor parallelism takes FP8 checkpoints with one scale per output "
                             f"channel (block 1 0), not block {cfg.fp8_weight_block}")  # fmt: skip

    # Per rank: the query heads, KV heads, Mamba heads, Mamba groups, vocabulary range.
    def q_heads(self, r):
        n = self.cfg.num_attention_heads // self.world
        return range(r * n, (r + 1) * n)

    def kv_heads(self, r):
        per = self.cfg.num_attention_heads // self.cfg.num_key_value_heads
        q = self.q_heads(r)
        return range(q.start // per, (q.stop - 1) // per + 1)

    def m_heads(self, r):
        n = self.cfg.mamba_num_heads // self.world
        return range(r * n, (r + 1) * n)

    def m_groups(self, r):
        per = self.cfg.mamba_num_heads // self.cfg.n_groups
        h = self.m_heads(r)
        return range(h.start // per, (h.stop - 1) // per + 1)

    def local_config(self, r) -> TwoTowerConfig:
        cfg, w = self.cfg, self.world
        return dataclasses.replace(
            cfg,
            num_attention_heads=cfg.num_attention_heads // w,
            num_key_value_heads=len(self.kv_heads(r)),
            mamba_num_heads=cfg.mamba_num_heads // w,
            n_groups=len(self.m_groups(r)),
            moe_intermediate_size=cfg.moe_intermediate_size // w,
            moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size // w,
            intermediate_size=cfg.intermediate_size // w,
        )

    @property
    def norm_group_spans_ranks(self) -> bool:
        return self.cfg.n_groups < self.world


def _rows(t: torch.Tensor, parts: list[range], unit: int) -> torch.Tensor:
    """Rows of t in the given ranges of ``unit``-row blocks, concatenated."""
    return torch.cat([t[p.start * unit : p.stop * unit] for p in parts], dim=0)


def shard_state_dict(state: dict[str, torch.Tensor], cfg: TwoTowerConfig, rank: int,
                     world: int) -> dict[str, torch.Tensor]:  # fmt: skip
    """This rank's slices of a full (unquantized) state dict, named as the local model's: the
    shapes of ``Shards.local_config(rank)``, but for the two heads, which hold the rank's
    ``vocab_size / world`` rows."""
    sh = Shards(cfg, world)
    sh.check()
    D, P, N = cfg.head_dim, cfg.mamba_head_dim, cfg.ssm_state_size
    H, d_inner, G = cfg.mamba_num_heads, cfg.mamba_d_inner, cfg.n_groups
    heads, groups = sh.m_heads(rank), sh.m_groups(rank)
    vocab = cfg.vocab_size // world
    out = {}
    for key, t in state.items():
        # An FP8 weight's per-channel scales (out, 1) follow its rows: sliced with a column-
        # parallel weight, whole with a row-parallel one.
        scale = key.endswith(".weight_scale")
        name = key[: -len("_scale")] if scale else key
        leaf = name.rsplit(".", 1)[-1]
        if scale and name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight")):
            pass
        elif name.endswith("q_proj.weight"):
            t = _rows(t, [sh.q_heads(rank)], D)
        elif name.endswith(("k_proj.weight", "v_proj.weight")):
            t = _rows(t, [sh.kv_heads(rank)], D)
        elif name.endswith("o_proj.weight"):
            t = _rows(t.T, [sh.q_heads(rank)], D).T
        elif name.endswith("mixer.in_proj.weight"):
            z, x, B, C, dt = torch.split(t, [d_inner, d_inner, G * N, G * N, H])
            t = torch.cat([_rows(z, [heads], P), _rows(x, [heads], P), _rows(B, [groups], N),
                           _rows(C, [groups], N), _rows(dt, [heads], 1)])  # fmt: skip
        elif name.endswith(("conv1d.weight", "conv1d.bias")):
            x, B, C = torch.split(t, [d_inner, G * N, G * N])
            t = torch.cat([_rows(x, [heads], P), _rows(B, [groups], N), _rows(C, [groups], N)])
        elif leaf in ("dt_bias", "A_log", "D") and ".mixer." in name:
            t = _rows(t, [heads], 1)
        elif name.endswith("mixer.norm.weight"):
            t = _rows(t, [heads], P)
        elif name.endswith("mixer.out_proj.weight"):
            t = _rows(t.T, [heads], P).T
        elif name.endswith("up_proj.weight"):
            n = t.shape[0] // world
            t = t[rank * n : (rank + 1) * n]
        elif name.endswith("down_proj.weight"):
            n = t.shape[1] // world
            t = t[:, rank * n : (rank + 1) * n]
        elif name in ("lm_head.weight", "context_lm_head.weight"):
            t = t[rank * vocab : (rank + 1) * vocab]
        out[key] = t.contiguous()
    return out


def load_sharded(model, tp: TPGroup):
    """This rank's shard of a loaded model (a TwoTowerModel or TwoTowerLM; FP8 with per-channel
    scales too): a new TwoTowerLM of the local config holding its slices, with the collectives
    hooked in."""
    from ..checkpoint import build_model
    from ..model.attention import Attention
    from ..model.mamba import Mamba2Mixer
    from ..model.moe import MoE, Relu2MLP

    lm = model.lm if hasattr(model, "lm") else model
    cfg = lm.cfg
    shards = Shards(cfg, tp.world)
    full = lm.state_dict()
    state = shard_state_dict(full, cfg, tp.rank, tp.world)
    heads = {name: state.pop(name) for name in ("lm_head.weight", "context_lm_head.weight")}
    # The local config keeps the whole vocabulary (the embeddings are replicated): build with the
    # whole heads, then keep this rank's rows of them.
    local = build_model(shards.local_config(tp.rank), {**state, **{n: full[n] for n in heads}})
    for name, rows in heads.items():
        getattr(local, name.split(".")[0]).weight = torch.nn.Parameter(rows, requires_grad=False)
    local.tp = tp
    local.vocab_start = tp.rank * (cfg.vocab_size // tp.world)
    local.gather_logits = False  # the engine samples on the slices (parallel/sampling.py)
    moe_mlps = set()
    for module in local.modules():
        if isinstance(module, MoE):
            module.tp = tp
            moe_mlps.update(id(m) for m in module.modules() if isinstance(m, Relu2MLP))
    for module in local.modules():
        if isinstance(module, Attention):
            module.tp = tp
        elif isinstance(module, Mamba2Mixer):
            module.tp = tp
            if shards.norm_group_spans_ranks:  # this rank's heads are part of one global group
                module.tp_norm = (cfg.n_groups, shards.m_groups(tp.rank).start,
                                  cfg.mamba_d_inner // cfg.n_groups)  # fmt: skip
        elif isinstance(module, Relu2MLP) and id(module) not in moe_mlps:
            module.tp = tp  # a dense MLP layer (the MoE reduces its own)
    return local
