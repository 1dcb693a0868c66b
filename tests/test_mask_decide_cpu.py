"""The greedy mask-diffusion decision on the CPU (twotower_rt._cpu, ops/mask_sampling.py's
mask_decide_cpu) against mask_sampling_ref, the spec's decision in PyTorch ops. The kernel's
confidences agree to float32 rounding; predictions, commits and blocks are compared exactly on
inputs with no near-ties, and the rule's corner cases are built by hand."""

from __future__ import annotations

import pytest
import torch

from twotower_rt import _ext, fastpath
from twotower_rt.ops.mask_sampling import mask_decide_cpu, mask_sampling, mask_sampling_ref

pytestmark = pytest.mark.skipif(
    _ext.cpu_kernels() is None, reason=f"no CPU kernels: {_ext.cpu_kernels_error()}"
)

MASK = 3


def _check(logits, block, step, steps, threshold, mask=MASK):
    got = mask_decide_cpu(logits, block, mask_token_id=mask, step=step, steps_per_block=steps,
                          confidence_threshold=threshold)  # fmt: skip
    want = mask_sampling_ref(logits, block, mask_token_id=mask, step=step, steps_per_block=steps,
                             confidence_threshold=threshold)  # fmt: skip
    assert torch.equal(got.prediction, want.prediction)
    torch.testing.assert_close(got.confidence, want.confidence, rtol=2e-6, atol=0)
    assert torch.equal(got.block, want.block)
    assert torch.equal(got.masked, want.masked)
    assert torch.equal(got.num_committed, want.num_committed)
    return got


@pytest.mark.parametrize("B,S,V", [(1, 16, 2048), (3, 16, 2048), (2, 5, 37), (4, 33, 100),
                                   (1, 1, 4)])  # fmt: skip
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.8, 0.99])
def test_matches_the_reference(B, S, V, threshold):
    g = torch.Generator().manual_seed(B * 1000 + S + V)
    # Scaled so that some positions are confident and others are not.
    logits = torch.randn(B, S, V, generator=g) * torch.rand(B, S, 1, generator=g) * 12
    block = (
        torch.randint(4, V, (B, S), generator=g) if V > 4 else torch.zeros(B, S, dtype=torch.long)
    )
    block = torch.where(torch.rand(B, S, generator=g) < 0.7, torch.full_like(block, MASK), block)
    steps = 16
    for step in (0, 5, 14, 15, torch.randint(0, 20, (B,), generator=g)):
        _check(logits, block, step, steps, threshold)


def test_the_mask_token_is_never_predicted_and_committed_positions_stay():
    logits = torch.zeros(2, 4, 10)
    logits[..., MASK] = 50.0  # the mask token holds every row's max
    logits[0, :, 7] = 5.0
    block = torch.tensor([[MASK, 9, MASK, MASK], [MASK, MASK, MASK, MASK]])
    out = _check(logits, block, 0, 16, 0.5)
    assert bool((out.prediction[block == MASK] != MASK).all())
    assert int(out.block[0, 1]) == 9 and float(out.confidence[0, 1]) == float("inf")
    assert int(out.prediction[1, 0]) == 0  # all logits tie without the mask token: the first


def test_the_commit_rule_by_hand():
    V = 8

    # Confidences 0.9, 0.95, 0.5, 0.5 at the four positions (one dominant token each).
    def row(conf):
        x = torch.full((V,), 0.0)
        x[5] = torch.log(torch.tensor(conf * (V - 2) / (1 - conf)))  # p(5) = conf (mask excluded)
        return x

    logits = torch.stack([row(c) for c in (0.9, 0.95, 0.5, 0.5)])[None]
    block = torch.full((1, 4), MASK)
    out = _check(logits, block, 0, 16, 0.8)  # two above 0.8: both committed
    assert out.block.tolist() == [[5, 5, MASK, MASK]] and int(out.num_committed) == 2
    out = _check(logits, block, 0, 16, 0.99)  # none above: the most confident one
    assert out.block.tolist() == [[MASK, 5, MASK, MASK]] and int(out.num_committed) == 1
    out = _check(logits, block, 14, 16, 0.99)  # ceil(4 / 2) = 2
    assert out.block.tolist() == [[5, 5, MASK, MASK]]
    out = _check(logits[:, 2:], block[:, 2:], 0, 16, 0.99)  # a tie: the lower position first
    assert out.block.tolist() == [[5, MASK]]
    out = _check(logits, block, 15, 16, 0.99)  # the last step commits everything
    assert out.block.tolist() == [[5, 5, 5, 5]] and int(out.num_committed) == 4


def test_mask_sampling_runs_it_on_the_fast_path_only(monkeypatch):
    import importlib

    ms = importlib.import_module("twotower_rt.ops.mask_sampling")
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 16, 64, generator=g) * 6
    block = torch.full((2, 16), MASK)
    calls = []
    original = ms._mask_decide_cpu  # what mask_sampling dispatches to, its arguments checked

    def counting(*a, **kw):
        calls.append(1)
        return original(*a, **kw)

    monkeypatch.setattr(ms, "_mask_decide_cpu", counting)
    args = dict(mask_token_id=MASK, step=0, steps_per_block=16, confidence_threshold=0.8)
    mask_sampling(logits, block, **args)
    assert len(calls) == 1
    with fastpath.disabled():
        mask_sampling(logits, block, **args)
    with _ext.kernels_disabled():
        mask_sampling(logits, block, **args)
    seeds = torch.zeros(2, dtype=torch.long)
    mask_sampling(logits, block, **args, temperature=0.5, seed=seeds, offset=seeds)
    mask_sampling(logits.double(), block, **args)
    assert len(calls) == 1


def test_bad_arguments_are_refused():
    logits, block = torch.zeros(1, 4, 8), torch.full((1, 4), MASK)
    kw = dict(mask_token_id=MASK, step=0, steps_per_block=16, confidence_threshold=0.8)
    with pytest.raises(ValueError, match="float32"):
        mask_decide_cpu(logits.double(), block, **kw)
    with pytest.raises(ValueError, match="int64"):
        mask_decide_cpu(logits, block.int(), **kw)
    with pytest.raises(ValueError, match="outside"):
        mask_decide_cpu(logits, block, **{**kw, "mask_token_id": 8})
    with pytest.raises(ValueError, match="steps_per_block"):
        mask_decide_cpu(logits, block, **{**kw, "steps_per_block": 0})
    with pytest.raises(ValueError, match="step"):
        mask_decide_cpu(logits, block, **{**kw, "step": torch.zeros(2, dtype=torch.long)})
