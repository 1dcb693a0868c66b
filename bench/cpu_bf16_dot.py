"""What the CPU kernels' bfloat16 dot products buy, and what they cost: "highest" against "medium"
float32 matmul precision, side by side in one process.

    python bench/cpu_bf16_dot.py [--data-dir .data] [--rounds 5] [--speed-prompts 64]
        [--json-out bench/results/cpu_bf16_dot.json]

Under torch.set_float32_matmul_precision("medium"), on a CPU with AVX512_BF16, the model's
projections and MoE experts run by bfloat16 dot products (ops/linear_cpu.py: linear_dot_cpu;
ops/moe_cpu.py: dot_weights): their inputs rounded to bfloat16, 32 multiply-adds per instruction
instead of 16. Three parts, all on the shipped default model:

- ``kernels``: each projection shape of the model and its MoE layer at 1, 16 and 64 rows, the
  float32 kernel against the dot-product one, one kernel thread, the two alternating, the median
  of ``--rounds`` x 200 calls each (process CPU time);
- ``speed``: ``ar`` and mask diffusion at gamma 0.8 through ``generate`` at batch 1, 4 and 64 on
  ``--speed-prompts`` of evaluate's held-out prompts (evenly spread), 64 new tokens, the CPU
  kernels on one thread (process CPU time) and on two (wall clock), the two precisions and the two
  modes taking turns within every round, a warm-up round first; per precision the medians over
  the rounds of diffusion's tokens/s over ``ar``'s (each round's own ratio), and per mode medium's
  tokens/s over highest's;
- ``quality``: ``train.evaluate``'s quality columns for ``ar`` and mask diffusion at gamma 0.8 and
  0.9 on the 512 held-out prompts under each precision (the AR-tower judge always at "highest"),
  and how many continuations the precision changed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
from issue15_distill import report_header, write_report  # noqa: E402

import twotower_rt  # noqa: E402
from twotower_rt import _ext  # noqa: E402
from twotower_rt.threads import kernel_threads, set_kernel_threads  # noqa: E402
from twotower_rt.train import evaluate as ev  # noqa: E402

PRECISIONS = ("highest", "medium")
MODES = [("ar", None), ("mask_diffusion", 0.8)]
BATCHES = (1, 4, 64)


def _cpu_us_per_call(fn, calls: int) -> float:
    t = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - t) / calls * 1e6


def kernels(lm, rounds: int) -> list[dict]:
    """Each projection shape and the MoE layer, float32 kernel vs dot products, one thread."""
    tower = lm.denoiser_tower
    mamba = next(b.mixer for b in tower.layers if b.kind == "mamba")
    attention = next(b.mixer for b in tower.layers if b.kind == "attention")
    moe = next(b.mixer for b in tower.layers if b.kind == "moe")
    cases = [("mamba in_proj", mamba.in_proj), ("mamba out_proj", mamba.out_proj),
             ("attention o_proj", attention.o_proj), ("lm_head", lm.lm_head),
             ("moe layer", moe)]  # fmt: skip
    rows_out = []
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for name, module in cases:
            width = module.in_features if hasattr(module, "in_features") else lm.cfg.hidden_size
            for rows in (1, 16, 64):
                x = torch.randn(1, rows, width, generator=g)
                times = {p: [] for p in PRECISIONS}
                for r in range(rounds + 1):
                    for p in PRECISIONS:
                        with ev.matmul_precision(p):
                            us = _cpu_us_per_call(lambda m=module, x=x: m(x), 200)
                        if r:
                            times[p].append(us)
                a, b = (statistics.median(times[p]) for p in PRECISIONS)
                macs = (rows * module.in_features * module.out_features
                        if hasattr(module, "in_features") else None)  # fmt: skip
                row = {"op": name, "rows": rows, "highest_us": round(a, 2),
                       "medium_us": round(b, 2), "speedup": round(a / b, 3)}  # fmt: skip
                if macs:
                    row["highest_gmacs"] = round(macs / a / 1e3, 1)
                    row["medium_gmacs"] = round(macs / b / 1e3, 1)
                rows_out.append(row)
                print(row, flush=True)
    return rows_out


def speed(model, prompts, new_tokens: int, rounds: int) -> dict:
    """Tokens/s per (kernel threads, batch, precision, mode), both precisions and modes taking
    turns in every round; medians over the rounds after a warm-up."""
    spent = {}  # (k, batch, precision, mode) -> [(wall, cpu, tokens, nfe)] per round
    for r in range(rounds + 1):
        for k in (1, 2):
            set_kernel_threads(k)
            for batch in BATCHES:
                groups = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
                for i, p in enumerate(PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]):
                    for mode, gamma in MODES if (r + i) % 2 == 0 else MODES[::-1]:
                        wall, cpu, nfe = time.perf_counter(), time.process_time(), 0
                        with ev.matmul_precision(p):
                            for group in groups:
                                out = ev.run_mode(model, group, mode, gamma, new_tokens)[0]
                                nfe += sum(out.nfe)
                        key = (k, batch, p, ev.mode_key(mode, gamma))
                        if r:
                            spent.setdefault(key, []).append(
                                (time.perf_counter() - wall, time.process_time() - cpu, nfe)
                            )
        print(f"speed round {r} done", flush=True)
    tokens = len(prompts) * new_tokens
    out = {}
    for k in (1, 2):
        clock = 1 if k == 1 else 0  # one thread: CPU time; two (a spinning worker): wall
        for batch in BATCHES:
            cell = {}
            for p in PRECISIONS:
                ar = spent[(k, batch, p, "ar")]
                md = spent[(k, batch, p, "mask_diffusion@0.8")]
                cell[p] = {
                    "ar_tok_s": round(tokens / statistics.median(x[clock] for x in ar), 1),
                    "md_tok_s": round(tokens / statistics.median(x[clock] for x in md), 1),
                    "md_vs_ar": round(
                        statistics.median(a[clock] / m[clock] for a, m in zip(ar, md)), 3
                    ),  # fmt: skip
                    "md_vs_ar_rounds": [round(a[clock] / m[clock], 3) for a, m in zip(ar, md)],
                    "tokens_per_forward": round(tokens / md[0][2], 3),
                }
            for mode in ("ar", "mask_diffusion@0.8"):
                hi, me = (spent[(k, batch, p, mode)] for p in PRECISIONS)
                cell[f"{mode}_medium_vs_highest"] = round(
                    statistics.median(h[clock] / m[clock] for h, m in zip(hi, me)), 3
                )
            out[f"kernel_threads_{k}_batch_{batch}"] = cell
            print(k, batch, cell, flush=True)
    return out


def quality(model, prompts, truths, new_tokens: int) -> dict:
    modes = [("ar", None), ("mask_diffusion", 0.8), ("mask_diffusion", 0.9)]
    rows, outputs = {}, {}
    for p in PRECISIONS:
        with ev.matmul_precision(p), contextlib.redirect_stdout(io.StringIO()):
            evaluated = ev.evaluate(model, prompts, truths, new_tokens, modes=modes)
        keep = ("ar_nll", "quality_nll_ratio", "next_block_accuracy", "quality_accuracy_ratio",
                "distinct_2", "distinct_2_ratio", "tokens_per_forward", "ci95")  # fmt: skip
        rows[p] = {ev.mode_key(r["mode"], r["confidence_threshold"]): {k: r[k] for k in keep}
                   for r in evaluated}  # fmt: skip
        with ev.matmul_precision(p):
            outputs[p] = {ev.mode_key(m, g): ev.run_mode(model, prompts, m, g, new_tokens)[0]
                          .generated for m, g in modes}  # fmt: skip
        brief = {k: (round(v["quality_nll_ratio"], 4), round(v["tokens_per_forward"], 3),
                     round(v["distinct_2_ratio"], 3)) for k, v in rows[p].items()}  # fmt: skip
        print(p, brief, flush=True)
    changed = {key: sum(a != b for a, b in zip(outputs["highest"][key], outputs["medium"][key]))
               for key in outputs["highest"]}  # fmt: skip
    return {**rows, "continuations_changed_by_medium": changed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=str(REPO / ".data"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--speed-prompts", type=int, default=ev.SPEED_PROMPTS)
    ap.add_argument("--json-out", default=str(REPO / "bench/results/cpu_bf16_dot.json"))
    args = ap.parse_args()
    C = _ext.cpu_kernels()
    if C is None or not C.linear_dot_supported():
        print("cpu_bf16_dot: needs the CPU kernels on a CPU with AVX512_BF16", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    before = kernel_threads()
    model = twotower_rt.load()
    windows = ev.heldout_windows(model.tokenizer, args.data_dir, ev.HELDOUT_PROMPTS,
                                 ev.PROMPT_LEN + ev.NEW_TOKENS)  # fmt: skip
    prompts = [w[: ev.PROMPT_LEN] for w in windows]
    truths = [w[ev.PROMPT_LEN :] for w in windows]
    try:
        set_kernel_threads(1)
        report = {"kernels": kernels(model.lm, args.rounds)}
        report["speed"] = speed(model, ev.spread(prompts, args.speed_prompts), ev.NEW_TOKENS,
                                args.rounds)  # fmt: skip
        set_kernel_threads(2)
        report["quality"] = quality(model, prompts, truths, ev.NEW_TOKENS)
    finally:
        set_kernel_threads(before)
    write_report(args.json_out, {**report_header(), "rounds": args.rounds,
                                 "speed_prompts": args.speed_prompts, **report})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
