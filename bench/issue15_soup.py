"""Issue 15: a model soup, the element-wise mean of several stage-3 runs' weights.

    python bench/issue15_soup.py OUT_DIR RUN_DIR [RUN_DIR ...]

Each RUN_DIR is a checkpoint ``bench/issue15_distill.py`` wrote (``candidate`` or
``candidate_nocf``: its ``float32.safetensors`` beside the shipped-format ``model.safetensors``),
all fine-tuned from the same stage-2 model, so they share the context tower and start from the
same denoiser. OUT_DIR gets the mean in float32 and in bf16 (the runtime's format), with the
first run's config and tokenizer; evaluate it with ``bench/issue15_distill.py --eval-only``. Two
runs of one recipe differ by 0.05-0.08 of NLL ratio (README), and averaging fine-tuned weights
is the usual remedy for run-to-run variance; this measures whether it moves the trade-off.
"""

from __future__ import annotations

import argparse
import os
import shutil

import torch
from safetensors.torch import load_file, save_file


def soup(runs: list[str], out_dir: str) -> None:
    states = [load_file(os.path.join(r, "float32.safetensors")) for r in runs]
    keys = set(states[0])
    if any(set(s) != keys for s in states):
        raise SystemExit("the runs' checkpoints hold different tensors: not one model's runs")
    mean = {k: (sum(s[k].double() for s in states) / len(states)).float() for k in sorted(keys)}
    os.makedirs(out_dir, exist_ok=True)
    save_file(mean, os.path.join(out_dir, "float32.safetensors"))
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in mean.items()},
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    for name in ("config.json", "tokenizer.json"):
        shutil.copyfile(os.path.join(runs[0], name), os.path.join(out_dir, name))
    print(f"mean of {len(runs)} runs ({len(mean)} tensors) -> {out_dir}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("out_dir")
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args()
    soup(args.runs, args.out_dir)


if __name__ == "__main__":
    main()
