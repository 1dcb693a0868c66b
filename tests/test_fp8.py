"""FP8 weights: quantization error bounds, the config flag, quantize -> load -> generate, the
loader's refusals, and the CLI."""

import json

import pytest
import torch

import twotower_rt
from twotower_rt.checkpoint import CheckpointError
from twotower_rt.cli import main as cli_main
from twotower_rt.config import ConfigError, TwoTowerConfig
from twotower_rt.model.linear import (
    FP8_DTYPE,
    Fp8Linear,
    dequantize_weight,
    quantize_weight,
    scale_shape,
)
from twotower_rt.quantize import quantize_checkpoint


@pytest.mark.parametrize(
    "shape, block", [((10, 7), (1, 0)), ((10, 7), (4, 3)), ((64, 96), (32, 32))]
)
def test_quantization_error_is_e4m3_rounding(shape, block):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[0])[:, None]
    w[0] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_weight(w, block)
    assert q.dtype == FP8_DTYPE and scale.shape == scale_shape(*shape, block)
    back = dequantize_weight(q, scale, block, torch.float32)
    # e4m3: 3 mantissa bits (relative half-ulp 2^-4); subnormals step by 2^-9 of the scale.
    rows = torch.arange(shape[0]) // (block[0] or shape[0])
    cols = torch.arange(shape[1]) // (block[1] or shape[1])
    s = scale[rows][:, cols]
    assert ((back - w).abs() <= w.abs() * 2**-4 + s * 2**-9 + 1e-12).all()
    assert torch.equal(back[0], torch.zeros(shape[1]))
    # Each block's largest magnitude lands on 448 exactly (or the block is all zero).
    assert q.float().abs().max() == 448.0


def test_config_quantization_flag():
    base = {"hidden_size": 64, "vocab_size": 100, "hybrid_override_pattern": "M*E"}
    assert TwoTowerConfig.from_dict(base).fp8_weight_block is None
    per_channel = {**base, "quantization_config": {"quant_method": "fp8"}}
    assert TwoTowerConfig.from_dict(per_channel).fp8_weight_block == (1, 0)
    q = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    blocks = {**base, "quantization_config": q}
    cfg = TwoTowerConfig.from_dict(blocks)
    assert cfg.fp8_weight_block == (128, 128)
    assert TwoTowerConfig.from_dict(cfg.to_dict()).fp8_weight_block == (128, 128)
    for bad, message in [
        ({"quant_method": "int8"}, "quant_method"),
        ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "activation_scheme"),
        ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size"),
    ]:
        with pytest.raises(ConfigError, match=message):
            TwoTowerConfig.from_dict({**base, "quantization_config": bad})


@pytest.fixture(scope="module")
def fp8_golden(golden_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8") / "tiny-a-fp8"
    report = quantize_checkpoint(golden_dir, out)
    return out, report


def test_quantize_then_load_and_generate(golden_dir, fp8_golden):
    out, report = fp8_golden
    assert report["tensors_quantized"] > 0 and report["bytes_after"] < report["bytes_before"]
    model = twotower_rt.load(out, dtype="float32")
    fp8_layers = [m for m in model.lm.modules() if isinstance(m, Fp8Linear)]
    assert len(fp8_layers) == report["tensors_quantized"]
    assert all(m.weight.dtype == FP8_DTYPE for m in fp8_layers)
    assert model.lm.context_tower.layers[0].mixer.in_proj.weight.dtype == FP8_DTYPE
    # The router and the heads stay in full precision.
    moe = next(b.mixer for b in model.lm.context_tower.layers if b.kind == "moe")
    assert moe.gate.weight.dtype == torch.float32
    assert model.lm.lm_head.weight.dtype == torch.float32
    # Dequantized weights are within e4m3 rounding of the original ones.
    base = twotower_rt.load(golden_dir, dtype="float32")
    w = base.lm.context_tower.layers[0].mixer.in_proj.weight
    layer = model.lm.context_tower.layers[0].mixer.in_proj
    back = dequantize_weight(layer.weight, layer.weight_scale, layer.block, torch.float32)
    assert ((back - w).abs() <= w.abs() * 2**-4 + layer.weight_scale * 2**-9).all()
    for mode in ("ar", "mock_ar", "mask_diffusion"):
        out_ = model.generate([[1, 2, 3, 4]], mode=mode, max_new_tokens=16)
        assert len(out_.generated[0]) == 16
    bf16 = twotower_rt.load(out, dtype="bfloat16")
    assert bf16.generate([[5, 6]], mode="ar", max_new_tokens=4).generated[0]


def test_loader_refuses_mixed_up_fp8_files(fp8_golden, golden_dir, tmp_path):
    out, _ = fp8_golden
    # An FP8 config over the unquantized weights: the first projection is not float8.
    (tmp_path / "config.json").write_text((out / "config.json").read_text())
    (tmp_path / "model.safetensors").symlink_to(golden_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="weight_scale|float8"):
        twotower_rt.load(tmp_path)


def test_quantize_refusals(fp8_golden, golden_dir, tmp_path):
    out, _ = fp8_golden
    with pytest.raises(ValueError, match="already an FP8"):
        quantize_checkpoint(out, tmp_path / "again")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        quantize_checkpoint(golden_dir, tmp_path / "busy")
    with pytest.raises(ValueError, match="block"):
        quantize_checkpoint(golden_dir, tmp_path / "b", (0, 4))


def test_cli_quantize(golden_dir, tmp_path, capsys):
    dst = tmp_path / "q"
    assert cli_main(["quantize", "--model", str(golden_dir), "--out", str(dst),
                     "--block", "32", "32", "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["weight_block"] == [32, 32]
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [32, 32]
    assert cli_main(["quantize", "--model", str(golden_dir), "--out", str(dst)]) == 2
    assert "not empty" in capsys.readouterr().err


needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)


@pytest.mark.gpu
@needs_gpu
def test_fp8_model_on_gpu(tmp_path):
    from twotower_rt.api import DEFAULT_MODEL_DIR

    quantize_checkpoint(DEFAULT_MODEL_DIR, tmp_path / "q")
    model = twotower_rt.load(tmp_path / "q", device="cuda", dtype="bfloat16")
    for mode in ("ar", "mask_diffusion"):
        out = model.generate([[1, 5, 9, 33]], mode=mode, max_new_tokens=32)
        assert len(out.generated[0]) == 32 or out.finish_reason[0] == "eos"


def _as_bytes(t):
    return t.view(torch.uint8) if t.dtype == FP8_DTYPE else t


def test_sharded_source_is_quantized_shard_by_shard(golden_dir, fp8_golden, tmp_path):
    from safetensors.torch import load_file, save_file

    # The golden checkpoint split into two shards with an index.
    state = load_file(golden_dir / "model.safetensors")
    names = sorted(state)
    src = tmp_path / "sharded"
    src.mkdir()
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}  # fmt: skip
    for file, part in shards.items():
        save_file({n: state[n] for n in part}, src / file)
    weight_map = {n: f for f, part in shards.items() for n in part}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (src / "config.json").write_text((golden_dir / "config.json").read_text())
    out = tmp_path / "fp8-sharded"
    quantize_checkpoint(src, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    got = {}
    for file in shards:
        got.update(load_file(out / file))
    want = load_file(fp8_golden[0] / "model.safetensors")  # the single-file source's result
    assert got.keys() == want.keys()
    assert all(torch.equal(_as_bytes(got[n]), _as_bytes(want[n])) for n in want)
    assert all(index["weight_map"][n] in shards for n in want)
    twotower_rt.load(out).generate([[1, 2, 3]], mode="ar", max_new_tokens=4)


def test_failed_quantize_leaves_nothing(golden_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(golden_dir / "model.safetensors")
    state.pop(sorted(state)[-1])  # one tensor missing: found only after the last one is read
    src = tmp_path / "broken"
    src.mkdir()
    save_file(state, src / "model.safetensors")
    (src / "config.json").write_text((golden_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="missing"):
        quantize_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
