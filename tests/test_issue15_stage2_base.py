"""bench/issue15_stage2_base.py: the stored longer stage-2 denoiser + the shipped context tower is
a whole model that loads and decodes, and a mismatched file is refused."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import issue15_stage2_base as s2  # noqa: E402

import twotower_rt  # noqa: E402


def test_the_assembled_base_is_the_shipped_context_tower_and_the_stored_denoiser(tmp_path):
    out = s2.assemble(tmp_path / "base")
    whole = load_file(str(out / "model.safetensors"))
    shipped = load_file(str(s2.SHIPPED / "model.safetensors"))
    half = load_file(str(s2.DENOISER))
    assert set(whole) == set(shipped)
    for k, v in whole.items():
        source = shipped if k.startswith(s2.CONTEXT_PREFIXES) else half
        assert torch.equal(v, source[k]), k
    # The stored denoiser is not the shipped one (that one went through stage 3).
    assert not torch.equal(half["lm_head.weight"], shipped["lm_head.weight"])
    model = twotower_rt.load(str(out), device="cpu", dtype="float32")
    result = model.generate([[5, 6, 7]], max_new_tokens=16, mode="mask_diffusion",
                            confidence_threshold=0.8)  # fmt: skip
    assert len(result.generated[0]) == 16


def test_a_file_with_context_tensors_or_missing_ones_is_refused(tmp_path):
    half = load_file(str(s2.DENOISER))
    shipped = load_file(str(s2.SHIPPED / "model.safetensors"))
    with_context = dict(half, **{"context_lm_head.weight": shipped["context_lm_head.weight"]})
    save_file(with_context, str(tmp_path / "ctx.safetensors"))
    with pytest.raises(ValueError, match="context-tower tensors"):
        s2.assemble(tmp_path / "a", denoiser=tmp_path / "ctx.safetensors")
    short = {k: v for k, v in half.items() if k != "lm_head.weight"}
    save_file(short, str(tmp_path / "short.safetensors"))
    with pytest.raises(ValueError, match="missing \\['lm_head.weight'\\]"):
        s2.assemble(tmp_path / "b", denoiser=tmp_path / "short.safetensors")


def test_a_run_checkpoint_gives_its_denoiser_in_bfloat16(tmp_path):
    """--run-checkpoint: a whole float32 model as the trainer writes it -> its denoiser half in
    bfloat16 (the values rounded once, the context tensors left out)."""
    shipped = load_file(str(s2.SHIPPED / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    run = {k: v.float() + 1e-3 * torch.randn(v.shape, generator=g) for k, v in shipped.items()}
    save_file(run, str(tmp_path / "diffusion.safetensors"))
    half = load_file(str(s2.denoiser_half(tmp_path / "diffusion.safetensors",
                                          tmp_path / "half.safetensors")))  # fmt: skip
    assert set(half) == {k for k in shipped if not k.startswith(s2.CONTEXT_PREFIXES)}
    for k, v in half.items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, run[k].to(torch.bfloat16)), k
    out = s2.assemble(tmp_path / "base", denoiser=tmp_path / "half.safetensors")
    assert torch.equal(load_file(str(out / "model.safetensors"))["lm_head.weight"],
                       half["lm_head.weight"])  # fmt: skip
