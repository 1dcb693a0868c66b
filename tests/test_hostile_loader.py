"""load() and quantize under hostile checkpoints: every bad config.json, index or weight is a
ConfigError / CheckpointError (ValueError) naming the file and the key or tensor, quickly, with no
allocation sized by the file; NaN weights are refused on request; quantize leaves nothing behind."""

import json
import os
import time

import pytest
from safetensors.torch import load_file, save_file
from test_checkpoint import _shard, ckpt, edit_config  # noqa: F401 -- the fixture

import twotower_rt
from twotower_rt import CheckpointError, ConfigError
from twotower_rt.cli import main
from twotower_rt.quantize import quantize_checkpoint


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hidden_size": -64}, "hidden_size: Input should be greater than or equal to 1"),
        ({"hidden_size": 64.0}, "hidden_size: Input should be a valid integer"),
        ({"hidden_size": "64"}, "hidden_size: Input should be a valid integer"),
        ({"hidden_size": True}, "hidden_size: Input should be a valid integer"),
        ({"hidden_size": 10**9}, "hidden_size: Input should be less than or equal to 65536"),
        ({"hidden_size": 2**70}, "hidden_size: Input should be less than or equal"),
        ({"n_routed_experts": 10**7}, "n_routed_experts: Input should be less than or equal"),
        ({"n_routed_experts": 4096, "hybrid_override_pattern": "E" * 20,
          "num_hidden_layers": None}, "4096 experts x 20 MoE layers"),
        ({"hybrid_override_pattern": "M" * 100_000, "num_hidden_layers": None},
         "at most 1024 characters"),
        ({"routed_scaling_factor": "big"}, "routed_scaling_factor: Input should be a valid number"),
        ({"use_conv_bias": "true"}, "use_conv_bias: Input should be a valid boolean"),
        ({"eos_token_id": 512}, "eos_token_id: 512 is not a token id in [0, vocab_size=512)"),
        ({"bos_token_id": -1}, "bos_token_id: Input should be greater than or equal to 0"),
        ({"eos_token_id": [2, 9999]}, "eos_token_id[1]: 9999 is not a token id"),
        ({"layer_norm_epsilon": 0}, "layer_norm_epsilon: Input should be greater than 0"),
        ({"time_step_limit": ["a", 1]}, "time_step_limit.0: Input should be a valid number"),
        ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [10**9, 1]}},
         "weight_block_size"),
    ],
)  # fmt: skip
def test_bad_config_values(ckpt, changes, message):  # noqa: F811
    edit_config(ckpt, **changes)
    started = time.monotonic()
    with pytest.raises(ConfigError) as e:
        twotower_rt.load(ckpt)
    assert message in str(e.value) and str(ckpt / "config.json") in str(e.value), str(e.value)
    assert time.monotonic() - started < 10 and len(str(e.value)) < 500


@pytest.mark.parametrize(
    "key, text, message",
    [
        ("layer_norm_epsilon", "Infinity", "layer_norm_epsilon: Input should be a finite number"),
        ("routed_scaling_factor", "NaN", "NaN is not a JSON number"),
        ("hidden_size", "1" + "0" * 5000, "an integer of 5001 digits"),
        ("x", "[" * 100_000 + "]" * 100_000, "nested 100001 deep"),
        ("x", '"\\ud800"', "lone surrogate"),
    ],
)
def test_bad_config_text(ckpt, key, text, message):  # noqa: F811
    raw = json.loads((ckpt / "config.json").read_text())
    raw.pop(key, None)
    (ckpt / "config.json").write_text(json.dumps(raw)[:-1] + f', "{key}": {text}}}')
    with pytest.raises(ConfigError, match="config.json") as e:
        twotower_rt.load(ckpt)
    assert message in str(e.value), str(e.value)


def test_infinity_is_read_where_a_key_allows_it(ckpt):  # noqa: F811
    raw = (ckpt / "config.json").read_text().rstrip().removesuffix("}")
    (ckpt / "config.json").write_text(raw + ', "time_step_limit": [0.0, Infinity]}')
    assert twotower_rt.load(ckpt).config.time_step_limit == (0.0, float("inf"))


@pytest.mark.parametrize("kind", ["directory", "symlink loop", "/dev/zero", "too large"])
def test_config_that_is_not_a_small_regular_file(ckpt, kind):  # noqa: F811
    path = ckpt / "config.json"
    path.unlink()
    if kind == "directory":
        path.mkdir()
    elif kind == "symlink loop":
        os.symlink(path, path)
    elif kind == "/dev/zero":
        os.symlink("/dev/zero", path)
    else:
        path.write_bytes(b" " * (5 << 20))
    with pytest.raises(ConfigError, match="config.json"):
        twotower_rt.load(ckpt)


@pytest.mark.parametrize("value", [7, None, ["a"], {"x": 1}])
def test_index_values_that_are_not_file_names(ckpt, value):  # noqa: F811
    index = _shard(ckpt)
    name = sorted(index["weight_map"])[0]
    index["weight_map"][name] = value
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"weight_map.{name}: Input should be a valid string"):
        twotower_rt.load(ckpt)


def test_index_that_is_not_json_or_not_a_file(ckpt):  # noqa: F811
    _shard(ckpt)
    index = ckpt / "model.safetensors.index.json"
    index.write_text('{"weight_map": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(CheckpointError, match="nested"):
        twotower_rt.load(ckpt)
    index.unlink()
    index.mkdir()
    with pytest.raises(CheckpointError, match="not a regular file"):
        twotower_rt.load(ckpt)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_weights_refuses_nan_and_inf(ckpt, bad):  # noqa: F811
    state = load_file(str(ckpt / "model.safetensors"))
    name = sorted(state)[3]
    state[name].view(-1)[5] = bad
    save_file(state, str(ckpt / "model.safetensors"))
    twotower_rt.load(ckpt)  # not scanned unless asked
    with pytest.raises(CheckpointError, match=f"tensor '{name}' holds 1 NaN or infinite"):
        twotower_rt.load(ckpt, check_weights=True)
    argv = ["generate", "--model", str(ckpt), "--input-ids", "1,2", "--check-weights"]
    assert main(argv) == 2


def test_quantize_bounds_its_block_and_leaves_nothing(ckpt, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "fp8"
    assert main(["quantize", "--model", str(ckpt), "--out", str(out),
                 "--block", "1000000000", "1"]) == 2  # fmt: skip
    assert "block must be" in capsys.readouterr().err and not out.exists()
    state = load_file(str(ckpt / "model.safetensors"))
    name = next(n for n in sorted(state) if n.endswith("in_proj.weight"))
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"'{name}' holds 1 NaN"):
        quantize_checkpoint(ckpt, out)
    assert not out.exists() and os.listdir(tmp_path) == [ckpt.name]  # no temp dir left either


def test_quantize_on_a_full_disk_leaves_nothing(ckpt, tmp_path, monkeypatch):  # noqa: F811
    """safetensors reports a failed write as a SafetensorError: an OSError naming the output,
    and no partial output."""
    from safetensors import SafetensorError

    import twotower_rt.quantize as quantize

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(quantize, "save_file", full)
    out = tmp_path / "fp8"
    with pytest.raises(OSError, match="fp8: cannot write the FP8 checkpoint.*No space left"):
        quantize_checkpoint(ckpt, out)
    assert not out.exists() and sorted(os.listdir(tmp_path)) == [ckpt.name]


@pytest.mark.parametrize(
    "config, message",
    [
        ({"eos_token_id": 512}, "eos_token_id 512 is not a token id in [0, 512)"),
        ({"eos_token_id": [2, 10**30]}, "eos_token_id 1000000000000000000000000000000 is not"),
        ({"temperature": "hot"}, "'temperature' must be a number"),
        ({"temperature": -1}, "'temperature' must be greater than or equal to 0"),
        ({"top_p": 1.5}, "'top_p' must be less than or equal to 1"),
        ({"steps_per_block": 10**30}, "'steps_per_block' must be less than or equal"),
        ({"block_size": 0}, "'block_size' must be greater than or equal to 1"),
        ({"max_new_tokens": 10**30}, "max_new_tokens must be < 2147483648"),
        ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 0"),
        ({"mask_token_id": 512}, "mask_token_id 512 is outside the vocabulary"),
        ({"confidence_threshold": "high"}, "'confidence_threshold' must be a number"),
    ],
)  # fmt: skip
def test_bad_generation_config_refused_at_load(ckpt, config, message):  # noqa: F811
    """A generation_config.json every request would take its defaults from is checked at load
    (the golden model's vocabulary is 512): refused there, naming the file and the field, instead
    of failing every request."""
    (ckpt / "generation_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        twotower_rt.load(ckpt)
    assert "generation_config.json" in str(info.value) and message in str(info.value), info.value
