"""The server and the engine under hostile and careless input: every bad request gets a 4xx with
an OpenAI error body and harms no other request; a fault while stepping one request fails that
request alone; silent, half-sent and excess connections are closed; /health tells a dead or stuck
engine; the per-parameter step functions stay bounded. Also a property-based fuzz of the API."""

import asyncio
import json
import socket
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve import CONTEXT, Server, make_app

from twotower_rt.engine import Engine, steps
from twotower_rt.serve import guarded_h11

POISON_TEMPERATURE = 0.123  # requests with this temperature fault inside the engine step


def poison(engine: Engine) -> None:
    """Make every AR / mock-AR step at POISON_TEMPERATURE raise, as a bug or a device fault
    would, inside Engine.step."""
    real = engine.runner.run

    def run(key, inputs):
        if key.kind in ("ar", "mock") and key.params[0] == POISON_TEMPERATURE:
            raise RuntimeError("poisoned step")
        return real(key, inputs)

    engine.runner.run = run


def wait_idle(engine: Engine, slots: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while engine.num_running or engine.num_waiting or engine.pool.free != slots:
        assert time.monotonic() < deadline, (engine.num_running, engine.pool.free)
        time.sleep(0.05)


# --- the engine ---------------------------------------------------------------------------------


def test_a_step_fault_fails_that_request_alone(default_model):
    engine = Engine(default_model, max_slots=4, context=64)
    poison(engine)
    prompts = [[5, 6, 7], [40, 41], [9]]
    good = [engine.add_request(p, "ar", max_new_tokens=8) for p in prompts]
    bad = engine.add_request([5, 6], "ar", max_new_tokens=8, temperature=POISON_TEMPERATURE)
    md = engine.add_request([5, 6], "mask_diffusion", max_new_tokens=16)
    engine.run()
    failed = engine.pop(bad)
    assert failed.finish_reason == "error" and "poisoned step" in failed.error
    for rid, prompt in zip(good, prompts):
        solo = default_model.generate([prompt], mode="ar", max_new_tokens=8).generated[0]
        assert engine.pop(rid).generated == solo
    solo = default_model.generate([[5, 6]], mode="mask_diffusion", max_new_tokens=16)
    assert engine.pop(md).generated == solo.generated[0]
    assert engine.pool.free == 4 and not engine.has_unfinished()


@pytest.mark.parametrize(
    "params, message",
    [
        ({"seed": 2**64, "temperature": 1.0}, "seed must be < 2\\*\\*63"),
        ({"seed": 2**63, "temperature": 1.0}, "seed must be < 2\\*\\*63"),
        ({"steps_per_block": 10**30, "max_new_tokens": 16}, "steps_per_block must be <="),
    ],
)
def test_engine_refuses_values_past_its_tensors(default_model, params, message):
    engine = Engine(default_model, max_slots=1, context=64)
    with pytest.raises(ValueError, match=message):
        engine.add_request([5], "mask_diffusion", **params)
    assert engine.pool.free == 1 and not engine.has_unfinished()


def test_step_functions_are_bounded(default_model, monkeypatch):
    monkeypatch.setattr(steps, "MAX_STEP_FUNCTIONS", 4)
    engine = Engine(default_model, max_slots=2, context=32)
    for i in range(12):
        engine.add_request([5, 6], "ar", max_new_tokens=2, temperature=0.5 + i / 100, seed=i)
    engine.run()
    assert len(engine.runner._fns) <= 4


# --- hostile requests -----------------------------------------------------------------------------

NINES = "9" * 5000
HOSTILE = [
    (json.dumps({"prompt": [5], "seed": 2**64, "temperature": 1}), 400, "seed"),
    (json.dumps({"prompt": [5], "seed": 2**63 - 1, "n": 2}), 400, "seed"),
    (json.dumps({"prompt": [5], "steps_per_block": 10**30}), 400, "steps_per_block"),
    ('{"prompt": [5], "block_size": 1' + "0" * 400 + "}", 400, "digits"),
    ('{"prompt": [5], "max_tokens": 1' + "0" * 400 + "}", 400, "digits"),
    ('{"prompt": [5], "max_tokens": ' + NINES + "}", 400, "digits"),
    ('{"prompt": ' + "[" * 2000 + "]" * 2000 + "}", 400, "nested"),
    ('{"prompt": "x\\ud800"}', 400, "surrogate"),
    ('{"\\udc00": 1, "prompt": "x"}', 400, "surrogate"),
    ('{"prompt": [5], "temperature": NaN}', 400, "NaN"),
    ('{"prompt": [5], "temperature": 1e999}', 400, "overflows"),
    (json.dumps({"prompt": [[5]] * 10000}), 400, "can never run"),
    (json.dumps({"prompt": "x" * (2 << 20)}), 413, "larger than"),
    (json.dumps({"prompt": [5], "block_size": 10**6, "max_tokens": 1}), 400, "block_size"),
    (json.dumps({"prompt": [5], "top_k": 10**6}), 400, "top_k"),
    (json.dumps({"prompt": [5], "stop_token_ids": [10**6]}), 400, "stop_token_ids"),
    (json.dumps({"prompt": [5], "n": True}), 400, "'n' must be an integer, got a boolean"),
    (json.dumps({"prompt": [5], "stream": "yes"}), 400, "'stream' must be a boolean"),
    (json.dumps({"prompt": "x" * 100_000}), 400, "cannot fit"),
]


def test_hostile_requests_get_4xx_and_harm_nothing(default_model):
    app = make_app(default_model, slots=2)
    engine = app.state.worker.engine
    with Server(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        for body, status, message in HOSTILE:
            r = c.post("/v1/completions", content=body.encode(),
                       headers={"content-type": "application/json"})  # fmt: skip
            assert r.status_code == status, (body[:80], r.status_code, r.text[:300])
            error = r.json()["error"]
            assert message in error["message"], (body[:80], error)
            assert error["type"] == "invalid_request_error"
        chunked = iter([b'{"prompt": "' + b"x" * (1 << 20)] * 3)  # no Content-Length: counted
        r = c.post("/v1/completions", content=chunked)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        assert c.get("/health").json() == {"status": "ok"}
        out = c.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 4, "mode": "ar"})
        assert out.status_code == 200 and len(out.json()["choices"][0]["token_ids"]) == 4
    wait_idle(engine, 2)


def test_heavy_bodies_do_not_block_the_event_loop(default_model):
    """Bodies near the size cap (parsed, checked and tokenized in worker threads) while /health
    is polled: it keeps answering (the bug: 11.5 s while one 10 MB prompt was tokenized)."""
    app = make_app(default_model, slots=1)
    heavy = json.dumps({"prompt": [5] * 300_000}).encode()  # ~1 MB of token ids
    text = json.dumps({"prompt": "ROMEO. " * 140_000}).encode()  # ~1 MB of text

    async def run(url):
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:

            async def health():
                worst = 0.0
                while not posted.done():
                    started = time.monotonic()
                    assert (await c.get("/health")).status_code == 200
                    worst = max(worst, time.monotonic() - started)
                    await asyncio.sleep(0.02)
                return worst

            bodies = [heavy, text] * 4
            posted = asyncio.gather(*(c.post("/v1/completions", content=b) for b in bodies))
            worst = await health()
            return worst, [r.status_code for r in await posted]

    with Server(app) as srv:
        worst, codes = asyncio.run(run(srv.url))
    assert codes == [400] * 8
    assert worst < 3.0, worst


def test_poison_amid_16_streams(default_model):
    """16 streams run while ~1000 bad, poisoned and tiny good requests come and go: the streams
    finish with exactly their solo output, every poisoned request gets a 500 of its own, every
    bad one a 400, and afterwards no slot is held and nothing waits."""
    slots = 20
    app = make_app(default_model, slots=slots, max_queue=1024)
    engine = app.state.worker.engine
    poison(engine)
    prompts = [[5 + i, 40, 7 + 2 * i] for i in range(16)]
    # each row of a batch is exactly what it would be alone (tested in test_engine / test_golden)
    solo = default_model.generate(prompts, mode="ar", max_new_tokens=24, eos_token_id=2)
    want = [default_model.decode(g) for g in solo.generated]

    async def stream(c, prompt):
        body = {"prompt": prompt, "max_tokens": 24, "mode": "ar", "temperature": 0,
                "stream": True}  # fmt: skip
        text = ""
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    bodies = [
        ({"prompt": [5], "max_tokens": 2, "mode": "ar", "temperature": POISON_TEMPERATURE}, 500),
        ({"prompt": [5], "seed": 2**64}, 400),
        ({"prompt": [5], "max_tokens": "2"}, 400),
        ({"prompt": [5], "steps_per_block": 10**30}, 400),
        ({"prompt": [5, 6], "max_tokens": 1, "mode": "ar", "temperature": 0}, 200),
    ]

    async def flood(c, sem, body, status):
        async with sem:
            r = await c.post("/v1/completions", json=body)
        assert r.status_code == status, (body, r.text)
        if status != 200:
            assert "message" in r.json()["error"]

    async def run():
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            streams = [stream(c, p) for p in prompts]
            mixed = [flood(c, sem, *bodies[i % len(bodies)]) for i in range(1000)]
            results = await asyncio.gather(*streams, *mixed)
        return results[:16]

    with Server(app) as srv:
        texts = asyncio.run(run())
        assert texts == want
        wait_idle(engine, slots)
        assert app.state.worker.queue_depth == 0 and not app.state.worker._sequences
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert "twotower_rt_sequences_failed_total 200" in metrics
        assert httpx.get(f"{srv.url}/health").status_code == 200


# --- connections, bodies, health ----------------------------------------------------------------


def _closed(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes ``sock`` within ``seconds`` (what it sent first is read)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_silent_half_sent_and_excess_connections_are_closed(default_model):
    app = make_app(default_model, slots=1)
    with Server(app, http=guarded_h11(0.5, 8), timeout_keep_alive=1) as srv:
        address = ("127.0.0.1", srv.port)
        silent = [socket.create_connection(address) for _ in range(4)]
        half = socket.create_connection(address)
        half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
        time.sleep(0.1)
        excess = [socket.create_connection(address) for _ in range(8)]
        assert sum(_closed(s, 0.3) for s in excess) >= 5  # 5 + 8 open, 8 allowed
        assert all(_closed(s, 5) for s in [*silent, half])
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.get("/health").status_code == 200
        for s in [*silent, half, *excess]:
            s.close()


def test_a_body_that_never_arrives_gets_408(default_model):
    app = make_app(default_model, slots=1, body_timeout=0.5)
    with Server(app) as srv:
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")  # fmt: skip
        s.settimeout(10)
        # The head and the body may come in separate reads: read until the server closes.
        head = b""
        while chunk := s.recv(4096):
            head += chunk
        s.close()
    assert head.startswith(b"HTTP/1.1 408"), head[:100]
    assert b"body_timeout" in head or b"did not arrive" in head


def test_health_tells_a_stuck_or_dead_engine(default_model):
    app = make_app(default_model, slots=1, stall_seconds=0.3)
    worker = app.state.worker
    real_step = worker.engine.step
    calls = []

    def slow_step():
        if not calls:
            calls.append(1)
            time.sleep(1.5)
        return real_step()

    worker.engine.step = slow_step
    with Server(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        done = []

        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as ac:
                body = {"prompt": [5], "max_tokens": 2, "mode": "ar"}
                done.append((await ac.post("/v1/completions", json=body)).status_code)

        import threading

        t = threading.Thread(target=asyncio.run, args=(run(),))
        t.start()
        seen = set()
        deadline = time.monotonic() + 10
        while t.is_alive() and time.monotonic() < deadline:
            r = c.get("/health")
            seen.add(r.status_code)
            time.sleep(0.05)
        t.join(timeout=30)
        assert 503 in seen and done == [200]
        assert c.get("/health").status_code == 200
        worker.stop()  # the engine thread ends
        r = c.get("/health")
        assert r.status_code == 503 and "stopped" in r.json()["error"]["message"]


# --- fuzz ---------------------------------------------------------------------------------------

FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop",
          "stop_token_ids", "seed", "n", "stream", "user", "echo", "logprobs", "best_of",
          "mode", "block_size", "steps_per_block", "confidence_threshold", "bogus"]  # fmt: skip
LEAVES = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.integers(-3, 40)
          | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
          | st.sampled_from(["ar", "mock_ar", "mask_diffusion", "ROMEO."]))  # fmt: skip
VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                      max_leaves=10)  # fmt: skip
PROMPTS = st.text(min_size=1, max_size=24) | st.lists(st.integers(0, 2100), min_size=1, max_size=6)
BODIES = (
    st.fixed_dictionaries(
        {"prompt": PROMPTS | VALUES, "max_tokens": st.integers(-1, 20) | VALUES},
        optional={name: VALUES for name in FIELDS if name not in ("prompt", "max_tokens")},
    )
    | st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=5)
    | VALUES
)


@pytest.fixture(scope="module")
def fuzz_server(default_model):
    app = make_app(default_model, slots=4)
    with Server(app) as srv:
        yield srv, app.state.worker.engine


SLOW_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@settings(max_examples=60, deadline=None, suppress_health_check=SLOW_OK)
@given(body=BODIES)
def test_fuzz_completions(fuzz_server, body):
    """Any JSON body: a 200 with one choice per prompt x n, or a 4xx with an OpenAI error body;
    never a 500, a hang or a dead server."""
    srv, engine = fuzz_server
    body = {**body, "mode": "ar"} if isinstance(body, dict) and "n" in body else body
    r = httpx.post(f"{srv.url}/v1/completions", content=json.dumps(body).encode(), timeout=60)
    assert r.status_code in (200, 400, 413), (body, r.status_code, r.text[:300])
    out = r.json()
    if r.status_code == 200:
        assert out["object"] == "text_completion" and out["choices"]
        assert all(len(c["token_ids"]) <= body.get("max_tokens", 16) for c in out["choices"])
    else:
        assert isinstance(out["error"]["message"], str) and out["error"]["type"]
    assert httpx.get(f"{srv.url}/health", timeout=30).status_code == 200


def test_after_the_fuzz_nothing_is_held(fuzz_server):
    srv, engine = fuzz_server
    wait_idle(engine, 4)
    assert engine.plan.context == CONTEXT
