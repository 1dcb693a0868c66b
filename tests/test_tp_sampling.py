"""The vocabulary-parallel samplers against the one-process references: the ranks are threads of
this process sharing a fake group (all-gather through a barrier), each holding a slice of the
logits; every rank must come out with the reference's tokens."""

import threading

import pytest
import torch

from twotower_rt.ops.mask_sampling import mask_sampling_ref
from twotower_rt.ops.sample_tokens import sample_tokens_ref
from twotower_rt.parallel.sampling import tp_mask_sampling, tp_sample_tokens


class ThreadGroup:
    """``world`` threads as the ranks of a group: all_gather_last / all_reduce via a barrier."""

    def __init__(self, world):
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots = [None] * world

    def rank(self, r):
        group = self

        class Rank:
            rank, world = r, group.world

            def all_gather_last(self, t):
                group.slots[r] = t
                group.barrier.wait()
                out = torch.cat(list(group.slots), dim=-1)
                group.barrier.wait()
                return out

        return Rank()

    def run(self, fn):
        results = [None] * self.world

        def target(r):
            results[r] = fn(self.rank(r), r)

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        return results


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_tp_mask_sampling_is_the_reference(world, temperature):
    g = torch.Generator().manual_seed(world)
    B, S, V, mask = 3, 8, 96, 5
    logits = torch.randn(B, S, V, generator=g) * 3
    logits[0, :, mask] = 50.0  # the mask token must never win, even when its rank holds the max
    block = torch.full((B, S), mask)
    block[1, 2] = 17
    seed, offset = torch.tensor([1, 2, 3]), torch.tensor([0, 5, 9])
    step = torch.tensor([0, 3, 7])
    args = dict(mask_token_id=mask, step=step, steps_per_block=8, confidence_threshold=0.5,
                temperature=temperature, seed=seed, offset=offset)  # fmt: skip
    want = mask_sampling_ref(logits, block, **args)
    width = V // world
    outs = ThreadGroup(world).run(
        lambda tp, r: tp_mask_sampling(
            logits[..., r * width : (r + 1) * width], block, tp=tp, vocab_start=r * width, **args
        )
    )
    for out in outs:
        assert torch.equal(out.block, want.block) and torch.equal(out.masked, want.masked)
        assert torch.equal(out.prediction, want.prediction)
        assert torch.equal(out.num_committed, want.num_committed)
        torch.testing.assert_close(out.confidence, want.confidence, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("params", [(0.0, None, None), (0.9, None, None), (0.8, 10, None),
                                    (1.1, None, 0.8)])  # fmt: skip
def test_tp_sample_tokens_is_the_reference(world, params):
    temperature, top_k, top_p = params
    g = torch.Generator().manual_seed(7)
    B, V = 5, 96
    logits = torch.randn(B, V, generator=g) * 2
    seed, offset = torch.arange(B) * 11, torch.arange(B)
    want = sample_tokens_ref(logits, temperature, top_k, top_p, seed, offset)
    width = V // world
    outs = ThreadGroup(world).run(lambda tp, r: tp_sample_tokens(
        logits[:, r * width:(r + 1) * width], temperature, top_k, top_p, seed, offset, tp=tp,
        vocab_start=r * width))  # fmt: skip
    for out in outs:
        assert torch.equal(out, want), (out, want)
