"""``twotower-rt quantize``: a checkpoint with FP8 (e4m3) weights from a bf16/fp32 one.

The projections listed in :mod:`twotower_rt.model.linear` get float8_e4m3fn weights and float32
``weight_scale`` tensors (per output channel, or per block with ``block``); every other tensor keeps
the source checkpoint's dtype. config.json is the source's with a ``quantization_config`` added,
which the loader reads; tokenizer.json is copied. It works one source shard at a time, so the
real checkpoint (24 shards, 126 GB in bf16) needs the memory of one shard, not of the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .checkpoint import (
    INDEX_FILE,
    _weight_files,
    expected_fixed_dtypes,
    expected_shapes,
    iter_checkpoint,
)
from .config import MAX_CONFIG_BYTES, MAX_FP8_BLOCK, ConfigError, TwoTowerConfig, read_json
from .model.linear import FP8_DTYPE, quantize_weight

PER_CHANNEL = (1, 0)


def _file_bytes(directory: str) -> int:
    return sum(os.path.getsize(p) for p in _weight_files(directory))


def quantize_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, block: tuple[int, int] = PER_CHANNEL
) -> dict:
    """Write the FP8 checkpoint of ``src`` into the new directory ``dst``, shard by shard (one
    source shard's tensors in memory at a time; a sharded source gives the same shards and an
    index); returns a report (bytes before/after, tensors quantized). Everything is written into
    a temporary directory beside ``dst`` and renamed to ``dst`` at the end, so on any failure (a
    NaN or infinite weight, a full disk, an interrupt) no partial output is left."""
    src, dst = os.fspath(src), os.fspath(dst).rstrip(os.sep) or os.sep
    rows, cols = block if len(block) == 2 else (0, -1)
    if (
        any(type(v) is not int for v in block)
        or not 1 <= rows <= MAX_FP8_BLOCK
        or not (0 <= cols <= MAX_FP8_BLOCK)
    ):
        raise ValueError(
            f"block must be (rows in [1, {MAX_FP8_BLOCK}], cols in [0, {MAX_FP8_BLOCK}]; "
            f"0 = whole row), got {tuple(block)}"
        )
    if os.path.lexists(dst) and not (os.path.isdir(dst) and not os.listdir(dst)):
        raise ValueError(
            f"{dst}: exists and is not empty (or not a directory); choose a new directory"
        )
    cfg = TwoTowerConfig.from_json_file(os.path.join(src, "config.json"))
    if cfg.fp8_weight_block is not None:
        raise ValueError(f"{src}: already an FP8 checkpoint")
    qcfg = dataclasses.replace(cfg, fp8_weight_block=(rows, cols))
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.", dir=os.path.dirname(dst) or ".")
    try:
        quantized, kept_dtypes = _write(src, work, cfg, qcfg)
        if os.path.isdir(dst):
            os.rmdir(dst)  # empty (checked above)
        os.rename(work, dst)
    except SafetensorError as e:  # safetensors reports a failed write (a full disk) this way
        shutil.rmtree(work, ignore_errors=True)
        raise OSError(f"{dst}: cannot write the FP8 checkpoint: {e}") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    before, after = _file_bytes(src), _file_bytes(dst)
    return {
        "source": src,
        "output": dst,
        "weight_block": list(qcfg.fp8_weight_block),
        "tensors_quantized": quantized,
        "other_tensors_dtype": ", ".join(sorted(kept_dtypes)),
        "bytes_before": before,
        "bytes_after": after,
        "saved_fraction": round(1 - after / before, 4),
    }


def _write(src: str, dst: str, cfg, qcfg) -> tuple[int, set[str]]:
    """The whole FP8 checkpoint into ``dst``: shards, index, config.json, tokenizer.json."""
    weight_map, quantized, kept_dtypes = _write_shards(src, dst, cfg, qcfg)
    if os.path.isfile(os.path.join(src, INDEX_FILE)):
        total = sum(os.path.getsize(os.path.join(dst, f)) for f in set(weight_map.values()))
        _write_json(os.path.join(dst, INDEX_FILE),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})  # fmt: skip
    raw = read_json(os.path.join(src, "config.json"), MAX_CONFIG_BYTES, ConfigError, "config")
    raw["quantization_config"] = qcfg.to_dict()["quantization_config"]
    _write_json(os.path.join(dst, "config.json"), raw)
    if os.path.isfile(os.path.join(src, "tokenizer.json")):
        shutil.copyfile(os.path.join(src, "tokenizer.json"), os.path.join(dst, "tokenizer.json"))
    return quantized, kept_dtypes


def _write_shards(src, dst, cfg, qcfg) -> tuple[dict[str, str], int, set[str]]:
    """Each source shard to a shard of the same name in ``dst``: the FP8 projections with their
    scales, every other tensor as stored. Returns (name -> shard file, count quantized, the
    dtypes kept)."""
    fixed = expected_fixed_dtypes(qcfg)
    weight_map: dict[str, str] = {}
    kept_dtypes: set[str] = set()
    quantized = 0
    shard: dict[str, torch.Tensor] = {}
    shard_file = None
    for path, name, tensor in iter_checkpoint(src, expected_shapes(cfg), check_finite=True):
        if os.path.basename(path) != shard_file:
            if shard_file is not None:
                save_file(shard, os.path.join(dst, shard_file), metadata={"format": "pt"})
            shard, shard_file = {}, os.path.basename(path)
        if fixed.get(name) == FP8_DTYPE:
            q, scale = quantize_weight(tensor, qcfg.fp8_weight_block)
            scale_name = name.removesuffix("weight") + "weight_scale"
            shard[name], shard[scale_name] = q, scale
            weight_map[scale_name] = shard_file
            quantized += 1
        else:
            shard[name] = tensor.contiguous()
            kept_dtypes.add(str(tensor.dtype).removeprefix("torch."))
        weight_map[name] = shard_file
    if shard_file is not None:
        save_file(shard, os.path.join(dst, shard_file), metadata={"format": "pt"})
    return weight_map, quantized, kept_dtypes


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
