"""A checkpoint's ``generation_config.json``: its EOS ids and its default sampling, which every
entry point (``model.generate``, ``serve``, ``batch``) uses where a request says nothing.

As vLLM does (``--generation-config auto``), only the sampling values are taken: ``temperature``,
``top_p``, ``top_k`` and ``max_new_tokens``, plus the two-tower fields a checkpoint may carry
(``block_size``, ``steps_per_block``, ``confidence_threshold``, ``mask_token_id``); ``do_sample``
is not read, and neutral values (top_p 1, top_k 0) are dropped. A request's own parameters always
win. ``eos_token_id`` (an id or a list) is added to the stop ids of every request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

GENERATION_CONFIG_FILE = "generation_config.json"
# generation_config.json key -> SamplingParams field
SAMPLING_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "max_new_tokens": "max_new_tokens",
    "block_size": "block_size",
    "steps_per_block": "steps_per_block",
    "confidence_threshold": "confidence_threshold",
    "mask_token_id": "mask_token_id",
}


@dataclass
class GenerationDefaults:
    """``params``: SamplingParams defaults from the checkpoint; ``eos_token_ids``: its stop ids."""

    params: dict = field(default_factory=dict)
    eos_token_ids: list[int] = field(default_factory=list)
    source: str | None = None

    def apply(self, params: dict) -> dict:
        """``params`` (SamplingParams fields a caller gave) over these defaults; the EOS ids are
        the defaults' when the caller gave none."""
        merged = {**self.params, **params}
        if "eos_token_id" not in params and self.eos_token_ids:
            merged["eos_token_id"] = list(self.eos_token_ids)
        return merged

    def request_defaults(self) -> dict:
        """The defaults as /v1/completions fields (``max_new_tokens`` is ``max_tokens`` there;
        ``mask_token_id`` is not a request field)."""
        out = {k: v for k, v in self.params.items() if k not in ("max_new_tokens", "mask_token_id")}
        if "max_new_tokens" in self.params:
            out["max_tokens"] = self.params["max_new_tokens"]
        return out

    def apply_to_request(self, body):
        """A /v1/completions body over these defaults, the EOS ids added to its
        ``stop_token_ids`` (a body that is not an object, or whose stop_token_ids is not a list,
        is returned as it is, for the validation to refuse)."""
        if not isinstance(body, dict):
            return body
        body = {**self.request_defaults(), **{k: v for k, v in body.items() if v is not None}}
        stop_ids = body.get("stop_token_ids", [])
        if self.eos_token_ids and isinstance(stop_ids, list):
            body["stop_token_ids"] = stop_ids + [t for t in self.eos_token_ids if t not in stop_ids]
        return body


def read_generation_config(
    directory: str | os.PathLike, vocab_size: int | None = None
) -> GenerationDefaults:
    """The defaults of ``directory``/generation_config.json (empty when there is none), checked
    here, once, by the rules a request's own values meet (types, bounds, finite numbers; with
    ``vocab_size``, token ids inside the vocabulary): a bad file is refused at load, naming the
    file and the field, rather than failing every request that would take its defaults."""
    path = os.path.join(os.fspath(directory), GENERATION_CONFIG_FILE)
    if not os.path.isfile(path):
        return GenerationDefaults()
    from . import safejson

    try:
        raw = safejson.load_file(path, max_bytes=1 << 20)
        if not isinstance(raw, dict):
            raise TypeError("not a JSON object")
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a valid generation config ({exc})") from None
    params = {SAMPLING_KEYS[k]: v for k, v in raw.items() if k in SAMPLING_KEYS and v is not None}
    if params.get("top_p") == 1:
        del params["top_p"]
    if isinstance(params.get("top_k"), int) and params["top_k"] <= 0:
        del params["top_k"]
    eos = raw.get("eos_token_id")
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in eos):
        raise ValueError(f"{path}: eos_token_id must be a token id or a list of them, got {eos!r}")
    _check(params, eos, vocab_size, path)
    return GenerationDefaults(params, eos, path)


def _check(params: dict, eos: list[int], vocab_size: int | None, path: str) -> None:
    from .params import SamplingParams
    from .protocol import INT32_LIMIT, DecodingFields, validate

    fields = {k: v for k, v in params.items() if k in DecodingFields.model_fields}
    try:
        validate(DecodingFields, fields)
        new = params.get("max_new_tokens", 0)
        if isinstance(new, int) and not isinstance(new, bool) and new >= INT32_LIMIT:
            raise ValueError(f"max_new_tokens must be < {INT32_LIMIT}, got {new}")
        SamplingParams(**params, eos_token_id=eos or None).validate(
            "ar", INT32_LIMIT if vocab_size is None else vocab_size, 1
        )
    except ValueError as exc:  # protocol.BadRequest is one
        raise ValueError(f"{path}: {exc}") from None
