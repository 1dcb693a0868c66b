"""``twotower-rt quantize``: a checkpoint with FP8 (e4m3) weights from a bf16/fp32 one.

The projections listed in :mod:`twotower_rt.model.linear` get float8_e4m3fn weights and float32
``weight_scale`` tensors (per output channel, or per block with ``block``); every other tensor keeps
the source checkpoint's dtype. config.json is the source's with a ``quantization_config`` added,
which the loader reads; tokenizer.json is copied.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import _weight_files, expected_fixed_dtypes, load_checkpoint
from .model.linear import FP8_DTYPE, quantize_weight

PER_CHANNEL = (1, 0)


def _source_dtype(directory: str) -> torch.dtype:
    """The dtype the source checkpoint stores its tensors in (that of its first tensor)."""
    for path in _weight_files(directory):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                return f.get_tensor(name).dtype
    raise ValueError(f"{directory}: the checkpoint has no tensors")


def _file_bytes(directory: str) -> int:
    return sum(os.path.getsize(p) for p in _weight_files(directory))


def quantize_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, block: tuple[int, int] = PER_CHANNEL
) -> dict:
    """Write the FP8 checkpoint of ``src`` into the new directory ``dst``; returns a report
    (bytes before/after, tensors quantized)."""
    src, dst = os.fspath(src), os.fspath(dst)
    if len(block) != 2 or block[0] < 1 or block[1] < 0:
        raise ValueError(f"block must be (rows >= 1, cols >= 0; 0 = whole row), got {block}")
    if os.path.exists(dst) and os.listdir(dst):
        raise ValueError(f"{dst}: exists and is not empty; choose a new directory")
    cfg, lm = load_checkpoint(src, "cpu", torch.float32)
    if cfg.fp8_weight_block is not None:
        raise ValueError(f"{src}: already an FP8 checkpoint")
    keep_dtype = _source_dtype(src)
    qcfg = dataclasses.replace(cfg, fp8_weight_block=tuple(block))
    fixed = expected_fixed_dtypes(qcfg)
    state: dict[str, torch.Tensor] = {}
    quantized = 0
    for name, tensor in lm.state_dict().items():
        if fixed.get(name) == FP8_DTYPE:
            q, scale = quantize_weight(tensor, qcfg.fp8_weight_block)
            state[name] = q
            state[name.removesuffix("weight") + "weight_scale"] = scale
            quantized += 1
        else:
            state[name] = tensor.to(keep_dtype).contiguous()
    os.makedirs(dst, exist_ok=True)
    save_file(state, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        raw = json.load(f)
    raw["quantization_config"] = qcfg.to_dict()["quantization_config"]
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=2)
        f.write("\n")
    if os.path.isfile(os.path.join(src, "tokenizer.json")):
        shutil.copyfile(os.path.join(src, "tokenizer.json"), os.path.join(dst, "tokenizer.json"))
    before, after = _file_bytes(src), _file_bytes(dst)
    return {
        "source": src,
        "output": dst,
        "weight_block": list(qcfg.fp8_weight_block),
        "tensors_quantized": quantized,
        "other_tensors_dtype": str(keep_dtype).removeprefix("torch."),
        "bytes_before": before,
        "bytes_after": after,
        "saved_fraction": round(1 - after / before, 4),
    }
