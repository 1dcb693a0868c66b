"""The public entry point: ``twotower_rt.load(path or hub id)`` -> a model whose ``generate`` runs
a mode, on token ids or on text."""

from __future__ import annotations

import os

import torch

from .checkpoint import load_checkpoint, resolve_dtype
from .config import TwoTowerConfig
from .generate import GenerationOutput, generate
from .generation_config import GenerationDefaults, read_generation_config
from .model.tower import TwoTowerLM
from .params import MODES

TOKENIZER_FILE = "tokenizer.json"
# The tiny trained model shipped inside the package (python -m twotower_rt.train made it; see
# bench/results/default_model.json): what load() and the CLI use when given no path.
DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")
BUILTIN_SOURCE = "<builtin tiny random>"
MAX_TOKENIZER_BYTES = 256 << 20


def resolve_device(device) -> torch.device:
    """A torch device from its name; "auto": the current CUDA GPU when torch sees one, else the
    CPU."""
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")  # fmt: skip
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


def checkpoint_dtype(directory: str) -> str | None:
    """config.json's ``torch_dtype`` (``dtype`` in newer files), or None."""
    from . import safejson
    from .config import MAX_CONFIG_BYTES

    try:
        raw = safejson.load_file(os.path.join(directory, "config.json"),
                                 max_bytes=MAX_CONFIG_BYTES, allow_infinity=True)  # fmt: skip
    except (OSError, ValueError):
        return None  # load_checkpoint reports what is wrong with it
    value = raw.get("torch_dtype", raw.get("dtype")) if isinstance(raw, dict) else None
    return value if isinstance(value, str) else None


def choose_dtype(dtype, device: torch.device, directory: str) -> tuple[torch.dtype, str]:
    """``(dtype, why)``. "auto": on a GPU the checkpoint's torch_dtype when it is bfloat16, else
    bfloat16 (float32 and float16 checkpoints: the kernels take bfloat16, as vLLM downcasts
    float32); on the CPU float32 (the PyTorch CPU path is fastest and conformance-exact there)."""
    if dtype != "auto":
        return resolve_dtype(dtype), "asked for"
    stored = checkpoint_dtype(directory)
    if device.type != "cuda":
        return torch.float32, f"auto: float32 on the CPU; checkpoint: {stored or 'unstated'}"
    if stored == "bfloat16":
        return torch.bfloat16, "auto: the checkpoint's torch_dtype"
    return torch.bfloat16, f"auto: bfloat16 on a GPU; checkpoint: {stored or 'unstated'}"


class TwoTowerModel:
    """A loaded two-tower model: ``generate`` for token ids or text (text needs the checkpoint's
    tokenizer.json), ``encode``/``decode``."""

    modes = MODES

    def __init__(self, lm: TwoTowerLM, source: str, tokenizer=None, *, path: str | None = None,
                 generation: GenerationDefaults | None = None, chat_template=None,
                 dtype_reason: str = ""):  # fmt: skip
        self.lm = lm
        self.source = source  # what the caller named: a directory or a hub id
        self.path = path if path is not None else source  # the local checkpoint directory
        self.tokenizer = tokenizer
        self.generation = generation if generation is not None else GenerationDefaults()
        self.chat_template = chat_template  # twotower_rt.chat.ChatTemplate, or None
        self.dtype_reason = dtype_reason

    def with_lm(self, lm: TwoTowerLM) -> TwoTowerModel:
        """The same model (tokenizer, generation defaults, template) over another ``lm`` (a
        tensor-parallel shard, a placed copy)."""
        return TwoTowerModel(lm, self.source, self.tokenizer, path=self.path,
                             generation=self.generation, chat_template=self.chat_template,
                             dtype_reason=self.dtype_reason)  # fmt: skip

    @property
    def config(self) -> TwoTowerConfig:
        return self.lm.cfg

    @property
    def device(self) -> torch.device:
        return self.lm.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.dtype

    def generate(self, prompts, mode: str = "mask_diffusion", **params) -> GenerationOutput:
        """prompts: a text, a list of texts, or a list of token-id lists (prompts may differ in
        length). Parameters: max_new_tokens, block_size, steps_per_block, mask_token_id,
        temperature, top_k, top_p, confidence_threshold, eos_token_id (int or list), seed (int
        for every row or one per row); those not given come from the checkpoint's
        generation_config.json, then SamplingParams. Returns per-row ``sequences`` (prompt +
        generated), ``generated``, ``nfe`` and, with a tokenizer, ``texts`` (generated text)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts)
        if texts and prompts:
            prompts = [self.encode(p) for p in prompts]
        out = generate(self.lm, prompts, mode, **self.generation.apply(params))
        if self.tokenizer is not None:
            out.texts = [self.decode(g) for g in out.generated]
        return out

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
    device: str | torch.device = "auto",
    dtype: torch.dtype | str = "auto",
    revision: str | None = None,
    progress: bool | None = None,
    check_weights: bool = False,
) -> TwoTowerModel:
    """Load a checkpoint (config.json + safetensors [+ tokenizer.json, tokenizer_config.json,
    generation_config.json]) onto ``device`` in ``dtype``. ``path``: a directory, or a Hugging
    Face hub id ("org/name", at ``revision``) taken from the hub cache or downloaded into it
    (:mod:`twotower_rt.hub`; HF_HUB_OFFLINE=1: the cache only). With no path, the default model
    shipped in the package (a tiny trained two-tower model with its tokenizer;
    :func:`load_builtin_model` gives the seeded random one). ``device`` "auto": CUDA when torch
    sees a GPU, else the CPU; ``dtype`` "auto": see :func:`choose_dtype`, else float32 or
    bfloat16. ``progress``: a bar over the shards (None: when there is more than one).
    ``check_weights``: scan every tensor and refuse (CheckpointError naming it) one holding a
    NaN or an infinity."""
    from .chat import load_chat_template
    from .hub import resolve_model_dir

    source = DEFAULT_MODEL_DIR if path is None else os.fspath(path)
    path = resolve_model_dir(source, revision)
    dev = resolve_device(device)
    dtype, dtype_reason = choose_dtype(dtype, dev, path)
    _, lm = load_checkpoint(path, dev, dtype, check_weights, progress)
    tokenizer = None
    tok_path = os.path.join(path, TOKENIZER_FILE)
    if os.path.isfile(tok_path):
        from tokenizers import Tokenizer

        from .safejson import read_bytes

        try:
            tokenizer = Tokenizer.from_str(read_bytes(tok_path, MAX_TOKENIZER_BYTES).decode())
        except Exception as e:  # tokenizers raises its own exception type
            raise ValueError(f"{tok_path}: cannot load tokenizer: {e}") from None
    generation = read_generation_config(path, lm.cfg.vocab_size)
    return TwoTowerModel(lm, source, tokenizer, path=path, generation=generation,
                         chat_template=load_chat_template(path),
                         dtype_reason=dtype_reason)  # fmt: skip


def load_builtin_model(
    *, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32
) -> TwoTowerModel:
    """The built-in tiny configuration with seeded random weights (no files, no tokenizer)."""
    from .builtin import load_builtin

    return TwoTowerModel(load_builtin(resolve_device(device), resolve_dtype(dtype)), BUILTIN_SOURCE)


def startup_summary(model: TwoTowerModel, engine=None) -> str:
    """One line for the start of serve and batch: model, device, dtype (and why), on the CPU the
    threads (torch's, the kernels', whether the kernels' stream is on), the pool plan."""
    from .threads import kernel_stream, kernel_threads

    dtype = str(model.dtype).removeprefix("torch.")
    why = f" ({model.dtype_reason})" if getattr(model, "dtype_reason", "") else ""
    where = f" [{model.path}]" if getattr(model, "path", model.source) != model.source else ""
    cpu = ""
    if model.device.type == "cpu":
        stream = ", kernel stream on" if kernel_stream() else ""
        cpu = (f", threads: torch {torch.get_num_threads()}, kernels {kernel_threads()}"
               f"{stream}")  # fmt: skip
    pool = f"; {engine.plan.describe()}" if engine is not None else ""
    return f"model {model.source}{where}, device {model.device}, dtype {dtype}{why}{cpu}{pool}"
