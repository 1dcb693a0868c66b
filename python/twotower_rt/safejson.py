"""JSON from untrusted bytes and files, with bounds: the file or text size, the nesting depth,
the digits of an integer, finite numbers only, and text that is valid Unicode (no lone surrogate
escapes). The server, the batch job and the loader read everything they are handed through here,
so no input sizes a recursion, an allocation or a Python int past what the caller allows.
"""

from __future__ import annotations

import json
import os
import stat

import numpy as np

MAX_DEPTH = 64  # nesting of arrays and objects
MAX_INT_DIGITS = 40  # an int64 has 19; nothing we read needs more than a few

_STRING = None  # compiled lazily: re is cheap but not needed by callers that never parse


class JSONInputError(ValueError):
    """The input is not JSON we accept (its message says why and where)."""


def _depth(raw: bytes) -> int:
    """The deepest nesting of [] and {} outside strings, without recursion."""
    global _STRING
    if _STRING is None:
        import re

        _STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
    brackets = np.frombuffer(_STRING.sub(b"", raw), dtype=np.uint8)
    step = np.zeros(brackets.shape, dtype=np.int64)
    step[(brackets == ord("[")) | (brackets == ord("{"))] = 1
    step[(brackets == ord("]")) | (brackets == ord("}"))] = -1
    return int(np.cumsum(step).max(initial=0))


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JSONInputError(f"an integer of {len(text)} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise JSONInputError(f"the number {text[:40]} overflows a float")
    return value


def _constant(name: str):
    raise JSONInputError(f"{name} is not a JSON number (only finite numbers are accepted)")


def _infinity(name: str) -> float:
    if name != "Infinity":
        _constant(name)
    return float("inf")


def loads(raw: bytes | str, *, max_depth: int = MAX_DEPTH, allow_infinity: bool = False):
    """``raw`` parsed as strict JSON; JSONInputError (a ValueError) for anything refused.
    ``allow_infinity``: the token Infinity reads as float("inf") (Python's json writes it; the
    caller's schema says where it may stand), never NaN or -Infinity."""
    if isinstance(raw, str):
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError:
            raise JSONInputError("the text is not valid Unicode") from None
    if raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark is no error
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JSONInputError(f"not UTF-8: {e}") from None
    depth = _depth(raw)
    if depth > max_depth:
        raise JSONInputError(f"nested {depth} deep (at most {max_depth})")
    try:
        constant = _infinity if allow_infinity else _constant
        obj = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=constant)
    except json.JSONDecodeError as e:
        raise JSONInputError(f"not valid JSON: {e}") from None
    try:  # a lone surrogate escape ("\ud800") decodes to a str that cannot be encoded
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise JSONInputError("a string holds a lone surrogate escape (not valid Unicode)") from None
    return obj


def read_bytes(path: str | os.PathLike, max_bytes: int) -> bytes:
    """A regular file's bytes, at most ``max_bytes`` of them; OSError / ValueError that name the
    file for a directory, a device, a FIFO, a symlink loop or a file too large."""
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path}: not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise ValueError(f"{path}: larger than {max_bytes} bytes")
    return data


def load_file(path: str | os.PathLike, *, max_bytes: int, max_depth: int = MAX_DEPTH,
              allow_infinity: bool = False):  # fmt: skip
    """A JSON file read with :func:`read_bytes` and parsed with :func:`loads`; errors name the
    file."""
    path = os.fspath(path)
    try:
        return loads(read_bytes(path, max_bytes), max_depth=max_depth,
                     allow_infinity=allow_infinity)  # fmt: skip
    except JSONInputError as e:
        raise JSONInputError(f"{path}: {e}") from None
