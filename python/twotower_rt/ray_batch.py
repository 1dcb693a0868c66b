"""``twotower-rt batch IN OUT --ray [ADDRESS]``: the batch job over engine replicas on a Ray
cluster (:func:`run_ray_batch`).

It keeps ``batch``'s guarantee, every id once, with one writer: the driver reads the input (ids
and validity: a bad line, a duplicate id or an id already in OUT never reaches an actor), hands
the rest to the replicas as Arrow blocks, and appends the results it gets back to the shards of
the OUT directory, fsync'd batch by batch. An actor that dies is restarted by Ray and its batch run
again (its rows were not written yet); a driver that dies leaves at most a torn last line, which
the next run cuts off before it skips every id already written.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time

import pyarrow as pa
import ray

from .batch import (
    PARAM_KEYS,
    BatchSummary,
    _keyed_line,
    _LineError,
    _numbered_lines,
    _read_done,
)
from .ray import DEFAULT_BATCH_SIZE, _raw_id, generate_stage, job_defaults

try:
    import fcntl
except ImportError:  # not POSIX: no lock against two runs writing the same OUT
    fcntl = None

SHARD_PATTERN = "part-*.jsonl"
SHARD_LINES = 100_000  # result lines per shard before the next one starts


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


def check_job(input_path, output_path, errors_path, model, mode: str,
              engine_and_params: dict) -> tuple[list[str], str, str]:  # fmt: skip
    """What stops a job before it starts (ValueError): a missing input, an OUT that is a file, an
    unknown or bad default. Returns (input files, OUT, errors file)."""
    output_path = os.fspath(output_path).rstrip(os.sep)
    errors_path = output_path + ".errors.jsonl" if errors_path is None else os.fspath(errors_path)
    files = input_files(os.fspath(input_path))
    if os.path.realpath(errors_path) in {os.path.realpath(f) for f in files}:
        raise ValueError(f"the errors file {errors_path} is one of the input files")
    if os.path.exists(output_path) and not os.path.isdir(output_path):
        raise ValueError(f"with --ray, OUT is a directory of result shards: {output_path} is a "
                         "file")  # fmt: skip
    unknown = sorted(set(engine_and_params) - set(PARAM_KEYS) - {"dtype", "max_slots", "context"})
    if unknown:
        raise ValueError(f"unknown parameters {unknown}; SamplingParams has {list(PARAM_KEYS)}")
    params = {k: v for k, v in engine_and_params.items() if k in PARAM_KEYS}
    job_defaults(None if model is None else os.fspath(model), mode, params)
    return files, output_path, errors_path


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

    files, output_path, errors_path = check_job(input_path, output_path, errors_path, model,
                                                mode, engine_and_params)  # fmt: skip
    model = None if model is None else os.fspath(model)
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
    return max(1, int(resources.get("CPU", os.cpu_count() or 1)) // tp)


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


def cmd_batch_ray(args, model: str | None, kwargs: dict) -> int:
    """``twotower-rt batch IN OUT --ray [ADDRESS]``: connect (or start a local cluster), run the
    job, print the summary, disconnect."""
    import logging

    if args.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {args.tp}")
    if args.max_in_flight is not None:
        raise ValueError("--max-in-flight is for the one-process job; with --ray, --batch-size "
                         "rows go to a replica at a time")  # fmt: skip
    if getattr(args, "matmul_precision", None) is not None:
        raise ValueError("--matmul-precision applies to one process; it does not reach --ray's "
                         "replicas yet")  # fmt: skip
    if getattr(args, "kernel_stream", None) is True:
        raise ValueError("--kernel-stream applies to one process; it does not reach --ray's "
                         "replicas yet")  # fmt: skip
    for flag in ("replicas", "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    check_job(args.input, args.output, args.errors, model, kwargs.get("mode", "mask_diffusion"),
              {k: v for k, v in kwargs.items() if k not in ("mode", "device")})  # fmt: skip
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
