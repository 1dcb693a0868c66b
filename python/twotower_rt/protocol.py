"""The HTTP API's request models (pydantic) and error helpers, and the batch job's line model.

Every request body goes through :func:`read_json_body` (a size cap, a time limit, JSON with a depth
and number bound: :mod:`twotower_rt.safejson`) and then a strict pydantic model: exact JSON types
(no bool for an int, no string for a number), bounded integers (seeds in [0, 2**63), sizes bounded
here and then by the model's vocabulary and the server's context), finite floats, unknown fields
refused. A refusal is a :class:`BadRequest` carrying the HTTP status and the OpenAI error body
(:func:`error_body`). ``/v1/chat/completions`` and any later route reuse these pieces.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import safejson
from .params import MAX_STEPS_PER_BLOCK, MODES, SEED_LIMIT, VERIFIED_SPARE_BLOCKS

DEFAULT_MAX_TOKENS = 16
MAX_N = 16
MAX_STOP = 4
MAX_STOP_TOKEN_IDS = 64
INT32_LIMIT = 2**31  # sizes past this are never meaningful (the context bounds them further)
MAX_BODY_BYTES = 1 << 20
MAX_BODY_DEPTH = 16  # the deepest valid body (a list of token-id lists) nests 3
# OpenAI fields accepted only at their neutral values (a client asking for more gets a 400, not a
# silent no).
UNSUPPORTED = {
    "echo": (None, False), "logprobs": (None,), "best_of": (None, 1), "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}), "stream_options": (None, {}, {"include_usage": False}),
}  # fmt: skip
# What a field takes, for type errors (pydantic's union errors list every member).
EXPECTED = {
    "prompt": "a string, a list of token ids, or a list of either",
    "stop": f"a non-empty string or a list of at most {MAX_STOP} of them",
    "id": "a non-empty string or an integer",
    "input_ids": "a list of token ids",
    "eos_token_id": "a token id or a list of them",
    "stop_token_ids": "a list of token ids",
}


class BadRequest(ValueError):
    """A request refused: ``status`` (400 unless said otherwise) with the OpenAI error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.param, self.status, self.kind, self.code = param, status, kind, code

    def body(self) -> dict:
        return error_body(str(self), self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


TYPE_WORDS = {
    "int_type": "an integer", "float_type": "a number", "bool_type": "a boolean",
    "string_type": "a string", "list_type": "a list", "dict_type": "an object",
}  # fmt: skip


def _json_type(value) -> str:
    for kind, word in ((bool, "a boolean"), (int, "an integer"), (float, "a number"),
                       (str, "a string"), (list, "a list"), (dict, "an object")):  # fmt: skip
        if isinstance(value, kind):
            return word
    return "null"


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_validation_error(exc: ValidationError) -> tuple[str, str | None]:
    """(message, param) for the first problem pydantic found, in words a client can act on."""
    err = exc.errors(include_url=False)[0]
    loc = [str(part) for part in err["loc"]]
    field = loc[0] if loc else None
    if err["type"] == "extra_forbidden":
        return f"unknown field {_short(field)}", None
    if err["type"] == "missing":
        return f"'{field}' is required", field
    if err["type"].endswith("_type") and (field in EXPECTED or err["type"] in TYPE_WORDS):
        expected = EXPECTED.get(field) or TYPE_WORDS[err["type"]]
        where = "".join(f"[{p}]" for p in loc[1:] if p.isdigit())
        return f"'{field}'{where} must be {expected}, got {_json_type(err.get('input'))}", field
    where = "".join(f"[{p}]" for p in loc[1:] if p.isdigit())
    message = re.sub(r"^(Input|String|List|Value) should", "must", err["msg"])
    message = message.removeprefix("Value error, ")
    got = f" (got {_short(err['input'])})" if err.get("input") is not None else ""
    if field is None:  # a rule over several fields
        return f"{message}{got if err['type'] != 'value_error' else ''}", None
    return f"'{field}'{where} {message}{got}", field


def validate(model: type[BaseModel], obj):
    """``obj`` as ``model``, or BadRequest naming the field."""
    if not isinstance(obj, dict):
        raise BadRequest(f"the request must be a JSON object, got {type(obj).__name__}")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise BadRequest(*describe_validation_error(exc)) from None


# --- the models -----------------------------------------------------------------------------------

TokenId = Annotated[int, Field(ge=0, lt=INT32_LIMIT)]  # then checked against the vocabulary
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class DecodingFields(_Strict):
    """The decoding parameters every request format shares (HTTP bodies, batch lines)."""

    mode: Literal[MODES] | None = None
    block_size: int | None = Field(None, ge=1, le=INT32_LIMIT)
    steps_per_block: int | None = Field(None, ge=1, le=MAX_STEPS_PER_BLOCK)
    confidence_threshold: float | None = None
    draft_steps: int | None = Field(None, ge=1, le=MAX_STEPS_PER_BLOCK)
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=1, lt=INT32_LIMIT)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: Seed | None = None

    def sampling_params(self) -> dict:
        """The SamplingParams fields given (mode and seed left to the caller)."""
        names = ("block_size", "steps_per_block", "confidence_threshold", "draft_steps",
                 "temperature", "top_k", "top_p")  # fmt: skip
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


class CompletionRequest(DecodingFields):
    """``POST /v1/completions``."""

    model: str | None = None
    prompt: str | list[TokenId] | list[str | list[TokenId]]
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, lt=INT32_LIMIT)
    temperature: float = Field(1.0, ge=0)  # the OpenAI default
    stop: str | list[str] = Field(default_factory=list)
    stop_token_ids: list[TokenId] = Field(default_factory=list, max_length=MAX_STOP_TOKEN_IDS)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    user: str | None = None
    echo: Any = None
    logprobs: Any = None
    best_of: Any = None
    suffix: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    stream_options: Any = None

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _neutral(cls, value, info):
        if value not in UNSUPPORTED[info.field_name]:
            raise ValueError("is not supported by this server")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP or not all(stops):
            raise ValueError(f"must be a non-empty string or a list of at most {MAX_STOP} of them")
        return stops

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        prompts = (
            [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else value
        )
        if not prompts or not all(prompts):
            raise ValueError("must not be empty")
        return prompts


class BatchLine(DecodingFields):
    """One line of a ``twotower-rt batch`` input file."""

    id: Annotated[str, Field(min_length=1, max_length=1024)] | int
    prompt: Annotated[str, Field(min_length=1)] | None = None
    input_ids: Annotated[list[TokenId], Field(min_length=1)] | None = None
    max_new_tokens: int | None = Field(None, ge=0, lt=INT32_LIMIT)
    max_tokens: int | None = Field(None, ge=0, lt=INT32_LIMIT)
    mask_token_id: TokenId | None = None
    eos_token_id: TokenId | list[TokenId] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None

    @model_validator(mode="after")
    def _one_of_each(self):
        if (self.prompt is None) == (self.input_ids is None):
            raise ValueError("a line needs exactly one of 'prompt' (text) or 'input_ids'")
        if self.max_tokens is not None and self.max_new_tokens is not None:
            raise ValueError("give max_new_tokens or its alias max_tokens, not both")
        return self

    def sampling_params(self) -> dict:
        params = super().sampling_params()
        if self.seed is not None:
            params["seed"] = self.seed
        if self.mask_token_id is not None:
            params["mask_token_id"] = self.mask_token_id
        new = self.max_new_tokens if self.max_new_tokens is not None else self.max_tokens
        if new is not None:
            params["max_new_tokens"] = new
        if self.eos_token_id is not None or self.stop_token_ids is not None:
            eos = self.eos_token_id
            eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
            params["eos_token_id"] = eos + list(self.stop_token_ids or [])
        return params


# --- a /v1/completions request against the served model -------------------------------------------


@dataclass
class Completion:
    """A validated /v1/completions request: the prompts (token ids), the engine parameters, and
    what the response needs."""

    prompts: list[list[int]]
    mode: str
    params: list[dict]  # one per choice of each prompt: prompts x n
    n: int
    max_tokens: int
    stop: list[str]
    stream: bool


@dataclass
class ServedModel:
    """What a request is checked against: the model's vocabulary and EOS, the tokenizer, the
    server's context per sequence, its default mode and how many sequences it may ever queue."""

    vocab_size: int
    context: int
    tokenizer: Any = None
    eos_token_id: int | None = None
    default_mode: str = "mask_diffusion"
    max_sequences: int = 256


def parse_completion(body, served: ServedModel) -> Completion:
    """A parsed JSON body -> a Completion, or BadRequest saying what is wrong. Tokenizes text
    prompts (so run it off the event loop)."""
    req = validate(CompletionRequest, body)
    if req.stop and served.tokenizer is None:
        raise BadRequest("'stop' strings need a model with a tokenizer; use stop_token_ids", "stop")
    vocab = served.vocab_size
    for name, ids in (("stop_token_ids", req.stop_token_ids), ("top_k", [(req.top_k or 1) - 1])):
        if any(t >= vocab for t in ids):
            raise BadRequest(f"'{name}' is outside the vocabulary [0, {vocab})", name)
    sequences = len(req.prompt) * req.n
    if sequences > served.max_sequences:
        raise BadRequest(
            f"{len(req.prompt)} prompt(s) x n = {req.n} is {sequences} sequences; this server "
            f"queues at most {served.max_sequences} at once, so the request can never run",
            "prompt",
        )
    mode = req.mode or served.default_mode
    params = req.sampling_params()
    if params.get("top_p") == 1:
        del params["top_p"]
    eos = served.eos_token_id
    params["eos_token_id"] = req.stop_token_ids + ([eos] if eos is not None else [])
    block = params.get("block_size", 16)
    if block > served.context:
        raise BadRequest(f"'block_size' ({block}) exceeds this server's context of "
                         f"{served.context} tokens", "block_size")  # fmt: skip
    # Mask diffusion runs whole blocks: generate enough of them, return the first max_tokens.
    new = -(-req.max_tokens // block) * block if mode == "mask_diffusion" else req.max_tokens
    params["max_new_tokens"] = new
    prompts = [_token_ids(p, served) for p in req.prompt]
    longest = max(len(x) for x in prompts)
    # A verified round writes a whole block before it rolls back (generate.VERIFIED_SPARE_BLOCKS).
    spare = VERIFIED_SPARE_BLOCKS * block if mode == "verified" else 0
    if longest + new + spare > served.context:
        raise BadRequest(
            f"the prompt ({longest} tokens) plus max_tokens ({req.max_tokens}"
            f"{f', {new} in whole blocks' if new != req.max_tokens else ''}"
            f"{f', and {spare} for verified drafts' if spare else ''}) exceeds this "
            f"server's context of {served.context} tokens",
            "max_tokens",
        )
    if req.seed is not None and req.seed + req.n > SEED_LIMIT:
        raise BadRequest("'seed' + n must be <= 2**63 (choice i takes seed + i)", "seed")
    choices = []
    for _ in prompts:
        for i in range(req.n):
            choices.append({**params, "seed": None if req.seed is None else req.seed + i})
    return Completion(prompts, mode, choices, req.n, req.max_tokens, req.stop, req.stream)


def _token_ids(prompt, served: ServedModel) -> list[int]:
    if isinstance(prompt, str):
        if served.tokenizer is None:
            raise BadRequest("text prompts need a model with a tokenizer; send token ids", "prompt")
        # A token never spans less than a byte: a text this long cannot fit the context.
        if len(prompt) > 16 * served.context:
            raise BadRequest(f"a prompt of {len(prompt)} characters cannot fit this server's "
                             f"context of {served.context} tokens", "prompt")  # fmt: skip
        ids = served.tokenizer.encode(prompt).ids
        if not ids:
            raise BadRequest("a prompt is empty", "prompt")
        return list(ids)
    if any(t >= served.vocab_size for t in prompt):
        raise BadRequest(
            f"a prompt token id is outside the vocabulary [0, {served.vocab_size})", "prompt"
        )
    return list(prompt)


# --- reading a body -------------------------------------------------------------------------------


async def read_json_body(request, *, max_bytes: int = MAX_BODY_BYTES, timeout: float = 30.0,
                         max_depth: int = MAX_BODY_DEPTH):  # fmt: skip
    """The request's JSON body: 413 past ``max_bytes`` (told by Content-Length or counted as it
    arrives), 408 when it has not all arrived in ``timeout`` seconds, 400 for JSON refused by
    :func:`safejson.loads` (parsed in a worker thread)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise BadRequest(f"the request body is larger than {max_bytes} bytes", status=413,
                         code="body_too_large")  # fmt: skip

    async def receive() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise BadRequest(f"the request body is larger than {max_bytes} bytes",
                                 status=413, code="body_too_large")  # fmt: skip
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        raw = await asyncio.wait_for(receive(), timeout)
    except asyncio.TimeoutError:
        raise BadRequest(f"the request body did not arrive within {timeout:g} s", status=408,
                         code="body_timeout") from None  # fmt: skip
    try:
        return await asyncio.to_thread(safejson.loads, raw, max_depth=max_depth)
    except safejson.JSONInputError as exc:
        raise BadRequest(f"the request body is refused: {exc}") from None
