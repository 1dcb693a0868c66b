"""Incremental detokenization: the pieces pushed token by token (or a block at a time) join to the
whole text's decoding, multi-byte characters split across byte-level tokens included, with
``tokenizers``' DecodeStream and with the offset method used without it."""

import pytest

from twotower_rt.detok import DecodeStream, IncrementalDetokenizer

TEXTS = [
    "ROMEO. But soft, what light through yonder window breaks?",
    "naïve café, São Paulo, Zürich: ½ × ¾ ≠ ∞",
    "日本語のテキストと中文字符 — and 한국어",
    "emoji 🙂🚀👩‍👩‍👧 and combining e\u0301 marks\n\n  indented",
]
WAYS = [True, False] if DecodeStream is not None else [False]


@pytest.mark.parametrize("use_decode_stream", WAYS, ids=lambda x: "stream" if x else "offsets")
@pytest.mark.parametrize("chunk", [1, 3, 16])
@pytest.mark.parametrize("text", TEXTS)
def test_pieces_join_to_the_whole_decoding(default_model, text, chunk, use_decode_stream):
    tokenizer = default_model.tokenizer
    ids = tokenizer.encode(text).ids
    assert len(ids) > len(text.encode()) / 4, "byte-level tokens split multi-byte characters"
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    detok = IncrementalDetokenizer(tokenizer, use_decode_stream)
    pieces = [detok.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    assert "".join(pieces) == whole == detok.text
    if "\ufffd" not in whole:
        assert not any("\ufffd" in p for p in pieces), "an incomplete character was sent"


@pytest.mark.parametrize("use_decode_stream", WAYS, ids=lambda x: "stream" if x else "offsets")
def test_special_tokens_are_skipped(default_model, use_decode_stream):
    tokenizer = default_model.tokenizer
    ids = tokenizer.encode("KING. Well, ").ids + [2] + tokenizer.encode("é fin").ids + [1, 0]
    detok = IncrementalDetokenizer(tokenizer, use_decode_stream)
    text = "".join(detok.push([t]) for t in ids)
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert "</s>" not in text


@pytest.mark.parametrize("use_decode_stream", WAYS, ids=lambda x: "stream" if x else "offsets")
def test_flush_gives_a_character_cut_in_half(default_model, use_decode_stream):
    """Output cut inside a multi-byte character (max_tokens): the pieces hold it back, flush gives
    what the whole decoding gives."""
    tokenizer = default_model.tokenizer
    ids = tokenizer.encode("ab 🙂").ids
    whole = tokenizer.decode(ids[:-1], skip_special_tokens=True)
    assert whole.endswith("\ufffd")
    detok = IncrementalDetokenizer(tokenizer, use_decode_stream)
    text = "".join(detok.push([t]) for t in ids[:-1])
    assert "\ufffd" not in text
    assert text + detok.flush() == whole == detok.text


def test_offset_method_works_in_a_bounded_window(default_model, monkeypatch):
    """Each push decodes a few tokens around the new ones, not the whole text."""
    tokenizer = default_model.tokenizer
    ids = tokenizer.encode(" ".join(TEXTS) * 4).ids
    lengths = []

    class Counting:
        def decode(self, window, skip_special_tokens=True):
            lengths.append(len(window))
            return tokenizer.decode(window, skip_special_tokens=skip_special_tokens)

    detok = IncrementalDetokenizer(Counting(), use_decode_stream=False)
    text = "".join(detok.push([t]) for t in ids)
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert max(lengths) <= 8 < len(ids)


def test_a_streamed_choice_sends_each_character_once(default_model):
    """serve's per-choice state fed a block at a time: the pieces sent join to the whole decoding
    (no U+FFFD sent for a character split across blocks), cut at max_tokens, and a stop string
    that spans two blocks is found and none of it is sent."""
    from types import SimpleNamespace

    from twotower_rt.serve import _Choice

    tokenizer = default_model.tokenizer
    ids = tokenizer.encode(TEXTS[2] + TEXTS[3]).ids
    for max_tokens, stop in ((len(ids), []), (len(ids) - 5, []), (len(ids), ["🙂🚀"])):
        choice, sent = _Choice(tokenizer, max_tokens, stop), []
        for end in range(3, len(ids) + 3, 3):
            done = end >= len(ids)
            out = SimpleNamespace(generated=ids[:end], finished=done,
                                  finish_reason="length" if done else None)  # fmt: skip
            sent.append(choice.update(out))
            if choice.done:
                break
        whole = tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)
        if stop:
            whole = whole[: whole.index(stop[0])]
            assert choice.finish_reason == "stop"
        assert "".join(sent) == choice.text == whole
        assert not any("\ufffd" in s for s in sent[:-1])
