"""Issue 15: the longer-trained stage 2 as a base directory for stage 3.

    python bench/issue15_stage2_base.py OUT_DIR [--run-checkpoint RUN/diffusion.safetensors]
    python bench/issue15_distill.py --base OUT_DIR ...

``bench/checkpoints/stage2_4155_denoiser.safetensors`` holds the denoiser half (bfloat16) of a
stage 2 trained for 4,155 steps instead of the shipped model's 2,155: the stage-2 model shipped at
commit 0b9823a, continued with ``python -m twotower_rt.train diffusion --resume --steps 2000`` and
the stage-2 recipe (lr 1.5e-3, warm-up 20, batch 8 x 256), a warm restart of its schedule. Its
held-out masked-token CE went from 4.676 to 4.489 nats (``bench/results/issue15_stage2_4155_log.
jsonl``). Every stage leaves the context tower as stage 1 made it, so only the denoiser is kept:
this writes OUT_DIR as the shipped model's context tower and head with that denoiser (config and
tokenizer copied from the shipped model), in the layout ``twotower_rt.load`` and ``--base`` take.
``--run-checkpoint`` takes the denoiser from a stage-2 run's own checkpoint instead (the whole
model in float32, as ``python -m twotower_rt.train diffusion`` writes it), rounded to bfloat16 as
the shipped stage-2 checkpoint was.
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


def denoiser_half(run_checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """The denoiser's tensors of a whole-model checkpoint, in bfloat16, saved to ``out``."""
    import torch

    tensors = load_file(str(run_checkpoint))
    half = {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()
            if not k.startswith(CONTEXT_PREFIXES)}  # fmt: skip
    save_file(dict(sorted(half.items())), str(out), metadata={"format": "pt"})
    return Path(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--run-checkpoint", default=None,
                    help="a stage-2 run's diffusion.safetensors (default: the 4,155-step "
                         "denoiser kept in bench/checkpoints)")  # fmt: skip
    args = ap.parse_args()
    denoiser = DENOISER
    if args.run_checkpoint is not None:
        os.makedirs(args.out_dir, exist_ok=True)
        half = os.path.join(args.out_dir, "denoiser_bf16.safetensors")
        denoiser = denoiser_half(args.run_checkpoint, half)
    print(f"stage 2 ({denoiser}) -> {assemble(args.out_dir, denoiser)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
