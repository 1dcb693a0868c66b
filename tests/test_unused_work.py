"""Work nobody reads is skipped, and what is still computed keeps its bits.

- A context pass whose hidden states nobody reads (a prefill chunk, a block commit:
  ``context_forward(..., hidden=False)``) stops once the cache is written: the last attention
  layer only writes its K/V, and no layer after it (nor norm_f) runs. The cache it leaves must be
  the full pass's, bit for bit, on every path (CPU kernels, PyTorch fast path, eager).
- A denoiser forward with ``needed`` runs the layers after the last position-mixing layer only on
  the positions some row needs; its logits there must be the full forward's, bit for bit.

Each test also checks that the skip happens (the skipped layer's calls and shapes), so it cannot
pass by the feature doing nothing."""

from __future__ import annotations

import contextlib

import pytest
import torch

import twotower_rt
from twotower_rt import _ext, fastpath
from twotower_rt.model.cache import ContextCache

PATHS = ("kernels", "fast_no_kernels", "eager")


@pytest.fixture(scope="module")
def model():
    return twotower_rt.load(dtype=torch.float32)


def _path(path: str) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    if path != "kernels":
        stack.enter_context(_ext.kernels_disabled())
    stack.enter_context(fastpath.forced(path != "eager"))
    return stack


def _caches(lm, b: int, context: int, seed: int) -> tuple[ContextCache, ContextCache]:
    """Two equal caches of b rows holding ``context`` random committed tokens each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, lm.cfg.vocab_size, (b, context), generator=g)
    pair = []
    for _ in range(2):
        cache = ContextCache.allocate(lm.cfg, b, context + 40, torch.float32, torch.device("cpu"))
        lm.context_forward(ids, cache)
        pair.append(cache)
    return pair[0], pair[1]


def _assert_same_cache(a: ContextCache, b: ContextCache) -> None:
    assert torch.equal(a.lengths, b.lengths)
    for i in a.keys:
        assert torch.equal(a.keys[i], b.keys[i]) and torch.equal(a.values[i], b.values[i])
    assert a.mamba.keys() == b.mamba.keys()
    for i in a.mamba:
        assert torch.equal(a.mamba[i].conv, b.mamba[i].conv)
        assert torch.equal(a.mamba[i].ssm, b.mamba[i].ssm)


@contextlib.contextmanager
def _calls(module: torch.nn.Module):
    """Records the shape of every input ``module`` is called with."""
    shapes = []
    handle = module.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    try:
        yield shapes
    finally:
        handle.remove()


@torch.inference_mode()
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("b,n,ragged", [(1, 16, False), (3, 16, True), (2, 5, False)])
def test_context_pass_without_hidden_writes_the_same_cache(model, path, b, n, ragged):
    lm = model.lm
    tower = lm.context_tower
    kinds = lm.cfg.layer_kinds
    assert kinds[tower.last_mixer] == "attention" and tower.last_mixer < len(kinds) - 1
    full, lean = _caches(lm, b, 24, seed=b * 10 + n)
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(4, lm.cfg.vocab_size, (b, n), generator=g)
    n_valid = torch.tensor([n, n - 2, 1][:b]) if ragged else None
    tail = tower.layers[-1].mixer  # a position-wise layer after the last attention layer
    with _path(path):
        with _calls(tail) as full_calls:
            hidden = lm.context_forward(ids, full, n_valid)
        with _calls(tail) as lean_calls:
            none = lm.context_forward(ids, lean, n_valid, hidden=False)
    assert hidden.shape == (b, n, lm.cfg.hidden_size) and none is None
    assert len(full_calls) == 1 and lean_calls == []
    _assert_same_cache(full, lean)


@torch.inference_mode()
def test_context_pass_without_hidden_on_pool_slots(model):
    """A block commit as the engine makes it: a batch over some of a pool's slots."""
    lm = model.lm
    pool_full, pool_lean = _caches(lm, 5, 20, seed=7)
    slots = torch.tensor([3, 0, 4])
    ids = torch.randint(4, lm.cfg.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    for pool, hidden in ((pool_full, True), (pool_lean, False)):
        batch = pool.select(slots, max_length=20)
        lm.context_forward(ids, batch, hidden=hidden)
        pool.store(batch, appended=16)
    _assert_same_cache(pool_full, pool_lean)


def test_outputs_false_needs_append(model):
    lm = model.lm
    cache = ContextCache.allocate(lm.cfg, 1, 8, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="append"):
        lm.denoiser_tower(torch.zeros(1, 2, dtype=torch.long), cache, prefix_len=cache.lengths,
                          mamba_states=cache.mamba, append=False, outputs=False)  # fmt: skip


NEEDED = [
    [[1] * 16],  # a fresh block: nothing left out
    [[1, 0, 0, 1] * 4],
    [[0] * 15 + [1]],
    [[1, 1, 0, 0] * 4, [0, 0, 0, 0] * 4, [0, 1, 1, 0] * 4],  # position 3 needed by no row
    [[0] * 16, [0] * 8 + [1] * 8],
]


@torch.inference_mode()
@pytest.mark.parametrize("needed", NEEDED)
def test_denoiser_logits_on_needed_positions_are_the_full_forward_bitwise(model, needed):
    lm = model.lm
    needed = torch.tensor(needed, dtype=torch.bool)
    b, S = needed.shape
    cache, _ = _caches(lm, b, 30, seed=S + b)
    g = torch.Generator().manual_seed(int(needed.sum()))
    block = torch.randint(4, lm.cfg.vocab_size, (b, S), generator=g)
    block[needed] = 3  # the needed positions are the masked ones
    t = needed.sum(dim=-1).float() / S
    args = dict(prefix_len=cache.lengths, mamba_states=cache.mamba, t=t)
    tail = lm.denoiser_tower.layers[-1].mixer
    with _calls(tail) as full_calls:
        full = lm.denoiser_logits(block, cache, **args)
    with _calls(tail) as lean_calls:
        lean = lm.denoiser_logits(block, cache, needed=needed, **args)
    kept = int(needed.any(dim=0).sum())
    assert full_calls == [(b, S, lm.cfg.hidden_size)]
    if _ext.cpu_kernels() is not None:  # the tail runs on the kept positions alone
        assert lean_calls == [(b, kept if 0 < kept < S else S, lm.cfg.hidden_size)]
    assert lean.shape == full.shape
    assert torch.equal(lean[needed], full[needed])
    assert not lean[~needed].any()


@torch.inference_mode()
@pytest.mark.parametrize("path", PATHS)
def test_tower_rows_are_the_full_forward_rows(model, path):
    """``Tower.forward``'s ``rows`` on every path: the hidden states at those positions, bitwise
    where each row is computed alone (the CPU kernels), else to float32 rounding (a matmul's
    rounding may depend on its row count)."""
    lm = model.lm
    cache, _ = _caches(lm, 2, 12, seed=3)
    ids = torch.randint(4, lm.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    rows = torch.tensor([0, 5, 6, 15])
    args = dict(prefix_len=cache.lengths, mamba_states=cache.mamba, append=False)
    with _path(path):
        full, _ = lm.context_tower(ids, cache, **args)
        lean, _ = lm.context_tower(ids, cache, rows=rows, **args)
    want = full.index_select(1, rows)
    if path == "kernels" and _ext.cpu_kernels() is not None:
        assert torch.equal(lean, want)
    else:
        torch.testing.assert_close(lean, want, rtol=1e-5, atol=1e-5)
