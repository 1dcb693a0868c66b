"""The checkpoint's config.json as a validated dataclass.

Key names are those of the released NemotronH / TwoTower config.json. Only what the model uses is
kept; everything else in the file is ignored (e.g. ``rope_theta``: the model has no positional
encoding). Anything we cannot run is refused here, with the key and the value, before a single
weight is read.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import safejson

SUPPORTED_ARCHITECTURES = ("NemotronHTwoTowerForCausalLM",)

# One character per layer in ``hybrid_override_pattern``.
LAYER_KINDS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}

# Width of the sinusoidal time features and their maximum period: fixed by the modeling code,
# not stored in config.json.
TIME_FREQ_DIM = 256
TIME_MAX_PERIOD = 10000.0


# Architecture limits: far past any released model, low enough that no size read from a file
# overflows a product or makes building the model (on the meta device) take more than seconds.
MAX_LAYERS = 1024
MAX_DIM = 1 << 16  # hidden size, heads, head dims, state sizes
MAX_INTERMEDIATE = 1 << 20
MAX_VOCAB = 1 << 22
MAX_EXPERTS = 4096
MAX_EXPERT_MODULES = 1 << 16  # routed experts x MoE layers
MAX_CONFIG_BYTES = 4 << 20
MAX_FP8_BLOCK = 4096  # rows or columns of one FP8 scale block (DeepSeek's is 128)


class ConfigError(ValueError):
    """config.json describes something twotower_rt cannot run (or is malformed)."""


def _size(low: int, high: int):
    return Annotated[int, Field(ge=low, le=high)]


class ConfigSchema(BaseModel):
    """The keys of config.json that TwoTowerConfig reads: exact JSON types (a bool is not an int,
    "true" is not a bool), sizes within the architecture limits, finite floats; the keys present
    are checked, the rest take TwoTowerConfig's defaults. Cross-field rules (divisibility, token
    ids inside the vocabulary) are TwoTowerConfig's own."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    hidden_size: _size(1, MAX_DIM)
    vocab_size: _size(1, MAX_VOCAB)
    hybrid_override_pattern: Annotated[str, Field(min_length=1, max_length=MAX_LAYERS)]
    layer_norm_epsilon: Annotated[float, Field(gt=0, le=1)] | None = None
    mamba_num_heads: _size(1, MAX_DIM) | None = None
    mamba_head_dim: _size(1, MAX_DIM) | None = None
    n_groups: _size(1, MAX_DIM) | None = None
    ssm_state_size: _size(1, MAX_DIM) | None = None
    conv_kernel: _size(1, 64) | None = None
    use_conv_bias: bool | None = None
    use_bias: bool | None = None
    time_step_limit: tuple[float, Annotated[float, Field(allow_inf_nan=True)]] | None = None
    num_attention_heads: _size(1, MAX_DIM) | None = None
    num_key_value_heads: _size(1, MAX_DIM) | None = None
    head_dim: _size(1, MAX_DIM) | None = None
    attention_bias: bool | None = None
    n_routed_experts: _size(1, MAX_EXPERTS) | None = None
    num_experts_per_tok: _size(1, MAX_EXPERTS) | None = None
    n_shared_experts: _size(0, 1) | None = None
    moe_intermediate_size: _size(0, MAX_INTERMEDIATE) | None = None
    moe_shared_expert_intermediate_size: _size(0, MAX_INTERMEDIATE) | None = None
    intermediate_size: _size(0, MAX_INTERMEDIATE) | None = None
    routed_scaling_factor: Annotated[float, Field(gt=0)] | None = None
    norm_topk_prob: bool | None = None
    n_group: _size(1, MAX_EXPERTS) | None = None
    topk_group: _size(1, MAX_EXPERTS) | None = None
    mlp_bias: bool | None = None
    bos_token_id: _size(0, MAX_VOCAB) | None = None
    eos_token_id: _size(0, MAX_VOCAB) | None = None
    pad_token_id: _size(0, MAX_VOCAB) | None = None
    tie_word_embeddings: bool | None = None
    residual_in_fp32: bool | None = None
    architectures: list[str] | None = None

    @classmethod
    def check(cls, kwargs: dict, source: str) -> None:
        """ConfigError naming the file and the key for the first value refused."""
        try:
            cls.model_validate(kwargs)
        except ValidationError as e:
            raise ConfigError(f"{source}: {schema_problem(e)}") from None


def schema_problem(exc: ValidationError) -> str:
    """'key: what is wrong (got value)' for the first value a file's schema refused."""
    err = exc.errors(include_url=False)[0]
    key = ".".join(str(p) for p in err["loc"]) or "(the file)"
    got = repr(err.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    return f"{key}: {err['msg']} (got {got})"


@dataclass
class TwoTowerConfig:
    hidden_size: int
    vocab_size: int
    hybrid_override_pattern: str
    layer_norm_epsilon: float = 1e-5
    # Mamba-2
    mamba_num_heads: int = 64
    mamba_head_dim: int = 64
    n_groups: int = 8
    ssm_state_size: int = 128
    conv_kernel: int = 4
    use_conv_bias: bool = True
    use_bias: bool = False
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    # Attention
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    attention_bias: bool = False
    # MoE and dense MLP
    n_routed_experts: int = 128
    num_experts_per_tok: int = 6
    n_shared_experts: int = 1
    moe_intermediate_size: int = 1856
    moe_shared_expert_intermediate_size: int = 3712
    intermediate_size: int = 0
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    mlp_bias: bool = False
    # Tokens
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 0
    tie_word_embeddings: bool = False
    residual_in_fp32: bool = False
    architectures: list[str] = field(default_factory=lambda: list(SUPPORTED_ARCHITECTURES))
    # FP8 weights (config.json "quantization_config", written by `twotower-rt quantize`): None for
    # unquantized checkpoints, else the scale granularity: [1, in] per output channel or a block
    # such as [128, 128]. See twotower_rt.model.linear.
    fp8_weight_block: tuple[int, int] | None = None
    source: str = "<in memory>"

    def __post_init__(self) -> None:
        def fail(key: str, msg: str) -> None:
            raise ConfigError(f"{self.source}: {key}: {msg}")

        if not any(a in SUPPORTED_ARCHITECTURES for a in self.architectures):
            fail(
                "architectures",
                f"{self.architectures} is not supported; twotower_rt runs "
                f"{list(SUPPORTED_ARCHITECTURES)}",
            )
        pattern = self.hybrid_override_pattern
        if not isinstance(pattern, str) or not pattern:
            fail("hybrid_override_pattern", f"expected a non-empty string, got {pattern!r}")
        for i, ch in enumerate(pattern):
            if ch not in LAYER_KINDS:
                fail(
                    "hybrid_override_pattern",
                    f"unknown layer character {ch!r} at layer {i} in {pattern!r}; "
                    f"known: {LAYER_KINDS}",
                )
        positive = (
            "hidden_size",
            "vocab_size",
            "mamba_num_heads",
            "mamba_head_dim",
            "n_groups",
            "ssm_state_size",
            "conv_kernel",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        )
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(key, f"expected a positive integer, got {value!r}")
        if self.mamba_num_heads % self.n_groups:
            fail(
                "n_groups",
                f"{self.n_groups} does not divide mamba_num_heads {self.mamba_num_heads}",
            )
        if self.num_attention_heads % self.num_key_value_heads:
            fail(
                "num_key_value_heads",
                f"{self.num_key_value_heads} does not divide "
                f"num_attention_heads {self.num_attention_heads}",
            )
        if "E" in pattern:
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                fail(
                    "num_experts_per_tok",
                    f"{self.num_experts_per_tok} not in "
                    f"[1, n_routed_experts={self.n_routed_experts}]",
                )
            if self.n_group != 1 or self.topk_group != 1:
                fail(
                    "n_group",
                    f"grouped routing (n_group={self.n_group}, topk_group="
                    f"{self.topk_group}) is not supported; only 1/1",
                )
            if self.n_shared_experts not in (0, 1):
                fail("n_shared_experts", f"{self.n_shared_experts} is not supported (0 or 1)")
        if "-" in pattern and self.intermediate_size <= 0:
            fail("intermediate_size", "dense MLP layers ('-') need a positive intermediate_size")
        if self.residual_in_fp32:
            fail("residual_in_fp32", "true is not supported (the released model uses false)")
        if self.tie_word_embeddings:
            fail("tie_word_embeddings", "true is not supported (two-tower heads are untied)")
        lo, hi = self.time_step_limit
        if not lo <= hi:
            fail("time_step_limit", f"{self.time_step_limit} is not a (low, high) pair")
        if not 0 < self.layer_norm_epsilon < math.inf:
            fail(
                "layer_norm_epsilon", f"must be positive and finite, got {self.layer_norm_epsilon}"
            )
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, key)
            if value is not None and not 0 <= value < self.vocab_size:
                fail(key, f"{value} is not a token id in [0, vocab_size={self.vocab_size})")
        if "E" in pattern and pattern.count("E") * self.n_routed_experts > MAX_EXPERT_MODULES:
            fail("n_routed_experts", f"{self.n_routed_experts} experts x {pattern.count('E')} MoE "
                 f"layers is more than {MAX_EXPERT_MODULES} expert modules")  # fmt: skip
        block = self.fp8_weight_block
        if block is not None and (
            len(block) != 2 or any(not isinstance(v, int) or v < 0 for v in block)
        ):
            fail("quantization_config", f"weight_block_size {block!r}: expected two sizes >= 0")

    # Derived sizes -----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.hybrid_override_pattern)

    @property
    def layer_kinds(self) -> list[str]:
        return [LAYER_KINDS[c] for c in self.hybrid_override_pattern]

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def mamba_in_proj_dim(self) -> int:
        return self.mamba_d_inner + self.mamba_conv_dim + self.mamba_num_heads

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        d.pop("fp8_weight_block")
        d["num_hidden_layers"] = self.num_layers
        d["time_step_limit"] = [self.time_step_limit[0], self.time_step_limit[1]]
        if self.fp8_weight_block is not None:
            d["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "none",
                "weight_block_size": list(self.fp8_weight_block),
            }
        return d

    # Parsing -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict, source: str = "<dict>") -> TwoTowerConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        for key in ("hidden_size", "vocab_size", "hybrid_override_pattern"):
            if key not in raw:
                raise ConfigError(f"{source}: missing required key {key!r}")
        if "architectures" in raw and not isinstance(raw["architectures"], list):
            raise ConfigError(f"{source}: architectures: expected a list")
        n_layers = raw.get("num_hidden_layers")
        pattern = raw["hybrid_override_pattern"]
        if n_layers is not None and isinstance(pattern, str) and n_layers != len(pattern):
            raise ConfigError(
                f"{source}: num_hidden_layers is {n_layers} but hybrid_override_pattern "
                f"{pattern[:64]!r}{'...' if len(pattern) > 64 else ''} has {len(pattern)} layers"
            )
        known = {f.name for f in dataclasses.fields(cls)} - {"source"}
        kwargs = {k: raw[k] for k in known if k in raw and raw[k] is not None}
        if "layer_norm_epsilon" not in raw and "norm_eps" in raw:
            kwargs["layer_norm_epsilon"] = raw["norm_eps"]
        if "time_step_limit" in kwargs:
            lim = kwargs["time_step_limit"]
            if not isinstance(lim, (list, tuple)) or len(lim) != 2:
                raise ConfigError(f"{source}: time_step_limit: expected [low, high], got {lim!r}")
            kwargs["time_step_limit"] = tuple(lim)
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if isinstance(raw.get(key), list):  # some configs list several EOS ids
                vocab = raw["vocab_size"] if type(raw["vocab_size"]) is int else MAX_VOCAB
                for i, value in enumerate(raw[key]):
                    if type(value) is not int or not 0 <= value < vocab:
                        raise ConfigError(f"{source}: {key}[{i}]: {value!r} is not a token id in "
                                          f"[0, vocab_size={vocab})")  # fmt: skip
                kwargs[key] = raw[key][0] if raw[key] else None
        ConfigSchema.check({k: v for k, v in kwargs.items() if k != "fp8_weight_block"}, source)
        if "time_step_limit" in kwargs:
            kwargs["time_step_limit"] = tuple(float(v) for v in kwargs["time_step_limit"])
        for act_key, expected in (("mamba_hidden_act", "silu"), ("mlp_hidden_act", "relu2")):
            if act_key in raw and raw[act_key] != expected:
                raise ConfigError(
                    f"{source}: {act_key}: {raw[act_key]!r} is not supported (only {expected!r})"
                )
        if raw.get("mamba_ssm_cache_dtype", "float32") != "float32":
            raise ConfigError(f"{source}: mamba_ssm_cache_dtype: only float32 is supported")
        kwargs.pop("fp8_weight_block", None)  # only through quantization_config
        if raw.get("quantization_config") is not None:
            kwargs["fp8_weight_block"] = _parse_quantization(raw["quantization_config"], source)
        try:
            return cls(**kwargs, source=source)
        except TypeError as e:  # a value of the wrong JSON type
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> TwoTowerConfig:
        """config.json read through :mod:`safejson` (a size cap, a regular file, a depth
        bound; Infinity only where a key allows it) and checked by :class:`ConfigSchema`."""
        path = os.fspath(path)
        raw = read_json(path, MAX_CONFIG_BYTES, ConfigError, "a checkpoint needs config.json")
        return cls.from_dict(raw, source=path)


def read_json(path: str, max_bytes: int, error: type[ValueError], needed_for: str):
    """A JSON file of a checkpoint, or ``error`` naming the file for anything refused: missing
    (saying what it is ``needed_for``), not a regular file, too large, unreadable, not JSON."""
    try:
        return safejson.load_file(path, max_bytes=max_bytes, allow_infinity=True)
    except FileNotFoundError:
        raise error(f"{path}: no such file ({needed_for})") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:  # safejson: its message names the file
        raise error(str(e) if str(e).startswith(path) else f"{path}: {e}") from None


def _parse_quantization(q, source: str) -> tuple[int, int]:
    """config.json's quantization_config -> the FP8 scale block (rows, cols); 0 cols means a
    whole row (per output channel)."""

    def fail(msg: str):
        raise ConfigError(f"{source}: quantization_config: {msg}")

    if not isinstance(q, dict):
        fail(f"expected an object, got {q!r}")
    if q.get("quant_method") != "fp8":
        fail(f"quant_method {q.get('quant_method')!r} is not supported (only 'fp8')")
    if q.get("fmt", "e4m3") != "e4m3":
        fail(f"fmt {q.get('fmt')!r} is not supported (only 'e4m3')")
    if q.get("activation_scheme", "none") not in ("none", None):
        fail(f"activation_scheme {q.get('activation_scheme')!r}: activations are not quantized")
    block = q.get("weight_block_size")
    if block is None:
        return (1, 0)
    if (
        not isinstance(block, list)
        or len(block) != 2
        or not all(type(v) is int and 0 <= v <= MAX_FP8_BLOCK for v in block)
    ):
        fail(f"weight_block_size {block!r}: expected [rows, cols], each in [0, {MAX_FP8_BLOCK}]")
    return (block[0], block[1])
