"""The public entry point: ``twotower_rt.load(path)`` -> a model whose ``generate`` runs a mode."""

from __future__ import annotations

import os

import torch

from .checkpoint import load_checkpoint, resolve_dtype
from .config import TwoTowerConfig
from .generate import MODES, GenerationOutput, generate
from .model.tower import TwoTowerLM

TOKENIZER_FILE = "tokenizer.json"
# The tiny trained model shipped inside the package (python -m twotower_rt.train made it; see
# bench/results/default_model.json): what load() and the CLI use when given no path.
DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")
BUILTIN_SOURCE = "<builtin tiny random>"
MAX_TOKENIZER_BYTES = 256 << 20


def resolve_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a valid torch device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} asked for, but torch sees no CUDA GPU here "
            f"(torch {torch.__version__}); use device='cpu'"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device type {dev.type!r} is not supported (cpu or cuda)")
    return dev


class TwoTowerModel:
    """A loaded two-tower model: ``generate`` for token ids, ``encode``/``decode`` when the
    checkpoint ships a tokenizer.json."""

    modes = MODES

    def __init__(self, lm: TwoTowerLM, source: str, tokenizer=None):
        self.lm = lm
        self.source = source
        self.tokenizer = tokenizer

    @property
    def config(self) -> TwoTowerConfig:
        return self.lm.cfg

    @property
    def device(self) -> torch.device:
        return self.lm.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.dtype

    def generate(self, input_ids, mode: str = "mask_diffusion", **params) -> GenerationOutput:
        """input_ids: a list of token-id lists (prompts may differ in length). Parameters:
        max_new_tokens, block_size, steps_per_block, mask_token_id, temperature, top_k, top_p,
        confidence_threshold, eos_token_id (int or list), seed (int for every row or one per
        row). Returns per-row ``sequences`` (prompt + generated) and ``nfe``."""
        return generate(self.lm, input_ids, mode, **params)

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(
                f"{self.source}: this checkpoint has no {TOKENIZER_FILE}; "
                "pass token ids instead of text"
            )
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        return self._require_tokenizer().encode(text).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._require_tokenizer().decode(ids, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        cfg = self.config
        return (
            f"TwoTowerModel({self.source!r}, layers={cfg.hybrid_override_pattern!r}, "
            f"hidden={cfg.hidden_size}, vocab={cfg.vocab_size}, device={self.device}, "
            f"dtype={self.dtype})"
        )


def load(
    path: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    check_weights: bool = False,
) -> TwoTowerModel:
    """Load a checkpoint directory (config.json + safetensors [+ tokenizer.json]) onto ``device``
    in ``dtype`` (float32 or bfloat16). With no path, the default model shipped in the package
    (a tiny trained two-tower model with its tokenizer; :func:`load_builtin_model` gives the
    seeded random one). ``check_weights``: scan every tensor and refuse (CheckpointError naming
    it) one holding a NaN or an infinity."""
    dev = resolve_device(device)
    dtype = resolve_dtype(dtype)
    if path is None:
        path = DEFAULT_MODEL_DIR
    _, lm = load_checkpoint(path, dev, dtype, check_weights)
    tokenizer = None
    tok_path = os.path.join(os.fspath(path), TOKENIZER_FILE)
    if os.path.isfile(tok_path):
        from tokenizers import Tokenizer

        from .safejson import read_bytes

        try:
            tokenizer = Tokenizer.from_str(read_bytes(tok_path, MAX_TOKENIZER_BYTES).decode())
        except Exception as e:  # tokenizers raises its own exception type
            raise ValueError(f"{tok_path}: cannot load tokenizer: {e}") from None
    return TwoTowerModel(lm, os.fspath(path), tokenizer)


def load_builtin_model(
    *, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32
) -> TwoTowerModel:
    """The built-in tiny configuration with seeded random weights (no files, no tokenizer)."""
    from .builtin import load_builtin

    return TwoTowerModel(load_builtin(resolve_device(device), resolve_dtype(dtype)), BUILTIN_SOURCE)
