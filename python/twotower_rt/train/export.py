"""Write a trained run as a checkpoint directory the runtime loads: config.json (the released
model's key names), model.safetensors (bf16 by default: half the bytes, and the runtime computes
in whatever dtype it is asked for), tokenizer.json."""

from __future__ import annotations

import os
import shutil

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from .model_init import run_config
from .train import config_json, write_json


def export(run_dir: str, tokenizer_path: str, out_dir: str, dtype: str = "bfloat16",
           stage: str = "auto") -> None:  # fmt: skip
    """``stage``: whose weights, ``diffusion`` (stage 2), ``distill`` (stage 3) or ``auto`` (stage
    3's if it ran, else stage 2's)."""
    cfg = run_config(run_dir, Tokenizer.from_file(tokenizer_path).get_vocab_size())
    if stage == "auto":
        has_distill = os.path.isfile(os.path.join(run_dir, "distill.safetensors"))
        stage = "distill" if has_distill else "diffusion"
    if stage not in ("diffusion", "distill"):
        raise ValueError(f"stage must be 'auto', 'diffusion' or 'distill', got {stage!r}")
    weights = os.path.join(run_dir, f"{stage}.safetensors")
    state = load_file(weights)
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.to(torch_dtype).contiguous() for k, v in sorted(state.items())},
              os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt", "source": "python -m twotower_rt.train"})  # fmt: skip
    os.chmod(os.path.join(out_dir, "model.safetensors"), 0o644)
    write_json(os.path.join(out_dir, "config.json"), {**config_json(cfg), "torch_dtype": dtype})
    shutil.copyfile(tokenizer_path, os.path.join(out_dir, "tokenizer.json"))
    total = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    print(f"exported {weights} ({dtype}) -> {out_dir} ({total / 2**20:.1f} MiB)")
