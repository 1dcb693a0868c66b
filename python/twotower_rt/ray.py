"""twotower_rt as a Ray Data stage: many engine replicas over a sharded dataset (``pip install
'twotower-rt[ray]'``).

- :class:`TwoTowerPredictor`: the callable class for ``Dataset.map_batches``. Each actor loads the
  model once and runs every batch of rows through its :class:`~twotower_rt.engine.Engine`. A row
  holds the fields of a ``twotower-rt batch`` line (``id``, ``prompt`` or ``input_ids``, optional
  ``mode`` and parameters) as columns, or the whole line as JSON text in a ``json`` column.
- :func:`generate_stage`: ``ds.map_batches`` with the resources a replica needs (``num_gpus`` =
  ``tp`` on GPUs, ``concurrency`` = replicas, the batch size).
- :func:`run_ray_batch`: ``twotower-rt batch IN OUT --ray``: the batch job over a Ray cluster.

A row's result never depends on its replica or its batch: the engine runs each row as it would
alone, with the row's own seed (as in ``batch``, a sampled row with no seed, neither its own nor a
default, draws a fresh one, so only seeded rows repeat exactly).

The job (:func:`run_ray_batch`) keeps ``batch``'s guarantee, every id once, with one writer: the
driver reads the input (ids and validity: a bad line, a duplicate id or an id already in OUT never
reaches an actor), hands the rest to the actors as Arrow blocks, and appends the results it gets
back to the shards of the OUT directory, fsync'd batch by batch. An actor that dies is restarted by
Ray and its batch run again (its rows were not written yet); a driver that dies leaves at most a
torn last line, which the next run cuts off before it skips every id already written.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time

import pyarrow as pa
import ray

from .api import DEFAULT_MODEL_DIR, load
from .batch import (
    PARAM_KEYS,
    BatchSummary,
    _check_defaults,
    _id_key,
    _keyed_line,
    _line_request,
    _LineError,
    _numbered_lines,
    _read_done,
    result_record,
)
from .config import TwoTowerConfig
from .engine import Engine

try:
    import fcntl
except ImportError:  # not POSIX: no lock against two runs writing the same OUT
    fcntl = None

SHARD_PATTERN = "part-*.jsonl"
SHARD_LINES = 100_000  # result lines per shard before the next one starts
DEFAULT_BATCH_SIZE = 64
RESULT_KEYS = ("id", "text", "token_ids", "prompt_tokens", "finish_reason", "nfe", "seconds")


class TwoTowerPredictor:
    """``ds.map_batches(TwoTowerPredictor, fn_constructor_kwargs=..., batch_format="pyarrow")``.

    The constructor takes what ``run_batch`` takes: ``model`` (a checkpoint directory, None for the
    default model) loaded on ``device`` in ``dtype``, ``mode`` and ``params`` (SamplingParams
    fields) as the defaults a row overrides, and the engine's ``max_slots`` and ``context``.

    Each output row has the input row's result: ``id``, ``text``, ``token_ids``, ``prompt_tokens``,
    ``finish_reason``, ``nfe``, ``seconds`` (as a ``batch`` output line) and ``error`` (None, or why
    the row was refused; its result fields are then None). Rows given as a ``json`` column come
    back as ``result`` (the output line's JSON text), ``generated_tokens``, ``error`` and
    ``error_id`` (the refused line's id as JSON text) instead, beside the input's ``path`` and
    ``line`` columns when it has them: JSON ids may mix integers and strings, which one Arrow
    column cannot hold."""

    def __init__(self, model: str | None = None, *, mode: str = "mask_diffusion",
                 device: str = "cpu", dtype: str = "float32", max_slots: int | None = None,
                 context: int | None = None, **params):  # fmt: skip
        unknown = sorted(set(params) - set(PARAM_KEYS))
        if unknown:
            raise ValueError(f"unknown parameters {unknown}; SamplingParams has {list(PARAM_KEYS)}")
        self.model = load(model, device=device, dtype=dtype)
        _check_defaults(mode, params, self.model.config.vocab_size)
        self.mode, self.defaults = mode, params
        self.engine = Engine(self.model, max_slots=max_slots, context=context)
        self._batches = 0

    def __call__(self, batch) -> dict[str, list]:
        rows = _rows(batch)
        if rows and "json" in rows[0]:  # a batch job's lines, as JSON text
            results = self.run([row["json"] for row in rows])
            out = {key: [row[key] for row in rows] for key in ("path", "line") if key in rows[0]}
            out["result"] = [None if r is None else json.dumps(r, ensure_ascii=False)
                             for r, _ in results]  # fmt: skip
            out["generated_tokens"] = [0 if r is None else len(r["token_ids"]) for r, _ in results]
            out["error"] = [e for _, e in results]
            out["error_id"] = [None if e is None else json.dumps(_raw_id(row["json"]))
                               for row, (_, e) in zip(rows, results)]  # fmt: skip
            return out
        results = self.run([{k: v for k, v in row.items() if v is not None} for row in rows])
        out = {"id": [row.get("id") for row in rows]}
        for key in RESULT_KEYS[1:]:
            out[key] = [None if r is None else r[key] for r, _ in results]
        out["error"] = [e for _, e in results]
        return out

    def run(self, lines: list) -> list[tuple[dict | None, str | None]]:
        """Each line (a JSON line as text or bytes, or its parsed object) through the engine ->
        per line (its output record, None) or (None, why it was refused)."""
        self._batches += 1
        results: list = [None] * len(lines)
        pending: dict[str, tuple[int, object, float]] = {}  # engine id -> (index, id, submitted)
        for index, line in enumerate(lines):
            try:
                if isinstance(line, dict):
                    obj = line
                    if _id_key(obj.get("id")) is None:
                        raise _LineError(f"id must be a non-empty string or an integer, got "
                                         f"{obj.get('id')!r}")  # fmt: skip
                else:
                    obj, _ = _keyed_line(line.encode() if isinstance(line, str) else line)
                prompt, mode, params = _line_request(obj, self.mode, self.defaults)
                engine_id = f"{self._batches}:{index}"
                self.engine.add_request(prompt, mode, request_id=engine_id, **params)
            except (_LineError, ValueError, TypeError) as e:
                results[index] = (None, " ".join(str(e).split()))
                continue
            pending[engine_id] = (index, obj["id"], time.perf_counter())
        for engine_id in [e for e in pending if self.engine.output(e).finished]:
            self._finish(engine_id, pending, results)  # max_new_tokens 0
        while pending:
            if not self.engine.has_unfinished():
                raise RuntimeError(f"engine idle with {len(pending)} requests outstanding")
            for out in self.engine.step():
                if out.finished:
                    self._finish(out.request_id, pending, results)
        return results

    def _finish(self, engine_id: str, pending: dict, results: list) -> None:
        index, rid, submitted = pending.pop(engine_id)
        out = self.engine.pop(engine_id)
        results[index] = (result_record(self.model, rid, out, time.perf_counter() - submitted),
                          None)  # fmt: skip


def _rows(batch) -> list[dict]:
    """A batch in any of Ray Data's formats -> one dict of plain Python values per row."""
    if isinstance(batch, pa.Table):
        return batch.to_pylist()
    if hasattr(batch, "to_dict"):  # pandas
        batch = {k: batch[k].to_numpy() for k in batch.columns}
    columns = {k: [_plain(v) for v in values] for k, values in batch.items()}
    n = len(next(iter(columns.values()), []))
    return [{k: columns[k][i] for k in columns} for i in range(n)]


def _plain(value):
    """numpy scalars and arrays -> Python values; NaN (pandas' missing value) -> None."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def generate_stage(ds, model: str | None = None, *, replicas: int = 1, tp: int = 1,
                   batch_size: int = DEFAULT_BATCH_SIZE, device: str = "cpu",
                   num_cpus: float | None = None, **predictor_args):  # fmt: skip
    """``ds`` with a :class:`TwoTowerPredictor` stage of ``replicas`` actors, each holding the
    model once: on ``device="cuda"`` each takes ``tp`` GPUs (Ray sets its CUDA_VISIBLE_DEVICES),
    on the CPU ``num_cpus`` cores (default 1). ``batch_size`` rows per call; ``predictor_args``:
    the predictor's other arguments (mode, dtype, max_slots, context, SamplingParams fields)."""
    if tp != 1:
        raise ValueError("tp > 1 inside a Ray replica is not supported yet; use tp=1")
    for name, value in (("replicas", replicas), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    gpu = device.startswith("cuda")
    resources = {"num_gpus": tp} if gpu else {"num_cpus": 1 if num_cpus is None else num_cpus}
    if gpu and num_cpus is not None:
        resources["num_cpus"] = num_cpus
    return ds.map_batches(
        TwoTowerPredictor,
        fn_constructor_kwargs={"model": model, "device": device, **predictor_args},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=replicas),
        **resources,
    )


def input_files(path: str) -> list[str]:
    """A JSONL file, or every non-hidden file of a directory of shards (sorted)."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if not n.startswith("."))
        files = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
        if files:
            return files
        raise ValueError(f"input directory {path} holds no files")
    raise ValueError(f"input {path} does not exist")


def _vocab_size(model: str | None) -> int:
    """From config.json alone: the driver never loads the weights."""
    path = os.path.join(os.fspath(model or DEFAULT_MODEL_DIR), "config.json")
    return TwoTowerConfig.from_json_file(path).vocab_size


class _Shards:
    """The result shards of OUT: the ids they hold, and new lines appended to the next shard."""

    def __init__(self, directory: str):
        self.directory = directory
        self.lock = open(os.path.join(directory, ".lock"), "a")
        if fcntl is not None:
            try:
                fcntl.flock(self.lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.lock.close()
                raise ValueError(f"another batch run is writing {directory}") from None
        self.done: set[str] = set()
        paths = sorted(glob.glob(os.path.join(directory, SHARD_PATTERN)))
        for path in paths:
            with open(path, "ab") as f:
                self.done |= _read_done(f, path)
        self.next_index = 1 + max((_shard_index(p) for p in paths), default=-1)
        self.file = None
        self.lines = 0

    def write(self, lines: list[str]) -> None:
        """Append the lines and make them durable (a kill now loses none of them)."""
        if self.file is None or self.lines >= SHARD_LINES:
            self.close_file()
            name = os.path.join(self.directory, f"part-{self.next_index:05d}.jsonl")
            self.file, self.lines, self.next_index = open(name, "ab"), 0, self.next_index + 1
        self.file.write("".join(line + "\n" for line in lines).encode("utf-8"))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.lines += len(lines)

    def close_file(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def close(self) -> None:
        self.close_file()
        self.lock.close()


def _shard_index(path: str) -> int:
    stem = os.path.basename(path)[len("part-") : -len(".jsonl")]
    return int(stem) if stem.isdigit() else -1


def run_ray_batch(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    model: str | os.PathLike | None = None,
    *,
    mode: str = "mask_diffusion",
    errors_path: str | os.PathLike | None = None,
    replicas: int | None = None,
    tp: int = 1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "cpu",
    progress: bool = False,
    **engine_and_params,
) -> BatchSummary:
    """The ``batch`` job on the Ray cluster this process is connected to (``ray.init`` first; Ray
    starts a local one otherwise): every request of ``input_path`` (a JSONL file or a directory of
    them) through ``replicas`` engine actors (default: one per ``tp`` GPUs of the cluster on
    ``device="cuda"``, one per CPU on the CPU), the results appended to the shards
    ``part-NNNNN.jsonl`` of the directory ``output_path``. A re-run skips every id already there.
    Bad lines go to ``errors_path`` (default OUT + ".errors.jsonl", rewritten each run) as
    ``{"file", "line", "id", "error"}``. ``engine_and_params``: ``dtype``, ``max_slots``,
    ``context`` and the SamplingParams defaults, as for :func:`~twotower_rt.batch.run_batch`."""
    from tqdm import tqdm

    input_path, output_path = os.fspath(input_path), os.fspath(output_path).rstrip(os.sep)
    errors_path = output_path + ".errors.jsonl" if errors_path is None else os.fspath(errors_path)
    model = None if model is None else os.fspath(model)
    params = {k: v for k, v in engine_and_params.items() if k in PARAM_KEYS}
    unknown = sorted(set(engine_and_params) - set(PARAM_KEYS) - {"dtype", "max_slots", "context"})
    if unknown:
        raise ValueError(f"unknown parameters {unknown}; SamplingParams has {list(PARAM_KEYS)}")
    files = input_files(input_path)
    if os.path.realpath(errors_path) in {os.path.realpath(f) for f in files}:
        raise ValueError(f"the errors file {errors_path} is one of the input files")
    _check_defaults(mode, params, _vocab_size(model))
    if os.path.exists(output_path) and not os.path.isdir(output_path):
        raise ValueError(f"with --ray, OUT is a directory of result shards: {output_path} is a "
                         "file")  # fmt: skip
    os.makedirs(output_path, exist_ok=True)
    if replicas is None:
        replicas = _default_replicas(device, tp)

    shards = _Shards(output_path)
    start = time.perf_counter()
    done = skipped = errors = tokens = 0
    try:
        with open(errors_path, "w", encoding="utf-8") as errors_file:

            def error(path, number, rid, reason):
                nonlocal errors
                record = {"file": path, "line": number, "id": rid, "error": reason}
                errors_file.write(json.dumps(record, ensure_ascii=False) + "\n")
                errors += 1

            blocks, skipped, to_do = _plan(files, shards.done, batch_size, error)
            errors_file.flush()
            bar = tqdm(total=to_do + errors, initial=errors, unit="req", dynamic_ncols=True,
                       disable=not progress)  # fmt: skip
            try:
                if blocks:
                    ds = ray.data.from_arrow_refs(blocks)
                    ds = generate_stage(ds, model, replicas=replicas, tp=tp,
                                        batch_size=batch_size, device=device, mode=mode,
                                        **engine_and_params)  # fmt: skip
                    ds.context.enable_progress_bars = False  # the bar is ours
                    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                        columns = batch.to_pydict()
                        results = [r for r in columns["result"] if r is not None]
                        if results:
                            shards.write(results)
                        for path, number, rid, reason in zip(
                            columns["path"], columns["line"], columns["error_id"], columns["error"]
                        ):
                            if reason is not None:
                                error(path, number, json.loads(rid), reason)
                        errors_file.flush()
                        done += len(results)
                        tokens += sum(columns["generated_tokens"])
                        rate = tokens / (time.perf_counter() - start)
                        bar.set_postfix_str(f"{rate:.1f} tok/s, errors {errors}", refresh=False)
                        bar.update(batch.num_rows)
            finally:
                bar.close()
    finally:
        shards.close()
    return BatchSummary(done, skipped, errors, tokens, time.perf_counter() - start, output_path,
                        errors_path)  # fmt: skip


def _default_replicas(device: str, tp: int) -> int:
    resources = ray.cluster_resources() if ray.is_initialized() else {}
    if device.startswith("cuda"):
        gpus = int(resources.get("GPU", 0))
        if gpus < tp:
            raise ValueError(f"the Ray cluster has {gpus} GPUs; a replica needs {tp}")
        return gpus // tp
    return max(1, int(resources.get("CPU", os.cpu_count() or 1)))


def _plan(files: list[str], done: set[str], batch_size: int, error) -> tuple[list, int, int]:
    """One pass over the input on the driver: lines that are no JSON object with a valid id,
    duplicate ids (after the first) and ids already in OUT never reach an actor; the others go
    into Arrow blocks of ``batch_size`` rows in the object store. Returns (block refs, lines
    skipped, lines to run)."""
    refs, first, chunk = [], {}, []
    skipped = to_do = 0

    def flush():
        if chunk:
            paths, numbers, lines = zip(*chunk)
            table = pa.table({"path": list(paths), "line": list(numbers), "json": list(lines)})
            refs.append(ray.put(table))
            chunk.clear()

    for path in files:
        for number, raw in _numbered_lines(path):
            try:
                obj, key = _keyed_line(raw)
                if key in first:
                    raise _LineError(f"duplicate id {obj['id']!r} (first on {first[key]})")
            except _LineError as e:
                error(path, number, _raw_id(raw), " ".join(str(e).split()))
                continue
            first[key] = f"{path} line {number}"
            if key in done:
                skipped += 1
                continue
            chunk.append((path, number, raw))
            to_do += 1
            if len(chunk) == batch_size:
                flush()
    flush()
    return refs, skipped, to_do


def _raw_id(raw: bytes):
    try:
        return _keyed_line(raw)[0]["id"]
    except (_LineError, KeyError):
        return None


def cmd_batch_ray(args, model: str | None, kwargs: dict) -> int:
    """``twotower-rt batch IN OUT --ray [ADDRESS]``: connect (or start a local cluster), run the
    job, print the summary, disconnect."""
    import logging

    if args.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {args.tp}")
    if args.max_in_flight is not None:
        raise ValueError("--max-in-flight is for the one-process job; with --ray, --batch-size "
                         "rows go to a replica at a time")  # fmt: skip
    ray.init(address=args.ray or None, logging_level=logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        summary = run_ray_batch(args.input, args.output, model, errors_path=args.errors,
                                replicas=args.replicas, tp=args.tp,
                                batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
                                max_slots=args.max_slots, context=args.context,
                                progress=not args.no_progress, **kwargs)  # fmt: skip
    except KeyboardInterrupt:
        print(f"twotower-rt: batch interrupted; {args.output} keeps every completed line: run the "
              "same command again to resume", file=sys.stderr)  # fmt: skip
        return 130
    finally:
        ray.shutdown()
    print(f"twotower-rt batch: {summary.describe()}")
    return 0
