"""Issue 15: the evaluation's quality columns when every mode samples instead of decoding greedily.

    python bench/issue15_sampled.py [MODEL_DIR] --data-dir .data [--temperatures 0 0.7 1.0]
        [--seeds 0 1] [--gammas 0.8 0.9] [--append] [--json-out bench/results/issue15_sampled.json]

Issue 15's targets are read greedily (``python -m twotower_rt.train evaluate``: temperature 0 for
every mode), where the default model's distinct-2 is 0.65 of AR's at gamma 0.8. Synthetic text is
usually sampled; this runs the same evaluation (``train.evaluate.evaluate``: 512 held-out prompts
of 32 tokens, 64 new tokens, block 16, 16 steps, the ratios to ``ar`` with their paired-bootstrap
intervals) with AR sampling from softmax(logits / T) and mask diffusion taking Gumbel-max
predictions at T (its confidence stays the untempered probability: TWOTOWER.md section 4), at
each temperature and seed, plus the greedy rows for reference. Quality only, no timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from issue15_distill import report_header, write_report  # noqa: E402

import twotower_rt  # noqa: E402
from twotower_rt.api import DEFAULT_MODEL_DIR  # noqa: E402
from twotower_rt.train import evaluate as ev  # noqa: E402

KEEP = ("mode", "confidence_threshold", "ar_nll", "quality_nll_ratio", "next_block_accuracy",
        "quality_accuracy_ratio", "distinct_2", "distinct_2_ratio", "distinct_3",
        "tokens_per_forward", "ci95")  # fmt: skip


def run(
    model, prompts, truths, gammas, temperatures, seeds, new_tokens: int = ev.NEW_TOKENS
) -> list[dict]:
    """One block of rows per (temperature, seed): ``ar`` then mask diffusion at each gamma;
    temperature 0 (greedy) once, whatever the seeds. Each prompt draws from its own stream
    (row i of seed s: s * len(prompts) + i): one seed for every row would give every row the
    same uniforms, so the rows' samples would move together and the corpus's distinct n-grams
    would not be those of independent draws."""
    modes = [("ar", None)] + [("mask_diffusion", g) for g in gammas]
    out = []
    for temperature in temperatures:
        for seed in [None] if temperature <= 0 else seeds:
            per_row = (
                None if seed is None else [seed * len(prompts) + i for i in range(len(prompts))]
            )
            rows = ev.evaluate(model, prompts, truths, new_tokens, modes,
                               temperature=temperature, seed=per_row)  # fmt: skip
            out.append({"temperature": temperature, "seed": seed,
                        "rows": [{k: r.get(k) for k in KEEP} for r in rows]})  # fmt: skip
    return out


def _as_list(command) -> list:
    return command if isinstance(command, list) else [command]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=DEFAULT_MODEL_DIR)
    ap.add_argument("--data-dir", default=str(REPO / ".data"))
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.7, 1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--gammas", type=float, nargs="+", default=[0.8, 0.9])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--append", action="store_true",
                    help="add this run's blocks to those JSON_OUT holds when this run ends "
                    "(this script's run on the same model and prompts at other temperatures, "
                    "e.g. in another process)")  # fmt: skip
    ap.add_argument("--json-out", default=str(REPO / "bench" / "results" / "issue15_sampled.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = twotower_rt.load(args.model, device="cpu", dtype="float32")
    n = ev.PROMPT_LEN
    windows = ev.heldout_windows(model.tokenizer, args.data_dir, args.prompts, n + ev.NEW_TOKENS)
    prompts, truths = [w[:n] for w in windows], [w[n:] for w in windows]
    results = run(model, prompts, truths, args.gammas, args.temperatures, args.seeds)
    report = {
        **report_header(),
        "model": os.path.relpath(os.path.abspath(args.model), REPO),
        "eval": {
            "prompts": len(prompts),
            "prompt_tokens": ev.PROMPT_LEN,
            "new_tokens": ev.NEW_TOKENS,
            "block_size": ev.BLOCK,
            "steps_per_block": 16,
        },  # fmt: skip
        "results": results,
    }
    if args.append:
        with open(args.json_out, encoding="utf-8") as f:
            earlier = json.load(f)
        if earlier["model"] != report["model"] or earlier["eval"] != report["eval"]:
            raise SystemExit(f"{args.json_out} holds another model's or evaluation's rows")
        blocks = earlier["results"] + results
        report["results"] = sorted(blocks, key=lambda b: (b["temperature"], b["seed"] or 0))
        report["command"] = [*_as_list(earlier["command"]), report["command"]]
    write_report(args.json_out, report)
    for block in results:
        for r in block["rows"]:
            print(f"T={block['temperature']} seed={block['seed']} {r['mode']}@"
                  f"{r['confidence_threshold']}: nll {r['quality_nll_ratio']:.3f} "
                  f"distinct-2 {r['distinct_2_ratio']:.2f} acc {r['quality_accuracy_ratio']:.2f}"
                  f" tpf {r['tokens_per_forward']:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
