"""``twotower-rt serve``: an OpenAI-compatible completions server over the engine (Starlette +
uvicorn).

    POST /v1/completions   prompt (text, token ids, or a list of either), max_tokens, temperature,
                           top_p, stop, seed, n, stream; the two-tower fields mode, block_size,
                           steps_per_block, confidence_threshold, draft_steps (and top_k,
                           stop_token_ids)
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
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from .detok import IncrementalDetokenizer
from .engine import Engine, RequestOutput
from .protocol import (
    MAX_BODY_BYTES,
    BadRequest,
    ServedModel,
    error_body,
    parse_completion,
    read_json_body,
)

log = logging.getLogger("twotower_rt.serve")

STALL_SECONDS = 300.0  # /health answers 503 while one engine step has run this long


class EngineFailure(RuntimeError):
    """The engine failed a sequence while stepping it (that sequence alone)."""


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
        self.step_started: float | None = None  # monotonic time the running step began
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
            self.step_started = time.monotonic()
            try:
                outputs = self.engine.step()
            except Exception as exc:  # the engine fails a request's own faults alone (its
                # "error" outputs); what escapes a step is the engine's, and no one's output
                # can be trusted: every client is answered rather than left waiting
                log.exception("engine step failed")
                self._fail_all(f"engine error: {exc}")
                continue
            finally:
                self.step_started = None
            for out in outputs:
                self._deliver(out)

    def stalled_for(self) -> float:
        """Seconds the step now running has taken (0 when none runs)."""
        started = self.step_started
        return 0.0 if started is None else time.monotonic() - started

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
                except Exception as exc:  # validated before, so unexpected: still answered
                    self._send(seq, exc)
                    continue
                self._sequences[seq.rid] = seq
                self.metrics.prompt_tokens += len(seq.ids)
                out = self.engine.output(seq.rid)
                if out.finished:  # nothing to generate: it never reaches a step
                    self._deliver(out)
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
            if out.finish_reason == "error":
                self.metrics.failed += 1
                self._send(seq, EngineFailure(out.error or "engine error"))
                return
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


# --- the ASGI app ---------------------------------------------------------------------------------


class _Choice:
    """One choice's text as its tokens arrive: decoding, stop strings, max_tokens."""

    def __init__(self, tokenizer, max_tokens: int, stop: list[str]):
        self.tokenizer, self.max_tokens, self.stop = tokenizer, max_tokens, stop
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0  # characters of text returned so far
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.finish_reason: str | None = None
        self.engine_done = False  # its engine request finished (else: cancel it when done here)

    def update(self, out) -> str:
        """Take an engine output (or an error); return the new text to send."""
        if isinstance(out, Exception):
            raise out
        self.engine_done = out.finished
        new_tokens = out.generated[len(self.tokens) : self.max_tokens]
        self.tokens = out.generated[: self.max_tokens]
        before, text = len(self.text), self.text
        last = out.finished or len(out.generated) >= self.max_tokens
        if self.detok is not None:
            text += self.detok.push(new_tokens) + (self.detok.flush() if last else "")
        for s in self.stop:  # only where the new text can complete a stop string
            at = text.find(s, max(0, before - len(s) + 1))
            if at >= 0:
                text, self.finish_reason = text[:at], "stop"
        if self.finish_reason is None and last:
            truncated = len(out.generated) > self.max_tokens
            reason = out.finish_reason
            self.finish_reason = "length" if truncated or reason == "length" else "stop"
        self.text = text
        # Until done, hold back what could be the start of a stop string still to come.
        hold = 0 if self.done or not self.stop else max(map(len, self.stop)) - 1
        upto = max(self.sent, len(text) - hold)
        new, self.sent = text[self.sent : upto], upto
        return new

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def create_app(engine: Engine, *, model_name: str, tokenizer=None, api_key: str | None = None,
               max_queue: int = 256, default_mode: str = "mask_diffusion", chat_template=None,
               generation=None, max_body_bytes: int = MAX_BODY_BYTES, body_timeout: float = 30.0,
               stall_seconds: float = STALL_SECONDS):  # fmt: skip
    """The Starlette app serving ``engine`` (its worker thread starts now, stops at shutdown).
    Bodies past ``max_body_bytes`` get 413, bodies not all sent in ``body_timeout`` s 408;
    /health says 503 once one engine step has run ``stall_seconds``. ``chat_template``: a
    :class:`~twotower_rt.chat.ChatTemplate` for /v1/chat/completions (None: that route answers
    400); ``generation``: the checkpoint's
    :class:`~twotower_rt.generation_config.GenerationDefaults`, under every request's own fields.
    Chat bodies are read, limited and validated as completion bodies are."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    from .chat import ChatEndpoint

    worker = EngineWorker(engine, max_queue)
    cfg = engine.lm.cfg
    served = ServedModel(cfg.vocab_size, engine.plan.context, tokenizer,
                         getattr(cfg, "eos_token_id", None), default_mode, max_queue)  # fmt: skip
    chat = ChatEndpoint(chat_template, tokenizer)

    def parse(body, chat_endpoint) -> tuple:
        """A body -> (Completion, the chat shape or None); renders and tokenizes (a thread)."""
        shape = None  # /v1/chat/completions: turns completion responses into chat ones
        if chat_endpoint is not None:
            body, shape = chat_endpoint.prepare(body)
        if generation is not None:
            body = generation.apply_to_request(body)
        return parse_completion(body, served), shape

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

    async def completions(request: Request, chat_endpoint=None):
        if not authorized(request):
            return unauthorized()
        try:
            body = await read_json_body(request, max_bytes=max_body_bytes, timeout=body_timeout)
            req, shape = await asyncio.to_thread(parse, body, chat_endpoint)
        except BadRequest as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
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
            return StreamingResponse(_stream(request, cid, seqs, choices, shape),
                                     media_type="text/event-stream")  # fmt: skip
        return await _complete(request, cid, req, seqs, choices, shape)

    async def chat_completions(request: Request):
        return await completions(request, chat)

    async def _next(request, seq, watch_disconnect: bool):
        while True:
            try:
                return await asyncio.wait_for(seq.sink.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if watch_disconnect and await request.is_disconnected():
                    raise ConnectionAbortedError from None

    async def _complete(request, cid, req, seqs, choices, shape):
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
        result = {
            "id": cid, "object": "text_completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": i, "text": c.text, "logprobs": None,
                         "finish_reason": c.finish_reason, "token_ids": c.tokens}
                        for i, c in enumerate(choices)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion},
        }  # fmt: skip
        return JSONResponse(result if shape is None else shape.response(result))

    async def _stream(request, cid, seqs, choices, shape):
        def event(index, text, finish_reason):
            chunk = {"id": cid, "object": "text_completion", "created": int(time.time()),
                     "model": model_name, "choices": [{"index": index, "text": text,
                     "logprobs": None, "finish_reason": finish_reason}]}  # fmt: skip
            return f"data: {json.dumps(chunk if shape is None else shape.chunk(chunk))}\n\n"

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
        stalled = worker.stalled_for()
        if stalled > stall_seconds:
            return fail(503, f"one engine step has run for {stalled:.0f} s", "server_error")
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

    async def internal_error(request: Request, exc):  # a bug of ours: still an OpenAI body
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return fail(500, f"internal error: {type(exc).__name__}", "server_error")

    app = Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={404: not_found, 405: not_allowed, Exception: internal_error},
        lifespan=lifespan,
    )
    app.state.worker = worker
    return app


def guarded_h11(header_timeout: float, max_connections: int):
    """uvicorn's h11 protocol with what uvicorn lacks: a connection past ``max_connections`` is
    closed at once, and one that has not sent a whole request head ``header_timeout`` seconds
    after it connected (or after its last response) is closed, so silent and half-sent
    connections cannot pile up. (Idle keep-alive is uvicorn's ``timeout_keep_alive``; bodies
    are timed by the app.)"""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _head_timer = None
        _head_cycle = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._head_timer is None and self._between_requests():
                self._arm()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._head_cycle = self.cycle
            self._head_timer = self.loop.call_later(header_timeout, self._head_expired)

        def _head_expired(self) -> None:
            self._head_timer = None
            if self.cycle is self._head_cycle and self._between_requests():
                if not self.transport.is_closing():
                    self.transport.close()

    return GuardedH11Protocol


def serve(model, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_queue: int = 256, model_name: str | None = None, default_mode: str = "mask_diffusion",
          engine: Engine | None = None, max_connections: int = 256, header_timeout: float = 10.0,
          keep_alive_timeout: float = 5.0, max_body_bytes: int = MAX_BODY_BYTES,
          log_level: str = "warning", **engine_args) -> None:  # fmt: skip
    """Run the server until interrupted: ``model`` a loaded TwoTowerModel, ``engine_args`` for
    :class:`Engine` (max_slots, context, memory_budget, ...), or ``engine`` one already made (the
    lockstep engine of rank 0 under tensor parallelism). At most ``max_connections`` connections
    (more are closed; past it in flight, uvicorn answers 503); a request head must arrive within
    ``header_timeout`` s, and an idle keep-alive connection is closed after
    ``keep_alive_timeout`` s. ``log_level``: uvicorn's and this package's loggers (debug, info,
    warning, error)."""
    import uvicorn

    from .api import startup_summary

    engine = engine if engine is not None else Engine(model, **engine_args)
    name = model_name or os.path.basename(os.path.normpath(getattr(model, "source", "twotower")))
    app = create_app(engine, model_name=name, tokenizer=getattr(model, "tokenizer", None),
                     api_key=api_key, max_queue=max_queue, default_mode=default_mode,
                     chat_template=getattr(model, "chat_template", None),
                     generation=getattr(model, "generation", None),
                     max_body_bytes=max_body_bytes)  # fmt: skip
    chat = "with" if getattr(model, "chat_template", None) is not None else "without"
    print(f"twotower-rt: {startup_summary(model, engine)}\nserving {name} on "
          f"http://{host}:{port}/v1 ({chat} a chat template)", flush=True)  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                http=guarded_h11(header_timeout, max_connections),
                limit_concurrency=max_connections, timeout_keep_alive=keep_alive_timeout,
                h11_max_incomplete_event_size=16 * 1024)  # fmt: skip
