"""Issue 15: where mask diffusion loses AR quality, commit by commit.

    python bench/issue15_commits.py [--model DIR] [--gamma 0.8] [--data-dir .data]
        [--json-out bench/results/issue15_commits.json]

``train.evaluate``'s held-out prompts (512 x 32 tokens -> 64 new, greedy, block 16, 16 steps),
each generated alone with ``mode="mask_diffusion"``. Every decision step of the engine is logged
(the engine's decision op, ``engine.steps.mask_sampling``, wrapped for the run), so each generated
token is known with the step that committed it: its confidence, whether the rule forced it (the
schedule's minimum, confidence <= gamma) or it passed the threshold, and whether every position
to its left was committed before ("frontier": where the denoiser sees what AR sees) or not
("ahead"). Each token is then scored by the AR (context) tower, teacher-forced on the final text:
its NLL (the ``quality_nll_ratio`` of ``train.evaluate`` is mean NLL of ``ar`` / of the mode), and
whether it is the AR tower's own argmax there. The report bins commits by kind and confidence:
how calibrated the commits are, and which ones carry the NLL gap (tokens with NLL > 6, i.e. AR
probability < 0.25%).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

import torch  # noqa: E402

import twotower_rt  # noqa: E402
from twotower_rt.engine import steps as engine_steps  # noqa: E402
from twotower_rt.train.evaluate import ar_token_scores, heldout_windows, run_mode  # noqa: E402
from twotower_rt.train.tokenizer import MASK_ID  # noqa: E402

BLOCK = 16
BINS = ((0.0, 0.8), (0.8, 0.9), (0.9, 0.95), (0.95, 0.99), (0.99, 1.01))
CATASTROPHIC_NLL = 6.0


def generate_logged(model, prompt: list[int], gamma: float, new_tokens: int):
    """(generated tokens, [(block before, block after, confidence)] per decision step, the
    denoiser forwards the engine counted)."""
    steps = []
    decide = engine_steps.mask_sampling

    def logged(logits, block, **kw):
        out = decide(logits, block, **kw)
        steps.append((block[0].clone(), out.block[0].clone(), out.confidence[0].clone()))
        return out

    engine_steps.mask_sampling = logged
    try:
        out, _ = run_mode(model, [prompt], "mask_diffusion", gamma, new_tokens)
    finally:
        engine_steps.mask_sampling = decide
    return list(out.generated[0]), steps, sum(out.nfe)


def commits_of(steps, gamma: float) -> list[dict]:
    """One record per committed position, in generation order: block, position, confidence,
    forced or not, frontier or ahead."""
    records, block_index, filled = [], 0, 0
    for before, after, conf in steps:
        new = torch.nonzero(before != after).squeeze(-1).tolist()
        for i in new:
            left_known = all(int(before[j]) != MASK_ID for j in range(i))
            records.append({"pos": block_index * BLOCK + i, "confidence": float(conf[i]),
                            "forced": bool(conf[i] <= gamma), "frontier": left_known})  # fmt: skip
        filled += len(new)
        if filled >= BLOCK:
            block_index, filled = block_index + 1, 0
    return records


def summarise(rows: list[dict], total_nll: float) -> dict:
    n = len(rows)
    nll = sum(r["nll"] for r in rows)
    return {
        "commits": n,
        "ar_argmax_agreement": sum(r["agree"] for r in rows) / n if n else None,
        "mean_nll": nll / n if n else None,
        "share_of_all_nll": nll / total_nll,
        "catastrophic": sum(r["nll"] > CATASTROPHIC_NLL for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    ap.add_argument("--gamma", type=float, default=0.8)
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--data-dir", default=str(REPO / ".data"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json-out", default=str(REPO / "bench" / "results" / "issue15_commits.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = twotower_rt.load(args.model) if args.model else twotower_rt.load()
    windows = heldout_windows(model.tokenizer, args.data_dir, args.prompts,
                              args.prompt_len + args.new_tokens)  # fmt: skip
    prompts = [w[: args.prompt_len] for w in windows]
    gens, per_prompt, n_steps = [], [], 0
    for prompt in prompts:
        gen, steps, nfe = generate_logged(model, prompt, args.gamma, args.new_tokens)
        gens.append(gen)
        per_prompt.append(commits_of(steps, args.gamma))
        n_steps += nfe
    ar_gens = [list(g) for g in run_mode(model, prompts, "ar", None, args.new_tokens)[0].generated]
    nll, agree = ar_token_scores(model.lm, prompts, gens)
    ar_nll = float(ar_token_scores(model.lm, prompts, ar_gens)[0].mean())

    rows = []
    for r, records in enumerate(per_prompt):
        for rec in records:
            if rec["pos"] < args.new_tokens:
                rows.append({**rec, "nll": float(nll[r, rec["pos"]]),
                             "agree": bool(agree[r, rec["pos"]])})  # fmt: skip
    total = sum(r["nll"] for r in rows)
    groups = defaultdict(list)
    for row in rows:
        kind = ("forced" if row["forced"] else "above") + ("_frontier" if row["frontier"]
                                                          else "_ahead")  # fmt: skip
        groups[kind].append(row)
        lo, hi = next(b for b in BINS if b[0] <= row["confidence"] < b[1])
        groups[f"{kind} conf [{lo}, {min(hi, 1.0)})"].append(row)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip()
        or "unknown",
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "command": "python " + " ".join(sys.argv),
        "model": args.model or "twotower_rt/default_model",
        "gamma": args.gamma,
        "definitions": {
            "frontier": "every position to the left in the block was committed before this step",
            "ahead": "some position to the left was still masked when this one was committed",
            "forced": "committed by the schedule's minimum with confidence <= gamma",
            "ar_argmax_agreement": "share of the commits that are the AR tower's argmax given "
            "the final text before them",
            "catastrophic": f"commits whose AR-tower NLL exceeds {CATASTROPHIC_NLL}",
        },
        "ar_mean_nll": ar_nll,
        "mask_diffusion_mean_nll": float(nll.mean()),
        "quality_nll_ratio": ar_nll / float(nll.mean()),
        "tokens_per_forward": len(rows) / n_steps,
        "all": summarise(rows, total),
        "groups": {k: summarise(v, total) for k, v in sorted(groups.items())},
    }
    cat = [r for r in rows if r["nll"] > CATASTROPHIC_NLL]
    report["catastrophic_share_of_nll"] = sum(r["nll"] for r in cat) / total
    os.makedirs(os.path.dirname(args.json_out) or ".", exist_ok=True)
    with open(args.json_out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"gamma {args.gamma}: NLL ratio {report['quality_nll_ratio']:.3f}; "
          f"{len(cat)} of {len(rows)} commits have AR-NLL > {CATASTROPHIC_NLL} and carry "
          f"{report['catastrophic_share_of_nll']:.1%} of the NLL")  # fmt: skip
    for k, v in report["groups"].items():
        print(f"  {k:36s} {v['commits']:5d} commits  agree {v['ar_argmax_agreement']:.2f}  "
              f"mean NLL {v['mean_nll']:.2f}  NLL>6: {v['catastrophic']}")  # fmt: skip
    print(f"report -> {args.json_out}")


if __name__ == "__main__":
    main()
