"""config.json parsing and checkpoint loading: every bad input is a clear error naming the file and
the tensor; shards and bf16 load; pickle files are never read."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import twotower_rt
from twotower_rt import CheckpointError, ConfigError, TwoTowerConfig


@pytest.fixture
def ckpt(tmp_path, golden_dir):
    """A writable copy of the golden checkpoint."""
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(golden_dir / "config.json", d / "config.json")
    shutil.copy(golden_dir / "model.safetensors", d / "model.safetensors")
    return d


def edit_config(d, **changes):
    raw = json.loads((d / "config.json").read_text())
    raw.update(changes)
    for k, v in changes.items():
        if v is None:
            del raw[k]
    (d / "config.json").write_text(json.dumps(raw))


def test_golden_config_parses(golden_dir):
    cfg = TwoTowerConfig.from_json_file(golden_dir / "config.json")
    assert cfg.hybrid_override_pattern == "MEM*EMEM*E"
    assert cfg.layer_kinds.count("mamba") == 4 and cfg.layer_kinds.count("moe") == 4
    assert (cfg.mamba_d_inner, cfg.mamba_conv_dim, cfg.mamba_in_proj_dim) == (128, 192, 328)
    assert cfg.time_step_limit == (0.0, float("inf"))  # absent from the file: no clamp


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hybrid_override_pattern": "MEX*EMEM*E"}, "unknown layer character 'X' at layer 2"),
        ({"hybrid_override_pattern": "MEM*EMEM*"}, "num_hidden_layers is 10"),
        ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
        ({"hidden_size": None}, "missing required key 'hidden_size'"),
        ({"hidden_size": -4}, "hidden_size"),
        ({"num_key_value_heads": 3}, "does not divide"),
        ({"mlp_hidden_act": "gelu"}, "mlp_hidden_act"),
        ({"n_group": 2}, "grouped routing"),
        ({"time_step_limit": [0.1]}, "time_step_limit"),
    ],
)
def test_bad_config(ckpt, changes, message):
    edit_config(ckpt, **changes)
    with pytest.raises(ConfigError, match=message) as e:
        twotower_rt.load(ckpt)
    assert str(ckpt / "config.json") in str(e.value)


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        twotower_rt.load(ckpt)


def test_missing_config_and_dir(tmp_path, ckpt):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        twotower_rt.load(tmp_path / "nope")
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json: no such file"):
        twotower_rt.load(ckpt)


def _rewrite(d, fn):
    state = load_file(str(d / "model.safetensors"))
    fn(state)
    save_file(state, str(d / "model.safetensors"))


def test_missing_tensor(ckpt):
    _rewrite(ckpt, lambda s: s.pop("denoiser_tower.layers.3.mixer.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*denoiser_tower\.layers\.3\.mixer\.k_proj"):
        twotower_rt.load(ckpt)


def test_unexpected_tensor(ckpt):
    _rewrite(ckpt, lambda s: s.__setitem__("backbone.extra.weight", torch.zeros(3)))
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: unexpected tensor "
        r"'backbone\.extra\.weight'",
    ):
        twotower_rt.load(ckpt)


def test_misshaped_tensor(ckpt):
    _rewrite(ckpt, lambda s: s.__setitem__("lm_head.weight", torch.zeros(511, 64)))
    with pytest.raises(
        CheckpointError,
        match=r"'lm_head\.weight' has shape \[511, 64\], "
        r"expected \[512, 64\]",
    ):
        twotower_rt.load(ckpt)


def test_integer_tensor(ckpt):
    _rewrite(
        ckpt,
        lambda s: s.__setitem__("context_tower.layers.0.mixer.D", torch.ones(8, dtype=torch.int64)),
    )
    with pytest.raises(CheckpointError, match="floating-point"):
        twotower_rt.load(ckpt)


def test_corrupt_file(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        twotower_rt.load(ckpt)


def test_pickle_checkpoint_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    # A pickle that would run code if it were ever unpickled.
    (ckpt / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch /tmp/pwned'\ntR.")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: pickle checkpoints are not"):
        twotower_rt.load(ckpt)


def _shard(d, n_shards=3):
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(state)
    weight_map = {}
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: state[n] for n in names[i::n_shards]}
        save_file(part, str(d / shard))
        weight_map.update({n: shard for n in part})
    index = {"metadata": {}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


def test_sharded_checkpoint_generates_the_same(ckpt, golden_model):
    _shard(ckpt)
    sharded = twotower_rt.load(ckpt)
    for name, t in golden_model.lm.state_dict().items():
        assert torch.equal(sharded.lm.state_dict()[name], t), name
    prompt = [[11, 22, 33, 44]]
    assert (
        sharded.generate(prompt, max_new_tokens=16).sequences
        == golden_model.generate(prompt, max_new_tokens=16).sequences
    )


def test_sharded_index_errors(ckpt):
    index = _shard(ckpt)
    path = ckpt / "model.safetensors.index.json"
    name = "lm_head.weight"
    broken = json.loads(json.dumps(index))
    broken["weight_map"][name] = "model-00009-of-00009.safetensors"
    path.write_text(json.dumps(broken))
    with pytest.raises(CheckpointError, match="shard .*00009.* does not exist"):
        twotower_rt.load(ckpt)
    other = next(s for s in set(index["weight_map"].values()) if s != index["weight_map"][name])
    broken["weight_map"][name] = other  # points at a shard that does not hold it
    path.write_text(json.dumps(broken))
    with pytest.raises(
        CheckpointError,
        match=r"index lists tensors that are not in this file: "
        r"lm_head\.weight",
    ):
        twotower_rt.load(ckpt)
    broken["weight_map"][name] = "../elsewhere.safetensors"
    path.write_text(json.dumps(broken))
    with pytest.raises(CheckpointError, match="not a .safetensors file in this directory"):
        twotower_rt.load(ckpt)
    path.write_text("[]")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        twotower_rt.load(ckpt)


def test_bfloat16_load(golden_dir, golden_model):
    model = twotower_rt.load(golden_dir, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    for name, t in model.lm.state_dict().items():
        assert t.dtype == torch.bfloat16, name
        assert torch.equal(t, golden_model.lm.state_dict()[name].to(torch.bfloat16)), name
    for mode in ("ar", "mock_ar", "mask_diffusion"):
        out = model.generate([[5, 9, 200, 31], [8, 8]], mode=mode, max_new_tokens=16)
        assert [len(s) for s in out.sequences] == [20, 18]
        assert all(0 <= t < 512 for s in out.sequences for t in s)


@pytest.mark.parametrize("dtype", ["float16", torch.float64, "int8"])
def test_unsupported_dtype(golden_dir, dtype):
    with pytest.raises(ValueError, match="not supported"):
        twotower_rt.load(golden_dir, dtype=dtype)


def test_bad_device(golden_dir):
    with pytest.raises(ValueError, match="not a valid torch device"):
        twotower_rt.load(golden_dir, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            twotower_rt.load(golden_dir, device="cuda")
