"""Issue 15 feasibility: how confident is the AR tower on its own samples, and the denoiser today?

    python bench/issue15_feasibility.py [--prompts 64] [--prompt-len 32] [--new-tokens 64]
        [--data-dir .data] [--threads 1] [--out bench/results/issue15_feasibility.json]

The shipped default model (``twotower_rt.load()``, float32, CPU), on held-out prompts
(``train.evaluate.heldout_windows``; ``train.data.prepare`` fetches the pinned sdists if needed).
Nothing is trained here.

1. AR samples: ``mode="ar"`` continuations at temperature 0.7 and 0.8 (seed ``--seed + row``)
   and greedy. The AR (context) tower is then teacher-forced over prompt + continuation (as in
   ``evaluate.ar_nll``); at every generated position its top-token probability given the
   prefix. ``p[g]`` = share of positions with top probability > g, and ``acc[g]`` = how often
   that top token is the token actually generated (1.0 by construction for greedy). Issue 15's
   rule of thumb: tokens per forward at gamma 0.8 ~ 1 / (1 - p[0.8]), so 1.5 needs p >= 0.33.
   Also a run-length proxy per block of 16: a forward commits the leftmost masked position
   (its left context complete, so an AR-distilled denoiser could be exact there) plus the
   following positions while their AR confidence > gamma; forwards per block = 1 + the number
   of later positions at or below gamma. It assumes the denoiser is as confident as the AR
   tower's *conditional*, with its masked left neighbours unknown, so it is an upper bound
   in spirit, not a prediction. The same statistics on the true held-out continuations as a
   reference (issue 15 quotes 15% above 0.8, 93% right).
2. The current denoiser: ``mask_diffusion`` greedy, block 16, 16 steps, confidence threshold
   0.8, one prompt at a time (batch 1: no padding rows). Every denoiser forward is recorded
   (``engine.steps.mask_sampling`` wrapped): masked positions before it, how many of them had
   confidence > g, and how many it committed (cross-checked against ``commits_per_step``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

import twotower_rt  # noqa: E402
from twotower_rt.engine import steps as engine_steps  # noqa: E402
from twotower_rt.env import cpu_report  # noqa: E402
from twotower_rt.model.cache import ContextCache  # noqa: E402
from twotower_rt.train.evaluate import heldout_windows  # noqa: E402

GAMMAS = (0.5, 0.7, 0.8, 0.9)
BLOCK, STEPS, MASK_ID = 16, 16, 3


@torch.no_grad()
def ar_confidence(lm, prompts, continuations):
    """(top-token probability, top token == continuation token) at every continuation position,
    teacher-forced through the context tower; tensors (rows, new_tokens)."""
    seqs = torch.tensor([p + c for p, c in zip(prompts, continuations)])
    n_prompt = len(prompts[0])
    cache = ContextCache.allocate(lm.cfg, seqs.shape[0], seqs.shape[1], lm.dtype, lm.device)
    logits = lm.context_logits(lm.context_forward(seqs[:, :-1], cache))[:, n_prompt - 1 :]
    probs = torch.softmax(logits.float(), dim=-1)
    top_p, top_id = probs.max(dim=-1)
    return top_p, top_id == seqs[:, n_prompt:]


def confidence_stats(top_p: torch.Tensor, right: torch.Tensor) -> dict:
    out = {"positions": top_p.numel(), "mean_top_prob": float(top_p.mean())}
    for g in GAMMAS:
        above = top_p > g
        n = int(above.sum())
        p = n / top_p.numel()
        out[f"p_above_{g}"] = p
        out[f"acc_above_{g}"] = float(right[above].float().mean()) if n else None
        out[f"issue_rule_tokens_per_forward_{g}"] = 1 / (1 - p) if p < 1 else None
        # run-length proxy per block of BLOCK positions
        blocks = above.reshape(above.shape[0], -1, BLOCK)
        forwards = 1 + (~blocks[..., 1:]).sum(dim=-1)
        out[f"run_proxy_tokens_per_forward_{g}"] = BLOCK * forwards.numel() / float(forwards.sum())
    out["accuracy_of_top_token"] = float(right.float().mean())
    return out


def distinct_n(seqs, n):
    grams = [tuple(s[i : i + n]) for s in seqs for i in range(len(s) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def denoiser_forwards(model, prompts, new_tokens, gamma):
    """Every denoiser forward of greedy mask diffusion, one prompt at a time."""
    records, original = [], engine_steps.mask_sampling

    def recording(logits, block, **kw):
        out = original(logits, block, **kw)
        masked = block == kw["mask_token_id"]
        conf = out.confidence.float()
        for r in range(block.shape[0]):
            n_masked = int(masked[r].sum())
            if n_masked == 0:
                continue
            rec = {"masked": n_masked, "committed": int((out.block[r] != block[r]).sum())}
            for g in GAMMAS:
                rec[f"above_{g}"] = int((masked[r] & (conf[r] > g)).sum())
            rec["max_conf"] = float(conf[r][masked[r]].max())
            records.append(rec)
        return out

    engine_steps.mask_sampling = recording
    commits, nfe, gen = [], 0, []
    t0 = time.perf_counter()
    try:
        for prompt in prompts:
            out = model.generate([prompt], mode="mask_diffusion", max_new_tokens=new_tokens,
                                 temperature=0.0, block_size=BLOCK, steps_per_block=STEPS,
                                 confidence_threshold=gamma)  # fmt: skip
            nfe += out.nfe[0]
            commits += [c for blk in out.commits_per_step[0] for c in blk]
            gen.append(out.generated[0])
    finally:
        engine_steps.mask_sampling = original
    seconds = time.perf_counter() - t0
    assert len(records) == nfe == len(commits), (len(records), nfe, len(commits))
    assert [r["committed"] for r in records] == commits
    total_masked = sum(r["masked"] for r in records)
    summary = {
        "confidence_threshold": gamma,
        "denoiser_forwards": nfe,
        "generated_tokens": sum(len(g) for g in gen),
        "tokens_per_forward": sum(commits) / nfe,
        "commits_per_forward_histogram": {str(k): commits.count(k) for k in sorted(set(commits))},
        "forwards_with_any_above_threshold": sum(r[f"above_{gamma}"] > 0 for r in records) / nfe,
        "mean_max_masked_confidence": sum(r["max_conf"] for r in records) / nfe,
        "seconds_batch1": seconds,
        "distinct_2": distinct_n(gen, 2),
        "distinct_3": distinct_n(gen, 3),
    }
    for g in GAMMAS:
        above = sum(r[f"above_{g}"] for r in records)
        summary[f"share_masked_above_{g}_pooled"] = above / total_masked
        summary[f"share_masked_above_{g}_mean_per_forward"] = (
            sum(r[f"above_{g}"] / r["masked"] for r in records) / nfe
        )
    # the first forward of each block (all 16 masked): the fully masked case
    first = [r for r in records if r["masked"] == BLOCK]
    summary["first_forward_of_block"] = {
        "forwards": len(first),
        **{
            f"share_above_{g}": sum(r[f"above_{g}"] for r in first) / (BLOCK * len(first))
            for g in GAMMAS
        },  # fmt: skip
    }
    return summary, gen


def git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=REPO).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 0.8])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--gamma", type=float, default=0.8)
    ap.add_argument("--data-dir", default=".data")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "bench/results/issue15_feasibility.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    model = twotower_rt.load(dtype=torch.float32)
    lm = model.lm
    windows = heldout_windows(model.tokenizer, args.data_dir, args.prompts,
                              args.prompt_len + args.new_tokens)  # fmt: skip
    prompts = [w[: args.prompt_len] for w in windows]
    truths = [w[args.prompt_len :] for w in windows]

    ar = {}
    runs = [("greedy", 0.0)] + [(f"temperature_{t}", t) for t in args.temperatures]
    for name, temp in runs:
        params = dict(max_new_tokens=args.new_tokens, temperature=temp)
        if temp > 0:
            params["seed"] = [args.seed + i for i in range(len(prompts))]
        t0 = time.perf_counter()
        out = model.generate(prompts, mode="ar", **params)
        gen = out.generated
        top_p, right = ar_confidence(lm, prompts, gen)
        ar[name] = {"temperature": temp, **confidence_stats(top_p, right),
                    "distinct_2": distinct_n(gen, 2), "distinct_3": distinct_n(gen, 3),
                    "seconds": time.perf_counter() - t0,
                    "sample": model.tokenizer.decode(gen[0])}  # fmt: skip
        print(name, json.dumps({k: v for k, v in ar[name].items() if k != "sample"}), flush=True)
    top_p, right = ar_confidence(lm, prompts, truths)
    heldout = {**confidence_stats(top_p, right), "distinct_2": distinct_n(truths, 2),
               "distinct_3": distinct_n(truths, 3)}  # fmt: skip
    print("heldout_text", json.dumps(heldout), flush=True)

    denoiser, gen = denoiser_forwards(model, prompts, args.new_tokens, args.gamma)
    denoiser["sample"] = model.tokenizer.decode(gen[0])
    print("denoiser", json.dumps({k: v for k, v in denoiser.items() if k != "sample"}), flush=True)

    report = {
        "issue": 15,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "HEAD"),
        "worktree_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_report(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },  # fmt: skip
        "setup": {
            "model": "twotower_rt.load() (shipped default model), float32, CPU",
            "prompts": len(prompts),
            "prompt_tokens": args.prompt_len,
            "new_tokens": args.new_tokens,
            "block_size": BLOCK,
            "steps_per_block": STEPS,
            "seeds": f"seed + row, seed = {args.seed}",
            "prompt_source": "train.evaluate.heldout_windows on .data (held-out tail of "
            "every document, never trained on)",
            "sample_prompt": model.tokenizer.decode(prompts[0]),
        },  # fmt: skip
        "definitions": {
            "p_above_g": "share of generated positions where the AR tower's top-token "
            "probability given the prefix (teacher-forced) is > g",
            "acc_above_g": "among those, share whose top token is the token in the text",
            "issue_rule_tokens_per_forward_g": "1 / (1 - p_above_g), issue 15's rule of thumb",
            "run_proxy_tokens_per_forward_g": "16 / (1 + positions 1..15 of each block of 16 "
            "with AR confidence <= g), averaged over blocks",
            "share_masked_above_g_pooled": "sum over denoiser forwards of masked positions with "
            "confidence > g / sum of masked positions",
            "share_masked_above_g_mean_per_forward": "the same ratio averaged per forward",
            "tokens_per_forward": "sum of commits_per_step / denoiser forwards",
        },  # fmt: skip
        "ar_samples": ar,
        "heldout_text": heldout,
        "denoiser_mask_diffusion": denoiser,
        "target": {"tokens_per_forward": 1.5, "p_needed_by_issue_rule": 1 / 3},
        "seconds_total": time.perf_counter() - t_start,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"report -> {args.out}")


if __name__ == "__main__":
    main()
