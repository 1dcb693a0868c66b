"""Issue 15: the longer-trained stage 2 as a base directory for stage 3.

    python bench/issue15_stage2_base.py OUT_DIR
    python bench/issue15_distill.py --base OUT_DIR ...

``bench/checkpoints/stage2_4155_denoiser.safetensors`` holds the denoiser half (bfloat16) of a
stage 2 trained for 4,155 steps instead of the shipped model's 2,155: the stage-2 model shipped at
commit 0b9823a, continued with ``python -m twotower_rt.train diffusion --resume --steps 2000`` and
the stage-2 recipe (lr 1.5e-3, warm-up 20, batch 8 x 256), a warm restart of its schedule. Its
held-out masked-token CE went from 4.676 to 4.489 nats (``bench/results/issue15_stage2_4155_log.
jsonl``). Every stage leaves the context tower as stage 1 made it, so only the denoiser is kept:
this writes OUT_DIR as the shipped model's context tower and head with that denoiser (config and
tokenizer copied from the shipped model), in the layout ``twotower_rt.load`` and ``--base`` take.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "python" / "twotower_rt" / "default_model"
DENOISER = REPO / "bench" / "checkpoints" / "stage2_4155_denoiser.safetensors"
CONTEXT_PREFIXES = ("context_tower.", "context_lm_head.")


def assemble(out_dir: str | os.PathLike, denoiser: str | os.PathLike = DENOISER,
             shipped: str | os.PathLike = SHIPPED) -> Path:  # fmt: skip
    """OUT_DIR = ``shipped``'s context half + ``denoiser``'s tensors; raises if the two halves
    overlap or leave a tensor of the shipped model out."""
    base = load_file(os.path.join(shipped, "model.safetensors"))
    half = load_file(str(denoiser))
    context = {k: v for k, v in base.items() if k.startswith(CONTEXT_PREFIXES)}
    if any(k.startswith(CONTEXT_PREFIXES) for k in half):
        raise ValueError(
            f"{denoiser} holds context-tower tensors; it should hold the denoiser only"
        )
    missing = sorted(set(base) - set(context) - set(half))
    extra = sorted(set(half) - set(base))
    if missing or extra:
        raise ValueError(f"{denoiser} does not match the model: missing {missing[:3]}, "
                         f"unknown {extra[:3]}")  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(dict(sorted({**context, **half}.items())), str(out / "model.safetensors"),
              metadata={"format": "pt", "source": "bench/issue15_stage2_base.py"})  # fmt: skip
    for name in ("config.json", "tokenizer.json"):
        shutil.copyfile(os.path.join(shipped, name), out / name)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    args = ap.parse_args()
    print(f"stage 2 (4,155 steps) -> {assemble(args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
