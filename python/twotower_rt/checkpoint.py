"""Loading a two-tower checkpoint directory: config.json + model.safetensors, or shards listed in
model.safetensors.index.json. Tensors are memory-mapped and converted one at a time onto the device
and dtype asked for. Every name and shape is checked against the model the config describes before
anything is kept. Pickle checkpoints are refused: nothing in a checkpoint is ever unpickled or run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError, safe_open

from .config import TwoTowerConfig, read_json, schema_problem
from .model.linear import fixed_dtypes
from .model.tower import TwoTowerLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_INDEX_BYTES = 64 << 20  # the real model's index is ~1 MB

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class CheckpointError(ValueError):
    """The checkpoint on disk does not match what its config.json describes (or is unreadable)."""


class IndexSchema(BaseModel):
    """model.safetensors.index.json: ``weight_map`` tensor name -> shard file name (strings);
    ``metadata`` and other keys are not read."""

    model_config = ConfigDict(extra="allow", strict=True)

    weight_map: dict[str, str]


def _read_index(index_path: str) -> dict[str, str]:
    raw = read_json(index_path, MAX_INDEX_BYTES, CheckpointError, "the shards' index")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{index_path}: not a valid safetensors index (not a JSON object)")
    try:
        return IndexSchema.model_validate(raw).weight_map
    except ValidationError as e:
        raise CheckpointError(
            f"{index_path}: not a valid safetensors index: {schema_problem(e)}"
        ) from None


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
        return DTYPES[dtype.lower()]
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype {dtype} is not supported; use torch.float32 or torch.bfloat16")
    return dtype


def _weight_files(directory: str) -> dict[str, list[str] | None]:
    """Map each safetensors file of the checkpoint to the tensor names the index assigns it
    (None when there is no index: a single file holds everything)."""
    index_path = os.path.join(directory, INDEX_FILE)
    single_path = os.path.join(directory, SINGLE_FILE)
    if os.path.lexists(index_path):
        weight_map = _read_index(index_path)
        files: dict[str, list[str] | None] = {}
        for name, shard in weight_map.items():
            shard_path = os.path.join(directory, shard)
            if os.path.basename(shard) != shard or not shard.endswith(".safetensors"):
                raise CheckpointError(
                    f"{index_path}: tensor {name!r} points to {shard!r}, "
                    "which is not a .safetensors file in this directory"
                )
            files.setdefault(shard_path, []).append(name)
        for shard_path in files:
            if not os.path.isfile(shard_path):
                raise CheckpointError(
                    f"{index_path}: shard {shard_path} does not exist (or is not a file)"
                )
        return files
    if os.path.lexists(single_path):
        if not os.path.isfile(single_path):
            raise CheckpointError(f"{single_path}: not a regular file")
        return {single_path: None}
    pickles = sorted(f for f in os.listdir(directory) if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(
            f"{os.path.join(directory, pickles[0])}: pickle checkpoints are not loaded (unpickling "
            "can run arbitrary code); convert the weights to safetensors first"
        )
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} and no {INDEX_FILE}")


def _fmt_names(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def iter_checkpoint(
    directory: str,
    expected: dict[str, torch.Size],
    fixed: dict[str, torch.dtype] | None = None,
    check_finite: bool = False,
) -> Iterator[tuple[str, str, torch.Tensor]]:
    """``(file, name, tensor)`` for every tensor of the checkpoint, shard after shard, each as
    stored (CPU, the file's dtype), checked against ``expected`` (names, shapes, floating point)
    and ``fixed`` (the dtypes an FP8 checkpoint must store), and with ``check_finite`` refused if
    it holds a NaN or an infinity; after the last, missing names raise. Only one tensor is held
    at a time, so a caller can work shard by shard."""
    fixed = fixed or {}
    where: dict[str, str] = {}
    for path, listed in _weight_files(directory).items():
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                names = list(f.keys())
                if listed is not None:
                    absent = set(listed) - set(names)
                    if absent:
                        raise CheckpointError(
                            f"{path}: the index lists tensors that are not in "
                            f"this file: {_fmt_names(absent)}"
                        )
                for name in names:
                    if listed is not None and name not in listed:
                        continue  # the index assigns this name to another shard
                    if name not in expected:
                        raise CheckpointError(
                            f"{path}: unexpected tensor {name!r} (not part of "
                            "the model its config.json describes)"
                        )
                    if name in where:
                        raise CheckpointError(f"{path}: tensor {name!r} also in {where[name]}")
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != tuple(expected[name]):
                        raise CheckpointError(
                            f"{path}: tensor {name!r} has shape {list(shape)}, "
                            f"expected {list(expected[name])}"
                        )
                    tensor = f.get_tensor(name)
                    if not tensor.is_floating_point():
                        raise CheckpointError(
                            f"{path}: tensor {name!r} has dtype {tensor.dtype}, "
                            "expected a floating-point type"
                        )
                    want = fixed.get(name)
                    if want is not None and tensor.dtype != want:
                        raise CheckpointError(
                            f"{path}: tensor {name!r} has dtype {tensor.dtype}, expected {want} "
                            "(config.json's quantization_config says this weight is FP8)"
                        )
                    if check_finite:
                        _check_finite(path, name, tensor)
                    where[name] = path
                    yield path, name, tensor
        except SafetensorError as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    missing = set(expected) - set(where)
    if missing:
        raise CheckpointError(
            f"{directory}: {len(missing)} tensor(s) missing from the checkpoint: "
            f"{_fmt_names(missing)}"
        )


def _check_finite(path: str, name: str, tensor: torch.Tensor) -> None:
    bad = 0
    for chunk in tensor.reshape(-1).split(1 << 24):  # float32 copies of 64 MiB at most
        bad += int((~torch.isfinite(chunk.float())).sum())
    if bad:
        raise CheckpointError(
            f"{path}: tensor {name!r} holds {bad} NaN or infinite value(s) of {tensor.numel()}"
        )


def read_state_dict(
    directory: str,
    expected: dict[str, torch.Size],
    device,
    dtype: torch.dtype,
    fixed: dict[str, torch.dtype] | None = None,
    check_weights: bool = False,
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint (checked by :func:`iter_checkpoint`, with
    ``check_weights`` also for NaN / infinite values) on ``device``: those named in ``fixed``
    (an FP8 checkpoint's weights and scales) keep that dtype, all others are converted to
    ``dtype``. ``progress``: a tqdm bar over the shards on stderr (None: when there is more
    than one)."""
    from tqdm import tqdm

    fixed = fixed or {}
    shards = len(_weight_files(directory))
    show = shards > 1 if progress is None else progress
    state, current = {}, None
    with tqdm(total=shards, desc="Loading safetensors shards", unit="shard",
              disable=not show) as bar:  # fmt: skip
        for path, name, tensor in iter_checkpoint(directory, expected, fixed, check_weights):
            if path != current:
                bar.update(current is not None)
                current = path
            state[name] = tensor.to(device=device, dtype=fixed.get(name) or dtype)
        bar.update(current is not None)
    return state


def _meta_model(cfg: TwoTowerConfig) -> TwoTowerLM:
    """The model the config describes, on the meta device (shapes and dtypes, no memory)."""
    with torch.device("meta"):
        return TwoTowerLM(cfg)


def _take(model: TwoTowerLM, state: dict[str, torch.Tensor]) -> TwoTowerLM:
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).eval()


def build_model(cfg: TwoTowerConfig, state: dict[str, torch.Tensor]) -> TwoTowerLM:
    """Instantiate the model without allocating (meta device) and take the given tensors."""
    return _take(_meta_model(cfg), state)


def _shapes(model: TwoTowerLM) -> dict[str, torch.Size]:
    return {name: t.shape for name, t in model.state_dict().items()}


def expected_shapes(cfg: TwoTowerConfig) -> dict[str, torch.Size]:
    return _shapes(_meta_model(cfg))


def expected_fixed_dtypes(cfg: TwoTowerConfig) -> dict[str, torch.dtype]:
    """The tensors whose dtype the checkpoint fixes (FP8 weights and their float32 scales)."""
    if cfg.fp8_weight_block is None:
        return {}
    return fixed_dtypes(_meta_model(cfg))


def load_checkpoint(
    path: str | os.PathLike,
    device="cpu",
    dtype: torch.dtype | str = torch.float32,
    check_weights: bool = False,
    progress: bool | None = None,
) -> tuple[TwoTowerConfig, TwoTowerLM]:
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise CheckpointError(
            f"{directory}: not a checkpoint directory (expected a folder with "
            "config.json and safetensors weights)"
        )
    dtype = resolve_dtype(dtype)
    cfg = TwoTowerConfig.from_json_file(os.path.join(directory, "config.json"))
    # One meta model gives the expected names, shapes and fixed dtypes and then takes the tensors
    # (building it costs seconds at the real model's 13k modules).
    model = _meta_model(cfg)
    state = read_state_dict(directory, _shapes(model), torch.device(device), dtype,
                            fixed_dtypes(model), check_weights, progress)  # fmt: skip
    return cfg, _take(model, state)
