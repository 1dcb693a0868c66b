"""``twotower_rt.ray`` and ``batch --ray`` on a local Ray cluster of 2 CPUs, the default model:
results equal the one-process ``batch`` for the same ids and seeds (also through a replica that is
a TP group of 2); an actor process killed mid-job is restarted and every id is written once; a
driver killed with SIGKILL resumes to every id once."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import subprocess_env
from test_batch import mixed_lines, read_jsonl, write_jsonl

from twotower_rt.batch import run_batch
from twotower_rt.cli import main

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from twotower_rt.ray import generate_stage  # noqa: E402
from twotower_rt.ray_batch import run_ray_batch  # noqa: E402

N_LINES = 16
DEFAULTS = {"max_new_tokens": 16, "seed": 5}  # the job's defaults (flags): a seed for every line


@pytest.fixture(scope="module")
def cluster():
    """A local cluster, 2 CPUs; its address for the CLI runs to join."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20,
             logging_level="WARNING")  # fmt: skip
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def job_lines(n: int = N_LINES) -> list[dict]:
    """batch's mixed lines (every mode, text and ids, integer and string ids), greedy and sampled:
    sampled rows with their own seed, or the job's default seed."""
    lines = mixed_lines(n)
    for i, line in enumerate(lines):
        if i % 3 != 2 or i % 5 == 0:
            line["temperature"] = 0.8
        if i % 4 == 1:
            line["seed"] = 100 + i
    lines[3]["max_tokens"] = 32
    lines[4]["max_new_tokens"] = 0
    return lines


BAD_LINES = [
    '{"id": "bad-temp", "input_ids": [1, 2], "temperature": -1}',
    '{"id": "bad-key", "input_ids": [1, 2], "temprature": 0.5}',
    "not json",
    '{"input_ids": [1, 2]}',
    json.dumps({"id": "r0", "input_ids": [9, 9]}),  # a duplicate of the first line's id
    # issue 19's poison lines: each one refused alone, the job carries on
    json.dumps({"id": "big-seed", "input_ids": [1, 2], "temperature": 0.5, "seed": 2**64}),
    json.dumps({"id": "big-steps", "input_ids": [1, 2], "steps_per_block": 10**30}),
    json.dumps(
        {"id": "big-drafts", "input_ids": [1, 2], "mode": "verified", "draft_steps": 10**30}
    ),
    "[" * 3000 + "]" * 3000,
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, default_model):
    """The one-process batch job over the same lines: id key -> output line (no seconds)."""
    folder = tmp_path_factory.mktemp("reference")
    src = write_jsonl(folder / "in.jsonl", job_lines() + BAD_LINES)
    summary = run_batch(src, folder / "out.jsonl", default_model, **DEFAULTS)
    assert (summary.done, summary.errors) == (N_LINES, len(BAD_LINES))
    errors = read_jsonl(folder / "out.jsonl.errors.jsonl")
    return {key(r): strip(r) for r in read_jsonl(folder / "out.jsonl")}, errors


def key(record: dict) -> str:
    return json.dumps(record["id"])


def strip(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "seconds"}


def results(out_dir: Path) -> list[dict]:
    return [r for shard in sorted(out_dir.glob("part-*.jsonl")) for r in read_jsonl(shard)]


def sharded_input(folder: Path, lines: list) -> Path:
    """The lines in two shards (a directory), the bad ones in the second."""
    folder.mkdir()
    half = len(lines) // 2
    write_jsonl(folder / "a.jsonl", lines[:half])
    write_jsonl(folder / "b.jsonl", lines[half:])
    return folder


def test_cli_refuses_bad_jobs_before_starting_ray(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray was started"))
    src = write_jsonl(tmp_path / "in.jsonl", job_lines())
    (tmp_path / "file").write_text("")
    cases = [
        ([str(src), str(tmp_path / "file"), "--ray"], "OUT is a directory of result shards"),
        ([str(tmp_path / "none"), str(tmp_path / "out"), "--ray"], "does not exist"),
        ([str(src), str(tmp_path / "out"), "--ray", "--max-in-flight", "3"], "--batch-size"),
        ([str(src), str(tmp_path / "out"), "--ray", "--replicas", "0"], "--replicas must be"),
        ([str(src), str(tmp_path / "out"), "--ray", "--temperature", "-1"], "temperature"),
        ([str(src), str(tmp_path / "out"), "--replicas", "2"], "go with --ray"),
    ]
    for argv, message in cases:
        assert main(["batch", *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_job_equals_one_process_batch_then_resume_skips_all(tmp_path, cluster, reference):
    want, want_errors = reference
    src = sharded_input(tmp_path / "in", job_lines() + BAD_LINES)
    out = tmp_path / "out"
    summary = run_ray_batch(src, out, replicas=2, batch_size=3, **DEFAULTS)
    assert (summary.done, summary.skipped, summary.errors) == (N_LINES, 0, len(BAD_LINES))
    rows = results(out)
    assert len(rows) == N_LINES and {key(r): strip(r) for r in rows} == want
    assert all(list(r) == list(rows[0]) for r in rows)  # the same fields, in batch's order
    errors = read_jsonl(Path(f"{out}.errors.jsonl"))
    assert sorted(map(json.dumps, (e["id"] for e in errors))) == sorted(
        map(json.dumps, (e["id"] for e in want_errors)))  # fmt: skip
    for e in errors:
        assert Path(e["file"]).parent == src and e["line"] >= 1
    by_id = {e["id"]: e["error"] for e in errors}
    assert by_id["bad-temp"] == {e["id"]: e["error"] for e in want_errors}["bad-temp"]

    again = run_ray_batch(src, out, replicas=2, batch_size=3, **DEFAULTS)
    assert (again.done, again.skipped, again.errors) == (0, N_LINES, len(BAD_LINES))
    assert len(results(out)) == N_LINES


@pytest.mark.parametrize("tp", [1, 2])
def test_stage_on_a_user_dataset(cluster, reference, tp):
    """generate_stage on rows given as columns (string ids, missing fields as nulls); tp=2: the
    replica is a tensor-parallel group (the actor and a follower process, gloo)."""
    want, _ = reference
    lines = [line for line in job_lines() if isinstance(line["id"], str)]
    ds = generate_stage(ray.data.from_items(lines), replicas=1, tp=tp, batch_size=4, **DEFAULTS)
    rows = ds.take_all()
    assert sorted(r["id"] for r in rows) == sorted(line["id"] for line in lines)
    for row in rows:
        assert row["error"] is None
        got = {k: row[k] for k in ("id", "text", "token_ids", "prompt_tokens", "finish_reason",
                                   "nfe")}  # fmt: skip
        got["token_ids"] = list(got["token_ids"])
        assert got == want[key(row)]


def _predictor_pids() -> list[int]:
    """The processes of this test's cluster (descendants of this process) running the stage."""
    me, pids = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes()
            if b"MapWorker" not in title or b"TwoTowerPredictor" not in title:
                continue
            pid = int(entry.name)
            while pid > 1:  # walk up to this process
                stat = (Path("/proc") / str(pid) / "stat").read_text()
                pid = int(stat.rsplit(")", 1)[1].split()[1])
                if pid == me:
                    pids.append(int(entry.name))
                    break
        except (OSError, ValueError, IndexError):
            continue
    return pids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the actors in /proc")
def test_actor_killed_mid_job_every_id_once(tmp_path, cluster, reference):
    want, _ = reference
    src = sharded_input(tmp_path / "in", job_lines())
    out = tmp_path / "out"
    killed = []

    def kill_an_actor_after_the_first_results():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if results_written(out) >= 2:
                pids = _predictor_pids()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append((pids[0], results_written(out)))
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_an_actor_after_the_first_results, daemon=True)
    killer.start()
    summary = run_ray_batch(src, out, replicas=2, batch_size=2, **DEFAULTS)
    killer.join(timeout=5)
    assert killed, "no actor was killed"
    print(f"killed actor pid {killed[0][0]} after {killed[0][1]} of {N_LINES} results")
    assert killed[0][1] < N_LINES
    assert (summary.done, summary.errors) == (N_LINES, 0)
    rows = results(out)
    assert len(rows) == N_LINES and {key(r): strip(r) for r in rows} == want


def results_written(out: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in out.glob("part-*.jsonl"))


def test_cli_driver_killed_then_resumed(tmp_path, cluster, reference):
    """batch --ray ADDRESS killed with SIGKILL after a few results, a torn line left at a shard's
    end; batch --ray (a local cluster of its own) finishes with every id once."""
    want, _ = reference
    src = sharded_input(tmp_path / "in", job_lines())
    out = tmp_path / "out"
    flags = "--no-progress --max-new-tokens 16 --seed 5 --batch-size 2 --replicas 1".split()
    cmd = [sys.executable, "-m", "twotower_rt", "batch", str(src), str(out), *flags]
    proc = subprocess.Popen([*cmd, "--ray", cluster], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and results_written(out) >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"batch ended early: {proc.communicate(timeout=10)}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    complete = results_written(out)
    assert 2 <= complete < N_LINES
    print(f"driver killed after {complete} of {N_LINES} results")
    with open(max(out.glob("part-*.jsonl")), "ab") as f:  # a write cut short by the kill
        f.write(b'{"id": "r999", "text": "Wh')

    env = {k: v for k, v in subprocess_env().items() if k != "RAY_ADDRESS"}
    done = subprocess.run([*cmd, "--ray"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"done {N_LINES - complete}, skipped {complete} (already in OUT), errors 0" in (
        done.stdout)  # fmt: skip
    rows = results(out)  # every line valid JSON
    assert len(rows) == N_LINES and {key(r): strip(r) for r in rows} == want


def test_a_row_the_engine_fails_is_an_error_and_the_others_finish(default_model, monkeypatch):
    """In the stage itself (no cluster): a row whose engine step faults gets an error, the rows
    beside it in the same batch get their one-process results."""
    from test_hostile_serve import POISON_TEMPERATURE, poison

    from twotower_rt.ray import TwoTowerPredictor

    predictor = TwoTowerPredictor(None, mode="ar", max_new_tokens=8, seed=1)
    poison(predictor.engine)
    good = [{"id": i, "input_ids": [5 + i, 6]} for i in range(3)]
    bad = {"id": "poisoned", "input_ids": [5, 6], "temperature": POISON_TEMPERATURE}
    results = predictor.run([good[0], bad, good[1], good[2]])
    record, error = results[1]
    assert record is None and "engine error" in error and "poisoned step" in error
    for row, (record, error) in zip(good, [results[0], *results[2:]]):
        solo = default_model.generate([row["input_ids"]], mode="ar", max_new_tokens=8)
        assert error is None and record["token_ids"] == solo.generated[0]
