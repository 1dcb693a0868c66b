"""Model sources: a Hugging Face hub id resolved offline from a hub cache the test lays out on disk
(models--org--name/{refs,snapshots,blobs}, as huggingface_hub writes it), revisions, the errors
for a missing id or path, the CLI taking hub ids (serve's positional MODEL), the dtype/device
"auto" choice, and the progress bar over shards."""

import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import subprocess_env
from safetensors.torch import load_file, save_file

import twotower_rt
from twotower_rt.api import DEFAULT_MODEL_DIR, choose_dtype
from twotower_rt.cli import build_parser, main
from twotower_rt.hub import HUB_FILES, ModelNotFoundError, is_hub_id, resolve_model_dir

REPO_ID = "twotower-test/tiny-default"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def add_snapshot(cache, repo_id: str, files: dict[str, bytes], ref: str | None = "main") -> str:
    """Lay out one snapshot of ``repo_id`` in hub cache ``cache`` as huggingface_hub does: each
    file a blob named by its hash, linked from snapshots/<commit>/; refs/<ref> holds the commit.
    Returns the snapshot directory."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return str(snapshot)


def default_files(**extra: bytes) -> dict[str, bytes]:
    files = {n: open(os.path.join(DEFAULT_MODEL_DIR, n), "rb").read() for n in MODEL_FILES}
    return {**files, **extra}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache under a temporary HF_HOME, offline (nothing here reaches the network)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    return cache


def test_hub_id_loads_from_the_cache_offline(hub_cache, default_model):
    snapshot = add_snapshot(hub_cache, REPO_ID, default_files())
    assert resolve_model_dir(REPO_ID) == snapshot
    model = twotower_rt.load(REPO_ID)
    assert model.source == REPO_ID and model.path == snapshot
    assert model.tokenizer is not None
    ids = [model.encode("ROMEO. But soft")]
    got = model.generate(ids, mode="ar", max_new_tokens=8, temperature=0.0).generated
    want = default_model.generate(ids, mode="ar", max_new_tokens=8, temperature=0.0).generated
    assert got == want


def test_revision_branch_and_commit(hub_cache):
    main_dir = add_snapshot(hub_cache, REPO_ID, default_files())
    config = json.loads(default_files()["config.json"])
    config["layer_norm_epsilon"] = 1e-6  # a different commit on branch "dev"
    dev_dir = add_snapshot(hub_cache, REPO_ID, default_files(**{
        "config.json": json.dumps(config).encode()}), ref="dev")  # fmt: skip
    assert resolve_model_dir(REPO_ID) == main_dir
    assert resolve_model_dir(REPO_ID, revision="dev") == dev_dir
    commit = os.path.basename(dev_dir)
    assert resolve_model_dir(REPO_ID, revision=commit) == dev_dir
    assert twotower_rt.load(REPO_ID, revision="dev").config.layer_norm_epsilon == 1e-6
    with pytest.raises(ModelNotFoundError, match="revision nope"):
        resolve_model_dir(REPO_ID, revision="nope")


def test_hub_cache_env_var_wins_over_hf_home(tmp_path, hub_cache, monkeypatch):
    other = tmp_path / "other-cache"
    snapshot = add_snapshot(other, REPO_ID, default_files())
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    assert resolve_model_dir(REPO_ID) == snapshot


def test_missing_hub_id_says_offline_and_not_found(hub_cache):
    with pytest.raises(ModelNotFoundError) as err:
        twotower_rt.load("nobody/no-such-model")
    message = str(err.value)
    assert "'nobody/no-such-model'" in message
    assert "not found in the hub cache" in message and "HF_HUB_OFFLINE" in message
    assert str(hub_cache) in message


def test_a_path_that_is_neither(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a checkpoint directory .no such directory"):
        twotower_rt.load(str(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError, match="revisions are for hub ids"):
        resolve_model_dir(DEFAULT_MODEL_DIR, revision="main")


def test_is_hub_id(tmp_path):
    assert is_hub_id("nvidia/Nemotron-Labs-TwoTower") and is_hub_id("gpt2")
    assert is_hub_id("org/name.v1_2")
    for path in ("/abs/dir", "./rel", "../up", "~/home", "a/b/c", "org/na me", str(tmp_path)):
        assert not is_hub_id(path), path


def test_only_safe_files_are_fetched():
    """allow_patterns takes the weights as safetensors and the JSON/tokenizer files, never a
    pickle or anything else in the repo."""

    def fetched(name):
        return any(fnmatch.fnmatch(name, pattern) for pattern in HUB_FILES)

    for name in ("config.json", "generation_config.json", "model-00001-of-00024.safetensors",
                 "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"):  # fmt: skip
        assert fetched(name), name
    for name in ("pytorch_model.bin", "model.pt", "consolidated.pth", "README.md", "train.py",
                 "optimizer.pkl"):  # fmt: skip
        assert not fetched(name), name


def test_cli_generate_with_a_hub_id(hub_cache, tmp_path):
    add_snapshot(hub_cache, REPO_ID, default_files())
    env = {**subprocess_env(), "HF_HOME": str(hub_cache.parent), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "twotower_rt", "generate", "--json", "--model", REPO_ID,
           "--mode", "ar", "--prompt", "ROMEO.", "--max-new-tokens", "4"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["model"] == REPO_ID and report["device"] == "cpu"
    assert report["dtype"] == "float32"  # auto on the CPU
    assert len(report["rows"][0]["generated"]) == 4
    cmd[cmd.index(REPO_ID)] = "nobody/missing"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert "'nobody/missing'" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_takes_the_model_as_a_positional_or_flag(capsys):
    parser = build_parser()
    args = parser.parse_args(["serve", "org/name", "--port", "9"])
    assert args.model_arg == "org/name" and args.model is None
    assert args.device == "auto" and args.dtype == "auto" and args.log_level == "info"
    args = parser.parse_args(["serve", "--model", "org/name", "--revision", "v1"])
    assert args.model == "org/name" and args.revision == "v1"
    code = main(["serve", "org/a", "--model", "org/b"])
    assert code == 2 and "two models named" in capsys.readouterr().err


def test_dtype_and_device_auto(tmp_path):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    d = tmp_path / "ckpt"
    d.mkdir()
    for stored, on_gpu in (("bfloat16", torch.bfloat16), ("float32", torch.bfloat16),
                           (None, torch.bfloat16)):  # fmt: skip
        (d / "config.json").write_text(json.dumps({"torch_dtype": stored}))
        assert choose_dtype("auto", gpu, str(d))[0] == on_gpu
        assert choose_dtype("auto", cpu, str(d))[0] == torch.float32
        assert choose_dtype("float32", gpu, str(d)) == (torch.float32, "asked for")
    (d / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))  # newer transformers' key
    assert choose_dtype("auto", gpu, str(d)) == (
        torch.bfloat16,
        "auto: the checkpoint's torch_dtype",
    )
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert twotower_rt.api.resolve_device("auto").type == want


def test_progress_bar_over_shards(tmp_path, capsys):
    d = tmp_path / "sharded"
    d.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(os.path.join(DEFAULT_MODEL_DIR, name), d / name)
    state = load_file(os.path.join(DEFAULT_MODEL_DIR, "model.safetensors"))
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, str(d / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    capsys.readouterr()
    twotower_rt.load(d)
    err = capsys.readouterr().err
    assert "Loading safetensors shards" in err and "2/2" in err
    twotower_rt.load(DEFAULT_MODEL_DIR)  # one file: no bar unless asked
    assert "Loading safetensors shards" not in capsys.readouterr().err
    twotower_rt.load(DEFAULT_MODEL_DIR, progress=True)
    assert "1/1" in capsys.readouterr().err


def test_log_level_and_the_start_up_line(tmp_path, caplog):
    """batch and serve take --log-level; batch logs one start-up line (model, device, dtype and
    why, the pool plan) at INFO, printed on stderr by the command."""
    args = build_parser().parse_args(["batch", "in", "out", "--log-level", "debug"])
    assert args.log_level == "debug"
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"id": 1, "input_ids": [5, 6], "mode": "ar"}) + "\n")
    cmd = [sys.executable, "-m", "twotower_rt", "batch", str(src), str(out), "--max-new-tokens",
           "2", "--no-progress", "--max-slots", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if "twotower_rt.batch" in x]
    assert line.startswith(f"INFO twotower_rt.batch: model {DEFAULT_MODEL_DIR}, device cpu, ")
    assert "dtype float32 (auto: float32 on the CPU; checkpoint: bfloat16)" in line
    assert "cache pool: 1 sequences" in line
    proc = subprocess.run(cmd + ["--log-level", "warning"], capture_output=True, text=True,
                          env=subprocess_env(), timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "twotower_rt.batch" not in proc.stderr


def test_serve_a_hub_id_for_the_openai_client(hub_cache):
    """`twotower-rt serve ORG/NAME` from the offline cache (a snapshot with a chat template): the
    model is listed under its hub id, the start-up line says device and dtype, and the openai
    client's completions and chat calls are answered."""
    import signal

    import openai
    from helpers import free_port, wait_for_health

    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    config = json.dumps({"chat_template": template, "eos_token": "</s>"}).encode()
    add_snapshot(hub_cache, REPO_ID, default_files(**{"tokenizer_config.json": config}))
    env = {**subprocess_env(), "HF_HOME": str(hub_cache.parent), "HF_HUB_OFFLINE": "1"}
    port = free_port()
    cmd = [sys.executable, "-m", "twotower_rt", "serve", REPO_ID, "--port", str(port),
           "--max-slots", "2", "--context", "128"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_health(proc, port, 120)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", timeout=60)
        assert [m.id for m in client.models.list()] == [REPO_ID]
        out = client.completions.create(model=REPO_ID, prompt="ROMEO.", max_tokens=4,
                                        extra_body={"mode": "ar"})  # fmt: skip
        assert len(out.choices[0].model_extra["token_ids"]) <= 4
        chat = client.chat.completions.create(model=REPO_ID, max_tokens=4, extra_body={
            "mode": "ar"}, messages=[{"role": "user", "content": "Speak."}])  # fmt: skip
        assert chat.choices[0].message.role == "assistant"
    finally:
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=30)
    first = stdout.decode().splitlines()[0]
    assert (
        first.startswith(f"twotower-rt: model {REPO_ID} [")
        and ", device cpu, dtype float32" in first
    )
    assert "cache pool: 2 sequences x 128 tokens" in first
