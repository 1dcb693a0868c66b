"""The two training stages of the default model, on the runtime's own ``TwoTowerLM``.

1. ``ar``: the context tower + ``context_lm_head`` as a causal LM (next-token cross-entropy) on
   random windows of the training stream, through ``context_forward`` exactly as at inference.
2. ``diffusion``: the context tower frozen; the denoiser tower + ``lm_head`` initialised from it,
   the time conditioning from the identity modulation; block-wise masked diffusion: each window is
   cut into blocks of 16; the frozen context tower runs once over the window (no grad) and leaves
   its K/V and its Mamba states at every block boundary; every block j >= 1 becomes one training
   row that attends to the context prefix [0, 16 j) and is seeded with the Mamba states at 16 j
   (exactly what ``denoiser_logits`` gets at inference), with a random number of its 16 tokens
   replaced by the mask id (t = masked fraction) and cross-entropy on the masked positions.

MoE routing is balanced without an auxiliary loss: after every step each router's
``e_score_correction_bias`` moves by ``bias_rate`` towards under-used experts (DeepSeek-V3's
auxiliary-loss-free balancing; the bias is the one the released checkpoints carry).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..config import TwoTowerConfig
from ..model.cache import ContextCache
from ..model.mamba import MambaState
from ..model.moe import Router
from ..model.tower import TwoTowerLM
from .model_init import set_scan_chunk
from .tokenizer import MASK_ID


@dataclass
class StageConfig:
    steps: int = 2000
    minutes: float = 0.0  # > 0: also stop (and anneal the LR) by wall-clock time
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bias_rate: float = 1e-3
    eval_every: int = 50
    eval_batches: int = 4
    seed: int = 0
    block_size: int = 16


class Schedule:
    """Linear warm-up then cosine to min_lr_ratio; progress is the larger of steps done / steps
    and (with a time budget) elapsed / minutes, so a time-boxed run still anneals fully."""

    def __init__(self, sc: StageConfig):
        self.sc = sc
        self.start = time.time()

    def progress(self, step: int) -> float:
        p = step / self.sc.steps
        if self.sc.minutes > 0:
            p = max(p, (time.time() - self.start) / (60 * self.sc.minutes))
        return min(p, 1.0)

    def lr(self, step: int) -> float:
        sc = self.sc
        if step < sc.warmup:
            return sc.lr * (step + 1) / sc.warmup
        cos = 0.5 * (1 + math.cos(math.pi * self.progress(step)))
        return sc.lr * (sc.min_lr_ratio + (1 - sc.min_lr_ratio) * cos)


def make_optimizer(params: list[tuple[str, torch.nn.Parameter]], sc: StageConfig):
    decay = [p for n, p in params if p.dim() >= 2 and "embeddings" not in n]
    no_decay = [p for n, p in params if not (p.dim() >= 2 and "embeddings" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": sc.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=sc.lr, betas=(0.9, 0.95), eps=1e-8,
    )  # fmt: skip


class RouterBalancer:
    """Counts each router's expert choices during a step; ``update`` nudges the selection bias."""

    def __init__(self, routers: list[Router], rate: float):
        self.routers, self.rate = routers, rate
        self.counts = [torch.zeros(r.weight.shape[0]) for r in routers]
        for i, router in enumerate(routers):
            router.register_forward_hook(self._hook(i))
        self.enabled = True

    def _hook(self, i: int):
        def hook(module, inputs, output):
            if self.enabled:
                ids = output[0].reshape(-1)
                self.counts[i] += torch.bincount(ids, minlength=len(self.counts[i])).float().cpu()

        return hook

    @torch.no_grad()
    def update(self) -> float:
        """Apply and reset; returns the worst max/mean load ratio seen in this step."""
        worst = 0.0
        for router, counts in zip(self.routers, self.counts):
            if counts.sum() > 0:
                worst = max(worst, float(counts.max() / counts.mean()))
                router.e_score_correction_bias += self.rate * torch.sign(counts.mean() - counts).to(
                    router.e_score_correction_bias.device
                )
            counts.zero_()
        return worst


def routers_of(tower) -> list[Router]:
    return [b.mixer.gate for b in tower.layers if b.kind == "moe"]


def random_windows(stream: torch.Tensor, batch: int, length: int, g: torch.Generator):
    starts = torch.randint(0, len(stream) - length, (batch,), generator=g)
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


def fixed_windows(stream: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """Evenly spaced windows: the same evaluation set every time."""
    starts = torch.linspace(0, len(stream) - length - 1, count).long()
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


# Stage 1 -----------------------------------------------------------------------------------------
def ar_loss(lm: TwoTowerLM, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of the context tower over windows (b, L + 1)."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    cache = ContextCache.allocate(lm.cfg, inputs.shape[0], inputs.shape[1], lm.dtype, lm.device)
    hidden = lm.context_forward(inputs, cache)
    logits = lm.context_logits(hidden)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# Stage 2 -----------------------------------------------------------------------------------------
@torch.no_grad()
def context_rows(lm: TwoTowerLM, windows: torch.Tensor, S: int, teacher: bool = False):
    """Run the frozen context tower over windows (b, L) once; return, for every block j >= 1 of
    every window as one row: the block's true tokens (R, S), a ContextCache whose K/V hold the
    window with prefix length S j, and the Mamba states at S j. With ``teacher``, also the AR
    tower's log-probabilities for every position of every row (R, S, vocab): position i of
    block j as predicted from the window's tokens before it (the hidden state at S j + i - 1),
    the exact AR distribution a denoiser sees when the block's positions before i are known."""
    b, L = windows.shape
    nb = L // S
    cache = ContextCache.allocate(lm.cfg, b, L, lm.dtype, lm.device)
    hidden = lm.context_forward(windows, cache)
    seq = torch.arange(b, device=windows.device).repeat_interleave(nb - 1)  # row -> window
    blk = torch.arange(1, nb, device=windows.device).repeat(b)  # row -> block index j
    keys = {i: k[seq, : L - S] for i, k in cache.keys.items()}
    values = {i: v[seq, : L - S] for i, v in cache.values.items()}
    mamba = {}
    for i, block in enumerate(lm.context_tower.layers):
        if block.kind == "mamba":
            chunks = block.mixer.chunk_states  # after tokens S, 2S, ...
            mamba[i] = MambaState(chunks.conv[seq, blk - 1], chunks.ssm[seq, blk - 1])
    prefix = blk * S
    rows_cache = ContextCache(prefix, keys, values, mamba)
    targets = windows.reshape(b, nb, S)[seq, blk]
    if not teacher:
        return targets, rows_cache
    pos = (blk * S - 1)[:, None] + torch.arange(S, device=windows.device)  # (R, S)
    logp = torch.log_softmax(lm.context_logits(hidden[seq[:, None], pos]), dim=-1)
    return targets, rows_cache, logp


def mask_blocks(targets: torch.Tensor, g: torch.Generator):
    """Mask a uniformly drawn number (1..S) of random positions per row; t = masked fraction."""
    R, S = targets.shape
    n_masked = torch.randint(1, S + 1, (R,), generator=g).to(targets.device)
    rank = torch.rand(R, S, generator=g).argsort(dim=-1).argsort(dim=-1).to(targets.device)
    masked = rank < n_masked[:, None]
    noisy = torch.where(masked, torch.full_like(targets, MASK_ID), targets)
    return noisy, masked, n_masked.float() / S


def diffusion_loss(lm: TwoTowerLM, windows: torch.Tensor, S: int, g: torch.Generator,
                   max_rows: int | None = None):  # fmt: skip
    targets, cache = context_rows(lm, windows, S)
    if max_rows is not None and targets.shape[0] > max_rows:
        keep = torch.randperm(targets.shape[0], generator=g)[:max_rows].to(targets.device)
        targets = targets[keep]
        cache = cache.index_select(keep)
    noisy, masked, t = mask_blocks(targets, g)
    logits = lm.denoiser_logits(noisy, cache, prefix_len=cache.lengths,
                                mamba_states=cache.mamba, t=t)  # fmt: skip
    return F.cross_entropy(logits[masked], targets[masked])


def init_denoiser_from_context(lm: TwoTowerLM) -> None:
    with torch.no_grad():
        lm.denoiser_tower.load_state_dict(lm.context_tower.state_dict())
        lm.lm_head.weight.copy_(lm.context_lm_head.weight)


# The loop ----------------------------------------------------------------------------------------
def run_stage(stage: str, lm: TwoTowerLM, train_ids: torch.Tensor, heldout_ids: torch.Tensor,
              sc: StageConfig, out_dir: str, log, first_step: int = 0) -> None:  # fmt: skip
    """Train one stage in place; appends JSON lines to ``log`` (train loss every step, held-out
    loss every eval_every steps). ``first_step`` > 0 continues a stage from its checkpoint
    (fresh optimizer state and schedule; the log's step numbers carry on)."""
    torch.manual_seed(sc.seed)
    g = torch.Generator().manual_seed(sc.seed)
    g_eval = torch.Generator().manual_seed(12345)
    lm.requires_grad_(False)
    if stage == "ar":
        modules = {"context_tower": lm.context_tower, "context_lm_head": lm.context_lm_head}
        tower = lm.context_tower
        length = sc.seq_len + 1
    else:
        modules = {"denoiser_tower": lm.denoiser_tower, "lm_head": lm.lm_head,
                   "t_embedder": lm.t_embedder, "t_block": lm.t_block,
                   "scale_shift_tables": lm.scale_shift_tables}  # fmt: skip
        tower = lm.denoiser_tower
        length = sc.seq_len
    params = []
    for prefix, module in modules.items():
        for name, p in module.named_parameters():
            if name.endswith("e_score_correction_bias"):
                continue  # moved by the balancer, not by gradients
            p.requires_grad_(True)
            params.append((f"{prefix}.{name}", p))
    opt = make_optimizer(params, sc)
    balancer = RouterBalancer(routers_of(tower), sc.bias_rate)
    sched = Schedule(sc)
    heldout = fixed_windows(heldout_ids, sc.eval_batches * sc.batch_size, length)
    set_scan_chunk(lm, sc.block_size)

    def loss_of(windows, gen):
        if stage == "ar":
            return ar_loss(lm, windows)
        return diffusion_loss(lm, windows, sc.block_size, gen)

    def evaluate() -> float:
        balancer.enabled = False
        with torch.no_grad():
            g_eval.manual_seed(12345)
            losses = [float(loss_of(heldout[i : i + sc.batch_size], g_eval))
                      for i in range(0, len(heldout), sc.batch_size)]  # fmt: skip
        balancer.enabled = True
        return sum(losses) / len(losses)

    step = 0
    t0 = time.time()
    while True:
        logged_step = first_step + step
        if step % sc.eval_every == 0 or sched.progress(step) >= 1.0:
            val = evaluate()
            log({"stage": stage, "step": logged_step, "time_s": time.time() - t0,
                 "heldout_loss": val})  # fmt: skip
            print(f"[{stage}] step {logged_step} held-out loss {val:.4f} ({time.time() - t0:.0f}s)",
                  flush=True)  # fmt: skip
            save_file({k: v.contiguous() for k, v in lm.state_dict().items()},
                      os.path.join(out_dir, f"{stage}.safetensors"))  # fmt: skip
            if sched.progress(step) >= 1.0:
                break
        lr = sched.lr(step)
        for group in opt.param_groups:
            group["lr"] = lr
        windows = random_windows(train_ids, sc.batch_size, length, g)
        loss = loss_of(windows, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_([p for _, p in params], sc.grad_clip)
        opt.step()
        imbalance = balancer.update()
        log({"stage": stage, "step": logged_step, "time_s": time.time() - t0,
             "loss": loss.item(),
             "lr": lr, "grad_norm": float(gnorm), "expert_imbalance": imbalance})  # fmt: skip
        if step % 10 == 0:
            print(f"[{stage}] step {logged_step} loss {loss.item():.4f} lr {lr:.2e} "
                  f"gnorm {float(gnorm):.2f} imb {imbalance:.2f} "
                  f"({time.time() - t0:.0f}s)", flush=True)  # fmt: skip
        step += 1
    lm.requires_grad_(False)
    set_scan_chunk(lm, 0)


def load_run_state(lm: TwoTowerLM, path: str) -> None:
    lm.load_state_dict(load_file(path), strict=True)


def stage_config_dict(sc: StageConfig) -> dict:
    return asdict(sc)


def config_json(cfg: TwoTowerConfig) -> dict:
    """config.json with the released model's key names (time_step_limit left at its default)."""
    d = cfg.to_dict()
    d.pop("time_step_limit")
    d.update(model_type="nemotron_h", mamba_hidden_act="silu", mlp_hidden_act="relu2",
             mamba_ssm_cache_dtype="float32", torch_dtype="bfloat16")  # fmt: skip
    return d


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
