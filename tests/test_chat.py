"""Chat templates rendered as transformers renders them, and the server through the official
``openai`` client: ``completions.create`` and ``chat.completions.create``, plain and streamed, n,
stop, seed and the two-tower fields; a model without a template answers 400; the checkpoint's
generation_config.json supplies request defaults. The default model on the CPU, with a small
template the test writes."""

import json
import shutil

import openai
import pytest
from test_serve import Server

import twotower_rt
from twotower_rt.api import DEFAULT_MODEL_DIR
from twotower_rt.chat import ChatTemplate, load_chat_template
from twotower_rt.engine import Engine
from twotower_rt.serve import create_app

# ChatML-like, with what transformers' environment gives a template: trim_blocks / lstrip_blocks
# (the block tags leave no newlines or indentation behind), raise_exception, bos/eos tokens.
TEMPLATE = """{{ bos_token }}{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
<|{{ message['role'] }}|>
{{ message['content'] | trim }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}"""
MESSAGES = [{"role": "system", "content": "Speak as in a play."},
            {"role": "user", "content": "Who art thou?"}]  # fmt: skip
RENDERED = "<s><|system|>\nSpeak as in a play.</s>\n<|user|>\nWho art thou?</s>\n<|assistant|>\n"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """The default model with the template, and a generation_config.json making requests greedy
    unless they say otherwise."""
    d = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, d)
    config = {"chat_template": TEMPLATE, "bos_token": "<s>",
              "eos_token": {"content": "</s>", "special": True}}  # fmt: skip
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "eos_token_id": 2}))
    return twotower_rt.load(d)


def test_template_renders_as_transformers_does(chat_model):
    template = chat_model.chat_template
    assert template.render(MESSAGES) == RENDERED
    assert template.render(MESSAGES, add_generation_prompt=False) == RENDERED[: -len(
        "<|assistant|>\n")]  # fmt: skip
    with pytest.raises(ValueError, match="unknown role tool"):
        template.render([{"role": "tool", "content": "x"}])
    # the helpers transformers' environment adds: tojson keeps non-ASCII, loop controls, the
    # {% generation %} tag, strftime_now; the sandbox refuses unsafe attribute access
    extras = ChatTemplate(
        "{{ messages | tojson }}{% for m in messages %}{% if loop.first %}"
        "{% continue %}{% endif %}{% generation %}{{ m.content }}"
        "{% endgeneration %}{% endfor %}{{ strftime_now('%Y')|length }}"
    )
    msgs = [{"role": "user", "content": "é"}, {"role": "user", "content": "b"}]
    assert extras.render(msgs) == '[{"role": "user", "content": "é"}, {"role": "user", ' \
        '"content": "b"}]b4'  # fmt: skip
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        ChatTemplate("{{ messages.append(1) }}").render(msgs)


def test_template_sources(tmp_path):
    assert load_chat_template(DEFAULT_MODEL_DIR) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ eos_token }}"}],
        "eos_token": "</s>"}))  # fmt: skip
    assert load_chat_template(tmp_path).render([]) == "D</s>"
    (tmp_path / "chat_template.jinja").write_text("J{{ bos_token | default('-') }}")
    assert load_chat_template(tmp_path).render([]) == "J-"


@pytest.fixture(scope="module")
def server(chat_model):
    engine = Engine(chat_model, max_slots=8, context=256)
    app = create_app(engine, model_name="chat", tokenizer=chat_model.tokenizer,
                     chat_template=chat_model.chat_template,
                     generation=chat_model.generation)  # fmt: skip
    with Server(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120)


def test_openai_completions_plain_and_streamed(client, chat_model):
    out = client.completions.create(model="chat", prompt="ROMEO. But soft", max_tokens=16)
    (choice,) = out.choices
    ids = chat_model.encode("ROMEO. But soft")
    want = chat_model.generate([ids], max_new_tokens=16).generated[0]  # greedy: generation_config
    want = want[: want.index(2) + 1] if 2 in want else want  # the config's EOS ends it
    assert choice.text == chat_model.decode(want)
    assert choice.model_extra["token_ids"] == want
    stream = client.completions.create(model="chat", prompt="ROMEO. But soft", max_tokens=16,
                                       stream=True)  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_openai_chat_plain_and_streamed(client, chat_model):
    out = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=16)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    (choice,) = out.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    # the same as a completion of the rendered conversation's tokens
    prompt_ids = chat_model.tokenizer.encode(RENDERED, add_special_tokens=False).ids
    assert prompt_ids[0] == 1  # <s> from the template, once
    plain = client.completions.create(model="chat", prompt=prompt_ids, max_tokens=16)
    assert choice.message.content == plain.choices[0].text
    assert out.usage.prompt_tokens == len(prompt_ids)

    stream = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=16,
                                            stream=True)  # fmt: skip
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_openai_chat_n_seed_stop_and_two_tower_fields(client):
    kwargs = dict(model="chat", messages=MESSAGES, max_tokens=24, n=2, seed=3, temperature=0.9,
                  stop=["\n"], extra_body={"mode": "ar", "top_k": 50})  # fmt: skip
    out = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.message.content for c in out.choices] == [c.message.content for c in again.choices]
    for choice in out.choices:
        assert "\n" not in choice.message.content
        assert choice.finish_reason in ("stop", "length")
    diffusion = client.chat.completions.create(
        model="chat", messages=MESSAGES, max_tokens=16,
        extra_body={"mode": "mask_diffusion", "confidence_threshold": 0.0, "block_size": 8},
    )  # fmt: skip
    assert diffusion.choices[0].message.content is not None


def test_chat_errors(client, default_model):
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="chat", messages=[])
    with pytest.raises(openai.BadRequestError, match="unknown role tool"):
        client.chat.completions.create(model="chat", messages=[{"role": "tool", "content": "x",
                                                                "tool_call_id": "1"}])  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(model="chat", messages=MESSAGES, logprobs=True)
    # a model without a chat template: a clear 400
    engine = Engine(default_model, max_slots=2, context=64)
    app = create_app(engine, model_name="plain", tokenizer=default_model.tokenizer)
    with Server(app) as srv:
        plain = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=60)
        with pytest.raises(openai.BadRequestError, match="no chat template") as err:
            plain.chat.completions.create(model="plain", messages=MESSAGES)
        assert err.value.status_code == 400


def _chat(**fields) -> str:
    return json.dumps({"model": "chat", "messages": MESSAGES, **fields})


# /v1/chat/completions bodies get the limits and checks of /v1/completions (protocol.py)
HOSTILE_CHAT = [
    (_chat(seed=2**64), 400, "seed"),
    (_chat(seed=-1), 400, "seed"),
    (_chat(seed="7"), 400, "seed"),
    (_chat(max_tokens=10**12), 400, "max_tokens"),
    (_chat(max_completion_tokens=10**6), 400, "max_tokens"),
    (_chat(n=10**6), 400, "'n'"),
    (_chat(steps_per_block=10**30), 400, "steps_per_block"),
    (_chat(messages=MESSAGES[:1] + [{"role": "user", "content": "x" * 100_000}]), 400, "context"),
    (_chat()[:-1] + ', "max_tokens": 1' + "0" * 400 + "}", 400, "digits"),
    (_chat()[:-1] + ', "temperature": NaN}', 400, "NaN"),
    ('{"messages": ' + "[" * 3000 + "]" * 3000 + "}", 400, "nested"),
    ('{"messages": [{"role": "user", "content": [' + "[" * 20 + "]" * 20 + "]}]}", 400, "nested"),
    ('{"messages": [{"role": "user", "content": "x\\ud800"}]}', 400, "surrogate"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]}), 413, "larger"),
]


def test_hostile_chat_bodies_get_4xx_and_harm_nothing(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=60) as c:
        for body, status, message in HOSTILE_CHAT:
            r = c.post("/v1/chat/completions", content=body.encode(),
                       headers={"content-type": "application/json"})  # fmt: skip
            assert r.status_code == status, (body[:80], r.status_code, r.text[:300])
            error = r.json()["error"]
            assert message in error["message"], (body[:80], error)
        assert c.get("/health").json() == {"status": "ok"}
        ok = c.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4})
        assert ok.status_code == 200, ok.text[:300]
        assert ok.json()["choices"][0]["message"]["role"] == "assistant"
