"""twotower_rt as a Ray Data stage: engine replicas over a sharded dataset (``pip install
'twotower-rt[ray]'``).

- :class:`TwoTowerPredictor`: the callable class for ``Dataset.map_batches``. Each actor loads the
  model once and runs every batch of rows through its :class:`~twotower_rt.engine.Engine` (with
  ``tp`` > 1: a tensor-parallel group, the actor its rank 0). A row holds the fields of a
  ``twotower-rt batch`` line (``id``, ``prompt`` or ``input_ids``, optional ``mode`` and
  parameters) as columns, or the whole line as JSON text in a ``json`` column.
- :func:`generate_stage`: ``ds.map_batches`` with the resources a replica needs (``num_gpus`` =
  ``tp`` on GPUs, an actor pool of ``replicas``, the batch size).

A row's result never depends on its replica or its batch: the engine runs each row as it would
alone, with the row's own seed (as in ``batch``, a sampled row with no seed, neither its own nor a
default, draws a fresh one, so only seeded rows repeat exactly). The batch job on a cluster,
``twotower-rt batch IN OUT --ray``, is :mod:`twotower_rt.ray_batch`.
"""

from __future__ import annotations

import json
import os
import time

import pyarrow as pa
import ray

from .api import DEFAULT_MODEL_DIR, load
from .batch import (
    PARAM_KEYS,
    _check_defaults,
    _id_key,
    _keyed_line,
    _line_request,
    _LineError,
    result_record,
)
from .config import TwoTowerConfig
from .engine import Engine
from .generation_config import read_generation_config
from .hub import resolve_model_dir

DEFAULT_BATCH_SIZE = 64
RESULT_KEYS = ("id", "text", "token_ids", "prompt_tokens", "finish_reason", "nfe", "seconds")


class TwoTowerPredictor:
    """``ds.map_batches(TwoTowerPredictor, fn_constructor_kwargs=..., batch_format="pyarrow")``.

    The constructor takes what ``run_batch`` takes: ``model`` (a checkpoint directory, None for the
    default model) loaded on ``device`` in ``dtype``, ``mode`` and ``params`` (SamplingParams
    fields) as the defaults a row overrides, and the engine's ``max_slots`` and ``context``.
    ``tp`` > 1: the engine is a tensor-parallel group of ``tp`` ranks, this actor its rank 0
    (:class:`TPGroupReplica`).

    Each output row has the input row's result: ``id``, ``text``, ``token_ids``, ``prompt_tokens``,
    ``finish_reason``, ``nfe``, ``seconds`` (as a ``batch`` output line) and ``error`` (None, or why
    the row was refused; its result fields are then None). Rows given as a ``json`` column come
    back as ``result`` (the output line's JSON text), ``generated_tokens``, ``error`` and
    ``error_id`` (the refused line's id as JSON text) instead, beside the input's ``path`` and
    ``line`` columns when it has them: JSON ids may mix integers and strings, which one Arrow
    column cannot hold."""

    def __init__(self, model: str | None = None, *, mode: str = "mask_diffusion",
                 device: str = "cpu", dtype: str = "float32", max_slots: int | None = None,
                 context: int | None = None, tp: int = 1, **params):  # fmt: skip
        unknown = sorted(set(params) - set(PARAM_KEYS))
        if unknown:
            raise ValueError(f"unknown parameters {unknown}; SamplingParams has {list(PARAM_KEYS)}")
        self.mode, self.defaults = mode, job_defaults(model, mode, params)
        self._batches = 0
        engine_args = {"max_slots": max_slots, "context": context}
        if tp > 1:
            self.group = TPGroupReplica(model, device, dtype, tp, engine_args)
        else:
            self.group = None
            self.engine = Engine(load(model, device=device, dtype=dtype), **engine_args)

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
        if self.group is not None:
            return self.group.call(self._run, lines)
        return self._run(self.engine, lines)

    def _run(self, engine: Engine, lines: list) -> list[tuple[dict | None, str | None]]:
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
                engine.add_request(prompt, mode, request_id=engine_id, **params)
            except (_LineError, ValueError, TypeError) as e:
                results[index] = (None, " ".join(str(e).split()))
                continue
            pending[engine_id] = (index, obj["id"], time.perf_counter())
        for engine_id in [e for e in pending if engine.output(e).finished]:
            self._finish(engine, engine_id, pending, results)  # max_new_tokens 0
        while pending:
            if not engine.has_unfinished():
                raise RuntimeError(f"engine idle with {len(pending)} requests outstanding")
            for out in engine.step():
                if out.finished:
                    self._finish(engine, out.request_id, pending, results)
        return results

    def _finish(self, engine: Engine, engine_id: str, pending: dict, results: list) -> None:
        index, rid, submitted = pending.pop(engine_id)
        out = engine.pop(engine_id)
        if out.finish_reason == "error":  # the engine failed this row alone (as in batch)
            results[index] = (None, f"engine error: {out.error}")
            return
        results[index] = (result_record(engine.model, rid, out, time.perf_counter() - submitted),
                          None)  # fmt: skip


class TPGroupReplica:
    """One replica as a tensor-parallel group of ``tp`` ranks: this process (the actor) is rank 0,
    its engine (a LockstepEngine) running in a thread of its own; ``tp - 1`` follower processes
    are spawned beside it (one GPU each, of the GPUs Ray gave the actor; gloo on the CPU). The
    ranks are ``twotower-rt batch --tp``'s (``parallel.lockstep``)."""

    def __init__(self, model: str | None, device: str, dtype: str, tp: int, engine_args: dict):
        import queue
        import threading

        import torch.multiprocessing as mp

        from .parallel import lockstep

        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(lockstep._free_port())
        args = (model, dtype, engine_args)
        self.followers = mp.start_processes(_follower_rank, args=(tp, device, args), nprocs=tp - 1,
                                            join=False, start_method="spawn")  # fmt: skip
        self.inbox, self.outbox = queue.Queue(), queue.Queue()
        self.thread = threading.Thread(target=lockstep._rank_main, daemon=True,
                                       args=(0, tp, device, self._lead_rank, args))  # fmt: skip
        self.thread.start()

    def _lead_rank(self, rank, group, device, model, dtype, engine_args) -> None:
        from .parallel.lockstep import run_ranks

        run_ranks(rank, group, engine_args, self._lead, load(model, device=device, dtype=dtype))

    def _lead(self, engine) -> None:
        """Rank 0's loop: run each call's function on the group's engine, until None."""
        while (work := self.inbox.get()) is not None:
            fn, lines = work
            try:
                self.outbox.put((fn(engine, lines), None))
            except Exception as e:  # handed to the caller
                self.outbox.put((None, e))

    def call(self, fn, lines: list):
        """``fn(engine, lines)`` on rank 0's engine (the other ranks follow its steps)."""
        import queue

        self.inbox.put((fn, lines))
        while True:
            try:
                result, error = self.outbox.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.thread.is_alive():
                    raise RuntimeError("the tensor-parallel group stopped") from None
        if error is not None:
            raise error
        return result


def _follower_rank(index: int, tp: int, device: str, args: tuple) -> None:
    """A spawned rank 1..tp-1: follows rank 0's steps until it stops (or its connection breaks
    when the actor dies)."""
    from .parallel.lockstep import _rank_main

    _rank_main(index + 1, tp, device, _follow, args)


def _follow(rank, group, device, model, dtype, engine_args) -> None:
    from .parallel.lockstep import run_ranks

    run_ranks(rank, group, engine_args, None, load(model, device=device, dtype=dtype))


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
    on the CPU ``num_cpus`` cores (default ``tp``). ``batch_size`` rows per call;
    ``predictor_args``: the predictor's other arguments (mode, dtype, max_slots, context,
    SamplingParams fields)."""
    for name, value in (("replicas", replicas), ("tp", tp), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    gpu = device.startswith("cuda")
    resources = {"num_gpus": tp} if gpu else {"num_cpus": tp if num_cpus is None else num_cpus}
    if gpu and num_cpus is not None:
        resources["num_cpus"] = num_cpus
    return ds.map_batches(
        TwoTowerPredictor,
        fn_constructor_kwargs={"model": model, "device": device, "tp": tp, **predictor_args},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=replicas),
        **resources,
    )


def job_defaults(model: str | None, mode: str, params: dict) -> dict:
    """The defaults every row starts from: ``params`` over the checkpoint's
    generation_config.json, checked as ``batch`` checks them (ValueError), from the checkpoint's
    JSON files alone: the driver never loads the weights."""
    directory = resolve_model_dir(os.fspath(model or DEFAULT_MODEL_DIR))
    vocab = TwoTowerConfig.from_json_file(os.path.join(directory, "config.json")).vocab_size
    params = read_generation_config(directory, vocab).apply(params)
    _check_defaults(mode, params, vocab)
    return params


def _raw_id(raw: bytes):
    try:
        return _keyed_line(raw)[0]["id"]
    except (_LineError, KeyError):
        return None
