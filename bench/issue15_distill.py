"""Issue 15: fine-tune the shipped default model's denoiser on the AR tower's own greedy text.

    nice -n 19 python bench/issue15_distill.py [--minutes 50] [--distill-prompts 8192]
        [--out-dir .data/issue15] [--json-out bench/results/issue15_distill.json]

One command, end to end, CPU, one thread by default:

1. Token stream: the training split (``.data/corpus/train.txt``; ``train.data.prepare`` fetches
   it if missing) encoded with the *shipped* tokenizer, so token ids are the default model's.
2. Distillation set (sequence-level distillation): ``--distill-prompts`` windows of
   ``--prompt-len`` tokens from the training stream (no document end inside), each continued by
   the AR (context) tower, ``mode="ar"``, greedy, ``--gen-tokens`` new tokens, batched. Greedy
   continuations are a deterministic function of the context, so a denoiser can in principle be
   confident on them. Cached under OUT_DIR.
3. Fine-tune from the shipped weights (float32): the context tower frozen, the denoiser tower +
   ``lm_head`` + time conditioning trained (as ``train.train.run_stage("diffusion")``). Each step
   takes ``--batch`` distillation sequences, runs the frozen context tower over them once
   (``train.train.context_rows``) and trains on every block made of generated tokens (blocks at
   or after the prompt), plus optionally ``--real-frac`` of rows from real training text.
   Masks match inference: a block at inference is denoised with exactly 16, 15, ..., 1 masked
   positions (fewer forwards when several commit at once), t = masked fraction. So: with
   probability ``--p-full`` a fully masked block, else an exact count drawn uniformly from
   1..S; the masked positions are, with probability ``--p-suffix``, the last ones of the block
   (the left-to-right order a distilled denoiser tends to commit in), else random.
   Loss: cross-entropy on masked positions. From progress ``--cf-start`` on (time-based, like
   the LR schedule) a certainty-forcing term (dParallel): ``--cf-weight`` x the mean entropy of
   the predicted distribution at masked positions whose argmax is already the target.
   The weights just before certainty forcing starts are kept too (``candidate_nocf``).
4. Evaluation (``train.evaluate``'s held-out prompts, 64 x 32 tokens -> 64 new, greedy,
   block 16, 16 steps): ``ar`` and ``mask_diffusion`` at gamma 0.5 / 0.7 / 0.8 / 0.9 for the
   shipped model and every candidate: tokens per denoiser forward, next-block accuracy, AR-NLL,
   distinct-2 and the ratios to AR. No wall-clock throughput.
5. Candidates saved (bf16 like the shipped model, plus the shipped config and tokenizer) under
   OUT_DIR/candidate*/ (git-ignored); the report to ``--json-out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import twotower_rt  # noqa: E402
from twotower_rt.api import DEFAULT_MODEL_DIR  # noqa: E402
from twotower_rt.checkpoint import build_model  # noqa: E402
from twotower_rt.train import data  # noqa: E402
from twotower_rt.train.evaluate import evaluate as evaluate_modes  # noqa: E402
from twotower_rt.train.evaluate import heldout_windows  # noqa: E402
from twotower_rt.train.model_init import set_scan_chunk  # noqa: E402
from twotower_rt.train.tokenizer import EOS_ID, MASK_ID, encode_documents  # noqa: E402
from twotower_rt.train.train import (  # noqa: E402
    RouterBalancer,
    Schedule,
    StageConfig,
    context_rows,
    make_optimizer,
    random_windows,
    routers_of,
)

GAMMAS = (0.5, 0.7, 0.8, 0.9)
BLOCK, STEPS = 16, 16


# 1. data ------------------------------------------------------------------------------------------
def train_stream(tok, data_dir: str, out_dir: str) -> torch.Tensor:
    path = os.path.join(out_dir, "train_ids.npy")
    if not os.path.isfile(path):
        corpus = os.path.join(data_dir, "corpus", "train.txt")
        if not os.path.isfile(corpus):
            data.prepare(data_dir)
        ids = np.asarray(encode_documents(tok, data.read_documents(corpus)), dtype=np.uint16)
        np.save(path, ids)
    return torch.from_numpy(np.load(path).astype(np.int64))


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


def distill_set(model, stream, args) -> torch.Tensor:
    """(N, prompt_len + gen_tokens): training prompts + the AR tower's greedy continuations."""
    path = os.path.join(args.out_dir, f"distill_{args.distill_prompts}x{args.prompt_len}"
                        f"+{args.gen_tokens}_seed{args.seed}.npy")  # fmt: skip
    if os.path.isfile(path):
        return torch.from_numpy(np.load(path).astype(np.int64))
    prompts = prompt_windows(stream, args.distill_prompts, args.prompt_len, args.seed)
    t0, seqs = time.time(), []
    for i in range(0, len(prompts), args.gen_batch):
        out = model.generate(prompts[i : i + args.gen_batch].tolist(), mode="ar",
                             max_new_tokens=args.gen_tokens, temperature=0.0)  # fmt: skip
        seqs += out.sequences
        print(f"[distill] {len(seqs)}/{len(prompts)} sequences ({time.time() - t0:.0f}s)",
              flush=True)  # fmt: skip
    arr = np.asarray(seqs, dtype=np.uint16)
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
    from twotower_rt.model.cache import ContextCache

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
    first = masked & (masked.cumsum(-1) == 1)
    return first


def step_loss(lm, targets, cache, args, g, cf_weight: float, teacher=None):
    masked, t = inference_masks(targets.shape[0], BLOCK, args.p_full, args.p_suffix, g)
    noisy = torch.where(masked, torch.full_like(targets, MASK_ID), targets)
    logits = lm.denoiser_logits(noisy, cache, prefix_len=cache.lengths, mamba_states=cache.mamba,
                                t=t)[masked]  # fmt: skip
    logits[:, MASK_ID] = -1e12  # as at inference: the mask token is never predicted
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
             "conf_gt_0.8": float((conf > 0.8).float().mean())}  # fmt: skip
    if teacher is not None and args.kl_weight > 0:
        # KL(AR || denoiser) at the chosen positions, indexed among the masked ones.
        sel = kl_positions(masked, args.kl_scope)[masked]
        teacher = teacher.clone()
        teacher[..., MASK_ID] = -1e12  # renormalised without the mask token, as the student
        p_ar = torch.log_softmax(teacher[masked][sel], dim=-1)
        kl = F.kl_div(logp[sel], p_ar, log_target=True, reduction="batchmean")
        loss = loss + args.kl_weight * kl
        stats["kl"] = kl.item()
    return loss, stats


# 3. training --------------------------------------------------------------------------------------
def save_candidate(lm, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    state = {
        k: v.detach().to(torch.bfloat16).contiguous() for k, v in sorted(lm.state_dict().items())
    }
    save_file(state, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt", "source": "bench/issue15_distill.py"})  # fmt: skip
    save_file({k: v.detach().contiguous() for k, v in lm.state_dict().items()},
              os.path.join(out, "float32.safetensors"))  # fmt: skip
    for f in ("config.json", "tokenizer.json"):
        shutil.copyfile(os.path.join(DEFAULT_MODEL_DIR, f), os.path.join(out, f))


def train(lm, seqs: torch.Tensor, real: torch.Tensor, args, log) -> dict:
    sc = StageConfig(steps=10**9, minutes=args.minutes, batch_size=args.batch, lr=args.lr,
                     warmup=args.warmup, bias_rate=args.bias_rate, seed=args.seed)  # fmt: skip
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
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
    first_block = args.prompt_len // BLOCK
    n_real = round(args.real_frac * args.batch)
    step, t0, nocf_saved, cf_start_step = 0, time.time(), False, None
    while sched.progress(step) < 1.0:
        progress = sched.progress(step)
        cf = args.cf_weight if (args.cf_weight > 0 and progress >= args.cf_start) else 0.0
        if cf and not nocf_saved:
            save_candidate(lm, os.path.join(args.out_dir, "candidate_nocf"))
            nocf_saved, cf_start_step = True, step
            print(f"[train] step {step}: certainty forcing on (weight {cf})", flush=True)
        lr = sched.lr(step)
        for group in opt.param_groups:
            group["lr"] = lr
        pick = torch.randint(0, len(seqs), (args.batch - n_real,), generator=g)
        kl = args.kl_weight > 0
        parts = [rows_of(lm, seqs[pick], first_block, teacher=kl)]
        if n_real:
            parts.append(rows_of(lm, random_windows(real, n_real, seqs.shape[1], g), 1, kl))
        targets, cache, teacher = concat_rows(parts)
        loss, stats = step_loss(lm, targets, cache, args, g, cf, teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_([p for _, p in params], sc.grad_clip)
        opt.step()
        balancer.update()
        rec = {"step": step, "time_s": round(time.time() - t0, 1), "loss": loss.item(),
               "lr": lr, "grad_norm": float(gnorm), "cf_weight": cf, **stats}  # fmt: skip
        log(rec)
        if step % 10 == 0:
            print(f"[train] step {step} loss {float(loss):.3f} ce {stats['ce']:.3f} "
                  f"acc {stats['acc']:.3f} conf>0.8 {stats['conf_gt_0.8']:.3f} "
                  f"kl {stats.get('kl', float('nan')):.3f} lr {lr:.1e} "
                  f"({time.time() - t0:.0f}s)", flush=True)  # fmt: skip
        step += 1
    lm.requires_grad_(False)
    set_scan_chunk(lm, 0)
    save_candidate(lm, os.path.join(args.out_dir, "candidate"))
    return {
        "steps": step,
        "minutes": round((time.time() - t0) / 60, 1),
        "cf_start_step": cf_start_step,
        "rows_per_step_distill": (args.batch - n_real)
        * ((args.prompt_len + args.gen_tokens) // BLOCK - first_block),
        "rows_per_step_real": n_real * ((args.prompt_len + args.gen_tokens) // BLOCK - 1),
    }


# 4. evaluation ------------------------------------------------------------------------------------
def evaluate(model, prompts, truths, new_tokens: int, gammas=GAMMAS) -> list[dict]:
    """``train.evaluate``'s quality rows: ``ar``, then mask diffusion at each gamma."""
    modes = [("ar", None)] + [("mask_diffusion", g) for g in gammas]
    return evaluate_modes(model, prompts, truths, new_tokens, modes)


def target_met(rows) -> bool:
    g08 = next(r for r in rows if r["confidence_threshold"] == 0.8)
    return bool(g08["quality_nll_ratio"] >= 0.95 and (g08["quality_accuracy_ratio"] or 0) >= 0.95
                and g08["tokens_per_forward"] >= 1.5)  # fmt: skip


def _git(*cmd) -> str:
    try:
        return subprocess.run(["git", *cmd], capture_output=True, text=True, check=True,
                              cwd=REPO).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def eval_only(args) -> int:
    torch.set_num_threads(args.threads)
    with open(args.json_out, encoding="utf-8") as f:
        report = json.load(f)
    extra = report.setdefault("extra_eval", {})
    for path in args.eval_only:
        model = twotower_rt.load(path)
        windows = heldout_windows(model.tokenizer, args.data_dir, args.eval_prompts,
                                  args.prompt_len + args.eval_new_tokens)  # fmt: skip
        prompts = [w[: args.prompt_len] for w in windows]
        truths = [w[args.prompt_len :] for w in windows]
        rows = evaluate(model, prompts, truths, args.eval_new_tokens, args.gammas)
        samples = {"prompt": model.decode(prompts[0])}
        for mode, gamma in [("ar", None)] + [("mask_diffusion", g) for g in args.gammas]:
            params = dict(max_new_tokens=args.eval_new_tokens, temperature=0.0)
            if gamma is not None:
                params.update(block_size=BLOCK, steps_per_block=STEPS, confidence_threshold=gamma)
            out = model.generate([prompts[0]], mode=mode, **params)
            samples[f"{mode}@{gamma}" if gamma else mode] = model.decode(out.generated[0])
        extra[os.path.relpath(os.path.abspath(path), REPO)] = {
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "commit": _git("rev-parse", "HEAD"),
            "results": rows,
            "samples": samples,
        }
    with open(args.json_out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"report -> {args.json_out}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data-dir", default=str(REPO / ".data"))
    ap.add_argument("--out-dir", default=str(REPO / ".data" / "issue15"))
    ap.add_argument("--json-out", default=str(REPO / "bench" / "results" / "issue15_distill.json"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--base",
        default=DEFAULT_MODEL_DIR,
        help="the model to fine-tune (default: the shipped one). The shipped model "
        "is this script's run on the stage-2 model of python -m twotower_rt.train, "
        "which commit 0b9823a shipped: see the README to reproduce it",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--distill-prompts", type=int, default=8192)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=96)
    ap.add_argument("--gen-batch", type=int, default=256)
    ap.add_argument("--minutes", type=float, default=50.0)
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--bias-rate", type=float, default=1e-3)
    ap.add_argument(
        "--real-frac",
        type=float,
        default=0.0,
        help="share of each step's sequences that are real training text",
    )
    ap.add_argument("--p-full", type=float, default=0.25)
    ap.add_argument("--p-suffix", type=float, default=0.5)
    ap.add_argument("--cf-start", type=float, default=0.6)
    ap.add_argument("--cf-weight", type=float, default=0.5)
    ap.add_argument(
        "--kl-weight",
        type=float,
        default=0.0,
        help="weight of a soft-target term: KL(AR tower || denoiser) at --kl-scope positions",
    )
    ap.add_argument("--kl-scope", choices=("first", "all"), default="first")
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--eval-new-tokens", type=int, default=64)
    ap.add_argument(
        "--eval-only",
        nargs="+",
        metavar="MODEL_DIR",
        default=None,
        help="no training: evaluate these checkpoint dirs at --gammas and add the "
        "rows to JSON_OUT's extra_eval (plus a decoded sample per gamma)",
    )
    ap.add_argument("--gammas", type=float, nargs="+", default=list(GAMMAS))
    args = ap.parse_args()
    if args.eval_only:
        return eval_only(args)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out_dir, exist_ok=True)
    t_start = time.time()

    shipped = twotower_rt.load(args.base, device="cpu", dtype="float32")
    tok = shipped.tokenizer
    windows = heldout_windows(tok, args.data_dir, args.eval_prompts,
                              args.prompt_len + args.eval_new_tokens)  # fmt: skip
    prompts = [w[: args.prompt_len] for w in windows]
    truths = [w[args.prompt_len :] for w in windows]

    print("[eval] shipped default model", flush=True)
    before = evaluate(shipped, prompts, truths, args.eval_new_tokens)

    stream = train_stream(tok, args.data_dir, args.out_dir)
    t0 = time.time()
    seqs = distill_set(shipped, stream, args)
    distill_minutes = (time.time() - t0) / 60
    print(f"[distill] {tuple(seqs.shape)} ({distill_minutes:.1f} min)", flush=True)

    # The shipped weights in float32, as ordinary (trainable) tensors.
    state = load_file(os.path.join(args.base, "model.safetensors"))
    lm = build_model(shipped.config, {k: v.float() for k, v in state.items()})
    del shipped
    with open(os.path.join(args.out_dir, "train_log.jsonl"), "w", encoding="utf-8") as f:

        def log(rec):
            f.write(json.dumps(rec) + "\n")
            f.flush()

        training = train(lm, seqs, stream, args, log)
    print(f"[train] {training}", flush=True)

    after = {}
    for name in ("candidate_nocf", "candidate"):
        path = os.path.join(args.out_dir, name)
        if os.path.isdir(path):
            print(f"[eval] {name}", flush=True)
            after[name] = evaluate(twotower_rt.load(path), prompts, truths, args.eval_new_tokens)

    report = {
        "issue": 15,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD"),
        "worktree_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "recipe": {
            k: v for k, v in vars(args).items() if k not in ("data_dir", "out_dir", "json_out")
        },  # fmt: skip
        "distill_set": {
            "sequences": int(seqs.shape[0]),
            "length": int(seqs.shape[1]),
            "minutes_to_generate": round(distill_minutes, 1),
        },
        "training": training,
        "eval": {
            "prompts": args.eval_prompts,
            "prompt_tokens": args.prompt_len,
            "new_tokens": args.eval_new_tokens,
            "block_size": BLOCK,
            "steps_per_block": STEPS,
            "temperature": 0.0,
            "dtype": "float32 compute, weights rounded to bfloat16 as shipped",
            "source": "train.evaluate.heldout_windows (held-out tail of every document)",
        },
        "before": {
            "model": "shipped default model",
            "results": before,
            "target_met": target_met(before),
        },
        "after": {
            name: {
                "model": os.path.relpath(os.path.join(args.out_dir, name), REPO),
                "results": rows,
                "target_met": target_met(rows),
            }
            for name, rows in after.items()
        },  # fmt: skip
        "total_minutes": round((time.time() - t_start) / 60, 1),
    }
    os.makedirs(os.path.dirname(args.json_out) or ".", exist_ok=True)
    with open(args.json_out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"report -> {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
