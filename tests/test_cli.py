"""The ``twotower-rt`` CLI: golden cases through ``generate --json``, batches, the built-in model in
every mode, text prompts with a tokenizer, one-line errors with exit code 2, ``env``."""

import json
import re
import shutil
import subprocess
import sys

import pytest
from conftest import load_cases
from helpers import subprocess_env

import twotower_rt
from twotower_rt import MODES, SamplingParams
from twotower_rt.cli import main

CASES = load_cases("cases.jsonl")


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run_cli(capsys, "generate", "--json", *argv)
    assert code == 0, err
    assert out.count("\n") == 1  # one JSON object on one line
    return json.loads(out)


def param_flags(params: dict) -> list[str]:
    """The CLI flags for a golden case's params; None means "not given"."""
    flags = []
    for name, value in params.items():
        if value is None:
            continue
        if isinstance(value, list):
            value = ",".join(map(str, value))
        flags += ["--" + name.replace("_", "-"), str(value)]
    return flags


def ids_flag(ids) -> str:
    return ",".join(map(str, ids))


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_golden_case(capsys, golden_dir, case):
    report = run_json(capsys, "--model", golden_dir, "--mode", case["mode"],
                      "--input-ids", ids_flag(case["input_ids"]),
                      *param_flags(case["params"]))  # fmt: skip
    (row,) = report["rows"]
    assert row["sequence"] == case["output_ids"]
    assert row["generated"] == case["output_ids"][case["prompt_len"] :]
    assert row["prompt_length"] == case["prompt_len"]
    if case["nfe"] is not None:
        assert row["nfe"] == case["nfe"]
    if case.get("commits_per_step") is not None:
        assert row["commits_per_step"] == case["commits_per_step"]
    eos = case["params"]["eos_token_id"]
    assert row["finish_reason"] == ("eos" if eos is not None else "length")
    assert "text" not in row  # tiny-a ships no tokenizer
    assert report["mode"] == case["mode"] and report["model"] == str(golden_dir)
    for name, value in case["params"].items():
        assert report["params"][name] == value


def test_batch_of_two(capsys, golden_dir):
    a, b = (c for c in CASES if c["id"] in ("md_p5_t09", "md_long"))
    assert a["params"] == b["params"]
    report = run_json(capsys, "--model", golden_dir, *param_flags(a["params"]),
                      "--input-ids", ids_flag(a["input_ids"]),
                      "--input-ids", ids_flag(b["input_ids"]))  # fmt: skip
    assert [r["sequence"] for r in report["rows"]] == [a["output_ids"], b["output_ids"]]
    assert [r["nfe"] for r in report["rows"]] == [a["nfe"], b["nfe"]]
    timing = report["timing"]
    n = len(a["output_ids"]) - a["prompt_len"] + len(b["output_ids"]) - b["prompt_len"]
    assert timing["generated_tokens"] == n
    assert timing["load_s"] > 0 and timing["generate_s"] > 0 and timing["tokens_per_s"] > 0


@pytest.mark.parametrize("mode", MODES)
def test_default_model_every_mode(capsys, default_model, mode):
    """No --model: the model shipped in the package, in a batch with a 1-token prompt."""
    report = run_json(capsys, "--mode", mode, "--input-ids", "5,6,7", "--input-ids", "9",
                      "--max-new-tokens", "16")  # fmt: skip
    want = default_model.generate([[5, 6, 7], [9]], mode=mode, max_new_tokens=16)
    assert [r["sequence"] for r in report["rows"]] == want.sequences
    assert [r["nfe"] for r in report["rows"]] == want.nfe
    assert [r["text"] for r in report["rows"]] == [default_model.decode(g) for g in want.generated]
    assert report["model"] == default_model.source and report["mode"] == mode
    assert (report["device"], report["dtype"]) == ("cpu", "float32")


def test_flags_left_out_take_the_apis_defaults(capsys, default_model):
    report = run_json(capsys, "--input-ids", "5,6,7")
    assert report["mode"] == "mask_diffusion"
    assert report["params"] == vars(SamplingParams())
    want = default_model.generate([[5, 6, 7]])
    assert report["rows"][0]["sequence"] == want.sequences[0]
    assert len(report["rows"][0]["generated"]) == SamplingParams.max_new_tokens


def test_default_model_text_prompts(capsys, default_model):
    prompts = ["ROMEO. But soft, what light", "And it came to pass"]
    code, out, err = run_cli(capsys, "generate", "--prompt", prompts[0], "--prompt", prompts[1],
                             "--max-new-tokens", "16")  # fmt: skip
    assert code == 0, err
    want = default_model.generate([default_model.encode(p) for p in prompts], max_new_tokens=16)
    lines = out.splitlines()
    assert lines[0] == f"[0] nfe={want.nfe[0]} finish={want.finish_reason[0]}"
    assert "\n".join(lines[1:]).startswith(default_model.decode(want.generated[0]))


def test_sampling_flags(capsys, golden_model, golden_dir):
    params = dict(temperature=0.8, top_k=20, top_p=0.9, seed=[1, 2], eos_token_id=[7, 8],
                  max_new_tokens=12)  # fmt: skip
    report = run_json(capsys, "--model", golden_dir, "--mode", "ar", "--input-ids", "5,6",
                      "--input-ids", "9,10,11", *param_flags(params))  # fmt: skip
    want = golden_model.generate([[5, 6], [9, 10, 11]], mode="ar", **params)
    assert [r["sequence"] for r in report["rows"]] == want.sequences
    assert report["params"]["seed"] == [1, 2] and report["params"]["eos_token_id"] == [7, 8]


def test_human_output(capsys, golden_dir):
    code, out, err = run_cli(capsys, "generate", "--model", golden_dir, "--input-ids", "1,2,3",
                             "--mode", "mock_ar", "--max-new-tokens", "4")  # fmt: skip
    assert code == 0
    header, ids = out.splitlines()
    assert header == "[0] nfe=4 finish=length"
    assert len(ids.split(",")) == 4
    assert "tokens/s" in err and err.count("\n") == 1


@pytest.fixture
def ckpt_with_tokenizer(tmp_path, golden_dir):
    """The golden checkpoint plus a word-level tokenizer: token i is the word "w{i}"."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path / "ckpt"
    d.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(golden_dir / name, d / name)
    vocab = {f"w{i}": i for i in range(512)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(d / "tokenizer.json"))
    return d


def test_text_prompts(capsys, ckpt_with_tokenizer, golden_dir):
    case = next(c for c in CASES if c["id"] == "md_p5_t09")
    prompt = " ".join(f"w{i}" for i in case["input_ids"])
    flags = param_flags(case["params"])
    report = run_json(capsys, "--model", ckpt_with_tokenizer, "--prompt", prompt,
                      "--prompt", "w9 w8", *flags)  # fmt: skip
    row = report["rows"][0]
    assert row["sequence"] == case["output_ids"]
    assert row["text"] == " ".join(f"w{i}" for i in row["generated"])
    assert len(report["rows"]) == 2 and report["rows"][1]["sequence"][:2] == [9, 8]
    code, out, _ = run_cli(capsys, "generate", "--model", ckpt_with_tokenizer,
                           "--prompt", prompt, *flags)  # fmt: skip
    assert code == 0 and out.splitlines()[1] == row["text"]


@pytest.fixture
def pickle_only_dir(tmp_path, golden_dir):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(golden_dir / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch /tmp/pwned'\ntR.")
    return d


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mode", "beam", "--input-ids", "1,2"], "argument --mode: invalid choice: 'beam'"),
        (["--input-ids", "1,two,3"], "argument --input-ids: '1,two,3' is not a comma-separated"),
        (["--input-ids", "1,2", "--max-new-tokens", "20"],
         r"max_new_tokens \(20\) must be a multiple of block_size \(16\)"),
        (["--input-ids", "1,2", "--top-p", "high"], "argument --top-p: invalid float value"),
        (["--input-ids", "1,2", "--seed", "1,2"], "seed has 2 entries for 1 prompts"),
        (["--input-ids", "1,99999"], r"input_ids\[0\]\[1\] = 99999 is not a token id"),
        (["--prompt", "hello"], "has no tokenizer.json.*--input-ids"),
        (["--input-ids", "1,2", "--model", "{missing}"], "not a checkpoint directory"),
        (["--input-ids", "1,2", "--model", "{pickled}"], "pickle checkpoints are not loaded"),
        (["--input-ids", "1,2", "--dtype", "float16"], "dtype 'float16' is not supported"),
        (["--max-new-tokens", "8"], "one of the arguments --prompt --input-ids is required"),
        (["--prompt", "a", "--input-ids", "1"], "not allowed with argument"),
    ],
)  # fmt: skip
def test_bad_input_is_exit_code_2(capsys, tmp_path, golden_dir, pickle_only_dir, argv, message):
    """Against the golden model (no tokenizer) unless the case names its own --model."""
    paths = {"{missing}": str(tmp_path / "nowhere"), "{pickled}": str(pickle_only_dir)}
    argv = [paths.get(a, a) for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(golden_dir)]
    code, out, err = run_cli(capsys, "generate", *argv)
    assert code == 2 and out == ""
    assert err.startswith("twotower-rt: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert re.search(message, err), err


def test_no_command_and_help(capsys):
    code, _, err = run_cli(capsys)
    assert code == 2 and err.startswith("twotower-rt: error: ")
    code, out, _ = run_cli(capsys, "generate", "--help")
    assert code == 0
    for field in vars(SamplingParams()):
        assert "--" + field.replace("_", "-") in out
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and twotower_rt.__version__ in out


def test_env(capsys):
    code, out, _ = run_cli(capsys, "env")
    assert code == 0 and "torch" in out
    code, out, _ = run_cli(capsys, "env", "--json")
    assert code == 0
    report = json.loads(out)
    assert isinstance(report, dict) and "torch" in report


def test_python_dash_m(golden_dir):
    case = next(c for c in CASES if c["id"] == "md_p5_t09")
    env = subprocess_env(single_thread=False)
    cmd = [sys.executable, "-m", "twotower_rt", "generate", "--json", "--model", str(golden_dir),
           "--input-ids", ids_flag(case["input_ids"]), *param_flags(case["params"])]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["rows"][0]["sequence"] == case["output_ids"]

    proc = subprocess.run([*cmd[:4], "--input-ids", "1,2", "--mode", "nope"], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("twotower-rt: error: argument --mode")
    assert "Traceback" not in proc.stderr

    proc = subprocess.run([sys.executable, "-m", "twotower_rt", "env"], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "torch" in proc.stdout


def test_api_key_from_the_flag_a_file_or_the_environment(tmp_path, monkeypatch, capsys):
    from twotower_rt.cli import API_KEY_ENV, _api_key, build_parser

    def key(*argv):
        return _api_key(build_parser().parse_args(["serve", *argv]))

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert key() is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert key() == "from-env"
    assert key("--api-key", "from-flag") == "from-flag"
    (tmp_path / "key").write_text("from-file\n")
    assert key("--api-key-file", str(tmp_path / "key")) == "from-file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        key("--api-key-file", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="not a regular file"):
        key("--api-key-file", str(tmp_path))
    assert main(["serve", "--api-key", "a", "--api-key-file", str(tmp_path / "key")]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_threads_and_check_weights_flags(capsys):
    import torch

    before = torch.get_num_threads()
    try:
        argv = ["generate", "--input-ids", "5,6", "--mode", "ar", "--max-new-tokens", "2",
                "--threads", "1", "--check-weights", "--json"]  # fmt: skip
        assert main(argv) == 0 and torch.get_num_threads() == 1
        assert json.loads(capsys.readouterr().out)["rows"][0]["generated"]
    finally:
        torch.set_num_threads(before)
