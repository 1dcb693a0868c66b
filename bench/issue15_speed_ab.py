"""Issue 15: batch-1 speed of two models side by side (mask_diffusion@0.8 against ar).

    python bench/issue15_speed_ab.py MODEL_A MODEL_B [--data-dir .data] [--rounds 2]
        [--json-out bench/results/issue15_cf10_speed_ab.json]

``train.evaluate.measure_speed`` restricted to ``ar`` and ``mask_diffusion`` at gamma 0.8, batch 1,
over evaluate's 64 timed prompts (64 of the 512, evenly spread), the CPU kernels on one thread and
on two, 3 timed rounds after a warm-up; the two models take turns, ``--rounds`` times each.
"""

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
from twotower_rt.train import evaluate as ev  # noqa: E402

MODES = [("ar", None), ("mask_diffusion", 0.8)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs=2)
    ap.add_argument("--data-dir", default=".data")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json-out", default="bench/results/issue15_speed_ab.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    models = {path: twotower_rt.load(path) for path in args.models}
    tok = next(iter(models.values())).tokenizer
    prompts = ev.timing_prompts(tok, args.data_dir, ev.SPEED_PROMPTS)  # evaluate's
    results = {path: [] for path in models}
    for r in range(args.rounds):
        for path, model in models.items():
            with contextlib.redirect_stdout(io.StringIO()):
                s = ev.measure_speed(model, prompts, ev.NEW_TOKENS, 3, (1, 2), MODES, batches=(1,))
            one, two = s[1]["batch_1"]["mask_diffusion@0.8"], s[2]["batch_1"]["mask_diffusion@0.8"]
            row = {"cpu_vs_ar_1": one["cpu_vs_ar"], "wall_vs_ar_2": two["wall_vs_ar"],
                   "tpf": one["tokens_per_forward"]}  # fmt: skip
            results[path].append(row)
            print(f"{path} round {r}: {row}", flush=True)
    write_report(args.json_out, {
        **report_header(),
        "results": results,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
