"""``twotower-rt batch``: a JSONL job through the engine on the default model; bad lines to the
errors file; resume skips what OUT has; ``kill -9`` then resume loses and repeats nothing."""

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import subprocess_env

from twotower_rt.batch import run_batch
from twotower_rt.cli import main

PROMPTS = ["ROMEO. But soft, what light", "And it came to pass", "Now is the winter"]


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def mixed_lines(n: int) -> list[dict]:
    """Every mode, text prompts and token ids, ids as strings and integers."""
    modes = ("ar", "mock_ar", "mask_diffusion")
    lines = []
    for i in range(n):
        line = {"id": i if i % 2 else f"r{i}", "mode": modes[i % 3]}
        if i % 4 < 2:
            line["prompt"] = PROMPTS[i % 3]
        else:
            line["input_ids"] = [5 + i, 40, 7 + 2 * i]
        lines.append(line)
    return lines


def test_mixed_modes_and_prompts(tmp_path, default_model):
    lines = mixed_lines(12)
    lines[3]["max_tokens"] = 16  # the alias
    lines[5]["max_new_tokens"] = 0
    want = {}  # id -> what model.generate gives the same request alone
    for line in lines:
        ids = line.get("input_ids") or default_model.encode(line["prompt"])
        n = line.get("max_new_tokens", 16)
        out = default_model.generate([ids], mode=line["mode"], max_new_tokens=n)
        want[line["id"]] = (ids, out.generated[0], out.nfe[0])
    ar = lines[0]  # stop at the third token it generates (ar: right after it)
    stop = want[ar["id"]][1][2]
    ar["stop_token_ids"] = [stop]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    out_path = tmp_path / "out.jsonl"

    summary = run_batch(src, out_path, default_model, max_new_tokens=16)
    assert (summary.done, summary.skipped, summary.errors) == (12, 0, 0)
    assert (tmp_path / "out.jsonl.errors.jsonl").read_text() == ""
    rows = read_jsonl(out_path)
    assert sorted(map(str, (r["id"] for r in rows))) == sorted(str(x["id"]) for x in lines)
    assert summary.generated_tokens == sum(len(r["token_ids"]) for r in rows)
    for row in rows:
        assert list(row) == ["id", "text", "token_ids", "prompt_tokens", "finish_reason", "nfe",
                             "seconds"]  # fmt: skip
        ids, generated, nfe = want[row["id"]]
        assert row["prompt_tokens"] == len(ids)
        assert row["text"] == default_model.decode(row["token_ids"])
        assert row["seconds"] >= 0
        if row["id"] == ar["id"]:
            cut = generated.index(stop) + 1
            assert row["token_ids"] == generated[:cut] and row["finish_reason"] == "eos"
            continue
        assert row["token_ids"] == generated and row["nfe"] == nfe
        assert row["finish_reason"] == "length"
        assert len(row["token_ids"]) == (0 if row["id"] == 5 else 16)
    assert any(r["text"].strip() for r in rows)


BAD_LINES = [
    ('{"id": "j", "prompt": "x"', "not valid JSON"),
    ('["a", "list"]', "must be a JSON object, got list"),
    ({"prompt": "no id"}, "missing 'id'"),
    ({"id": "ok1", "prompt": "a duplicate"}, "duplicate id 'ok1' (first on line 1)"),
    ({"id": True, "prompt": "x"}, "id must be a non-empty string or an integer"),
    ({"id": "e", "prompt": ""}, "'prompt' must have at least 1 character"),
    ({"id": "n", "mode": "ar"}, "exactly one of 'prompt' (text) or 'input_ids'"),
    ({"id": "b2", "prompt": "x", "input_ids": [1]}, "exactly one of"),
    ({"id": "m", "prompt": "x", "mode": "beam"},
     "'mode' must be 'ar', 'mock_ar', 'mask_diffusion' or 'verified'"),
    ({"id": "t", "prompt": "x", "temperature": -0.5}, "'temperature' must be greater than or"),
    ({"id": "bs", "prompt": "x", "block_size": 0}, "'block_size' must be greater than or equal"),
    ({"id": "k", "prompt": "x", "top_k": "3"}, "'top_k' must be an integer, got a string"),
    ({"id": "v", "input_ids": [1, 99999]}, "= 99999 is not a token id"),
    ({"id": "md", "prompt": "x", "max_tokens": 20}, "must be a multiple of block_size"),
    ({"id": "a", "prompt": "x", "max_tokens": 16, "max_new_tokens": 16}, "not both"),
    ({"id": "u", "prompt": "x", "temprature": 1.0}, "unknown field 'temprature'"),
    ({"id": "long", "input_ids": [5] * 60}, "exceeds the engine's context of 64 tokens"),
]  # fmt: skip


def test_bad_lines_go_to_the_errors_file(tmp_path, default_model):
    good = [{"id": "ok1", "input_ids": [5, 6], "mode": "ar"}, {"id": 2, "prompt": "Now is"}]
    rows = [good[0], *(line for line, _ in BAD_LINES), "", good[1]]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out_path, errors = tmp_path / "out.jsonl", tmp_path / "bad.jsonl"

    summary = run_batch(src, out_path, default_model, errors_path=errors, context=64,
                        max_new_tokens=16)  # fmt: skip
    assert (summary.done, summary.skipped, summary.errors) == (2, 0, len(BAD_LINES))
    assert sorted(str(r["id"]) for r in read_jsonl(out_path)) == ["2", "ok1"]
    reported = read_jsonl(errors)
    assert [e["line"] for e in reported] == list(range(2, 2 + len(BAD_LINES)))
    for error, (line, message) in zip(reported, BAD_LINES):
        assert message in error["error"], (error, message)
        known = isinstance(line, dict) and "id" in line and line["id"] is not True
        assert error["id"] == (line["id"] if known else None)


def test_rerun_skips_what_is_done(tmp_path, capsys, default_model):
    src = write_jsonl(tmp_path / "in.jsonl", mixed_lines(6) + ["{torn"])
    out_path = tmp_path / "out.jsonl"
    argv = ["batch", str(src), str(out_path), "--max-new-tokens", "16", "--no-progress"]
    assert main(argv) == 0
    assert "done 6, skipped 0 (already in OUT), errors 1" in capsys.readouterr().out
    first = out_path.read_bytes()

    assert main(argv) == 0
    assert "done 0, skipped 6 (already in OUT), errors 1" in capsys.readouterr().out
    assert out_path.read_bytes() == first
    assert len(read_jsonl(tmp_path / "out.jsonl.errors.jsonl")) == 1  # rewritten, not appended

    # the last two lines lost and the one before cut mid-line: those three are run again
    kept = first.splitlines(keepends=True)[:3]
    out_path.write_bytes(b"".join(kept) + first.splitlines(keepends=True)[3][:25])
    summary = run_batch(src, out_path, default_model, max_new_tokens=16)
    assert (summary.done, summary.skipped) == (3, 3)
    rows = read_jsonl(out_path)
    assert out_path.read_bytes().startswith(b"".join(kept))
    assert sorted(str(r["id"]) for r in rows) == sorted(str(x["id"]) for x in mixed_lines(6))
    by_id = {r["id"]: r["token_ids"] for r in map(json.loads, first.splitlines())}
    assert all(r["token_ids"] == by_id[r["id"]] for r in rows)  # greedy: the same tokens


def test_out_that_is_not_a_batch_output_is_refused(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", mixed_lines(2))
    out_path = tmp_path / "out.jsonl"
    out_path.write_text('{"id": 1}\nnot json\n{"id": 2}\n')
    assert main(["batch", str(src), str(out_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "out.jsonl line 2 is not a JSON object with an id" in err
    assert out_path.read_text() == '{"id": 1}\nnot json\n{"id": 2}\n'  # left as it was
    assert main(["batch", str(src), str(out_path), "--seed", "1,2"]) == 2
    assert "seed must be one integer" in capsys.readouterr().err


def test_one_writer_per_out(tmp_path, default_model):
    fcntl = pytest.importorskip("fcntl")
    src = write_jsonl(tmp_path / "in.jsonl", mixed_lines(1))
    out_path = tmp_path / "out.jsonl"
    with open(out_path, "ab") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another batch run is writing"):
            run_batch(src, out_path, default_model, max_new_tokens=16)
    assert run_batch(src, out_path, default_model, max_new_tokens=16).done == 1


def test_progress_bar(tmp_path, capsys, default_model):
    src = write_jsonl(tmp_path / "in.jsonl", mixed_lines(3) + ["{bad"])
    summary = run_batch(src, tmp_path / "out.jsonl", default_model, progress=True,
                        max_new_tokens=16)  # fmt: skip
    assert (summary.done, summary.errors) == (3, 1)
    err = capsys.readouterr().err
    assert "4/4" in err and "tok/s" in err and "errors 1" in err


def test_kill_9_then_resume(tmp_path, default_model):
    """A run killed with SIGKILL after a few results, plus a torn line at OUT's end, resumes to
    every id exactly once."""
    n = 120
    lines = [{"id": f"k{i}", "input_ids": [5 + i % 50, 9, 11 + i % 7]} for i in range(n)]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    out_path = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "twotower_rt", "batch", str(src), str(out_path), "--mode", "ar",
           "--max-new-tokens", "16", "--max-slots", "1", "--context", "64",
           "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if out_path.exists() and out_path.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"batch ended early: {proc.communicate(timeout=10)}"
        assert out_path.read_bytes().count(b"\n") >= 2, "no results within 60 s"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    written = out_path.read_bytes()
    complete = written[: written.rfind(b"\n") + 1].count(b"\n")
    assert complete < n
    print(f"killed after {complete} of {n} lines")
    with open(out_path, "ab") as f:  # a write cut short by the kill
        f.write(b'{"id": "k999", "text": "Wh')

    summary = run_batch(src, out_path, default_model, mode="ar", max_new_tokens=16,
                        max_slots=64, context=64)  # fmt: skip
    assert (summary.skipped, summary.done, summary.errors) == (complete, n - complete, 0)
    rows = read_jsonl(out_path)  # every line valid JSON
    assert sorted(r["id"] for r in rows) == sorted(line["id"] for line in lines)
    assert all(len(r["token_ids"]) == 16 and r["finish_reason"] == "length" for r in rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runs_on_a_gpu_unchanged(tmp_path):
    """The same job with the default model on the GPU (bf16): every line completes."""
    src = write_jsonl(tmp_path / "in.jsonl", mixed_lines(6))
    out = tmp_path / "out.jsonl"
    summary = run_batch(str(src), str(out), device="cuda", dtype="bfloat16", max_new_tokens=16,
                        progress=False)  # fmt: skip
    assert summary.done == 6 and summary.errors == 0
    assert sorted(str(r["id"]) for r in read_jsonl(out)) == sorted(
        str(line["id"]) for line in mixed_lines(6))  # fmt: skip


def test_poison_lines_go_to_the_errors_file_and_the_job_goes_on(tmp_path, monkeypatch,
                                                                default_model):  # fmt: skip
    """Lines that used to kill the job (and every resume): deep JSON, huge numbers, a seed past
    int64, a line longer than the cap, and a line whose step faults inside the engine."""
    from test_hostile_serve import POISON_TEMPERATURE, poison

    import twotower_rt.batch as batch
    from twotower_rt.engine import Engine

    monkeypatch.setattr(batch, "MAX_LINE_BYTES", 8192)
    rows = [
        {"id": "good1", "input_ids": [5, 6], "mode": "ar"},
        '{"id": "deep", "input_ids": ' + "[" * 3000 + "]" * 3000 + "}",
        {"id": "steps", "prompt": "x", "steps_per_block": 10**30},
        '{"id": "digits", "input_ids": [5], "max_tokens": ' + "9" * 5000 + "}",
        {"id": "seed", "prompt": "x", "temperature": 0.8, "seed": 2**64},
        {"id": "long", "prompt": "x" * 10_000},
        {"id": "fault", "input_ids": [5], "mode": "ar", "temperature": POISON_TEMPERATURE},
        {"id": "good2", "prompt": "Now is", "mode": "ar"},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    engine = Engine(default_model, max_slots=4, context=64)
    poison(engine)
    out_path = tmp_path / "out.jsonl"
    summary = run_batch(src, out_path, default_model, engine=engine, progress=True,
                        max_new_tokens=16)  # fmt: skip
    assert (summary.done, summary.errors) == (2, 6)
    assert sorted(r["id"] for r in read_jsonl(out_path)) == ["good1", "good2"]
    errors = {e["line"]: e for e in read_jsonl(tmp_path / "out.jsonl.errors.jsonl")}
    expected = {
        2: "nested 3001 deep", 3: "'steps_per_block' must be less than or equal",
        4: "an integer of 5000 digits", 5: "'seed' must be less than 9223372036854775808",
        6: "longer than 8192 bytes", 7: "engine error: RuntimeError: poisoned step",
    }  # fmt: skip
    for line, message in expected.items():
        assert message in errors[line]["error"], (line, errors[line])
    assert errors[7]["id"] == "fault" and engine.pool.free == 4
    # and a resume is not stopped by them either
    again = run_batch(src, out_path, default_model, engine=engine, max_new_tokens=16)
    assert (again.done, again.skipped, again.errors) == (0, 2, 6)


@pytest.mark.parametrize(
    "content",
    [b"hello, a file of mine", b'{"id": 1, "text": "a record without its newline"}',
     bytes(range(256)) * 16, b'{"id": 1}\n\x00\x01binary tail'],
    ids=["text-no-newline", "record-no-newline", "binary", "record-then-binary"],
)  # fmt: skip
def test_resume_never_destroys_a_file_it_did_not_write(tmp_path, capsys, content):
    src = write_jsonl(tmp_path / "in.jsonl", mixed_lines(1))
    out_path = tmp_path / "out.jsonl"
    out_path.write_bytes(content)
    assert main(["batch", str(src), str(out_path), "--no-progress"]) == 2
    assert "this file is not a batch output" in capsys.readouterr().err
    assert out_path.read_bytes() == content


def test_out_that_is_a_device_is_refused(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", mixed_lines(1))
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    assert main(["batch", str(src), "/dev/full", "--no-progress",
                 "--errors", str(tmp_path / "e.jsonl")]) == 2  # fmt: skip
    assert "must be a regular file" in capsys.readouterr().err


def test_threads_flag_and_default(tmp_path, capsys):
    from twotower_rt.threads import available_cpus, set_threads

    before = torch.get_num_threads()
    try:
        src = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "input_ids": [5], "mode": "ar"}])
        argv = ["batch", str(src), str(tmp_path / "o.jsonl"), "--no-progress",
                "--max-new-tokens", "2", "--threads", "1"]  # fmt: skip
        assert main(argv) == 0 and torch.get_num_threads() == 1
        assert set_threads(None) == available_cpus() == torch.get_num_threads()
        assert main([*argv[:-1], "0"]) == 2
        assert "threads must be an integer >= 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_kernel_stream_flag(tmp_path, capsys):
    """--kernel-stream turns the CPU kernels' stream on for the job, with one kernel thread
    unless --kernel-threads says otherwise; with --tp (or --ray) it is exit code 2."""
    from twotower_rt import _ext
    from twotower_rt.threads import (
        kernel_stream,
        kernel_threads,
        set_kernel_stream,
        set_kernel_threads,
    )

    stream, threads = kernel_stream(), kernel_threads()
    try:
        src = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "input_ids": [5], "mode": "ar"}])
        argv = ["batch", str(src), str(tmp_path / "o.jsonl"), "--no-progress",
                "--max-new-tokens", "2", "--kernel-stream"]  # fmt: skip
        assert main(argv) == 0
        assert kernel_stream() == (_ext.cpu_kernels() is not None)
        if _ext.cpu_kernels() is not None:
            assert kernel_threads() == 1
        set_kernel_stream(False)
        assert main([*argv, "--tp", "2"]) == 2
        assert "--kernel-stream applies to one process" in capsys.readouterr().err
        assert not kernel_stream()
        if importlib.util.find_spec("ray") is not None:  # the ray extra
            assert main([*argv, "--ray"]) == 2
            assert "--kernel-stream applies to one process" in capsys.readouterr().err
    finally:
        set_kernel_stream(stream)
        set_kernel_threads(threads)


def test_matmul_precision_flag(tmp_path, capsys):
    """--matmul-precision sets torch's float32 matmul precision for the job (the CPU kernels'
    bfloat16 dot products under "medium"); an unknown value, or one with --tp, is exit code 2."""
    before = torch.get_float32_matmul_precision()
    try:
        src = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "input_ids": [5], "mode": "ar"}])
        argv = ["batch", str(src), str(tmp_path / "o.jsonl"), "--no-progress",
                "--max-new-tokens", "2", "--matmul-precision", "medium"]  # fmt: skip
        assert main(argv) == 0 and torch.get_float32_matmul_precision() == "medium"
        torch.set_float32_matmul_precision(before)
        assert main([*argv[:-1], "low"]) == 2
        assert "invalid choice: 'low'" in capsys.readouterr().err
        assert main([*argv, "--tp", "2"]) == 2
        assert "--matmul-precision applies to one process" in capsys.readouterr().err
        assert torch.get_float32_matmul_precision() == before
        if importlib.util.find_spec("ray") is not None:  # the ray extra
            assert main([*argv, "--ray"]) == 2
            assert "does not reach --ray's replicas" in capsys.readouterr().err
    finally:
        torch.set_float32_matmul_precision(before)
