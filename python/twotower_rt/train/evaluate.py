"""The default model's report: AR vs mask diffusion on held-out text, and the training curves.

For each mode (``ar``; ``mask_diffusion`` at confidence_threshold 0.5 / 0.8 / 0.9, greedy,
block 16, 16 steps per block) on held-out prompts:

- ``ar_nll``: the AR (context) tower's mean negative log-likelihood per token of the mode's
  continuation given the prompt, teacher-forced. Lower is better; it asks "how plausible does the
  base model find this text". ``quality_nll_ratio`` = ar_nll(AR) / ar_nll(mode): 1.0 = AR's
  quality, below 1 = worse. It favours AR (greedy AR picks the tower's own argmax), so it is a
  conservative figure for diffusion.
- ``next_block_accuracy``: the fraction of the first 16 generated tokens equal, position by
  position, to the true held-out continuation; ``quality_accuracy_ratio`` = mode / AR.
- ``tokens_per_forward``: generated tokens / denoiser forwards (16 * blocks / nfe).
- ``tokens_per_s``: CPU throughput, whole batch of prompts at once (``batch``) and one prompt at a
  time (``single``), this machine's threads.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time

import torch

from .. import load
from ..model.cache import ContextCache
from . import data
from .tokenizer import EOS_ID, encode_documents

MODES = [("ar", None), ("mask_diffusion", 0.5), ("mask_diffusion", 0.8), ("mask_diffusion", 0.9)]
BLOCK = 16


def heldout_windows(tok, data_dir: str, count: int, length: int) -> list[list[int]]:
    """``count`` evenly spaced held-out windows of ``length`` tokens that cross no document end."""
    path = os.path.join(data_dir, "corpus", "heldout.txt")
    if not os.path.isfile(path):
        data.prepare(data_dir)
    stream = encode_documents(tok, data.read_documents(path))
    out, stride = [], max(1, (len(stream) - length) // (count * 2))
    for start in range(0, len(stream) - length, stride):
        window = stream[start : start + length]
        if EOS_ID not in window:
            out.append(window)
    if len(out) < count:
        raise RuntimeError(f"only {len(out)} held-out windows of {length} tokens")
    step = len(out) / count
    return [out[int(i * step)] for i in range(count)]


@torch.no_grad()
def ar_nll(lm, prompts: list[list[int]], continuations: list[list[int]]) -> float:
    """Mean per-token NLL of the continuations under the context tower (teacher-forced)."""
    seqs = torch.tensor([p + c for p, c in zip(prompts, continuations)])
    n_prompt = len(prompts[0])
    cache = ContextCache.allocate(lm.cfg, seqs.shape[0], seqs.shape[1], lm.dtype, lm.device)
    logits = lm.context_logits(lm.context_forward(seqs[:, :-1], cache))
    logp = torch.log_softmax(logits, dim=-1)
    targets = seqs[:, 1:]
    nll = -logp.gather(-1, targets[..., None]).squeeze(-1)[:, n_prompt - 1 :]
    return float(nll.mean())


def run_mode(model, prompts, mode, gamma, new_tokens):
    params = dict(max_new_tokens=new_tokens, temperature=0.0)
    if mode == "mask_diffusion":
        params.update(block_size=BLOCK, steps_per_block=16, confidence_threshold=gamma)
    t0 = time.perf_counter()
    out = model.generate(prompts, mode=mode, **params)
    return out, time.perf_counter() - t0


def evaluate(model, prompts, truths, new_tokens: int, single_prompts: int) -> list[dict]:
    rows = []
    for mode, gamma in MODES:
        out, seconds = run_mode(model, prompts, mode, gamma, new_tokens)
        gen = out.generated
        n_tokens = sum(len(g) for g in gen)
        correct = sum(a == b for g, t in zip(gen, truths) for a, b in zip(g[:BLOCK], t[:BLOCK]))
        single_s = 0.0
        for p in prompts[:single_prompts]:
            single_s += run_mode(model, [p], mode, gamma, new_tokens)[1]
        row = {
            "mode": mode, "confidence_threshold": gamma,
            "ar_nll": ar_nll(model.lm, prompts, gen),
            "next_block_accuracy": correct / (BLOCK * len(prompts)),
            "tokens_per_forward": n_tokens / sum(out.nfe) if sum(out.nfe) else 1.0,
            "denoiser_forwards": sum(out.nfe),
            "tokens_per_s_batch": n_tokens / seconds,
            "tokens_per_s_single": single_prompts * new_tokens / single_s,
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    for row in rows:
        row["quality_nll_ratio"] = base["ar_nll"] / row["ar_nll"]
        row["quality_accuracy_ratio"] = (row["next_block_accuracy"] / base["next_block_accuracy"]
                                         if base["next_block_accuracy"] else None)  # fmt: skip
        row["speed_vs_ar_single"] = row["tokens_per_s_single"] / base["tokens_per_s_single"]
    return rows


def read_stage_log(run_dir: str, stage: str) -> list[dict] | None:
    """A stage's JSON-lines training log (train steps have "loss", evaluations "heldout_loss"),
    or None when the stage has not run."""
    path = os.path.join(run_dir, f"{stage}_log.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def training_summary(run_dir: str) -> dict:
    summary = {}
    for stage in ("ar", "diffusion"):
        records = read_stage_log(run_dir, stage)
        if records is None:
            continue
        steps = [r for r in records if "loss" in r]
        evals = [r for r in records if "heldout_loss" in r]
        with open(os.path.join(run_dir, f"{stage}_stage.json")) as f:
            stage_cfg = json.load(f)
        # A resumed stage (``--resume``) restarts its clock: add up the segments.
        seconds, last = 0.0, 0.0
        for r in records:
            if r["time_s"] < last:
                seconds += last
            last = r["time_s"]
        summary[stage] = {
            "steps": len(steps),
            "segments": 1 + sum(b["time_s"] < a["time_s"] for a, b in zip(records, records[1:])),
            "minutes": round((seconds + last) / 60, 1),
            "tokens_seen": len(steps) * stage_cfg["batch_size"] * stage_cfg["seq_len"],
            "final_heldout_loss": evals[-1]["heldout_loss"] if evals else None,
            "config": stage_cfg,
        }
        resumed = os.path.join(run_dir, f"{stage}_stage_resumed.json")
        if os.path.isfile(resumed):
            with open(resumed) as f:
                summary[stage]["last_resumed_config"] = json.load(f)
    return summary


def plot(run_dir: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    titles = {"ar": "stage 1: context tower (next-token CE)",
              "diffusion": "stage 2: denoiser (masked-token CE, blocks of 16)"}  # fmt: skip
    for ax, stage in zip(axes, ("ar", "diffusion")):
        records = read_stage_log(run_dir, stage)
        if records is None:
            continue
        tr = [r for r in records if "loss" in r]
        ev = [r for r in records if "heldout_loss" in r]
        ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], lw=0.6, alpha=0.6,
                label="train (per step)")  # fmt: skip
        ax.plot([r["step"] for r in ev], [r["heldout_loss"] for r in ev], "o-", ms=3,
                label="held-out")  # fmt: skip
        ax.set_title(titles[stage], fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot -> {path}")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(args) -> None:
    model = load(args.model)
    tok = model.tokenizer
    windows = heldout_windows(tok, args.data_dir, args.prompts, args.prompt_len + args.new_tokens)
    prompts = [w[: args.prompt_len] for w in windows]
    truths = [w[args.prompt_len :] for w in windows]
    rows = evaluate(model, prompts, truths, args.new_tokens, single_prompts=4)
    run_dir = os.path.join(args.data_dir, "runs", args.run)
    model_dir = model.source
    files = {f: os.path.getsize(os.path.join(model_dir, f)) for f in sorted(os.listdir(model_dir))
             if not f.startswith((".", "__"))}  # fmt: skip
    sample_prompt = prompts[0]
    samples = {}
    for mode, gamma in MODES:
        out, _ = run_mode(model, [sample_prompt], mode, gamma, 32)
        samples[f"{mode}@{gamma}" if gamma else mode] = tok.decode(out.generated[0])
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },  # fmt: skip
        "model": {
            "source": "twotower_rt/default_model",
            "layers": model.config.hybrid_override_pattern,
            "hidden_size": model.config.hidden_size,
            "vocab_size": model.config.vocab_size,
            "parameters": sum(p.numel() for p in model.lm.parameters()),
            "files_bytes": files,
        },  # fmt: skip
        "eval": {
            "prompts": args.prompts,
            "prompt_tokens": args.prompt_len,
            "new_tokens": args.new_tokens,
            "block_size": BLOCK,
            "steps_per_block": 16,
            "temperature": 0.0,
            "dtype": "float32",
            "source": "held-out tail of every document (data.HELDOUT_FRACTION), never trained on",
        },  # fmt: skip
        "definitions": {
            "ar_nll": "AR (context) tower's mean NLL per token of the mode's continuation, "
            "teacher-forced on prompt + continuation; lower is better",
            "quality_nll_ratio": "ar_nll(ar) / ar_nll(mode); 1.0 = AR quality",
            "next_block_accuracy": "share of the first 16 generated tokens equal to the true "
            "held-out continuation, position by position",
            "quality_accuracy_ratio": "next_block_accuracy(mode) / next_block_accuracy(ar)",
            "tokens_per_forward": "generated tokens / denoiser forwards (16 * blocks / nfe)",
            "tokens_per_s_batch": f"all {args.prompts} prompts in one batch, CPU",
            "tokens_per_s_single": "one prompt at a time (4 prompts), CPU",
        },  # fmt: skip
        "results": rows,
        # For scale: the same NLL of the true held-out continuations (human text is not the
        # AR tower's argmax, so it scores worse than any greedy decoding).
        "heldout_text_ar_nll": ar_nll(model.lm, prompts, truths),
        "targets": {"gamma_0.8_quality_ratio_min": 0.95, "gamma_0.8_tokens_per_forward_min": 1.5},
        "training": training_summary(run_dir),
        "samples": {"prompt": tok.decode(sample_prompt), **samples},
    }
    g08 = next(r for r in rows if r["confidence_threshold"] == 0.8)
    report["targets"]["met"] = bool(g08["quality_nll_ratio"] >= 0.95
                                    and (g08["quality_accuracy_ratio"] or 0) >= 0.95
                                    and g08["tokens_per_forward"] >= 1.5)  # fmt: skip
    os.makedirs(os.path.dirname(args.json_out) or ".", exist_ok=True)
    with open(args.json_out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"report -> {args.json_out}")
    if os.path.isdir(run_dir):
        plot(run_dir, args.plot_out)
