"""bench/cpu_bf16_dot.py on a few prompts: each part runs both precisions and puts torch's
precision back, and the quality part scores "highest"'s continuations as evaluate does."""

import sys
from pathlib import Path

import pytest
import torch

import twotower_rt
from twotower_rt import _ext
from twotower_rt.train import evaluate as ev

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import cpu_bf16_dot  # noqa: E402

C = _ext.cpu_kernels()
pytestmark = pytest.mark.skipif(
    C is None or not C.linear_dot_supported(),
    reason="no CPU kernels, or a CPU without AVX512_BF16",
)


@pytest.fixture(scope="module")
def model():
    return twotower_rt.load()


def test_kernels_part(model):
    before = torch.get_float32_matmul_precision()
    rows = cpu_bf16_dot.kernels(model.lm, rounds=1)
    assert torch.get_float32_matmul_precision() == before
    assert {r["op"] for r in rows} >= {"mamba in_proj", "lm_head", "moe layer"}
    assert all(r["highest_us"] > 0 and r["medium_us"] > 0 for r in rows)
    assert all((r["rows"] == 1) or "speedup" in r for r in rows)


def test_speed_and_quality_parts(model, monkeypatch):
    monkeypatch.setattr(cpu_bf16_dot, "BATCHES", (1, 2))
    before = torch.get_float32_matmul_precision()
    prompts = [[5, 9, 200, 31], [44, 12, 9, 7]]
    speed = cpu_bf16_dot.speed(model, prompts, 16, rounds=1)
    assert set(speed) == {f"kernel_threads_{k}_batch_{b}" for k in (1, 2) for b in (1, 2)}
    cell = speed["kernel_threads_1_batch_1"]
    assert cell["highest"]["md_vs_ar"] > 0 and len(cell["medium"]["md_vs_ar_rounds"]) == 1
    quality = cpu_bf16_dot.quality(model, prompts, [[1] * 16, [2] * 16], 16)
    assert set(quality["continuations_changed_by_medium"]) == {
        "ar", "mask_diffusion@0.8", "mask_diffusion@0.9"}  # fmt: skip
    assert quality["highest"]["ar"]["quality_nll_ratio"] == 1.0
    assert torch.get_float32_matmul_precision() == before  # every part puts it back
    want = ev.run_mode(model, prompts, "ar", None, 16)[0].generated
    assert quality["highest"]["ar"]["ar_nll"] == pytest.approx(ev.ar_nll(model.lm, prompts, want))
