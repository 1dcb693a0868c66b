"""Incremental detokenization: the text of a growing list of token ids, piece by piece, in time
linear in the number of tokens (re-decoding a choice's whole text at every streamed update is
quadratic on long outputs).

:class:`IncrementalDetokenizer` uses the ``tokenizers`` library's ``decoders.DecodeStream`` when
the installed version has it (0.21+), else the offset method vLLM used before it existed: decode a
short window of tokens ending at the new ones, and keep back text that ends in an incomplete UTF-8
character (U+FFFD) until the tokens that complete it arrive. Either way the pieces joined equal
``tokenizer.decode(all_ids, skip_special_tokens=True)`` once :meth:`~IncrementalDetokenizer.flush`
has given what an unfinished character held back (tested on multi-byte characters).
"""

from __future__ import annotations

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21
    DecodeStream = None

REPLACEMENT = "\ufffd"
# Tokens decoded before the new ones in the offset method: enough context for decoders that
# depend on their neighbours (a leading-space rule, byte fallback across tokens).
PREFIX_WINDOW = 6


class IncrementalDetokenizer:
    """``push(ids)`` returns the text that ``ids`` add (special tokens skipped); ``text`` is all of
    it so far."""

    def __init__(self, tokenizer, use_decode_stream: bool | None = None):
        if use_decode_stream is None:
            use_decode_stream = DecodeStream is not None
        self.tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True) if use_decode_stream else None
        self.ids: list[int] = []
        self._prefix = 0  # offset method: ids[_prefix:_read] decode to the text already given
        self._read = 0
        self.text = ""

    def push(self, ids: list[int]) -> str:
        if self._stream is not None:
            pieces = []
            for token in ids:
                piece = self._stream.step(self.tokenizer, token)
                if piece:
                    pieces.append(piece)
            self.ids.extend(ids)
            new = "".join(pieces)
        else:
            self.ids.extend(ids)
            new = self._offsets()
        self.text += new
        return new

    def flush(self) -> str:
        """At the end: the text still held back (a character the last tokens left incomplete
        decodes to U+FFFD, as in the whole decoding). Decodes everything once."""
        whole = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        rest = whole[len(self.text) :] if whole.startswith(self.text) else ""
        self.text += rest
        return rest

    def _offsets(self) -> str:
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        now = decode(self.ids[self._prefix :], skip_special_tokens=True)
        if len(now) <= len(before) or now.endswith(REPLACEMENT):
            return ""  # nothing new, or a character still incomplete: wait for more tokens
        new = now[len(before) :]
        self._prefix = max(self._read, len(self.ids) - PREFIX_WINDOW)
        self._read = len(self.ids)
        return new
