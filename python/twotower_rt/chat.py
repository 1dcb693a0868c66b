"""Chat: a checkpoint's chat template, rendered as transformers renders it, and
``POST /v1/chat/completions`` on top of the completions machinery of :mod:`twotower_rt.serve`.

The template comes from ``chat_template.jinja`` or ``tokenizer_config.json``'s ``chat_template``
(a string, or a list of named templates whose "default" is used). It is compiled the way
``transformers`` compiles it (``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and
``lstrip_blocks``, loop controls, ``raise_exception``, ``tojson``, ``strftime_now``, the
``{% generation %}`` tag) and rendered with ``messages``, ``add_generation_prompt`` and the special
tokens (``bos_token``, ``eos_token``, ...); the text is then tokenized without adding special
tokens, as ``apply_chat_template(tokenize=True)`` does.

A chat request becomes a completion request whose prompt is the rendered conversation's token ids
(:meth:`ChatEndpoint.prepare`); the completion responses, plain or streamed, are reshaped into
``chat.completion`` objects and ``chat.completion.chunk`` deltas (:class:`ChatShape`). A model
without a template answers 400.
"""

from __future__ import annotations

import json
import os
from datetime import datetime

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
MAX_CONFIG_BYTES = 64 << 20  # tokenizer_config.json / special_tokens_map.json (added tokens)
MAX_TEMPLATE_BYTES = 1 << 20
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")  # fmt: skip
ROLES = ("system", "developer", "user", "assistant", "tool")
# Fields of a chat request passed on to the completion request as they are.
PASSED = (
    "model", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream", "user",
    "stop_token_ids", "mode", "block_size", "steps_per_block", "confidence_threshold",
    "draft_steps", "presence_penalty", "frequency_penalty", "logit_bias", "stream_options",
)  # fmt: skip
# Chat fields accepted only at their neutral values.
NEUTRAL = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []),
    "tool_choice": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
    "parallel_tool_calls": (None, True, False),
}  # fmt: skip
OWN = {"messages", "max_completion_tokens", "add_generation_prompt", "chat_template_kwargs"}


class ChatTemplate:
    """A compiled chat template and the special tokens it is rendered with."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, where: str = ""):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self.where = where
        self.template = _compile(source)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The conversation as text; a template error (``raise_exception``, a bad role order)
        raises ValueError."""
        from jinja2.exceptions import TemplateError

        context = {**self.special_tokens, **kwargs}
        try:
            return self.template.render(messages=messages, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt,
                                        **context)  # fmt: skip
        except TemplateError as exc:
            raise ValueError(f"the chat template refused the conversation: {exc}") from None


def _compile(source: str):
    """The template compiled as transformers' ``_compile_jinja_template`` compiles it."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` (assistant-mask markers): the body as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(
                lineno
            )

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)  # fmt: skip

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, loopcontrols])  # fmt: skip
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ValueError(f"the chat template does not compile: {exc}") from None


def _read_json(path: str) -> dict:
    from . import safejson

    try:  # bounded: size, depth and digits (a checkpoint's files are untrusted input too)
        data = safejson.load_file(path, max_bytes=MAX_CONFIG_BYTES)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # a serialized AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_chat_template(directory: str | os.PathLike) -> ChatTemplate | None:
    """The checkpoint's chat template, or None when it has none."""
    directory = os.fspath(directory)
    config_path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
    config = _read_json(config_path) if os.path.isfile(config_path) else {}
    special_path = os.path.join(directory, SPECIAL_TOKENS_FILE)
    specials = _read_json(special_path) if os.path.isfile(special_path) else {}
    tokens = {}
    for name in SPECIAL_TOKENS:
        text = _token_text(config.get(name, specials.get(name)))
        if text is not None:
            tokens[name] = text
    template_path = os.path.join(directory, TEMPLATE_FILE)
    if os.path.isfile(template_path):
        from .safejson import read_bytes

        try:
            source = read_bytes(template_path, MAX_TEMPLATE_BYTES).decode("utf-8")
        except (OSError, ValueError) as exc:
            raise ValueError(f"{template_path}: cannot read the chat template ({exc})") from None
        return ChatTemplate(source, tokens, template_path)
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if not isinstance(source, str) or not source:
        return None
    return ChatTemplate(source, tokens, config_path)


# --- /v1/chat/completions -------------------------------------------------------------------------


def _content(message: dict, index: int) -> str | None:
    """A message's content as text: a string, or the text parts of a list joined (as vLLM's
    "string" content format does)."""
    from .protocol import BadRequest

    content = message.get("content")
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise BadRequest(f"messages[{index}]: only text content parts are supported",
                                 "messages")  # fmt: skip
            texts.append(str(part.get("text", "")))
        return "\n".join(texts)
    raise BadRequest(f"messages[{index}].content must be a string or a list of text parts",
                     "messages")  # fmt: skip


class ChatEndpoint:
    """Turns a chat request into a completion request (:meth:`prepare`) for the server's one
    completions path."""

    def __init__(self, template: ChatTemplate | None, tokenizer):
        self.template, self.tokenizer = template, tokenizer

    def prepare(self, body) -> tuple[dict, ChatShape]:
        from .protocol import BadRequest

        if self.template is None or self.tokenizer is None:
            raise BadRequest("this model has no chat template (no chat_template in its "
                             "tokenizer_config.json or chat_template.jinja), so it cannot serve "
                             "/v1/chat/completions; use /v1/completions with a prompt",
                             "messages")  # fmt: skip
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        unknown = sorted(set(body) - set(PASSED) - set(NEUTRAL) - OWN)
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(unknown)}", unknown[0])
        for name, neutral in NEUTRAL.items():
            if body.get(name) not in neutral:
                raise BadRequest(f"'{name}' is not supported by this server", name)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list of messages", "messages")
        conversation = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise BadRequest(f"messages[{i}] must be an object with a 'role' in "
                                 f"{', '.join(ROLES)}", "messages")  # fmt: skip
            conversation.append({**message, "content": _content(message, i)})
        add_generation_prompt = body.get("add_generation_prompt", True)
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(add_generation_prompt, bool) or not isinstance(kwargs, dict):
            raise BadRequest("'add_generation_prompt' must be a boolean and "
                             "'chat_template_kwargs' an object")  # fmt: skip
        try:
            text = self.template.render(conversation, add_generation_prompt, **kwargs)
        except ValueError as exc:
            raise BadRequest(str(exc), "messages") from None
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        completion = {k: body[k] for k in PASSED if k in body}
        if body.get("max_completion_tokens") is not None:
            completion["max_tokens"] = body["max_completion_tokens"]
        completion["prompt"] = ids
        return completion, ChatShape()


class ChatShape:
    """One chat request's responses from the completion ones: ``response`` for the whole,
    ``chunk`` for each streamed event (the first of each choice also carries the role)."""

    def __init__(self):
        self._started: set[int] = set()

    @staticmethod
    def _id(cid: str) -> str:
        return "chat" + cid

    def response(self, result: dict) -> dict:
        choices = [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                    "logprobs": None, "finish_reason": c["finish_reason"],
                    "token_ids": c["token_ids"]} for c in result["choices"]]  # fmt: skip
        return {**result, "id": self._id(result["id"]), "object": "chat.completion",
                "choices": choices}  # fmt: skip

    def chunk(self, chunk: dict) -> dict:
        if "choices" not in chunk:  # an error event
            return chunk
        choices = []
        for c in chunk["choices"]:
            delta = {"content": c["text"]}
            if c["index"] not in self._started:
                self._started.add(c["index"])
                delta = {"role": "assistant", **delta}
            choices.append({"index": c["index"], "delta": delta, "logprobs": None,
                            "finish_reason": c["finish_reason"]})  # fmt: skip
        return {**chunk, "id": self._id(chunk["id"]), "object": "chat.completion.chunk",
                "choices": choices}  # fmt: skip
