"""Text in, text out from Python (``model.generate("text")`` returns ``texts``),
``twotower_rt.Engine`` at the top level, and a checkpoint's generation_config.json: its EOS ids and
default sampling used by generate and batch, a caller's own parameters winning."""

import json
import os
import shutil

import pytest

import twotower_rt
from twotower_rt.api import DEFAULT_MODEL_DIR
from twotower_rt.batch import run_batch
from twotower_rt.generation_config import read_generation_config

PROMPT = "ROMEO. But soft, what light"


def test_text_in_text_out(default_model):
    out = default_model.generate(PROMPT, mode="ar", max_new_tokens=8, temperature=0.0)
    ids = default_model.encode(PROMPT)
    by_ids = default_model.generate([ids], mode="ar", max_new_tokens=8, temperature=0.0)
    assert out.generated == by_ids.generated and out.sequences[0][: len(ids)] == ids
    assert out.texts == [default_model.decode(out.generated[0])] == by_ids.texts
    two = default_model.generate(
        [PROMPT, "KING."],
        mode="mask_diffusion",
        max_new_tokens=16,
        temperature=0.0,
        confidence_threshold=0.0,
    )  # one step a block
    assert len(two.texts) == 2 and two.texts[0] == default_model.decode(two.generated[0])


def test_text_needs_a_tokenizer(builtin_model):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        builtin_model.generate("hello", mode="ar", max_new_tokens=2)
    out = builtin_model.generate([[5, 6]], mode="ar", max_new_tokens=2)
    assert out.texts is None and len(out.generated[0]) == 2


def test_engine_at_the_top_level():
    from twotower_rt.engine import Engine

    assert twotower_rt.Engine is Engine and "Engine" in twotower_rt.__all__


@pytest.fixture(scope="module")
def with_generation_config(tmp_path_factory, default_model):
    """A copy of the default model whose generation_config.json makes the 4th token of the
    greedy AR continuation of PROMPT its EOS, greedy its default and 12 tokens its length."""
    greedy = default_model.generate(PROMPT, mode="ar", max_new_tokens=12, temperature=0.0)
    eos = greedy.generated[0][3]
    d = tmp_path_factory.mktemp("ckpt") / "with-gen-config"
    shutil.copytree(DEFAULT_MODEL_DIR, d)
    config = {"eos_token_id": [eos], "temperature": 0.0, "top_k": 0, "top_p": 1.0,
              "max_new_tokens": 12, "do_sample": False, "bos_token_id": 1}  # fmt: skip
    (d / "generation_config.json").write_text(json.dumps(config))
    return d, eos, greedy.generated[0]


@pytest.fixture(scope="module")
def gen_model(with_generation_config):
    return twotower_rt.load(with_generation_config[0])


def test_generation_config_read(with_generation_config):
    d, eos, _ = with_generation_config
    defaults = read_generation_config(d)
    assert defaults.eos_token_ids == [eos]
    assert defaults.params == {"temperature": 0.0, "max_new_tokens": 12}  # neutral top_k/p dropped
    assert defaults.apply({"temperature": 0.7}) == {"temperature": 0.7, "max_new_tokens": 12,
                                                    "eos_token_id": [eos]}  # fmt: skip
    assert defaults.apply({"eos_token_id": 5})["eos_token_id"] == 5
    body = defaults.apply_to_request({"prompt": "x", "stop_token_ids": [9], "max_tokens": 3})
    assert body == {"prompt": "x", "stop_token_ids": [9, eos], "max_tokens": 3,
                    "temperature": 0.0}  # fmt: skip
    assert read_generation_config(DEFAULT_MODEL_DIR).params == {}


def test_generation_config_bad_file(tmp_path):
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": "x"}')
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id"):
        read_generation_config(tmp_path)


def test_generate_uses_the_generation_config(with_generation_config, gen_model):
    d, eos, greedy = with_generation_config
    model = gen_model
    out = model.generate(PROMPT, mode="ar")  # greedy, 12 tokens, stops at the config's EOS
    assert out.generated[0] == greedy[: greedy.index(eos) + 1]
    assert out.finish_reason == ["eos"]
    out = model.generate(PROMPT, mode="ar", eos_token_id=2)  # the caller's EOS wins
    want = greedy[: greedy.index(2) + 1] if 2 in greedy else greedy
    assert out.generated[0] == want
    out = model.generate(PROMPT, mode="ar", max_new_tokens=2)
    assert len(out.generated[0]) == min(2, greedy.index(eos) + 1)


def test_batch_uses_the_generation_config(with_generation_config, gen_model, tmp_path):
    d, eos, greedy = with_generation_config
    model = gen_model
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"id": 1, "prompt": PROMPT, "mode": "ar"}) + "\n"
                   + json.dumps({"id": 2, "prompt": PROMPT, "mode": "ar",
                                 "eos_token_id": 2}) + "\n")  # fmt: skip
    run_batch(src, out, model)
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows[1]["token_ids"] == greedy[: greedy.index(eos) + 1]
    assert rows[1]["finish_reason"] == "eos"
    assert rows[2]["token_ids"] == (greedy[: greedy.index(2) + 1] if 2 in greedy else greedy)
    assert os.path.getsize(str(out) + ".errors.jsonl") == 0
