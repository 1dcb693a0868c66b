"""``twotower-rt serve``: an OpenAI-compatible completions server over the engine (Starlette +
uvicorn).

    POST /v1/completions   prompt (text, token ids, or a list of either), max_tokens, temperature,
                           top_p, stop, seed, n, stream; the two-tower fields mode, block_size,
                           steps_per_block, confidence_threshold (and top_k, stop_token_ids)
    GET  /v1/models        the one model served
    GET  /health           200 while the engine thread is alive
    GET  /metrics          Prometheus text: requests, tokens, tokens/s, queue depth, tokens per
                           denoiser forward

One :class:`EngineWorker` thread owns the :class:`~twotower_rt.engine.Engine` and steps it while
there is work; HTTP requests hand it sequences and receive their outputs through asyncio queues, so
every request shares the engine's continuous batching. Streaming sends each committed piece (a
block in mask diffusion, a token in AR) as an OpenAI server-sent event. A bounded queue answers 429
when full; a client that disconnects has its sequences aborted (their slots freed); an invalid
request gets a 400 with an OpenAI-style error body. ``--api-key`` protects /v1 and /metrics
(compared in constant time). Binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from .engine import Engine, RequestOutput
from .generate import MODES, SamplingParams

log = logging.getLogger("twotower_rt.serve")

DEFAULT_MAX_TOKENS = 16
TWO_TOWER_FIELDS = ("mode", "block_size", "steps_per_block", "confidence_threshold", "draft_steps")
KNOWN_FIELDS = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids",
    "seed", "n", "stream", "user", "echo", "logprobs", "best_of", "presence_penalty",
    "frequency_penalty", "logit_bias", "suffix", "stream_options", *TWO_TOWER_FIELDS,
}  # fmt: skip
MAX_N = 16
# OpenAI fields accepted only at their neutral values (a client asking for more gets a 400, not a
# silent no).
UNSUPPORTED = {
    "echo": (None, False), "logprobs": (None,), "best_of": (None, 1), "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}), "stream_options": (None, {}, {"include_usage": False}),
}  # fmt: skip


class BadRequest(ValueError):
    """An invalid request: answered 400 with the OpenAI error body."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --- the engine thread ----------------------------------------------------------------------------


@dataclass
class _Sequence:
    """One engine request on behalf of an HTTP request: its outputs go to ``sink`` (an asyncio
    queue of the event loop ``loop``)."""

    ids: list[int]
    mode: str
    params: dict
    loop: asyncio.AbstractEventLoop
    sink: asyncio.Queue
    rid: str | None = None


@dataclass
class Metrics:
    requests: int = 0
    rejected: int = 0
    failed: int = 0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    diffusion_tokens: int = 0
    denoiser_forwards: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=4096))  # (time, tokens)

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        tokens = sum(n for t, n in list(self.recent) if now - t <= window)
        return tokens / window


class EngineWorker:
    """Owns the engine in one thread: takes sequences and cancellations from any thread, steps the
    engine while it has work, and hands each output to its sequence's event loop."""

    def __init__(self, engine: Engine, max_queue: int):
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = Metrics()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sequences: dict[str, _Sequence] = {}
        self._pending = 0  # submitted, not yet in the engine
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="twotower-rt-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return self._pending + self.engine.num_waiting

    def submit(self, seqs: list[_Sequence]) -> bool:
        """Queue sequences (all or none); False when the queue is full."""
        with self._lock:
            if self.queue_depth + len(seqs) > self.max_queue:
                self.metrics.rejected += 1
                return False
            self._pending += len(seqs)
            for seq in seqs:
                seq.rid = f"s{next(self._ids)}"
        for seq in seqs:
            self._inbox.put(("add", seq))
        self._wake.set()
        return True

    def cancel(self, seqs: list[_Sequence]) -> None:
        for seq in seqs:
            self._inbox.put(("cancel", seq))
        self._wake.set()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop:
            self._drain()
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # an engine fault must not leave clients waiting forever
                log.exception("engine step failed")
                self._fail_all(f"engine error: {exc}")
                continue
            for out in outputs:
                self._deliver(out)

    def _drain(self) -> None:
        while True:
            try:
                op, seq = self._inbox.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                with self._lock:
                    self._pending -= 1
                try:
                    self.engine.add_request(seq.ids, seq.mode, request_id=seq.rid, **seq.params)
                except ValueError as exc:  # validated before, so unexpected: still answered
                    self._send(seq, exc)
                    continue
                self._sequences[seq.rid] = seq
                self.metrics.prompt_tokens += len(seq.ids)
            elif seq.rid in self._sequences:  # cancel
                self.engine.abort(seq.rid)
                self.engine.pop(seq.rid)
                del self._sequences[seq.rid]

    def _deliver(self, out: RequestOutput) -> None:
        seq = self._sequences.get(out.request_id)
        if seq is None:
            return
        now = time.monotonic()
        self.metrics.completion_tokens += len(out.new_tokens)
        self.metrics.recent.append((now, len(out.new_tokens)))
        if out.finished:
            del self._sequences[out.request_id]
            self.engine.pop(out.request_id)
            if seq.mode == "mask_diffusion":
                self.metrics.diffusion_tokens += len(out.generated)
                self.metrics.denoiser_forwards += out.nfe
        self._send(seq, out)

    def _fail_all(self, message: str) -> None:
        for rid, seq in list(self._sequences.items()):
            self.metrics.failed += 1
            self.engine.abort(rid)
            self.engine.pop(rid)
            self._send(seq, RuntimeError(message))
        self._sequences.clear()

    @staticmethod
    def _send(seq: _Sequence, item) -> None:
        try:
            seq.loop.call_soon_threadsafe(seq.sink.put_nowait, item)
        except RuntimeError:  # the client's event loop is gone
            pass


# --- requests -------------------------------------------------------------------------------------


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


def _expect(body: dict, name: str, kinds, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise BadRequest(f"'{name}' must be of type {_kind_names(kinds)}, got a boolean", name)
    if not isinstance(value, kinds):
        raise BadRequest(
            f"'{name}' must be of type {_kind_names(kinds)}, got {type(value).__name__}", name
        )
    return value


def _kind_names(kinds) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(k.__name__ for k in kinds)


def parse_completion(body, engine: Engine, tokenizer, default_mode: str) -> Completion:
    """Validate a /v1/completions body against the model and the engine; BadRequest says what is
    wrong."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}", unknown[0])
    for name, neutral in UNSUPPORTED.items():  # OpenAI fields this server cannot honour
        if body.get(name) not in neutral:
            raise BadRequest(f"'{name}' is not supported by this server", name)
    vocab = engine.lm.cfg.vocab_size
    prompts = _prompts(body.get("prompt"), tokenizer, vocab)
    mode = _expect(body, "mode", str, default_mode)
    if mode not in MODES:
        raise BadRequest(f"'mode' must be one of {', '.join(MODES)}, got {mode!r}", "mode")
    max_tokens = _expect(body, "max_tokens", int, DEFAULT_MAX_TOKENS)
    if max_tokens < 1:
        raise BadRequest(f"'max_tokens' must be >= 1, got {max_tokens}", "max_tokens")
    n = _expect(body, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise BadRequest(f"'n' must be in [1, {MAX_N}], got {n}", "n")
    stream = _expect(body, "stream", bool, False)
    stop = _expect(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise BadRequest("'stop' must be a non-empty string or a list of at most 4 of them", "stop")
    if stop and tokenizer is None:
        raise BadRequest("'stop' strings need a model with a tokenizer; use stop_token_ids", "stop")
    params: dict = {}
    for name, kinds in (("temperature", (int, float)), ("top_p", (int, float)), ("top_k", int),
                        ("block_size", int), ("steps_per_block", int), ("draft_steps", int),
                        ("confidence_threshold", (int, float))):  # fmt: skip
        value = _expect(body, name, kinds)
        if value is not None:
            params[name] = value
    params.setdefault("temperature", 1.0)  # the OpenAI default
    if params.get("top_p") == 1:
        del params["top_p"]
    stop_ids = _expect(body, "stop_token_ids", list, [])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise BadRequest("'stop_token_ids' must be a list of token ids", "stop_token_ids")
    eos = getattr(engine.lm.cfg, "eos_token_id", None)
    params["eos_token_id"] = stop_ids + ([eos] if eos is not None else [])
    # Mask diffusion runs whole blocks: generate enough of them, return the first max_tokens.
    block = params.get("block_size", SamplingParams.block_size)
    new = max_tokens
    if mode == "mask_diffusion" and isinstance(block, int) and block > 0:
        new = math.ceil(max_tokens / block) * block
    params["max_new_tokens"] = new
    seed = _expect(body, "seed", int)
    if seed is not None and seed < 0:
        raise BadRequest(f"'seed' must be >= 0, got {seed}", "seed")
    try:
        p = SamplingParams(**params)
        p.validate(mode, vocab, 1)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    longest = max(len(x) for x in prompts)
    if longest + new > engine.plan.context:
        raise BadRequest(
            f"the prompt ({longest} tokens) plus max_tokens ({max_tokens}"
            f"{f', {new} in whole blocks' if new != max_tokens else ''}) exceeds this server's "
            f"context of {engine.plan.context} tokens",
            "max_tokens",
        )
    choices = []
    for _ in prompts:
        for i in range(n):
            choices.append({**params, "seed": None if seed is None else seed + i})
    return Completion(prompts, mode, choices, n, max_tokens, stop, stream)


def _prompts(prompt, tokenizer, vocab) -> list[list[int]]:
    if prompt is None:
        raise BadRequest("'prompt' is required", "prompt")
    if isinstance(prompt, str) or (
        isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)
    ):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise BadRequest("'prompt' must be a string, a list of token ids, or a list of either",
                         "prompt")  # fmt: skip
    out = []
    for item in prompt:
        if isinstance(item, str):
            if tokenizer is None:
                raise BadRequest("text prompts need a model with a tokenizer; send token ids",
                                 "prompt")  # fmt: skip
            ids = tokenizer.encode(item).ids
        elif isinstance(item, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in item
        ):
            ids = item
        else:
            raise BadRequest("each prompt must be a string or a list of token ids", "prompt")
        if not ids:
            raise BadRequest("a prompt is empty", "prompt")
        if any(not 0 <= t < vocab for t in ids):
            raise BadRequest(f"a prompt token id is outside the vocabulary [0, {vocab})", "prompt")
        out.append(list(ids))
    return out


# --- the ASGI app ---------------------------------------------------------------------------------


class _Choice:
    """One choice's text as its tokens arrive: decoding, stop strings, max_tokens."""

    def __init__(self, tokenizer, max_tokens: int, stop: list[str]):
        self.tokenizer, self.max_tokens, self.stop = tokenizer, max_tokens, stop
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.engine_done = False  # its engine request finished (else: cancel it when done here)

    def update(self, out) -> str:
        """Take an engine output (or an error); return the new text to send."""
        if isinstance(out, Exception):
            raise out
        self.engine_done = out.finished
        self.tokens = out.generated[: self.max_tokens]
        text = self.tokenizer.decode(self.tokens) if self.tokenizer is not None else ""
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                text, self.finish_reason = text[:at], "stop"
        if self.finish_reason is None and (out.finished or len(out.generated) >= self.max_tokens):
            truncated = len(out.generated) > self.max_tokens
            reason = out.finish_reason
            self.finish_reason = "length" if truncated or reason == "length" else "stop"
        new = text[len(self.text) :] if text.startswith(self.text) else ""
        self.text = text
        return new

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def create_app(engine: Engine, *, model_name: str, tokenizer=None, api_key: str | None = None,
               max_queue: int = 256, default_mode: str = "mask_diffusion"):  # fmt: skip
    """The Starlette app serving ``engine`` (its worker thread starts now, stops at shutdown)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    worker = EngineWorker(engine, max_queue)
    created = int(time.time())
    completion_ids = itertools.count()

    def fail(status: int, message: str, kind: str, param=None, code=None) -> JSONResponse:
        return JSONResponse(error_body(message, kind, param, code), status_code=status)

    def authorized(request: Request) -> bool:
        if api_key is None:
            return True
        given = request.headers.get("authorization", "")
        expected = f"Bearer {api_key}"
        return hmac.compare_digest(given.encode(), expected.encode())

    def unauthorized() -> JSONResponse:
        return fail(401, "invalid or missing API key (Authorization: Bearer KEY)",
                    "authentication_error", code="invalid_api_key")  # fmt: skip

    async def completions(request: Request):
        if not authorized(request):
            return unauthorized()
        raw = await request.body()
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return fail(400, "the request body is not UTF-8", "invalid_request_error")
        except json.JSONDecodeError as exc:
            return fail(400, f"the request body is not valid JSON: {exc}", "invalid_request_error")
        try:
            req = parse_completion(body, engine, tokenizer, default_mode)
        except BadRequest as exc:
            return fail(400, str(exc), "invalid_request_error", exc.param)
        loop = asyncio.get_running_loop()
        seqs = [
            _Sequence(ids, req.mode, params, loop, asyncio.Queue())
            for ids, params in zip([p for p in req.prompts for _ in range(req.n)], req.params)
        ]
        if not worker.submit(seqs):
            return fail(429, f"the server's queue is full ({worker.max_queue} sequences); retry "
                             "later", "rate_limit_error", code="queue_full")  # fmt: skip
        worker.metrics.requests += 1
        cid = f"cmpl-{created:x}{next(completion_ids):06x}"
        choices = [_Choice(tokenizer, req.max_tokens, req.stop) for _ in seqs]
        if req.stream:
            return StreamingResponse(_stream(request, cid, seqs, choices),
                                     media_type="text/event-stream")  # fmt: skip
        return await _complete(request, cid, req, seqs, choices)

    async def _next(request, seq, watch_disconnect: bool):
        while True:
            try:
                return await asyncio.wait_for(seq.sink.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if watch_disconnect and await request.is_disconnected():
                    raise ConnectionAbortedError from None

    async def _complete(request, cid, req, seqs, choices):
        try:
            for seq, choice in zip(seqs, choices):
                while not choice.done:
                    choice.update(await _next(request, seq, True))
        except ConnectionAbortedError:
            return PlainTextResponse("", status_code=499)
        except Exception as exc:
            return fail(500, str(exc), "server_error")
        finally:
            worker.cancel([s for s, c in zip(seqs, choices) if not c.engine_done])
        completion = sum(len(c.tokens) for c in choices)
        prompt_tokens = sum(len(p) for p in req.prompts)
        return JSONResponse({
            "id": cid, "object": "text_completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": i, "text": c.text, "logprobs": None,
                         "finish_reason": c.finish_reason, "token_ids": c.tokens}
                        for i, c in enumerate(choices)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion},
        })  # fmt: skip

    async def _stream(request, cid, seqs, choices):
        def event(index, text, finish_reason):
            chunk = {"id": cid, "object": "text_completion", "created": int(time.time()),
                     "model": model_name, "choices": [{"index": index, "text": text,
                     "logprobs": None, "finish_reason": finish_reason}]}  # fmt: skip
            return f"data: {json.dumps(chunk)}\n\n"

        pending = {i: asyncio.ensure_future(seq.sink.get()) for i, seq in enumerate(seqs)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending.values(), timeout=0.5,
                                             return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                if not done and await request.is_disconnected():
                    return
                for i in [i for i, f in pending.items() if f in done]:
                    try:
                        text = choices[i].update(pending.pop(i).result())
                    except Exception as exc:
                        yield f"data: {json.dumps(error_body(str(exc), 'server_error'))}\n\n"
                        return
                    if text or choices[i].done:
                        yield event(i, text, choices[i].finish_reason)
                    if not choices[i].done:
                        pending[i] = asyncio.ensure_future(seqs[i].sink.get())
            yield "data: [DONE]\n\n"
        finally:
            for future in pending.values():
                future.cancel()
            worker.cancel([s for s, c in zip(seqs, choices) if not c.engine_done])

    async def models(request: Request):
        if not authorized(request):
            return unauthorized()
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "twotower_rt"}
        ]})  # fmt: skip

    async def health(request: Request):
        if not worker.alive:
            return fail(503, "the engine thread has stopped", "server_error")
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request):
        if not authorized(request):
            return unauthorized()
        m = worker.metrics
        tpf = m.diffusion_tokens / m.denoiser_forwards if m.denoiser_forwards else 0.0
        lines = [
            ("twotower_rt_requests_total", "counter", "completion requests accepted", m.requests),
            ("twotower_rt_requests_rejected_total", "counter", "requests refused (queue full)",
             m.rejected),
            ("twotower_rt_sequences_failed_total", "counter", "sequences failed by an engine "
             "error", m.failed),
            ("twotower_rt_prompt_tokens_total", "counter", "prompt tokens taken", m.prompt_tokens),
            ("twotower_rt_generation_tokens_total", "counter", "tokens generated",
             m.completion_tokens),
            ("twotower_rt_tokens_per_second", "gauge", "tokens generated per second, last 10 s",
             round(m.tokens_per_second(), 3)),
            ("twotower_rt_queue_depth", "gauge", "sequences waiting for a slot",
             worker.queue_depth),
            ("twotower_rt_running_sequences", "gauge", "sequences in the engine",
             engine.num_running),
            ("twotower_rt_tokens_per_denoiser_forward", "gauge", "mask diffusion: tokens "
             "committed per denoiser forward, finished sequences", round(tpf, 4)),
        ]  # fmt: skip
        text = "".join(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n{name} {value}\n"
                       for name, kind, doc, value in lines)  # fmt: skip
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(worker.stop)

    async def not_found(request: Request, exc):
        return fail(404, f"no route {request.method} {request.url.path}", "invalid_request_error")

    async def not_allowed(request: Request, exc):
        return fail(405, f"{request.method} is not allowed on {request.url.path}",
                    "invalid_request_error")  # fmt: skip

    app = Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={404: not_found, 405: not_allowed},
        lifespan=lifespan,
    )
    app.state.worker = worker
    return app


def serve(model, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_queue: int = 256, model_name: str | None = None, default_mode: str = "mask_diffusion",
          engine: Engine | None = None, **engine_args) -> None:  # fmt: skip
    """Run the server until interrupted: ``model`` a loaded TwoTowerModel, ``engine_args`` for
    :class:`Engine` (max_slots, context, memory_budget, ...), or ``engine`` one already made (the
    lockstep engine of rank 0 under tensor parallelism)."""
    import uvicorn

    engine = engine if engine is not None else Engine(model, **engine_args)
    name = model_name or os.path.basename(os.path.normpath(getattr(model, "source", "twotower")))
    app = create_app(engine, model_name=name, tokenizer=getattr(model, "tokenizer", None),
                     api_key=api_key, max_queue=max_queue, default_mode=default_mode)  # fmt: skip
    print(f"{engine.plan.describe()}\nserving {name} on http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
