"""Issue 15: is the denoiser's confidence a probability? Temperature-scale its head and see.

    python bench/issue15_calibrate.py [--model DIR] [--data-dir .data] [--out-dir .data/calibrate]
        [--json-out bench/results/issue15_calibrate.json]

The commit rule reads the denoiser's top probability as the chance its prediction is right
(commit above gamma). Certainty forcing (stage 3) trains that probability up on purpose. This
script measures the confidence against what it claims, on data the evaluation never sees:

1. a calibration set: the context tower's greedy continuations of ``--prompts`` training-split
   prompts drawn with ``--seed`` (the distillation sets use seeds 0 and 1), built like the
   distillation set (``distill.distill_set``);
2. every generated block of it as one row, masked as the distillation masks them
   (``distill.inference_masks``), run through the denoiser once; the denoiser's logits on the
   masked positions, the mask token excluded as at inference;
3. the temperature tau minimising the cross-entropy of logits / tau against the targets (the
   classic post-hoc calibration: one scalar, argmax unchanged), found by golden-section search
   on log tau;
4. the reliability of the top-1 probability (per confidence bin: share of predictions, accuracy)
   and the expected calibration error, before and after;
5. ``OUT_DIR/calibrated``: the model with the denoiser's head divided by tau (bf16 like the
   shipped model), for ``bench/issue15_distill.py --eval-only``.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from issue15_distill import _git, train_stream, write_report  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import twotower_rt  # noqa: E402
from twotower_rt.api import DEFAULT_MODEL_DIR  # noqa: E402
from twotower_rt.checkpoint import build_model  # noqa: E402
from twotower_rt.train import distill  # noqa: E402
from twotower_rt.train.model_init import set_scan_chunk  # noqa: E402

BLOCK = 16
BINS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


@torch.no_grad()
def masked_logits(lm, seqs: torch.Tensor, prompt_len: int, g: torch.Generator, chunk: int = 64):
    """(logits (N, vocab), targets (N,)) over the masked positions of every generated block."""
    out_logits, out_targets = [], []
    for i in range(0, seqs.shape[0], chunk):
        targets, cache, _ = distill.rows_of(lm, seqs[i : i + chunk], prompt_len // BLOCK)
        masked, t = distill.inference_masks(targets.shape[0], BLOCK, 0.25, 0.5, g)
        out_logits.append(distill.masked_logits(lm, targets, cache, masked, t).float())
        out_targets.append(targets[masked])
    return torch.cat(out_logits), torch.cat(out_targets)


def cross_entropy_at(logits: torch.Tensor, targets: torch.Tensor, tau: float) -> float:
    return float(F.cross_entropy(logits / tau, targets))


def fit_temperature(logits, targets, lo: float = -1.0, hi: float = 2.0, iters: int = 40) -> float:
    """Golden-section search for the tau in [e^lo, e^hi] with the least cross-entropy (it is
    convex in 1/tau, so unimodal in log tau)."""
    phi = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - phi * (b - a), a + phi * (b - a)
    fc = cross_entropy_at(logits, targets, math.exp(c))
    fd = cross_entropy_at(logits, targets, math.exp(d))
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - phi * (b - a)
            fc = cross_entropy_at(logits, targets, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + phi * (b - a)
            fd = cross_entropy_at(logits, targets, math.exp(d))
    return math.exp((a + b) / 2)


def reliability(logits, targets, tau: float) -> dict:
    """Per confidence bin: the share of predictions in it and their accuracy; the expected
    calibration error over the bins; what gamma 0.8 and 0.9 would admit (share, accuracy)."""
    probs = torch.softmax(logits / tau, dim=-1)
    conf, pred = probs.max(-1)
    right = (pred == targets).float()
    bins, ece = [], 0.0
    for lo, hi in zip(BINS, BINS[1:]):
        sel = (conf > lo) & (conf <= hi)
        n = int(sel.sum())
        acc = float(right[sel].mean()) if n else None
        mean_conf = float(conf[sel].mean()) if n else None
        if n:
            ece += n / len(conf) * abs(acc - mean_conf)
        bins.append({"bin": [lo, hi], "share": n / len(conf), "accuracy": acc,
                     "mean_confidence": mean_conf})  # fmt: skip
    above = {}
    for gamma in (0.8, 0.9):
        sel = conf > gamma
        share, acc = float(sel.float().mean()), float(right[sel].mean()) if sel.any() else None
        above[str(gamma)] = {"share": share, "accuracy": acc}
    return {
        "cross_entropy": cross_entropy_at(logits, targets, tau),
        "accuracy": float(right.mean()),
        "ece": ece,
        "bins": bins,
        "above_threshold": above,
    }


def save_scaled(model_dir: str, out: str, tau: float) -> None:
    """``model_dir`` with ``lm_head.weight`` (the denoiser's head) divided by tau, in bf16."""
    os.makedirs(out, exist_ok=True)
    state = load_file(os.path.join(model_dir, "model.safetensors"))
    head = state["lm_head.weight"]
    state["lm_head.weight"] = (head.float() / tau).to(head.dtype).contiguous()
    save_file(state, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt", "source": "bench/issue15_calibrate.py",
                        "temperature": f"{tau:.6f}"})  # fmt: skip
    for f in ("config.json", "tokenizer.json"):
        shutil.copyfile(os.path.join(model_dir, f), os.path.join(out, f))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL_DIR)
    ap.add_argument("--data-dir", default=".data")
    ap.add_argument("--out-dir", default=".data/calibrate")
    ap.add_argument("--json-out", default="bench/results/issue15_calibrate.json")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--seed", type=int, default=101)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = twotower_rt.load(args.model, device="cpu", dtype="float32")
    stream = train_stream(model.tokenizer, args.data_dir, args.out_dir)
    cfg = distill.DistillConfig(prompts=args.prompts, seed=args.seed)
    seqs = distill.distill_set(model, stream, cfg, args.out_dir)
    g = torch.Generator().manual_seed(args.seed)
    # The weights as plain modules (the training path, which keeps the Mamba states at every block
    # boundary for distill.rows_of), in float32.
    state = load_file(os.path.join(args.model, "model.safetensors"))
    lm = build_model(model.config, {k: v.float() for k, v in state.items()})
    set_scan_chunk(lm, BLOCK)
    logits, targets = masked_logits(lm, seqs, cfg.prompt_len, g)
    tau = fit_temperature(logits, targets)
    before, after = reliability(logits, targets, 1.0), reliability(logits, targets, tau)
    out = os.path.join(args.out_dir, "calibrated")
    save_scaled(args.model, out, tau)
    print(
        f"{len(targets)} masked positions: tau {tau:.3f}; cross-entropy "
        f"{before['cross_entropy']:.3f} -> {after['cross_entropy']:.3f}, ECE "
        f"{before['ece']:.3f} -> {after['ece']:.3f}; above 0.8: "
        f"{before['above_threshold']['0.8']} -> {after['above_threshold']['0.8']}"
    )
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "command": "python " + " ".join(sys.argv),
        "model": os.path.relpath(os.path.abspath(args.model), REPO),
        "calibration_set": {
            "prompts": args.prompts,
            "seed": args.seed,
            "prompt_len": cfg.prompt_len,
            "gen_tokens": cfg.gen_tokens,
            "masked_positions": len(targets),
        },  # fmt: skip
        "temperature": tau,
        "before": before,
        "after": after,
        "calibrated_model": os.path.relpath(os.path.abspath(out), REPO),
    }
    write_report(args.json_out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
