"""bench/issue15_calibrate.py: the temperature fit, the reliability figures and the scaled head."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import issue15_calibrate  # noqa: E402

from twotower_rt.api import DEFAULT_MODEL_DIR  # noqa: E402


@pytest.mark.parametrize("tau", [0.6, 1.0, 1.7])
def test_fit_temperature_recovers_the_temperature_that_drew_the_targets(tau):
    """Targets drawn from softmax(z / tau): the fitted temperature of z is tau, to within the
    sampling noise of 20,000 draws."""
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(20000, 50, generator=g)
    targets = torch.multinomial(torch.softmax(z / tau, -1), 1, generator=g).squeeze(-1)
    fitted = issue15_calibrate.fit_temperature(z, targets)
    assert abs(fitted - tau) < 0.05 * tau
    # the fit is a minimum: either side is worse
    at = issue15_calibrate.cross_entropy_at(z, targets, fitted)
    assert at < issue15_calibrate.cross_entropy_at(z, targets, fitted * 1.2)
    assert at < issue15_calibrate.cross_entropy_at(z, targets, fitted / 1.2)


def test_reliability_by_hand():
    """Two positions at confidence ~0.97 (one right), two at ~0.6 (both right)."""
    big, small = torch.tensor([4.0, 0.5, 0.0]), torch.tensor([1.0, 0.5, 0.0])
    logits = torch.stack([big, big, small, small])
    conf = torch.softmax(logits, -1).max(-1).values
    r = issue15_calibrate.reliability(logits, torch.tensor([0, 1, 0, 0]), 1.0)
    assert r["accuracy"] == 0.75
    above = r["above_threshold"]["0.8"]
    assert above == {"share": 0.5, "accuracy": 0.5}
    bins = {tuple(b["bin"]): b for b in r["bins"]}
    assert bins[(0.95, 1.0)]["share"] == 0.5 and bins[(0.95, 1.0)]["accuracy"] == 0.5
    low = next(b for b in r["bins"] if b["bin"][0] < conf[2] <= b["bin"][1])
    assert low["share"] == 0.5 and low["accuracy"] == 1.0
    want = 0.5 * abs(0.5 - float(conf[0])) + 0.5 * abs(1.0 - float(conf[2]))
    assert r["ece"] == pytest.approx(want)


def test_save_scaled_divides_the_denoiser_head_only(tmp_path):
    issue15_calibrate.save_scaled(DEFAULT_MODEL_DIR, str(tmp_path), 1.25)
    before = load_file(str(Path(DEFAULT_MODEL_DIR) / "model.safetensors"))
    after = load_file(str(tmp_path / "model.safetensors"))
    assert set(before) == set(after)
    for k in before:
        if k == "lm_head.weight":
            assert after[k].dtype == before[k].dtype
            want = (before[k].float() / 1.25).to(before[k].dtype)
            assert torch.equal(after[k], want) and not torch.equal(after[k], before[k])
        else:
            assert torch.equal(after[k], before[k]), k
    assert (tmp_path / "config.json").is_file() and (tmp_path / "tokenizer.json").is_file()
