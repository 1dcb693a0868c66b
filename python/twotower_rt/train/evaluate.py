"""The default model's report: AR vs mask diffusion vs verified on held-out text, and the
training curves.

For each mode (``ar``; ``mask_diffusion`` at confidence_threshold 0.5 / 0.7 / 0.8 / 0.9, greedy,
block 16, 16 steps per block; ``verified``, block 16, one draft forward per round) on held-out
prompts:

- ``ar_nll``: the AR (context) tower's mean negative log-likelihood per token of the mode's
  continuation given the prompt, teacher-forced. Lower is better; it asks "how plausible does the
  base model find this text". ``quality_nll_ratio`` = ar_nll(AR) / ar_nll(mode): 1.0 = AR's
  quality, below 1 = worse. It favours AR (greedy AR picks the tower's own argmax), so it is a
  conservative figure for diffusion.
- ``next_block_accuracy``: the fraction of the first 16 generated tokens equal, position by
  position, to the true held-out continuation; ``quality_accuracy_ratio`` = mode / AR.
- ``tokens_per_forward``: generated tokens / denoiser forwards (16 * blocks / nfe); for
  ``verified`` also ``accepted_per_round`` (drafts accepted per round: the accept length, before
  the round's own AR token) and ``tokens_per_model_forward`` (tokens / (draft forwards + context
  passes)).
- ``distinct_2`` / ``distinct_3``: distinct n-grams / all n-grams of the continuations (diversity).
- ``ci95``: a 95% interval per ratio to AR, by a paired bootstrap over the prompts. On 64 prompts
  the NLL ratio's interval is about +-0.075 and the accuracy ratio's +-0.3 (AR gets ~7% of the
  tokens right), too wide to judge a 5% target: the quality columns use 512 prompts by default.
- ``speed``: tokens/s at batch 1 (each prompt alone), 4 and 64 over ``--speed-prompts`` of the
  prompts (evenly spread), torch on one thread, the CPU kernels on one thread, on
  ``--kernel-threads`` and on their stream (one kernel thread on a worker beside the Python:
  ``threads.set_kernel_stream``; ``--no-kernel-stream`` leaves it out), the modes and
  configurations alternating within each of ``--repeats`` rounds after a warm-up; medians of
  wall-clock and of process CPU time (the steadier figure on a shared machine).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import subprocess
import time

import numpy as np
import torch

from .. import load
from ..env import cpu_report
from ..model.cache import ContextCache
from . import data
from .tokenizer import EOS_ID, encode_documents

MODES = [("ar", None), ("mask_diffusion", 0.5), ("mask_diffusion", 0.7), ("mask_diffusion", 0.8),
         ("mask_diffusion", 0.9), ("verified", None)]  # fmt: skip
SPEED_BATCHES = (1, 4, 64)
# ``python -m twotower_rt.train evaluate``'s defaults: held-out prompts of PROMPT_LEN tokens,
# NEW_TOKENS generated each, SPEED_PROMPTS of them (evenly spread) timed.
HELDOUT_PROMPTS, PROMPT_LEN, NEW_TOKENS, SPEED_PROMPTS = 512, 32, 64, 64
BLOCK = 16
BOOTSTRAP_RESAMPLES = 1000


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
def ar_token_scores(lm, prompts: list[list[int]], continuations: list[list[int]]):
    """Per continuation token, under the context tower (teacher-forced on prompt +
    continuation): its NLL and whether it is the tower's argmax there, both (rows, tokens).
    The judge does not change with the generation's precision: float32 matmuls run at
    "highest" precision here whatever torch.get_float32_matmul_precision() says."""
    seqs = torch.tensor([p + c for p, c in zip(prompts, continuations)])
    n_prompt = len(prompts[0])
    cache = ContextCache.allocate(lm.cfg, seqs.shape[0], seqs.shape[1], lm.dtype, lm.device)
    with matmul_precision("highest"):
        logits = lm.context_logits(lm.context_forward(seqs[:, :-1], cache))
    logp = torch.log_softmax(logits, dim=-1)
    targets = seqs[:, 1:]
    nll = -logp.gather(-1, targets[..., None]).squeeze(-1)[:, n_prompt - 1 :]
    agree = (logp.argmax(-1) == targets)[:, n_prompt - 1 :]
    return nll, agree


@contextlib.contextmanager
def matmul_precision(precision: str):
    """torch.set_float32_matmul_precision(precision) inside the block, the old value after."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def spread(items: list, n: int) -> list:
    """``n`` of ``items`` evenly spaced over them (all of them if there are no more than n)."""
    if n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def timing_prompts(tokenizer, data_dir: str, count: int) -> list[list[int]]:
    """``count`` of the evaluation's held-out prompts (HELDOUT_PROMPTS of PROMPT_LEN tokens),
    evenly spread over them: what its speed columns and the CPU benchmarks time."""
    windows = heldout_windows(tokenizer, data_dir, HELDOUT_PROMPTS, PROMPT_LEN + NEW_TOKENS)
    return spread([w[:PROMPT_LEN] for w in windows], count)


def ar_nll(lm, prompts: list[list[int]], continuations: list[list[int]]) -> float:
    """Mean per-token NLL of the continuations under the context tower (teacher-forced)."""
    return float(ar_token_scores(lm, prompts, continuations)[0].mean())


def run_mode(model, prompts, mode, gamma, new_tokens, temperature: float = 0.0, seed=None):
    """``model.generate`` of one mode (greedy unless ``temperature`` > 0: then sampled, with
    ``seed``); returns (its output, seconds)."""
    params = dict(max_new_tokens=new_tokens, temperature=temperature)
    if seed is not None:
        params["seed"] = seed
    if mode == "mask_diffusion":
        params.update(block_size=BLOCK, steps_per_block=16, confidence_threshold=gamma)
    elif mode == "verified":
        params.update(block_size=BLOCK, draft_steps=1)
    t0 = time.perf_counter()
    out = model.generate(prompts, mode=mode, **params)
    return out, time.perf_counter() - t0


def distinct_n(seqs: list[list[int]], n: int) -> float:
    grams = [tuple(s[i : i + n]) for s in seqs for i in range(len(s) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def mode_key(mode: str, gamma) -> str:
    return f"{mode}@{gamma}" if gamma is not None else mode


def evaluate(model, prompts, truths, new_tokens: int, modes=MODES,
             resamples: int = BOOTSTRAP_RESAMPLES, temperature: float = 0.0,
             seed=None) -> list[dict]:  # fmt: skip
    """Quality and work per mode (``ar`` first: the ratios' base) on all prompts at once (one
    batch); ``seconds`` is that batch's wall-clock time. Each ratio to AR comes with ``ci95``,
    a paired bootstrap over the prompts (:func:`bootstrap_ratios`). Greedy by default; with
    ``temperature`` > 0 every mode samples (``seed``: :func:`run_mode`)."""
    rows, per_prompt = [], []
    for mode, gamma in modes:
        out, seconds = run_mode(model, prompts, mode, gamma, new_tokens, temperature, seed)
        gen = out.generated
        n_tokens = sum(len(g) for g in gen)
        nll = ar_token_scores(model.lm, prompts, gen)[0]  # (prompts, new tokens)
        correct = [sum(a == b for a, b in zip(g[:BLOCK], t[:BLOCK])) for g, t in zip(gen, truths)]
        row = {
            "mode": mode, "confidence_threshold": gamma,
            "ar_nll": float(nll.mean()),
            "next_block_accuracy": sum(correct) / (BLOCK * len(prompts)),
            "distinct_2": distinct_n(gen, 2), "distinct_3": distinct_n(gen, 3),
            "tokens_per_forward": n_tokens / sum(out.nfe) if sum(out.nfe) else 1.0,
            "denoiser_forwards": sum(out.nfe), "seconds": round(seconds, 2),
        }  # fmt: skip
        if mode == "verified":
            rounds = [a for per_row in out.accepted_per_round for a in per_row]
            row["accepted_per_round"] = sum(rounds) / len(rounds)
            row["tokens_per_model_forward"] = n_tokens / (sum(out.nfe) + len(rounds))
        rows.append(row)
        per_prompt.append((nll.mean(-1).numpy(), np.asarray(correct), bigram_ids(gen)))
        print(json.dumps(row), flush=True)
    base = rows[0]
    for row, stats in zip(rows, per_prompt):
        row["quality_nll_ratio"] = base["ar_nll"] / row["ar_nll"]
        row["quality_accuracy_ratio"] = (row["next_block_accuracy"] / base["next_block_accuracy"]
                                         if base["next_block_accuracy"] else None)  # fmt: skip
        row["distinct_2_ratio"] = row["distinct_2"] / base["distinct_2"]
        row["ci95"] = bootstrap_ratios(per_prompt[0], stats, resamples)
    return rows


def bigram_ids(seqs: list[list[int]]) -> list[np.ndarray]:
    """Each sequence's bigrams as int64 ids (a * 2**32 + b)."""
    out = []
    for s in seqs:
        a = np.asarray(s, dtype=np.int64)
        out.append(a[:-1] * (1 << 32) + a[1:])
    return out


def bootstrap_ratios(base, mode, resamples: int, seed: int = 0) -> dict:
    """95% intervals of the three quality ratios (NLL, next-block accuracy, distinct-2) by a
    paired bootstrap: draw the prompts with replacement, the same draw for AR and the mode,
    recompute both from their per-prompt figures, take the 2.5 and 97.5 percentiles. (A prompt
    drawn twice repeats its bigrams, which lowers distinct-2 for AR and the mode alike.)"""
    rng = np.random.default_rng(seed)
    (nll_a, acc_a, big_a), (nll_m, acc_m, big_m) = base, mode
    n = len(nll_a)
    ratios = {"quality_nll_ratio": [], "quality_accuracy_ratio": [], "distinct_2_ratio": []}
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        ratios["quality_nll_ratio"].append(nll_a[idx].mean() / nll_m[idx].mean())
        if acc_a[idx].sum():
            ratios["quality_accuracy_ratio"].append(acc_m[idx].sum() / acc_a[idx].sum())
        d = [np.unique(np.concatenate([b[i] for i in idx])).size for b in (big_a, big_m)]
        ratios["distinct_2_ratio"].append(d[1] / d[0])
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else None
            for k, v in ratios.items()}  # fmt: skip


def matmul_rate(a: torch.Tensor, reps: int = 3) -> float:
    """GFLOP/s of ``a @ a`` (a square fp32 matrix) on torch's threads, the median of ``reps``: a
    probe of how much of the core the process gets (on a shared host it halves while a neighbour
    on the same physical core computes)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, a)
        times.append(time.perf_counter() - t0)
    return 2 * a.shape[0] ** 3 / sorted(times)[len(times) // 2] / 1e9


STREAM = "stream"  # a speed configuration: the kernels' stream on, one kernel thread (two cores)


def config_name(config) -> str:
    """A speed configuration's name: ``N kernel thread(s)`` or the stream's."""
    if config == STREAM:
        return "kernel stream (2 threads)"
    return f"{config} kernel thread{'s' if config > 1 else ''}"


def set_config(config) -> None:
    """Applies a speed configuration: a kernel-thread count (the stream off) or :data:`STREAM`
    (the kernels' stream on, its worker and the caller sharing the calls, no pool threads)."""
    from ..threads import set_kernel_stream, set_kernel_threads

    set_kernel_stream(config == STREAM)
    set_kernel_threads(1 if config == STREAM else config)


def measure_speed(model, prompts, new_tokens: int, repeats: int,
                  kernel_threads: tuple[int, ...] = (1,), modes=None,
                  batches=None, probes: list | None = None) -> dict:  # fmt: skip
    """Tokens/s per mode (``modes``, default MODES) at each of ``batches`` (default
    SPEED_BATCHES) over ``prompts`` (at batch B, in groups of B
    prompts; a last group of fewer is left out, or is the one group), side by side: torch on one
    thread, the CPU kernels on each count of ``kernel_threads`` (threads.set_kernel_threads), a
    warm-up of every configuration, then ``repeats`` rounds in which the counts alternate and,
    within a count, the modes take turns group by group (every mode runs group 1, then every
    mode group 2, ..., each group starting one mode later: on a shared machine whose speed
    drifts over seconds, each ratio to AR is then taken over the same stretch of time); medians
    over the rounds. A ``kernel_threads`` entry may be :data:`STREAM` (the kernels' stream,
    :func:`set_config`).
    Returns ``{count: {"batch_B": {mode: rates}}}``. ``cpu_tok_s`` is from the process's CPU
    time, ``tok_s`` from wall-clock; with more than one kernel thread the CPU time counts every
    core (a worker spins between calls), so compare wall-clock there (``wall_vs_ar``);
    ``cpu_vs_ar_rounds`` / ``wall_vs_ar_rounds``: each round's own ratio, to show the spread.
    ``probes``: a list to which each timed round appends the :func:`matmul_rate` measured before
    each of its groups (median and least), to read the spread against."""
    import statistics

    from ..threads import kernel_stream, set_kernel_stream, set_kernel_threads
    from ..threads import kernel_threads as current_kernel_threads

    modes, batches = modes or MODES, batches or SPEED_BATCHES
    probe = torch.ones(384, 384) if probes is not None else None  # matmul_rate's, made once
    threads, kthreads, stream = torch.get_num_threads(), current_kernel_threads(), kernel_stream()
    torch.set_num_threads(1)
    try:
        speed = {k: {} for k in kernel_threads}
        for batch in batches:
            groups = [prompts[i : i + batch] for i in range(0, len(prompts) - batch + 1, batch)]
            groups = groups or [prompts]  # fewer prompts than the batch: all of them at once
            tokens = sum(len(g) for g in groups) * new_tokens

            def once(rates, groups=groups):
                """One round: {mode: [wall s, CPU s, denoiser forwards]}, the modes taking
                turns on each group, group i starting from mode i (mod the modes), so that no
                mode always runs first (``rates``: None, or a list for a probe before each)."""
                spent = {mode_key(m, g): [0.0, 0.0, 0] for m, g in modes}
                for i, group in enumerate(groups):
                    if rates is not None:
                        rates.append(matmul_rate(probe))
                    first = i % len(modes)
                    for mode, gamma in modes[first:] + modes[:first]:
                        wall, cpu = time.perf_counter(), time.process_time()
                        nfe = sum(run_mode(model, group, mode, gamma, new_tokens)[0].nfe)
                        t = spent[mode_key(mode, gamma)]
                        t[0] += time.perf_counter() - wall
                        t[1] += time.process_time() - cpu
                        t[2] += nfe
                return spent

            times = {(k, mode_key(m, g)): [] for k in kernel_threads for m, g in modes}
            nfes = {}  # denoiser forwards per mode (greedy: the same every round)
            for r in range(repeats + 1):  # round 0: the warm-up
                for k in kernel_threads:
                    set_config(k)
                    rates = [] if probes is not None and r else None
                    for key, (wall, cpu, nfes[key]) in once(rates).items():
                        if r:
                            times[(k, key)].append((wall, cpu))
                    if rates:
                        probes.append({"batch": batch, "kernel_threads": k, "round": r,
                                       "matmul_gflops_median": round(statistics.median(rates), 1),
                                       "matmul_gflops_min": round(min(rates), 1)})  # fmt: skip
            for k in kernel_threads:
                row = {}
                for (count, key), runs in times.items():
                    if count == k:
                        wall = statistics.median(w for w, _ in runs)
                        cpu = statistics.median(c for _, c in runs)
                        tpf = tokens / nfes[key] if nfes[key] else 1.0
                        row[key] = {"tok_s": tokens / wall, "cpu_tok_s": tokens / cpu,
                                    "tokens_per_forward": tpf}  # fmt: skip
                ar_runs = times[(k, "ar")]
                for key in row:
                    row[key]["cpu_vs_ar"] = row[key]["cpu_tok_s"] / row["ar"]["cpu_tok_s"]
                    row[key]["wall_vs_ar"] = row[key]["tok_s"] / row["ar"]["tok_s"]
                    runs = times[(k, key)]
                    row[key]["cpu_vs_ar_rounds"] = [round(a[1] / b[1], 3)
                                                    for a, b in zip(ar_runs, runs)]  # fmt: skip
                    row[key]["wall_vs_ar_rounds"] = [round(a[0] / b[0], 3)
                                                     for a, b in zip(ar_runs, runs)]  # fmt: skip
                speed[k][f"batch_{batch}"] = row
                rate, ratio = ("cpu_tok_s", "cpu_vs_ar") if k == 1 else ("tok_s", "wall_vs_ar")
                print(f"speed batch {batch}, {config_name(k)}, {rate}: " + "  ".join(
                    f"{m} {v[rate]:.0f} ({v[ratio]:.2f}x)" for m, v in row.items()
                ), flush=True)  # fmt: skip
        return speed
    finally:
        torch.set_num_threads(threads)
        set_kernel_threads(kthreads)
        set_kernel_stream(stream)


def plot_tradeoff(rows: list[dict], speeds: dict, path: str) -> None:
    """Quality (AR-NLL ratio, with its 95% interval) against wall-clock tokens/s at batch 1 and
    64, one point per gamma, AR marked; one series per kernel-thread count (``speeds``:
    :func:`measure_speed`'s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    styles = {1: ("-", "tab:blue", "black"), 2: ("--", "tab:orange", "tab:red"),
              STREAM: ("-.", "tab:green", "darkgreen")}  # fmt: skip
    for ax, batch in zip(axes, ("batch_1", "batch_64")):
        for count, speed in speeds.items():
            line, color, ar_color = styles.get(count, (":", "tab:purple", "tab:purple"))
            cores = config_name(count)
            xs, ys, errs = [], [], [[], []]
            for row in rows:
                key = mode_key(row["mode"], row["confidence_threshold"])
                x, y = speed[batch][key]["tok_s"], row["quality_nll_ratio"]
                if row["mode"] == "ar":
                    ax.scatter([x], [y], marker="*", s=180, color=ar_color, zorder=3,
                               label=f"AR, {cores}")  # fmt: skip
                elif row["mode"] == "verified":
                    ax.scatter([x], [y], marker="D", s=40, color=color, zorder=3,
                               label=f"verified (lossless), {cores}")  # fmt: skip
                else:
                    xs.append(x)
                    ys.append(y)
                    lo, hi = row.get("ci95", {}).get("quality_nll_ratio") or (y, y)
                    errs[0].append(y - lo)
                    errs[1].append(hi - y)
                    if count == 1:
                        ax.annotate(f"gamma {row['confidence_threshold']}\n"
                                    f"{row['tokens_per_forward']:.1f} tok/fwd", (x, y),
                                    textcoords="offset points", xytext=(6, -4),
                                    fontsize=7)  # fmt: skip
            ax.plot(xs, ys, "o" + line, color=color, label=f"mask diffusion, {cores}")
            ax.errorbar(xs, ys, yerr=errs, fmt="none", ecolor=color, elinewidth=0.8, capsize=2)
        ax.axhline(0.95, color="gray", lw=0.8, ls="--", label="95% of AR quality")
        ax.set_xlabel(f"wall-clock tokens/s, {batch.replace('_', ' ')} (torch on one thread)")
        ax.set_ylabel("quality: AR-NLL(ar) / AR-NLL(mode)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("default model, held-out prompts, greedy, block 16: quality (bars: 95% intervals) "
                 "vs speed", fontsize=10)  # fmt: skip
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot -> {path}")


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


# The shipped model's stage-3 report and log (every 5th step) from bench/issue15_distill.py's run;
# a run of ``python -m twotower_rt.train distill`` writes its own RUN/distill_log.jsonl, which
# comes first.
SHIPPED_DISTILL_REPORT = os.path.join("bench", "results", "issue15_distill_s2ext80.json")
SHIPPED_DISTILL_LOG = os.path.join("bench", "results", "issue15_distill_log.jsonl")


def distill_records(run_dir: str) -> list[dict] | None:
    records = read_stage_log(run_dir, "distill")
    if records is None and os.path.isfile(SHIPPED_DISTILL_LOG):
        with open(SHIPPED_DISTILL_LOG, encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
    return records


def plot_distill(records: list[dict], path: str, window: int = 25) -> None:
    """Stage 3's curves: the masked-token cross-entropy, and the share of masked positions
    predicted right / with confidence > 0.8 (and, with rollouts, the share of the rollouts'
    commits whose prediction was wrong), against step (running means over ``window`` logged
    steps), certainty forcing's start marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(key):
        vals = [r[key] for r in records]
        out, acc = [], 0.0
        for i, v in enumerate(vals):
            acc += v - (vals[i - window] if i >= window else 0.0)
            out.append(acc / min(i + 1, window))
        return out

    steps = [r["step"] for r in records]
    cf = next((r["step"] for r in records if r.get("cf_weight", 0) > 0), None)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(steps, smooth("ce"), label="masked-token CE (train)")
    if "kl" in records[0]:
        axes[0].plot(steps, smooth("kl"), label="KL(AR || denoiser)")
    axes[0].set_ylabel("nats/token")
    axes[1].plot(steps, smooth("acc"), label="argmax = target")
    axes[1].plot(steps, smooth("conf_gt_0.8"), label="confidence > 0.8")
    if "rollout_err" in records[0]:
        axes[1].plot(steps, smooth("rollout_err"), label="rollout commits that were wrong")
    axes[1].set_ylabel("share of masked positions")
    for ax in axes:
        if cf is not None:
            ax.axvline(cf, color="grey", ls="--", lw=0.8, label="certainty forcing on")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        "stage 3: the denoiser distilled on the context tower's greedy text "
        "(a quarter of the rows real text)",
        fontsize=10,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot -> {path}")


def _distillation_summary(path: str = SHIPPED_DISTILL_REPORT):
    """Stage 3 of the shipped model (bench/issue15_distill.py): its recipe and training, from its
    own report."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    return {"report": path, "command": report.get("command"), "recipe": report.get("recipe"),
            "training": report.get("training")}  # fmt: skip


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
    rows = evaluate(model, prompts, truths, args.new_tokens)
    counts = tuple(dict.fromkeys([1, *args.kernel_threads]))  # one thread first: the baseline
    if getattr(args, "kernel_stream", True):
        counts += (STREAM,)
    speed_prompts = spread(prompts, args.speed_prompts or len(prompts))
    probes = []
    speeds = measure_speed(model, speed_prompts, args.new_tokens, args.repeats, counts,
                           probes=probes)  # fmt: skip
    speed = speeds[1]
    run_dir = os.path.join(args.data_dir, "runs", args.run)
    model_dir = model.source
    files = {f: os.path.getsize(os.path.join(model_dir, f)) for f in sorted(os.listdir(model_dir))
             if not f.startswith((".", "__"))}  # fmt: skip
    sample_prompt = prompts[0]
    samples = {}
    for mode, gamma in MODES:
        out, _ = run_mode(model, [sample_prompt], mode, gamma, 32)
        samples[mode_key(mode, gamma)] = tok.decode(out.generated[0])
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_report(),
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
            "speed_prompts": len(speed_prompts),
            "block_size": BLOCK,
            "steps_per_block": 16,
            "temperature": 0.0,
            "dtype": "float32",
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
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
            "distinct_n": "distinct n-grams / all n-grams over the continuations",
            "ci95": "per ratio to AR, a 95% interval by a paired bootstrap over the prompts "
            f"({BOOTSTRAP_RESAMPLES} draws of the prompts with replacement, AR and the mode "
            "recomputed on the same draw; 2.5 and 97.5 percentiles)",
            "speed": "tokens/s per batch size over speed_prompts of the held-out prompts, evenly "
            "spread over them "
            "(batch B: groups of B, one after the other; batch 1: each prompt alone), the "
            "modes taking turns group by group within each round, repeats rounds after a "
            "warm-up, medians (*_vs_ar_rounds: each round's own ratio); cpu_tok_s from "
            "process CPU time, tok_s from wall-clock; speed: the CPU kernels on one thread, "
            "speed_kernel_threads: on more (threads.set_kernel_threads; torch still on one), "
            "speed_kernel_stream: the kernels' stream on (threads.set_kernel_stream: each "
            "forward's kernel calls on a worker thread beside the Python, the two sharing big "
            "calls; one kernel thread, two cores), all "
            "measured in the same rounds, compared by wall-clock; tokens_per_forward: of the "
            "timed generations (the timed prompts' own rate, which differs from all prompts')",
            "speed_matmul_probes": "per timed round: a 384^3 fp32 matmul's GFLOP/s on one "
            "thread, measured before each group of that round (median, least): how much of the "
            "core the run had (on a shared host a neighbour's work halves it at times)",
        },  # fmt: skip
        "results": rows,
        "speed": speed,
        "speed_kernel_threads": {str(k): v for k, v in speeds.items() if k not in (1, STREAM)},
        "speed_kernel_stream": speeds.get(STREAM),
        "speed_matmul_probes": probes,
        # For scale: the same NLL of the true held-out continuations (human text is not the
        # AR tower's argmax, so it scores worse than any greedy decoding).
        "heldout_text_ar_nll": ar_nll(model.lm, prompts, truths),
        "targets": {
            "gamma_0.8_quality_ratio_min": 0.95,
            "gamma_0.8_tokens_per_forward_min": 1.5,
            "gamma_0.8_distinct_2_within": 0.10,
            "gamma_0.8_batch_1_speed_vs_ar_min": 1.3,
        },  # fmt: skip
        "training": training_summary(run_dir),
        "distillation": _distillation_summary(),
        "samples": {"prompt": tok.decode(sample_prompt), **samples},
    }
    g08 = next(r for r in rows if r["confidence_threshold"] == 0.8)
    g08_speed = speed["batch_1"]["mask_diffusion@0.8"]["cpu_vs_ar"]
    # Each mode at its best configuration (kernel-thread count or the stream), wall-clock (side by
    # side in one run).
    best = {key: max(speeds[k]["batch_1"][key]["tok_s"] for k in counts)
            for key in ("ar", "mask_diffusion@0.8")}  # fmt: skip
    report["targets"]["batch_1_best_wall_vs_best_ar"] = best["mask_diffusion@0.8"] / best["ar"]
    report["targets"]["met"] = {
        "quality_nll": g08["quality_nll_ratio"] >= 0.95,
        "quality_accuracy": (g08["quality_accuracy_ratio"] or 0) >= 0.95,
        "tokens_per_forward": g08["tokens_per_forward"] >= 1.5,
        "distinct_2": abs(g08["distinct_2_ratio"] - 1) <= 0.10,
        "batch_1_speed": g08_speed >= 1.3,
        "batch_1_speed_best_kernel_threads": best["mask_diffusion@0.8"] / best["ar"] >= 1.3,
    }
    os.makedirs(os.path.dirname(args.json_out) or ".", exist_ok=True)
    with open(args.json_out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"report -> {args.json_out}")
    plot_tradeoff(rows, speeds, args.tradeoff_out)
    if os.path.isdir(run_dir):
        plot(run_dir, args.plot_out)
    records = distill_records(run_dir)
    if records:
        plot_distill(records, args.distill_plot_out)
