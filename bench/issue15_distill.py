"""Issue 15: the distillation experiment around ``twotower_rt.train.distill`` (stage 3).

    nice -n 19 python bench/issue15_distill.py [--base DIR] [--minutes 50] [--kl-weight 1] ...
        [--out-dir .data/issue15] [--json-out bench/results/issue15_distill.json]

One command, end to end, CPU, one thread by default: the base model (default: the shipped one)
evaluated; the distillation set (``distill.distill_set``, the training split encoded with the
shipped tokenizer, cached under OUT_DIR); the fine-tune (``distill.train``: every option below
is a field of ``distill.DistillConfig``, whose defaults are the shipped recipe); the weights
just before certainty forcing (``candidate_nocf``) and at the end (``candidate``) saved under
OUT_DIR (bf16 like the shipped model, plus float32) and evaluated like the base
(``train.evaluate``'s held-out prompts, 512 x 32 tokens -> 64 new (``--eval-prompts``; the
reports before 2026-12-06 used 64 prompts), greedy, block 16, 16 steps: ``ar`` and
``mask_diffusion`` at gamma 0.5 / 0.7 / 0.8 / 0.9; tokens per denoiser forward,
next-block accuracy, AR-NLL, distinct-2/3 and the ratios to AR; no wall-clock throughput); the
report to ``--json-out``. ``python -m twotower_rt.train distill`` runs the same fine-tune as a
stage of the trainer, without the evaluations.
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
from safetensors.torch import load_file, save_file  # noqa: E402

import twotower_rt  # noqa: E402
from twotower_rt.api import DEFAULT_MODEL_DIR  # noqa: E402
from twotower_rt.checkpoint import build_model  # noqa: E402
from twotower_rt.env import cpu_report  # noqa: E402
from twotower_rt.train import data, distill  # noqa: E402
from twotower_rt.train.evaluate import evaluate as evaluate_modes  # noqa: E402
from twotower_rt.train.evaluate import heldout_windows, mode_key, run_mode  # noqa: E402
from twotower_rt.train.tokenizer import encode_documents  # noqa: E402

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


# 3. training --------------------------------------------------------------------------------------
def save_candidate(lm, out: str, base: str = DEFAULT_MODEL_DIR) -> None:
    """``lm``'s weights to ``out`` (bf16 as shipped, plus float32), with ``base``'s config and
    tokenizer (a wider base, ``bench/issue15_widen.py``, has its own config)."""
    os.makedirs(out, exist_ok=True)
    state = {
        k: v.detach().to(torch.bfloat16).contiguous() for k, v in sorted(lm.state_dict().items())
    }
    save_file(state, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt", "source": "bench/issue15_distill.py"})  # fmt: skip
    save_file({k: v.detach().contiguous() for k, v in lm.state_dict().items()},
              os.path.join(out, "float32.safetensors"))  # fmt: skip
    for f in ("config.json", "tokenizer.json"):
        shutil.copyfile(os.path.join(base, f), os.path.join(out, f))


def train(lm, seqs: torch.Tensor, real: torch.Tensor, args, log) -> dict:
    """``train.distill.train``, keeping the weights just before certainty forcing starts
    (``candidate_nocf``) and at the end (``candidate``)."""
    nocf = os.path.join(args.out_dir, "candidate_nocf")
    training = distill.train(lm, seqs, real, distill.recipe_from(args), log,
                             on_cf_start=lambda: save_candidate(lm, nocf, args.base))  # fmt: skip
    save_candidate(lm, os.path.join(args.out_dir, "candidate"), args.base)
    return training


# 4. evaluation ------------------------------------------------------------------------------------
def modes(gammas=GAMMAS) -> list[tuple]:
    return [("ar", None)] + [("mask_diffusion", g) for g in gammas]


def evaluate(model, prompts, truths, new_tokens: int, gammas=GAMMAS) -> list[dict]:
    """``train.evaluate``'s quality rows: ``ar``, then mask diffusion at each gamma."""
    return evaluate_modes(model, prompts, truths, new_tokens, modes(gammas))


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


def report_header() -> dict:
    """What every issue-15 report starts with: the issue, when, at which commit, where, how."""
    return {
        "issue": 15,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD"),
        "machine": {"platform": platform.platform(), "cpu": cpu_report()},
        "command": "python " + " ".join(sys.argv),
    }


def base_label(base: str) -> str:
    """How a report names the model a run starts from (``--base``)."""
    if os.path.abspath(base) == os.path.abspath(DEFAULT_MODEL_DIR):
        return "shipped default model"
    return os.path.relpath(os.path.abspath(base), REPO)


def write_report(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"report -> {path}")


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
        for mode, gamma in modes(args.gammas):
            out, _ = run_mode(model, [prompts[0]], mode, gamma, args.eval_new_tokens)
            samples[mode_key(mode, gamma)] = model.decode(out.generated[0])
        extra[os.path.relpath(os.path.abspath(path), REPO)] = {
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "commit": _git("rev-parse", "HEAD"),
            "results": rows,
            "samples": samples,
        }
    write_report(args.json_out, report)
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
    distill.add_recipe_args(ap)  # --minutes, --lr, --kl-weight, ...: DistillConfig's fields
    ap.add_argument("--distill-prompts", dest="prompts", type=int, default=argparse.SUPPRESS,
                    help="the same as --prompts (its earlier name)")  # fmt: skip
    ap.add_argument("--eval-prompts", type=int, default=512)
    ap.add_argument("--skip-base-eval", action="store_true",
                    help="do not evaluate the base (a run from a base another report has "
                    "evaluated); the report's before.results is then null")  # fmt: skip
    ap.add_argument("--eval-new-tokens", type=int, default=64)
    ap.add_argument(
        "--eval-only",
        nargs="+",
        metavar="MODEL_DIR",
        default=None,
        help="no training: evaluate these checkpoint dirs at --gammas and add the "
        "rows to JSON_OUT's extra_eval (plus a decoded sample per gamma)",
    )
    ap.add_argument("--gammas", type=float, nargs="+", default=list(GAMMAS),
                    help="--eval-only's gammas; a training run's evaluations (before "
                    "and after) take the four defaults, so every run's curve has them")  # fmt: skip
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

    base_name = base_label(args.base)
    before = None
    if not args.skip_base_eval:
        print(f"[eval] the base: {base_name}", flush=True)
        before = evaluate(shipped, prompts, truths, args.eval_new_tokens)

    stream = train_stream(tok, args.data_dir, args.out_dir)
    t0 = time.time()
    seqs = distill.distill_set(shipped, stream, distill.recipe_from(args), args.out_dir)
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
            "cpu": cpu_report(),
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
            "model": base_name,
            "results": before,
            "target_met": None if before is None else target_met(before),
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
    write_report(args.json_out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
