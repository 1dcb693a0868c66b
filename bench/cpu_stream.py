"""What the CPU kernels' stream buys: generation with each forward's kernel calls queued on a
worker thread (threads.set_kernel_stream) against the kernels called in line, side by side in one
process, on the shipped default model.

    python bench/cpu_stream.py [--data-dir .data] [--rounds 5] [--speed-prompts 32]
        [--json-out bench/results/cpu_stream.json]

Three configurations of the CPU kernels, torch on one thread: one kernel thread (the calls in
line), two (in line, each big call split with the pool's worker), and the stream (one kernel
thread: the calls run on the stream's worker while Python goes on to the next one, and whichever
thread is waiting takes a share of each big call). ``ar`` and mask diffusion at gamma 0.8 through
``generate`` at batch 1, 4 and 64 on ``--speed-prompts`` of evaluate's held-out prompts (evenly
spread), 64 new tokens, with evaluate's protocol (``train.evaluate.measure_speed``: a warm-up,
then ``--rounds`` rounds in which the configurations alternate and, within one, the modes take
turns group by group; medians of wall-clock tokens/s). Reported per batch: each configuration's
tokens/s and diffusion's ratio to ``ar`` in it, and each mode's speed under the stream over its
speed at one and at two kernel threads. The numbers are the same in every configuration (tests/
test_cpu_stream.py); so the tokens are."""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
from issue15_distill import report_header, write_report  # noqa: E402

import twotower_rt  # noqa: E402
from twotower_rt import _ext  # noqa: E402
from twotower_rt.train import evaluate as ev  # noqa: E402

MODES = [("ar", None), ("mask_diffusion", 0.8)]
BATCHES = (1, 4, 64)
CONFIGS = (1, 2, ev.STREAM)


def summary(speeds: dict) -> dict:
    """Per batch: tokens/s per configuration and mode, diffusion / ar in each, and each mode's
    stream speed over its speed at one and at two kernel threads (wall clock)."""
    out = {}
    for batch in speeds[1]:
        cell = {}
        for config in CONFIGS:
            row = speeds[config][batch]
            cell[ev.config_name(config)] = {
                "ar_tok_s": round(row["ar"]["tok_s"], 1),
                "md_tok_s": round(row["mask_diffusion@0.8"]["tok_s"], 1),
                "md_vs_ar": round(row["mask_diffusion@0.8"]["wall_vs_ar"], 3),
                "md_vs_ar_rounds": row["mask_diffusion@0.8"]["wall_vs_ar_rounds"],
                "tokens_per_forward": round(row["mask_diffusion@0.8"]["tokens_per_forward"], 3),
            }
        for mode in ("ar", "mask_diffusion@0.8"):
            stream = speeds[ev.STREAM][batch][mode]["tok_s"]
            for config in (1, 2):
                cell[f"{mode}_stream_vs_{ev.config_name(config).replace(' ', '_')}"] = round(
                    stream / speeds[config][batch][mode]["tok_s"], 3
                )
        out[batch] = cell
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=str(REPO / ".data"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--speed-prompts", type=int, default=32)
    ap.add_argument("--json-out", default=str(REPO / "bench/results/cpu_stream.json"))
    args = ap.parse_args()
    if _ext.cpu_kernels() is None:
        print("cpu_stream: needs the CPU kernels (twotower_rt._cpu)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    model = twotower_rt.load()
    prompts = ev.timing_prompts(model.tokenizer, args.data_dir, args.speed_prompts)
    probes = []
    with contextlib.redirect_stdout(io.StringIO()) as log:
        speeds = ev.measure_speed(model, prompts, ev.NEW_TOKENS, args.rounds, CONFIGS, MODES,
                                  BATCHES, probes)  # fmt: skip
    print(log.getvalue(), end="")
    report = {**report_header(), "rounds": args.rounds, "speed_prompts": len(prompts),
              "summary": summary(speeds),
              "speed": {ev.config_name(k): v for k, v in speeds.items()},
              "matmul_probes": probes}  # fmt: skip
    write_report(args.json_out, report)
    for batch, cell in report["summary"].items():
        ratios = {name: c["md_vs_ar"] for name, c in cell.items() if isinstance(c, dict)}
        gains = {k: v for k, v in cell.items() if not isinstance(v, dict)}
        print(f"{batch}: diffusion / ar {ratios}; stream gains {gains}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
