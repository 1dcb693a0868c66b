"""Stage 3 of the default model: sequence-level distillation of the denoiser.

The context tower continues training prompts greedily; the denoiser is fine-tuned on those
continuations, whose every token is a deterministic function of the context, so a denoiser can in
principle be confident on them (dParallel, CLLMs). From the stage-2 weights, float32, CPU:

1. Distillation set: ``prompts`` windows of ``prompt_len`` tokens from the training stream (no
   document end inside), each continued by the context tower (``mode="ar"``, greedy) by
   ``gen_tokens`` tokens. Cached as ``.npy`` (deterministic: seed, sizes, the frozen tower).
2. Training (the context tower frozen; the denoiser tower, ``lm_head`` and the time conditioning
   trained, as ``train.run_stage("diffusion")``): each step takes ``batch`` sequences, runs the
   frozen context tower over them once (:func:`train.context_rows`) and trains on every block made
   of generated tokens, plus optionally ``real_frac`` of the rows from real training text.
   Masks match inference, where a block is denoised with an exact count of masked positions: with
   probability ``p_full`` a fully masked block, else an exact count uniform in 1..S; the masked
   positions are, with probability ``p_suffix``, the block's last ones (the left-to-right order a
   distilled denoiser tends to commit in), else random; t = the masked fraction.
   Loss: cross-entropy on the masked positions; optionally ``kl_weight`` x KL(AR tower ||
   denoiser) at each row's first masked position (every position before it known: the AR
   tower's distribution there is exact) or, ``kl_scope="all"``, at every masked one, the AR
   distribution taken at ``kl_temperature`` (below 1: sharpened towards its argmax, the token of
   the greedy text, so that cross-entropy on greedy text is its limit at 0); from
   progress ``cf_start`` on (time-based, like the LR schedule) certainty forcing (dParallel):
   ``cf_weight`` x the mean entropy of the predicted distribution at masked positions whose
   argmax is already the target, and its counterpart ``doubt_weight`` x the mean confidence (top
   probability) at masked positions whose argmax is wrong: certainty forcing makes a denoiser
   confident where it is right and, in contexts like those, where it is wrong; the commit rule
   reads exactly that confidence. With ``rollout_steps`` N > 0, each row draws r in 0..N and a row
   with r > 0 trains on the mask state the decoding itself reaches after r steps from a fully
   masked block (:func:`rollout_masks`: no grad, the spec's commit rule at ``rollout_gamma``,
   the committed positions given their targets): the states where a confident wrong commit
   happens at inference, which random masks rarely produce. With ``onpolicy_weight`` > 0, from
   progress ``onpolicy_start`` on, ``onpolicy_rows`` rows per step are decoded by the denoiser
   itself (:func:`own_decoding`: its own commits, not the targets) and trained at a random state
   of that decoding towards the AR tower's distribution given the text it wrote
   (:func:`ar_on_blocks`): on-policy distillation, KL(AR tower at ``onpolicy_temperature`` ||
   denoiser) at every still masked position, or at temperature 0 cross-entropy towards the AR
   tower's argmax (what greedy AR writes after that text); the evaluation's AR-NLL is the AR
   tower's view of exactly such text.

``python -m twotower_rt.train distill`` runs it with :class:`DistillConfig`'s defaults, the recipe
of the shipped model; ``bench/issue15_distill.py`` is the experiment harness around it (every
candidate evaluated before and after).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..model.cache import ContextCache
from ..ops.mask_sampling import mask_sampling
from .model_init import set_scan_chunk
from .tokenizer import EOS_ID, MASK_ID
from .train import (
    RouterBalancer,
    Schedule,
    StageConfig,
    context_rows,
    make_optimizer,
    random_windows,
    routers_of,
)

BLOCK = 16


@dataclass
class DistillConfig:
    """The recipe; the defaults are the shipped model's stage 3."""

    minutes: float = 80.0
    batch: int = 16  # sequences per step
    lr: float = 5e-4
    warmup: int = 20
    bias_rate: float = 1e-3
    seed: int = 0
    prompts: int = 8192
    prompt_len: int = 32
    gen_tokens: int = 96
    gen_batch: int = 256
    gen_temperature: float = 0.0  # 0: greedy continuations; else sampled (a seed per prompt)
    real_frac: float = 0.25
    p_full: float = 0.25
    p_suffix: float = 0.5
    cf_start: float = 0.7
    cf_weight: float = 0.3
    doubt_weight: float = 0.0
    kl_weight: float = 0.0
    kl_scope: str = "first"
    kl_temperature: float = 1.0
    rollout_steps: int = 3
    rollout_gamma: float = 0.8
    onpolicy_weight: float = 0.0
    onpolicy_start: float = 0.5
    onpolicy_rows: int = 32
    onpolicy_temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.kl_scope not in ("first", "all"):
            raise ValueError(f"kl_scope must be 'first' or 'all', got {self.kl_scope!r}")
        if self.prompt_len % BLOCK or self.gen_tokens % BLOCK:
            raise ValueError(f"prompt_len and gen_tokens must be multiples of {BLOCK}")
        if not 0.0 <= self.real_frac < 1.0:
            raise ValueError(f"real_frac must be in [0, 1), got {self.real_frac}")
        if not 0 <= self.rollout_steps < BLOCK:
            raise ValueError(f"rollout_steps must be in [0, {BLOCK}), got {self.rollout_steps}")
        if not 0.0 <= self.gen_temperature <= 2.0:
            raise ValueError(f"gen_temperature must be in [0, 2], got {self.gen_temperature}")
        if not 0.0 <= self.rollout_gamma < 1.0:
            raise ValueError(f"rollout_gamma must be in [0, 1), got {self.rollout_gamma}")
        if self.onpolicy_weight < 0 or not 0.0 <= self.onpolicy_start <= 1.0:
            raise ValueError("onpolicy_weight must be >= 0 and onpolicy_start in [0, 1]")
        if self.onpolicy_temperature < 0:
            raise ValueError(f"onpolicy_temperature must be >= 0, got {self.onpolicy_temperature}")
        if not self.kl_temperature > 0:
            raise ValueError(f"kl_temperature must be > 0, got {self.kl_temperature}")
        if self.doubt_weight < 0:
            raise ValueError(f"doubt_weight must be >= 0, got {self.doubt_weight}")
        if self.onpolicy_rows < 1:
            raise ValueError(f"onpolicy_rows must be >= 1, got {self.onpolicy_rows}")


_HELP = {
    "batch": "sequences per step",
    "prompts": "distillation set: this many training prompts",
    "real_frac": "share of each step's sequences that are real training text",
    "gen_temperature": "the distillation set's continuations: 0 greedy, else sampled at this "
    "temperature (prompt i seeded with seed * 1000003 + i)",
    "doubt_weight": "from --cf-start on, weight of a penalty on the confidence (top probability) "
    "at masked positions whose argmax is wrong: certainty forcing's counterpart (0: off)",
    "kl_weight": "weight of a soft-target term: KL(AR tower || denoiser) at --kl-scope positions",
    "kl_temperature": "the soft target is the AR distribution at this temperature: below 1 "
    "sharpened towards its argmax (the greedy text's token), 1 the AR tower's own",
    "rollout_steps": "train on the mask states the denoiser's own decoding visits: rows run "
    "0..N teacher-forced decoding steps from a fully masked block first (0: off)",
    "rollout_gamma": "the commit threshold of those decoding steps (and of the on-policy term's)",
    "onpolicy_weight": "weight of on-policy distillation: the denoiser decodes blocks itself "
    "(greedy, at --rollout-gamma) and learns, at a random state of that decoding, the AR "
    "tower's distribution given the text it wrote (0: off)",
    "onpolicy_start": "training progress from which the on-policy term is on",
    "onpolicy_rows": "rows per step that get the on-policy term",
    "onpolicy_temperature": "the on-policy target: the AR distribution at this temperature; 0: "
    "its argmax (what greedy AR would write after the denoiser's text), cross-entropy",
}
_CHOICES = {"kl_scope": ("first", "all")}


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`DistillConfig` field (``--kl-weight`` for ``kl_weight``, ...),
    defaulting to the recipe; :func:`recipe_from` reads them back."""
    for field in dataclasses.fields(DistillConfig):
        kind = {"float": float, "int": int, "str": str}[str(field.type)]
        help_text = f"{_HELP[field.name]} " if field.name in _HELP else ""
        parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, type=kind,
                            default=field.default, choices=_CHOICES.get(field.name),
                            help=f"{help_text}(default {field.default})")  # fmt: skip


def recipe_from(args: argparse.Namespace) -> DistillConfig:
    fields = dataclasses.fields(DistillConfig)
    return DistillConfig(**{f.name: getattr(args, f.name) for f in fields})


# 1. data ------------------------------------------------------------------------------------------
def prompt_windows(stream: torch.Tensor, count: int, length: int, seed: int) -> torch.Tensor:
    """``count`` random training windows of ``length`` tokens with no EOS inside."""
    g = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < count:
        for w in random_windows(stream, 4 * count, length, g):
            if EOS_ID not in w:
                out.append(w)
                if len(out) == count:
                    break
    return torch.stack(out)


def distill_set(model, stream: torch.Tensor, cfg: DistillConfig, cache_dir: str) -> torch.Tensor:
    """(prompts, prompt_len + gen_tokens): training prompts + the context tower's greedy (or,
    with ``gen_temperature``, sampled) continuations (``model``: a loaded ``TwoTowerModel``),
    cached under ``cache_dir``."""
    sampled = f"_t{cfg.gen_temperature:g}" if cfg.gen_temperature > 0 else ""
    path = os.path.join(cache_dir, f"distill_{cfg.prompts}x{cfg.prompt_len}"
                        f"+{cfg.gen_tokens}_seed{cfg.seed}{sampled}.npy")  # fmt: skip
    if os.path.isfile(path):
        return torch.from_numpy(np.load(path).astype(np.int64))
    prompts = prompt_windows(stream, cfg.prompts, cfg.prompt_len, cfg.seed)
    t0, seqs = time.time(), []
    for i in range(0, len(prompts), cfg.gen_batch):
        rows = prompts[i : i + cfg.gen_batch].tolist()
        seeds = None
        if cfg.gen_temperature > 0:  # one seed per prompt: the same text however it is batched
            seeds = [cfg.seed * 1000003 + i + j for j in range(len(rows))]
        out = model.generate(rows, mode="ar", max_new_tokens=cfg.gen_tokens,
                             temperature=cfg.gen_temperature, seed=seeds)  # fmt: skip
        seqs += out.sequences
        print(f"[distill] {len(seqs)}/{len(prompts)} sequences ({time.time() - t0:.0f}s)",
              flush=True)  # fmt: skip
    arr = np.asarray(seqs, dtype=np.uint16)
    os.makedirs(cache_dir, exist_ok=True)
    np.save(path, arr)
    return torch.from_numpy(arr.astype(np.int64))


# 2. masks and loss --------------------------------------------------------------------------------
def inference_masks(R: int, S: int, p_full: float, p_suffix: float, g: torch.Generator):
    """(masked (R, S) bool, t (R,)): an exact count per row (S with probability p_full, else
    uniform in 1..S); the last n positions with probability p_suffix, else n random ones."""
    n = torch.randint(1, S + 1, (R,), generator=g)
    n = torch.where(torch.rand(R, generator=g) < p_full, torch.full_like(n, S), n)
    rank = torch.rand(R, S, generator=g).argsort(dim=-1).argsort(dim=-1)  # random order
    suffix_rank = torch.arange(S - 1, -1, -1).expand(R, S)  # last position first
    use_suffix = (torch.rand(R, generator=g) < p_suffix)[:, None]
    rank = torch.where(use_suffix, suffix_rank, rank)
    return rank < n[:, None], n.float() / S


def rows_of(lm, windows: torch.Tensor, first_block: int, teacher: bool = False):
    """context_rows for windows, keeping only the rows of blocks >= first_block: (targets,
    cache, teacher log-probs or None)."""
    targets, cache, *logp = context_rows(lm, windows, BLOCK, teacher=teacher)
    logp = logp[0] if logp else None
    nb = windows.shape[1] // BLOCK
    blk = torch.arange(1, nb).repeat(windows.shape[0])
    if first_block > 1:
        keep = torch.nonzero(blk >= first_block).squeeze(-1)
        targets, cache = targets[keep], cache.index_select(keep)
        logp = None if logp is None else logp[keep]
    return targets, cache, logp


def concat_rows(parts):
    """Join (targets, cache, teacher) row sets: the caches are padded to the longest prefix."""
    if len(parts) == 1:
        return parts[0]
    teacher = None if any(p[2] is None for p in parts) else torch.cat([p[2] for p in parts])
    parts = [p[:2] for p in parts]
    targets = torch.cat([t for t, _ in parts])
    L = max(c.keys[next(iter(c.keys))].shape[1] for _, c in parts)

    def pad(x):  # (R, l, ...) -> (R, L, ...)
        return F.pad(x, (0, 0) * (x.dim() - 2) + (0, L - x.shape[1]))

    first = parts[0][1]
    keys = {i: torch.cat([pad(c.keys[i]) for _, c in parts]) for i in first.keys}
    values = {i: torch.cat([pad(c.values[i]) for _, c in parts]) for i in first.values}
    mamba = {i: type(first.mamba[i])(torch.cat([c.mamba[i].conv for _, c in parts]),
                                     torch.cat([c.mamba[i].ssm for _, c in parts]))
             for i in first.mamba}  # fmt: skip
    lengths = torch.cat([c.lengths for _, c in parts])
    return targets, ContextCache(lengths, keys, values, mamba), teacher


def kl_positions(masked: torch.Tensor, scope: str) -> torch.Tensor:
    """Where the soft AR target applies: ``first``, each row's first masked position (every
    position before it is known, so the AR tower's distribution there is exactly the one the
    denoiser should give); ``all``, every masked position (an approximation wherever a masked
    position precedes it)."""
    if scope == "all":
        return masked
    return masked & (masked.cumsum(-1) == 1)


@torch.no_grad()
def rollout_masks(lm, targets: torch.Tensor, cache, steps: torch.Tensor, gamma: float):
    """The mask states inference visits, teacher-forced: row i starts fully masked and runs
    ``steps[i]`` mask-diffusion steps (the runtime's greedy decision, ``ops.mask_sampling``, at
    ``gamma`` with T = S), each committing the positions the denoiser's confidence picks but
    writing the row's targets there, not its predictions. Returns (masked (R, S) bool,
    committed, committed but predicted wrong): the last count is the commit errors the decoding
    would have made."""
    R = targets.shape[0]
    masked = torch.ones(R, BLOCK, dtype=torch.bool)
    committed = wrong = 0
    for j in range(int(steps.max()) if R else 0):
        rows = torch.nonzero((steps > j) & masked.any(-1)).squeeze(-1)
        if rows.numel() == 0:
            break
        m, tgt, sub = masked[rows], targets[rows], cache.index_select(rows)
        noisy = torch.where(m, torch.full_like(tgt, MASK_ID), tgt)
        logits = lm.denoiser_logits(noisy, sub, prefix_len=sub.lengths, mamba_states=sub.mamba,
                                    t=m.sum(-1).float() / BLOCK)  # fmt: skip
        out = mask_sampling(logits, noisy, mask_token_id=MASK_ID, step=j, steps_per_block=BLOCK,
                            confidence_threshold=gamma)  # fmt: skip
        commit = m & ~out.masked
        committed += int(commit.sum())
        wrong += int((commit & (out.prediction != tgt)).sum())
        masked[rows] = m & ~commit
    return masked, committed, wrong


@torch.no_grad()
def own_decoding(lm, cache, gamma: float, g: torch.Generator):
    """The denoiser decodes one fully masked block per row of ``cache`` itself, as the runtime
    does (greedy, :func:`ops.mask_sampling` at ``gamma``, T = S), to the end. Returns (its
    blocks (R, S), a state of each row's decoding drawn uniformly among the ones it went
    through: masked (R, S) bool, the positions still masked before that step)."""
    R = cache.lengths.shape[0]
    block = torch.full((R, BLOCK), MASK_ID, dtype=torch.long)
    states = []  # masked before each step
    for j in range(BLOCK):
        masked = block == MASK_ID
        rows = torch.nonzero(masked.any(-1)).squeeze(-1)
        if rows.numel() == 0:
            break
        states.append(masked)
        sub = cache.index_select(rows)
        logits = lm.denoiser_logits(block[rows], sub, prefix_len=sub.lengths,
                                    mamba_states=sub.mamba,
                                    t=masked[rows].sum(-1).float() / BLOCK)  # fmt: skip
        out = mask_sampling(logits, block[rows], mask_token_id=MASK_ID, step=j,
                            steps_per_block=BLOCK, confidence_threshold=gamma)  # fmt: skip
        block[rows] = out.block
    states = torch.stack(states, dim=1)  # (R, steps, S)
    taken = states.any(-1).sum(-1)  # steps each row went through (>= 1)
    pick = (torch.rand(R, generator=g) * taken).long().clamp_max(taken - 1)
    return block, states[torch.arange(R), pick]


@torch.no_grad()
def ar_on_blocks(lm, cache, blocks: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """The AR tower's log-probabilities (R, S, vocab) at every position of ``blocks`` given the
    row's context and the block's own tokens before it (the mask token excluded). ``first``
    (R, vocab): the AR logits at position 0, which depend on the context alone; the other
    positions come from one context-tower pass over the blocks, on a copy of the cache."""
    pad = (0, 0, 0, 0, 0, BLOCK)  # K/V room for the block after the longest prefix
    copy = ContextCache(cache.lengths.clone(),
                        {i: F.pad(k, pad) for i, k in cache.keys.items()},
                        {i: F.pad(v, pad) for i, v in cache.values.items()},
                        {i: type(s)(s.conv.clone(), s.ssm.clone())
                         for i, s in cache.mamba.items()})  # fmt: skip
    hidden = lm.context_forward(blocks, copy)
    logits = torch.cat([first[:, None], lm.context_logits(hidden[:, :-1])], dim=1)
    logits[..., MASK_ID] = -1e12
    return torch.log_softmax(logits, dim=-1)


def onpolicy_loss(lm, cache, teacher: torch.Tensor, cfg: DistillConfig, g: torch.Generator):
    """On-policy distillation on ``cfg.onpolicy_rows`` random rows: KL(AR tower || denoiser), or
    at ``onpolicy_temperature`` 0 cross-entropy towards the AR tower's argmax, at
    the still-masked positions of a state the denoiser's own decoding reached, the AR tower
    reading the text that decoding wrote (:func:`own_decoding`, :func:`ar_on_blocks`): the
    states and the left contexts of inference, where the teacher forcing of the other terms
    never puts the denoiser. ``teacher``: the rows' AR log-probs from :func:`rows_of` (its
    position 0 is the context-only distribution). Returns (loss, statistics)."""
    R = cache.lengths.shape[0]
    rows = torch.randperm(R, generator=g)[: cfg.onpolicy_rows]
    sub = cache.index_select(rows)
    blocks, masked = own_decoding(lm, sub, cfg.rollout_gamma, g)
    target = ar_on_blocks(lm, sub, blocks, teacher[rows, 0])
    logits = masked_logits(lm, blocks, sub, masked, masked.sum(-1).float() / BLOCK)
    teach = target[masked]
    if cfg.onpolicy_temperature == 0:
        loss = F.cross_entropy(logits, teach.argmax(-1))
    else:
        teach = torch.log_softmax(teach / cfg.onpolicy_temperature, dim=-1)
        loss = F.kl_div(torch.log_softmax(logits, dim=-1), teach, log_target=True,
                        reduction="batchmean")  # fmt: skip
    with torch.no_grad():  # the AR tower's NLL of what the denoiser wrote, per token
        own_nll = -target.gather(-1, blocks[..., None]).mean()
    return loss, {"onpolicy_loss": loss.item(), "onpolicy_ar_nll": float(own_nll)}


def masked_logits(lm, targets, cache, masked, t) -> torch.Tensor:
    """The denoiser's logits (N, vocab) at the ``masked`` positions of blocks ``targets`` (R, S)
    with those positions masked, the mask token excluded as at inference."""
    noisy = torch.where(masked, torch.full_like(targets, MASK_ID), targets)
    logits = lm.denoiser_logits(noisy, cache, prefix_len=cache.lengths, mamba_states=cache.mamba,
                                t=t)[masked]  # fmt: skip
    logits[:, MASK_ID] = -1e12  # the mask token is never predicted
    return logits


def step_loss(lm, targets, cache, cfg: DistillConfig, g, cf_weight: float, teacher=None,
              doubt_weight: float = 0.0):  # fmt: skip
    """One step's loss and its statistics (see the module docstring)."""
    masked, t = inference_masks(targets.shape[0], BLOCK, cfg.p_full, cfg.p_suffix, g)
    rollout = {}
    if cfg.rollout_steps:
        steps = torch.randint(0, cfg.rollout_steps + 1, (targets.shape[0],), generator=g)
        visited, committed, wrong = rollout_masks(lm, targets, cache, steps, cfg.rollout_gamma)
        use = (steps > 0) & visited.any(-1)  # a block the rollout finished keeps its mask
        masked = torch.where(use[:, None], visited, masked)
        t = masked.sum(-1).float() / BLOCK
        rollout = {"rollout_commits": committed, "rollout_err": wrong / max(committed, 1)}
    logits = masked_logits(lm, targets, cache, masked, t)
    tgt = targets[masked]
    ce = F.cross_entropy(logits, tgt)
    logp = torch.log_softmax(logits, dim=-1)
    with torch.no_grad():
        right = logits.argmax(-1) == tgt
        conf = logp.max(-1).values.exp()
    loss = ce
    if cf_weight > 0 and right.any():
        entropy = -(logp.exp() * logp).sum(-1)
        loss = ce + cf_weight * entropy[right].mean()
    stats = {"ce": ce.item(), "acc": float(right.float().mean()),
             "conf_gt_0.8": float((conf > 0.8).float().mean()), **rollout}  # fmt: skip
    if doubt_weight > 0 and not right.all():
        wrong_conf = logp[~right].max(-1).values.exp().mean()
        loss = loss + doubt_weight * wrong_conf
        stats["wrong_conf"] = wrong_conf.item()
    if teacher is not None and cfg.kl_weight > 0:
        # KL(AR || denoiser) at the chosen positions, indexed among the masked ones.
        sel = kl_positions(masked, cfg.kl_scope)[masked]
        teacher = teacher.clone()
        teacher[..., MASK_ID] = -1e12  # renormalised without the mask token, as the student
        p_ar = torch.log_softmax(teacher[masked][sel] / cfg.kl_temperature, dim=-1)
        kl = F.kl_div(logp[sel], p_ar, log_target=True, reduction="batchmean")
        loss = loss + cfg.kl_weight * kl
        stats["kl"] = kl.item()
    return loss, stats


# 3. training --------------------------------------------------------------------------------------
def train(lm, seqs: torch.Tensor, real: torch.Tensor, cfg: DistillConfig,
          log: Callable[[dict], None], on_cf_start: Callable[[], None] | None = None,
          max_steps: int | None = None) -> dict:  # fmt: skip
    """Fine-tune ``lm`` (float32, trainable tensors) in place on ``seqs`` (+ ``real`` text rows);
    ``log`` gets every step's record; ``on_cf_start`` runs once, just before certainty forcing
    starts. ``max_steps`` caps the run (tests); the time budget is ``cfg.minutes``."""
    sc = StageConfig(steps=max_steps or 10**9, minutes=cfg.minutes, batch_size=cfg.batch,
                     lr=cfg.lr, warmup=cfg.warmup, bias_rate=cfg.bias_rate,
                     seed=cfg.seed)  # fmt: skip
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    lm.requires_grad_(False)
    modules = {"denoiser_tower": lm.denoiser_tower, "lm_head": lm.lm_head,
               "t_embedder": lm.t_embedder, "t_block": lm.t_block,
               "scale_shift_tables": lm.scale_shift_tables}  # fmt: skip
    params = []
    for prefix, module in modules.items():
        for name, p in module.named_parameters():
            if not name.endswith("e_score_correction_bias"):  # moved by the balancer
                p.requires_grad_(True)
                params.append((f"{prefix}.{name}", p))
    opt = make_optimizer(params, sc)
    balancer = RouterBalancer(routers_of(lm.denoiser_tower), sc.bias_rate)
    sched = Schedule(sc)
    set_scan_chunk(lm, BLOCK)
    first_block = cfg.prompt_len // BLOCK
    n_real = round(cfg.real_frac * cfg.batch)
    step, t0, cf_start_step = 0, time.time(), None
    try:
        while sched.progress(step) < 1.0:
            progress = sched.progress(step)
            cf = cfg.cf_weight if (cfg.cf_weight > 0 and progress >= cfg.cf_start) else 0.0
            doubt = cfg.doubt_weight if progress >= cfg.cf_start else 0.0
            if cf and cf_start_step is None:
                if on_cf_start is not None:
                    on_cf_start()
                cf_start_step = step
                print(f"[distill] step {step}: certainty forcing on (weight {cf})", flush=True)
            onpolicy = cfg.onpolicy_weight > 0 and progress >= cfg.onpolicy_start
            kl = cfg.kl_weight > 0 or onpolicy
            lr = sched.lr(step)
            for group in opt.param_groups:
                group["lr"] = lr
            pick = torch.randint(0, len(seqs), (cfg.batch - n_real,), generator=g)
            parts = [rows_of(lm, seqs[pick], first_block, teacher=kl)]
            if n_real:
                windows = random_windows(real, n_real, seqs.shape[1], g)
                parts.append(rows_of(lm, windows, 1, teacher=kl))
            targets, cache, teacher = concat_rows(parts)
            loss, stats = step_loss(lm, targets, cache, cfg, g, cf, teacher, doubt)
            if onpolicy:
                op, op_stats = onpolicy_loss(lm, cache, teacher, cfg, g)
                loss, stats = loss + cfg.onpolicy_weight * op, {**stats, **op_stats}
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_([p for _, p in params], sc.grad_clip)
            opt.step()
            balancer.update()
            log({"step": step, "time_s": round(time.time() - t0, 1), "loss": loss.item(),
                 "lr": lr, "grad_norm": float(gnorm), "cf_weight": cf, "doubt_weight": doubt,
                 **stats})  # fmt: skip
            if step % 10 == 0:
                print(f"[distill] step {step} loss {loss.item():.3f} ce {stats['ce']:.3f} "
                      f"acc {stats['acc']:.3f} conf>0.8 {stats['conf_gt_0.8']:.3f} "
                      f"kl {stats.get('kl', float('nan')):.3f} "
                      f"rollout err {stats.get('rollout_err', float('nan')):.3f} "
                      f"on-policy loss {stats.get('onpolicy_loss', float('nan')):.3f} "
                      f"nll {stats.get('onpolicy_ar_nll', float('nan')):.3f} lr {lr:.1e} "
                      f"({time.time() - t0:.0f}s)", flush=True)  # fmt: skip
            step += 1
    finally:
        lm.requires_grad_(False)
        set_scan_chunk(lm, 0)
    return {
        "steps": step,
        "minutes": round((time.time() - t0) / 60, 1),
        "cf_start_step": cf_start_step,
        "rows_per_step_distill": (cfg.batch - n_real)
        * ((cfg.prompt_len + cfg.gen_tokens) // BLOCK - first_block),
        "rows_per_step_real": n_real * ((cfg.prompt_len + cfg.gen_tokens) // BLOCK - 1),
    }
