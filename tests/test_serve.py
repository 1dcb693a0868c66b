"""twotower-rt serve with real HTTP clients against a real server on 127.0.0.1 (uvicorn in a
thread, the default model on the CPU): plain and streaming completions, stop strings, n and
batched prompts, a load test, bad inputs, the queue bound, client disconnects, the API key and
the metrics. Every wait is bounded."""

import asyncio
import json
import threading
import time

import httpx
import pytest
import torch
import uvicorn
from helpers import free_port

from twotower_rt.engine import Engine
from twotower_rt.serve import create_app

CONTEXT = 256


class Server:
    """A uvicorn server for ``app`` on a free 127.0.0.1 port, in a thread (``config``: more
    uvicorn.Config settings)."""

    def __init__(self, app, **config):
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                **config)  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start in 30 s"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def make_app(model, *, slots=8, **kwargs):
    engine = Engine(model, max_slots=slots, context=CONTEXT)
    return create_app(engine, model_name="default", tokenizer=model.tokenizer, **kwargs)


@pytest.fixture(scope="module")
def server(default_model):
    with Server(make_app(default_model)) as srv:
        yield srv


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def complete(client, **body):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_plain_completion_is_the_model_s_generation(client, default_model):
    """Greedy text completion: the OpenAI response shape, and exactly the tokens the model
    generates for the same prompt (mask_diffusion, 16-token blocks, max_tokens cut to 20)."""
    out = complete(client, prompt="Once upon a time", max_tokens=20, temperature=0)
    assert out["object"] == "text_completion" and out["model"] == "default"
    (choice,) = out["choices"]
    ids = default_model.encode("Once upon a time")
    want = default_model.generate([ids], mode="mask_diffusion", max_new_tokens=32,
                                  temperature=0.0, eos_token_id=2).generated[0]  # fmt: skip
    want = want[: want.index(2) + 1] if 2 in want[:20] else want[:20]
    assert choice["token_ids"] == want
    assert choice["text"] == default_model.decode(want)
    assert choice["finish_reason"] == ("stop" if 2 in want else "length")
    usage = out["usage"]
    assert usage == {"prompt_tokens": len(ids), "completion_tokens": len(want),
                     "total_tokens": len(ids) + len(want)}  # fmt: skip


def test_token_prompts_n_and_seeds(client):
    out = complete(client, prompt=[[5, 6, 7], [8, 9]], n=2, max_tokens=8, temperature=0.9,
                   seed=11, mode="ar", top_k=40)  # fmt: skip
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert all(len(c["token_ids"]) <= 8 for c in out["choices"])
    again = complete(client, prompt=[[5, 6, 7], [8, 9]], n=2, max_tokens=8, temperature=0.9,
                     seed=11, mode="ar", top_k=40)  # fmt: skip
    assert [c["token_ids"] for c in out["choices"]] == [c["token_ids"] for c in again["choices"]]


def read_stream(response):
    chunks, done = [], False
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: ") :]
        if data == "[DONE]":
            done = True
            break
        chunks.append(json.loads(data))
    return chunks, done


def test_streaming_sends_blocks_and_matches_the_plain_response(client):
    body = dict(prompt="The king said", max_tokens=40, temperature=0.8, seed=5)
    plain = complete(client, **body)["choices"][0]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks, done = read_stream(r)
    assert done and len(chunks) >= 2, "one event per committed block, then [DONE]"
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_stop_strings(client):
    full = complete(client, prompt="Once upon a time", max_tokens=48, temperature=0, mode="ar")
    text = full["choices"][0]["text"]
    stop = text[5:8]
    assert stop and text.find(stop) >= 0
    out = complete(client, prompt="Once upon a time", max_tokens=48, temperature=0, mode="ar",
                   stop=[stop])  # fmt: skip
    choice = out["choices"][0]
    assert choice["text"] == text[: text.find(stop)] and choice["finish_reason"] == "stop"


BAD = [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\x00bad bytes", "not UTF-8"),
    (b"[1, 2, 3]", "JSON object"),
    (json.dumps({"max_tokens": 8}).encode(), "'prompt' is required"),
    (json.dumps({"prompt": ""}).encode(), "empty"),
    (json.dumps({"prompt": []}).encode(), "'prompt' must not be empty"),
    (json.dumps({"prompt": [1, "a"]}).encode(), "'prompt' must be a string"),
    (json.dumps({"prompt": "hi", "max_tokens": "8"}).encode(), "'max_tokens' must be an integer"),
    (json.dumps({"prompt": "hi", "max_tokens": True}).encode(), "boolean"),
    (json.dumps({"prompt": "hi", "mode": "fast"}).encode(), "'mode' must be 'ar'"),
    (json.dumps({"prompt": "hi", "temperature": -1}).encode(), "temperature"),
    (json.dumps({"prompt": "hi", "max_tokens": 10**6}).encode(), "exceeds"),
    (json.dumps({"prompt": "hi", "block_size": 0}).encode(), "block_size"),
    (json.dumps({"prompt": "word " * 400}).encode(), "exceeds"),
    (json.dumps({"prompt": [10**9]}).encode(), "vocabulary"),
    (json.dumps({"prompt": "hi", "n": 0}).encode(), "'n' must be"),
    (json.dumps({"prompt": "hi", "stop": [""]}).encode(), "'stop'"),
    (json.dumps({"prompt": "hi", "top_p": 0}).encode(), "top_p"),
    (json.dumps({"prompt": "hi", "seed": -3}).encode(), "seed"),
    (json.dumps({"prompt": "hi", "bogus": 1}).encode(), "unknown field"),
    (json.dumps({"prompt": "hi", "logprobs": 3}).encode(), "'logprobs' is not supported"),
    (json.dumps({"prompt": "hi", "echo": True}).encode(), "'echo' is not supported"),
]


def test_bad_inputs_get_400_with_an_openai_error_body(client):
    for body, message in BAD:
        r = client.post("/v1/completions", content=body,
                        headers={"content-type": "application/json"})  # fmt: skip
        assert r.status_code == 400, (body, r.status_code, r.text)
        error = r.json()["error"]
        assert message in error["message"], (body, error)
        assert error["type"] == "invalid_request_error"
    assert client.get("/v1/nowhere").status_code == 404
    assert client.get("/v1/completions").status_code == 405
    assert client.get("/health").json() == {"status": "ok"}
    complete(client, prompt="still serving", max_tokens=4)


def test_load_32_concurrent_clients(server):
    """32 clients, each sending requests back to back for 12 s (bounded): every request answered
    200 with its tokens, none lost."""

    async def one_client(c, i, stop_at, results):
        while time.monotonic() < stop_at:
            body = {
                "prompt": [5 + i, 6, 7],
                "max_tokens": 8,
                "temperature": 0.7,
                "seed": i,
                "mode": ("mask_diffusion", "ar", "mock_ar")[i % 3],
                "block_size": 8,
            }
            r = await c.post("/v1/completions", json=body)
            results.append((r.status_code, r.json()))

    async def run():
        results = []
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
            stop_at = time.monotonic() + 12
            await asyncio.gather(*(one_client(c, i, stop_at, results) for i in range(32)))
        return results

    results = asyncio.run(run())
    assert len(results) >= 32
    assert all(status == 200 for status, _ in results), [r for r in results if r[0] != 200][:3]
    assert all(len(body["choices"][0]["token_ids"]) >= 1 for _, body in results)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "twotower_rt_queue_depth 0" in metrics


def test_queue_bound_answers_429(default_model):
    with Server(make_app(default_model, slots=1, max_queue=2)) as srv:

        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
                body = {"prompt": [5, 6], "max_tokens": 64, "temperature": 0, "mode": "ar"}
                return await asyncio.gather(*(c.post("/v1/completions", json=body)
                                              for _ in range(8)))  # fmt: skip

        responses = asyncio.run(run())
    codes = sorted(r.status_code for r in responses)
    assert 429 in codes and 200 in codes, codes
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.json()["error"]["type"] == "rate_limit_error"


def test_disconnect_cancels_the_sequence(default_model):
    """A streaming client that goes away: its sequence is aborted and its slot freed."""
    app = make_app(default_model, slots=2)
    engine = app.state.worker.engine
    with Server(app) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            body = {"prompt": [5, 6, 7], "max_tokens": 200, "mode": "ar", "stream": True}
            with c.stream("POST", "/v1/completions", json=body) as r:
                next(r.iter_lines())
                assert engine.num_running == 1
        deadline = time.monotonic() + 20
        while engine.num_running or engine.pool.free != 2:
            assert time.monotonic() < deadline, "the disconnected sequence still runs"
            time.sleep(0.1)
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert c.get("/health").status_code == 200


def test_api_key(default_model):
    with Server(make_app(default_model, slots=1, api_key="s3cret")) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            body = {"prompt": [5], "max_tokens": 2}
            assert c.post("/v1/completions", json=body).status_code == 401
            wrong = {"authorization": "Bearer nope"}
            r = c.post("/v1/completions", json=body, headers=wrong)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert c.get("/v1/models").status_code == 401
            assert c.get("/metrics").status_code == 401
            assert c.get("/health").status_code == 200
            good = {"authorization": "Bearer s3cret"}
            assert c.post("/v1/completions", json=body, headers=good).status_code == 200
            assert c.get("/v1/models", headers=good).json()["data"][0]["id"] == "default"


def test_metrics(client):
    complete(client, prompt="Hello", max_tokens=16, temperature=0)
    text = client.get("/metrics").text
    values = dict(line.split() for line in text.splitlines() if not line.startswith("#"))
    assert int(values["twotower_rt_requests_total"]) >= 1
    assert int(values["twotower_rt_generation_tokens_total"]) >= 1
    assert float(values["twotower_rt_tokens_per_denoiser_forward"]) >= 1.0
    for name in ("twotower_rt_tokens_per_second", "twotower_rt_queue_depth",
                 "twotower_rt_running_sequences"):  # fmt: skip
        assert name in values


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_serves_on_a_gpu_unchanged(dtype):
    """The same server with the default model on the GPU: plain and streaming completions in
    every mode."""
    import twotower_rt

    model = twotower_rt.load(device="cuda", dtype=dtype)
    with Server(make_app(model, slots=4)) as srv:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            for mode in ("mask_diffusion", "ar", "mock_ar"):
                out = complete(c, prompt="Once upon a time", max_tokens=16, mode=mode, seed=1)
                assert out["choices"][0]["token_ids"], mode
            body = {"prompt": "The king", "max_tokens": 32, "stream": True, "seed": 2}
            with c.stream("POST", "/v1/completions", json=body) as r:
                chunks, done = read_stream(r)
            assert done and chunks


def test_the_kernels_stream_serves_the_same_tokens(default_model):
    """With the CPU kernels' stream on (serve's default on a 2-CPU machine), concurrent greedy
    requests, batched by the engine, get exactly the tokens the model writes for each prompt
    alone with the stream off."""
    from twotower_rt import _ext
    from twotower_rt.threads import set_kernel_stream

    if _ext.cpu_kernels() is None:
        pytest.skip("the CPU kernels are not built")
    prompts = [[5 + i, 60 + 7 * i, 7, 300 + i] for i in range(6)]
    set_kernel_stream(False)
    want = []
    for i, ids in enumerate(prompts):
        mode = ("mask_diffusion", "ar", "verified")[i % 3]
        out = default_model.generate([ids], mode=mode, max_new_tokens=32, temperature=0.0,
                                     eos_token_id=2).generated[0]  # fmt: skip
        want.append(out[: out.index(2) + 1] if 2 in out else out)
    set_kernel_stream(True)

    async def run(url):
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            bodies = [{"prompt": [ids], "max_tokens": 32, "temperature": 0,
                       "mode": ("mask_diffusion", "ar", "verified")[i % 3]}
                      for i, ids in enumerate(prompts)]  # fmt: skip
            return await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))

    with Server(make_app(default_model)) as srv:
        responses = asyncio.run(run(srv.url))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    got = [r.json()["choices"][0]["token_ids"] for r in responses]
    assert got == want
