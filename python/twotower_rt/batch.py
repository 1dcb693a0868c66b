"""``twotower-rt batch IN.jsonl OUT.jsonl``: a JSONL file of requests through one engine, for
synthetic-data jobs.

Each input line is a JSON object: ``id`` (string or integer, unique), ``prompt`` (text) or
``input_ids`` (token ids), and optionally ``mode`` and any :class:`SamplingParams` field
(``max_tokens`` is an alias of ``max_new_tokens``, ``stop_token_ids`` of ``eos_token_id``). Each
completed request is appended to OUT as one line and made durable (flushed and fsync'd) before the
next engine step, in completion order. A re-run first reads OUT, cuts off a torn last line (a
write killed half-way) and skips every id already there, so a job killed at any moment (even with
``kill -9``) resumes without losing or repeating a line. Bad lines go to the errors file, one
JSON object each (``line``, ``id``, ``error``), and the job goes on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from tqdm import tqdm

from . import safejson
from .api import TwoTowerModel, load, startup_summary
from .engine import Engine
from .params import MODES, SamplingParams
from .protocol import BadRequest, BatchLine, validate

try:
    import fcntl
except ImportError:  # not POSIX: no lock against two runs writing the same OUT
    fcntl = None

PARAM_KEYS = tuple(f.name for f in dataclasses.fields(SamplingParams))
MAX_LINE_BYTES = 16 << 20  # an input or output line longer than this is refused, never held
MAX_LINE_DEPTH = 16  # JSON nesting of a line (a valid one nests 2)
log = logging.getLogger("twotower_rt.batch")
IN_FLIGHT_PER_SLOT = 4  # requests handed to the engine per cache slot: enough to refill every slot


@dataclass
class BatchSummary:
    """What one :func:`run_batch` did: requests completed now, lines skipped because OUT already
    had their id, bad lines, and the tokens generated now in ``seconds``."""

    done: int
    skipped: int
    errors: int
    generated_tokens: int
    seconds: float
    output_path: str
    errors_path: str

    def describe(self) -> str:
        rate = self.generated_tokens / self.seconds if self.seconds > 0 else 0.0
        text = f"done {self.done}, skipped {self.skipped} (already in OUT), errors {self.errors}"
        if self.errors:
            text += f" (see {self.errors_path})"
        return f"{text}; {self.generated_tokens} tokens in {self.seconds:.1f} s ({rate:.1f} tok/s)"


class _LineError(Exception):
    pass


def _id_key(rid) -> str | None:
    """The id as its JSON text (so 7 and "7" are different ids), or None if not a valid id."""
    if isinstance(rid, bool) or not isinstance(rid, (int, str)) or rid == "":
        return None
    return json.dumps(rid)


def _bounded_lines(f) -> Iterator[bytes]:
    """The file's lines, each read with at most MAX_LINE_BYTES held: a longer one is yielded as
    its first MAX_LINE_BYTES + 1 bytes (no newline), the rest skipped."""
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
        yield raw


def _numbered_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line) for each line of the file that is not blank, read lazily."""
    with open(path, "rb") as f:
        for number, raw in enumerate(_bounded_lines(f), 1):
            if raw.strip():
                yield number, raw


def _parse(raw: bytes):
    if len(raw) > MAX_LINE_BYTES:
        raise _LineError(f"longer than {MAX_LINE_BYTES} bytes")
    try:
        return safejson.loads(raw, max_depth=MAX_LINE_DEPTH)
    except safejson.JSONInputError as e:
        raise _LineError(str(e)) from None


def _keyed_line(raw: bytes) -> tuple[dict, str]:
    """A line -> (its JSON object, its id key); _LineError if it is not an object with a valid
    id."""
    obj = _parse(raw)
    if not isinstance(obj, dict):
        raise _LineError(f"a line must be a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        raise _LineError("missing 'id' (a string or an integer, unique in the file)")
    key = _id_key(obj["id"])
    if key is None:
        raise _LineError(f"id must be a non-empty string or an integer, got {obj['id']!r}")
    return obj, key


def _line_request(obj, default_mode: str, defaults: dict) -> tuple[object, str, dict]:
    """A parsed line (its id already checked) -> (prompt text or ids, mode, SamplingParams
    fields): the line checked by :class:`BatchLine` (types and bounds), its values over the
    defaults; what depends on the model is checked by Engine.add_request."""
    try:
        line = validate(BatchLine, obj)
    except BadRequest as e:
        raise _LineError(str(e)) from None
    params = {**defaults, **line.sampling_params()}
    prompt = line.prompt if line.prompt is not None else line.input_ids
    return prompt, line.mode or default_mode, params


def result_record(model: TwoTowerModel, rid, out, seconds: float) -> dict:
    """The output line of a finished request: its line's ``id`` and the engine's output ``out``
    (a RequestOutput), ``seconds`` from submission to completion."""
    text = model.decode(out.generated) if model.tokenizer is not None else None
    return {"id": rid, "text": text, "token_ids": out.generated,
            "prompt_tokens": len(out.prompt), "finish_reason": out.finish_reason,
            "nfe": out.nfe, "seconds": round(seconds, 4)}  # fmt: skip


def _read_done(out_file, path: str) -> set[str]:
    """The id keys already in OUT (opened for appending). A last line without its newline is a
    write of ours cut short only if it is the start of a record (``{"id": ``, no more): the file
    is truncated back to the end of the last complete line. Anything else that is not a batch
    output (a line that is not a record, bytes that are not JSON) is refused, and OUT is left as
    it was."""
    done: set[str] = set()
    end = 0

    def refuse(number: int, what: str):
        raise ValueError(
            f"{path} line {number} {what}; this file is not a batch output (or it was "
            "corrupted): move it away or fix that line"
        )

    with open(path, "rb") as f:
        for number, raw in enumerate(_bounded_lines(f), 1):
            if not raw.endswith(b"\n"):
                torn = raw.startswith(b'{"id": ') and len(raw) <= MAX_LINE_BYTES
                if not torn or _record_key(raw) is not None:  # complete without its newline
                    refuse(number, "has no newline and is not a record cut short by a kill")
                break  # torn: its request is run again
            if raw.strip():
                key = _record_key(raw)
                if key is None:
                    refuse(number, "is not a JSON object with an id")
                done.add(key)
            end += len(raw)
    if out_file.tell() != end:
        out_file.truncate(end)
        out_file.seek(end)
        out_file.flush()
        os.fsync(out_file.fileno())
    return done


def _record_key(raw: bytes) -> str | None:
    """The id key of an output line, or None if it is not a JSON object with an id."""
    try:
        obj = _parse(raw)
    except _LineError:
        return None
    return _id_key(obj.get("id")) if isinstance(obj, dict) else None


def _count_to_do(input_path: str, done: set[str]) -> int:
    """Lines the progress bar counts: every non-blank line but the first of each id in OUT."""
    total, seen = 0, set()
    for _, raw in _numbered_lines(input_path):
        try:
            key = _id_key(_parse(raw).get("id"))
        except (_LineError, AttributeError):
            key = None
        if key in done and key not in seen:
            seen.add(key)
        else:
            total += 1
    return total


def _check_defaults(mode: str, params: dict, vocab_size: int) -> None:
    """The defaults every line starts from, checked once (mode-independent checks), by the same
    rules as a line's own values."""
    if isinstance(params.get("seed"), (list, tuple)):
        raise ValueError("seed must be one integer for every line (a line may give its own)")
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    try:
        validate(BatchLine, {"id": 0, "input_ids": [0], **params})
    except BadRequest as e:
        raise ValueError(f"the defaults (flags over generation_config.json): {e}") from None
    SamplingParams(**params).validate("ar", vocab_size, 1)  # ar: a multiple of a block or not


def run_batch(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    model: TwoTowerModel | str | os.PathLike | None = None,
    *,
    mode: str = "mask_diffusion",
    errors_path: str | os.PathLike | None = None,
    max_slots: int | None = None,
    context: int | None = None,
    max_in_flight: int | None = None,
    progress: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    engine: Engine | None = None,
    **params,
) -> BatchSummary:
    """Run every request of the JSONL file ``input_path`` and append one JSON line per completed
    request to ``output_path``: ``id``, ``text`` (the generated text, None without a tokenizer),
    ``token_ids``, ``prompt_tokens``, ``finish_reason``, ``nfe`` and ``seconds`` (submission to
    completion), in completion order, each step's lines fsync'd before the next step.

    ``model``: a loaded :class:`TwoTowerModel`, or a checkpoint directory (None: the default model)
    or hub id loaded on ``device`` in ``dtype`` (see :func:`twotower_rt.load`). ``mode`` and
    ``params`` (:class:`SamplingParams` fields, over the checkpoint's generation_config.json) are
    the defaults a line's own keys override. The engine has ``max_slots`` slots of ``context``
    tokens (its defaults when None); at most ``max_in_flight`` requests (default 4 per slot) are
    read ahead of completion, so the input is streamed, never held. Ids already in OUT are skipped
    (resume after a kill). Bad lines go to ``errors_path`` (default OUT + ".errors.jsonl",
    rewritten each run) as ``{"line", "id", "error"}`` objects. ``progress``: a tqdm bar on stderr.
    ``engine``: run on this engine instead of a new one (max_slots and context then unused).
    Raises ValueError/OSError for what stops the whole job (a bad default, an unreadable input,
    an OUT that is not a batch output or that another run is writing)."""
    input_path, output_path = os.fspath(input_path), os.fspath(output_path)
    errors_path = output_path + ".errors.jsonl" if errors_path is None else os.fspath(errors_path)
    paths = {os.path.realpath(p) for p in (input_path, output_path, errors_path)}
    if len(paths) != 3:
        raise ValueError("the input, output and errors files must be three different files")
    unknown = sorted(set(params) - set(PARAM_KEYS))
    if unknown:
        raise ValueError(f"unknown parameters {unknown}; SamplingParams has {list(PARAM_KEYS)}")
    if not os.path.isfile(input_path):
        raise ValueError(f"input file {input_path} does not exist")
    if not isinstance(model, TwoTowerModel):
        model = load(model, device=device, dtype=dtype)
    # The flags over the checkpoint's generation_config.json: the defaults every line starts from,
    # checked before any line is read.
    params = model.generation.apply(params) if hasattr(model, "generation") else params
    _check_defaults(mode, params, model.config.vocab_size)
    if engine is None:
        engine = Engine(model, max_slots=max_slots, context=context)
    log.info(startup_summary(model, engine))
    if max_in_flight is None:
        max_in_flight = IN_FLIGHT_PER_SLOT * engine.plan.slots
    elif isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise ValueError(f"max_in_flight must be an integer >= 1, got {max_in_flight!r}")

    if os.path.exists(output_path) and not os.path.isfile(output_path):
        raise ValueError(f"{output_path}: the output must be a regular file")
    with open(output_path, "ab") as out_file:
        if fcntl is not None:
            try:
                fcntl.flock(out_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(f"another batch run is writing {output_path}") from None
        done = _read_done(out_file, output_path)
        total = _count_to_do(input_path, done) if progress else None
        with open(errors_path, "w", encoding="utf-8") as errors_file:
            bar = tqdm(total=total, unit="req", dynamic_ncols=True, disable=not progress)
            try:
                job = _Job(engine, model, out_file, errors_file, bar, mode, params)
                job.run(_numbered_lines(input_path), done, max_in_flight)
            finally:
                bar.close()
    return BatchSummary(job.done, job.skipped, job.errors, job.tokens,
                        time.perf_counter() - job.start, output_path, errors_path)  # fmt: skip


class _Job:
    """One pass over the input: submit lines, step the engine, write what finishes."""

    def __init__(self, engine, model, out_file, errors_file, bar, mode, defaults):
        self.engine, self.model = engine, model
        self.out_file, self.errors_file, self.bar = out_file, errors_file, bar
        self.mode, self.defaults = mode, defaults
        self.pending: dict[str, tuple[object, float]] = {}  # engine id -> (line id, submitted)
        self.first_line: dict[str, int] = {}  # id key -> the line that had it first
        self.done = self.skipped = self.errors = self.tokens = 0
        self._synced_at = out_file.tell()
        self.start = time.perf_counter()

    def run(self, lines: Iterator[tuple[int, bytes]], done: set[str], max_in_flight: int) -> None:
        exhausted = False
        while True:
            while not exhausted and len(self.pending) < max_in_flight:
                item = next(lines, None)
                if item is None:
                    exhausted = True
                else:
                    self._submit(*item, done)
            self._sync()  # lines finished at submission (max_new_tokens 0)
            if not self.pending:
                return
            if not self.engine.has_unfinished():
                raise RuntimeError(f"engine idle with {len(self.pending)} requests outstanding")
            for out in self.engine.step():
                self.tokens += len(out.new_tokens)
                if out.finished:
                    self._complete(out.request_id)
            self._sync()

    def _submit(self, number: int, raw: bytes, done: set[str]) -> None:
        rid = None
        try:
            obj, key = _keyed_line(raw)
            rid = obj["id"]
            if key in self.first_line:
                raise _LineError(f"duplicate id {rid!r} (first on line {self.first_line[key]})")
            self.first_line[key] = number
            if key in done:
                self.skipped += 1
                return
            prompt, mode, params = _line_request(obj, self.mode, self.defaults)
            engine_id = str(number)
            self.engine.add_request(prompt, mode, request_id=engine_id, **params)
        except (_LineError, ValueError) as e:
            self._error(number, rid, str(e))
            return
        except Exception as e:  # noqa: BLE001 -- one line's fault never stops the job
            self._error(number, rid, f"{type(e).__name__}: {e}")
            return
        self.pending[engine_id] = (rid, time.perf_counter())
        if self.engine.output(engine_id).finished:
            self._complete(engine_id)

    def _complete(self, engine_id: str) -> None:
        out = self.engine.pop(engine_id)
        rid, submitted = self.pending.pop(engine_id)
        if out.finish_reason == "error":  # the engine failed this request alone
            self._error(int(engine_id), rid, f"engine error: {out.error}")
            return
        record = result_record(self.model, rid, out, time.perf_counter() - submitted)
        self.out_file.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        self.done += 1
        self._advance()

    def _error(self, number: int, rid, reason: str) -> None:
        record = {"line": number, "id": rid, "error": " ".join(reason.split())}
        self.errors_file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.errors_file.flush()
        self.errors += 1
        self._advance()

    def _advance(self) -> None:
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        self.bar.set_postfix_str(f"{rate:.1f} tok/s, errors {self.errors}", refresh=False)
        self.bar.update(1)

    def _sync(self) -> None:
        """Make the lines written since the last sync durable: a kill now loses none of them."""
        if self.out_file.tell() != self._synced_at:
            self.out_file.flush()
            os.fsync(self.out_file.fileno())
            self._synced_at = self.out_file.tell()
