"""The verified mode against ar and mask_diffusion on the default model, on this CPU.

    python bench/verified_cpu.py [--batch 1 4 64] [--new-tokens 64] [--repeats 5]
                                 [--draft-steps 1 2 4] [--block-size 16]
                                 [--out bench/results/verified_cpu.json] [--model DIR]

Every configuration generates ``new-tokens`` greedy tokens for ``batch`` distinct prompts (text of
the model's training style) through ``generate`` (the engine; prefill included: it is the same
for every mode). One thread (torch.set_num_threads(1)), one warm-up run per configuration, then
``repeats`` rounds in which the modes alternate; reported: the median wall-clock tokens/s and the
median process-CPU tokens/s (the machine is shared, so CPU time is the steadier figure), and the
per-mode work: for verified the accepted drafts per round, tokens per round and tokens per
forward (denoiser forwards + context passes), for mask_diffusion tokens per denoiser forward and
per forward (denoiser + block commits), for ar 1 token per context forward. Greedy verified
output is checked against ar's on every run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import time

import torch

from twotower_rt.env import cpu_report

TEXTS = [
    "ROMEO. But soft, what light", "And God said, Let there be", "JULIET.", "In the beginning",
    "KING HENRY. Once more unto the breach, dear friends", "The LORD is my shepherd",
    "HAMLET. To be, or not to be, that is the question:", "MACBETH. Is this a dagger",
]  # fmt: skip


def modes(draft_steps, block_size):
    yield "ar", {}
    yield "mask_diffusion", {"confidence_threshold": 0.8}
    for d in draft_steps:
        yield f"verified_d{d}", {"draft_steps": d, "block_size": block_size}


def work(name, out, new_tokens, batch) -> dict:
    tokens = new_tokens * batch
    if name == "ar":
        return {"tokens_per_forward": 1.0}
    if name == "mask_diffusion":
        nfe = sum(out.nfe)
        blocks = sum(len(c) for c in out.commits_per_step)
        return {"tokens_per_denoiser_forward": round(tokens / nfe, 3),
                "tokens_per_forward": round(tokens / (nfe + blocks), 3)}  # fmt: skip
    rounds = [a for row in out.accepted_per_round for a in row]
    forwards = sum(out.nfe) + len(rounds)  # draft forwards + one context pass per round
    return {
        "rounds": len(rounds),
        "accepted_per_round": round(statistics.mean(rounds), 3),
        "tokens_per_round": round(tokens / len(rounds), 3),
        "tokens_per_forward": round(tokens / forwards, 3),
    }


def run(model, prompts, name, params, new_tokens, alone: bool = False):
    """One configuration over ``prompts`` (each alone when ``alone``): the outputs merged into
    one GenerationOutput-like record, wall and CPU seconds."""
    mode = "verified" if name.startswith("verified") else name
    wall, cpu = time.perf_counter(), time.process_time()
    groups = [[p] for p in prompts] if alone else [prompts]
    outs = [model.generate(g, mode=mode, max_new_tokens=new_tokens, **params) for g in groups]
    seconds = time.perf_counter() - wall, time.process_time() - cpu
    out = outs[0]
    for extra in outs[1:]:
        out.sequences += extra.sequences
        out.nfe += extra.nfe
        if out.commits_per_step is not None:
            out.commits_per_step += extra.commits_per_step
        if out.accepted_per_round is not None:
            out.accepted_per_round += extra.accepted_per_round
    return out, *seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 64])
    parser.add_argument("--new-tokens", type=int, default=64, help="a multiple of 16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--draft-steps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--block-size", type=int, default=16, help="verified rows' block size")
    parser.add_argument("--out", default="bench/results/verified_cpu.json")
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    parser.add_argument("--single", type=int, default=1,
                        help="batch 1: this many distinct prompts, each alone")  # fmt: skip
    args = parser.parse_args()
    import twotower_rt

    torch.set_num_threads(1)
    model = twotower_rt.load(args.model, device="cpu", dtype="float32")
    rows = []
    for batch in args.batch:
        alone = batch == 1 and args.single > 1
        count = args.single if alone else batch
        prompts = [model.encode(TEXTS[i % len(TEXTS)]) for i in range(count)]
        configs = list(modes(args.draft_steps, args.block_size))
        times = {name: ([], []) for name, _ in configs}
        outs = {}
        for name, params in configs:  # warm-up
            outs[name] = run(model, prompts, name, params, args.new_tokens, alone)[0]
        for _ in range(args.repeats):
            for name, params in configs:  # the modes alternate within each repeat
                out, wall, cpu = run(model, prompts, name, params, args.new_tokens, alone)
                times[name][0].append(wall)
                times[name][1].append(cpu)
                if name.startswith("verified") and out.sequences != outs["ar"].sequences:
                    raise SystemExit(f"{name} at batch {batch}: greedy output differs from ar")
        row = {"batch": batch, "prompts": count, "each_alone": alone}
        tokens = count * args.new_tokens
        for name, _ in configs:
            wall, cpu = statistics.median(times[name][0]), statistics.median(times[name][1])
            row[name] = {"tok_s": round(tokens / wall, 2), "cpu_tok_s": round(tokens / cpu, 2),
                         **work(name, outs[name], args.new_tokens, count)}  # fmt: skip
        for name, _ in configs:
            if name.startswith("verified"):
                row[name]["over_ar"] = round(row[name]["tok_s"] / row["ar"]["tok_s"], 3)
                row[name]["cpu_over_ar"] = round(row[name]["cpu_tok_s"] / row["ar"]["cpu_tok_s"], 3)
                row[name]["over_mask_diffusion"] = round(
                    row[name]["tok_s"] / row["mask_diffusion"]["tok_s"], 3
                )
        rows.append(row)
        line = "  ".join(f"{n} {row[n]['tok_s']:7.1f} ({row[n]['cpu_tok_s']:7.1f} cpu)"
                         for n, _ in configs)  # fmt: skip
        print(f"B={batch:3d} tok/s  {line}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    commit = commit.strip() + ("+uncommitted-changes" if dirty else "")
    result = {
        "benchmark": "verified_cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_report(),
            "torch": torch.__version__,
            "threads": 1,
        },  # fmt: skip
        "model": args.model or "default (python/twotower_rt/default_model)",
        "new_tokens": args.new_tokens,
        "verified_block_size": args.block_size,
        "repeats": args.repeats,
        "timing": "median over repeats of whole generate() calls (prefill included), modes "
        "alternating; wall clock and process CPU time; greedy; measured",
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
