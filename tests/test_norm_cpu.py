"""The denoiser's time-modulated RMSNorm on the CPU (twotower_rt._cpu, ops/rmsnorm.py's
modulated_rms_norm_cpu) against its PyTorch reference (the ops cpu_fast.tower_forward runs
without the kernels), row by row bitwise, and the model's denoiser with it against eager."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import twotower_rt
from twotower_rt import _ext, fastpath
from twotower_rt.ops.rmsnorm import modulated_rms_norm_cpu, modulated_rms_norm_ref, rms_norm_cpu

pytestmark = pytest.mark.skipif(
    _ext.cpu_kernels() is None, reason=f"no CPU kernels: {_ext.cpu_kernels_error()}"
)


def _inputs(b, n, hidden, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, hidden, generator=g) * 2
    weight = torch.randn(hidden, generator=g)
    scale = 1 + torch.randn(b, hidden, generator=g) * 0.3
    shift = torch.randn(b, hidden, generator=g) * 0.5
    return x, weight, scale, shift


@pytest.mark.parametrize("post", [False, True])
@pytest.mark.parametrize("b,n,hidden", [(1, 1, 192), (1, 16, 192), (3, 16, 70), (2, 5, 17),
                                        (4, 3, 1), (2, 16, 2048)])  # fmt: skip
def test_kernel_matches_reference(post, b, n, hidden):
    x, weight, scale, shift = _inputs(b, n, hidden)
    got = modulated_rms_norm_cpu(x, weight, scale, shift, 1e-5, post=post)
    want = modulated_rms_norm_ref(x, weight, scale, shift, 1e-5, post=post)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_modulation_is_per_sequence():
    """Each sequence's rows take its own scale and shift: swapping sequences swaps outputs."""
    x, weight, scale, shift = _inputs(2, 4, 32)
    out = modulated_rms_norm_cpu(x, weight, scale, shift, 1e-5, post=False)
    swapped = modulated_rms_norm_cpu(x.flip(0).contiguous(), weight, scale.flip(0).contiguous(),
                                     shift.flip(0).contiguous(), 1e-5, post=False)  # fmt: skip
    assert torch.equal(out, swapped.flip(0))
    assert not torch.allclose(out[0], modulated_rms_norm_cpu(
        x[:1], weight, scale[1:], shift[1:], 1e-5, post=False)[0])  # fmt: skip


@pytest.mark.parametrize("post", [False, True])
def test_rows_do_not_depend_on_the_batch(post):
    x, weight, scale, shift = _inputs(3, 16, 192, seed=1)
    together = modulated_rms_norm_cpu(x, weight, scale, shift, 1e-5, post=post)
    for r in range(3):
        alone = modulated_rms_norm_cpu(x[r : r + 1], weight, scale[r : r + 1],
                                       shift[r : r + 1], 1e-5, post=post)  # fmt: skip
        assert torch.equal(alone[0], together[r])
        for t in (0, 7, 15):  # and a token alone is its row in the block
            token = x[r : r + 1, t : t + 1].contiguous()
            one = modulated_rms_norm_cpu(token, weight, scale[r : r + 1], shift[r : r + 1], 1e-5,
                                         post=post)  # fmt: skip
            assert torch.equal(one[0, 0], together[r, t])


@pytest.mark.parametrize("b,n,hidden", [(1, 1, 192), (2, 16, 192), (3, 5, 17), (1, 4, 1)])
def test_plain_norm_matches_f_rms_norm_row_by_row(b, n, hidden):
    """rms_norm_cpu (the kernel without scale and shift: the context tower's norms) against
    F.rms_norm, and each row alone gives its bits in the full call."""
    x, weight, _, _ = _inputs(b, n, hidden, seed=3)
    got = rms_norm_cpu(x, weight, 1e-5)
    torch.testing.assert_close(got, F.rms_norm(x, (hidden,), weight, 1e-5), rtol=2e-5, atol=2e-5)
    for r in range(b):
        for t in range(n):
            one = rms_norm_cpu(x[r : r + 1, t : t + 1].contiguous(), weight, 1e-5)
            assert torch.equal(one[0, 0], got[r, t])


def test_bad_arguments_are_refused():
    x, weight, scale, shift = _inputs(2, 3, 8)
    ok = dict(eps=1e-5, post=False)
    with pytest.raises(ValueError, match="x must be"):
        modulated_rms_norm_cpu(x[0], weight, scale, shift, **ok)
    with pytest.raises(ValueError, match="weight must be a float32 CPU tensor of shape"):
        modulated_rms_norm_cpu(x, weight[:4], scale, shift, **ok)
    with pytest.raises(ValueError, match="scale must be"):
        modulated_rms_norm_cpu(x, weight, scale.double(), shift, **ok)
    with pytest.raises(ValueError, match="shift must be"):
        modulated_rms_norm_cpu(x, weight, scale, shift[:1], **ok)
    with pytest.raises(ValueError, match="x must be contiguous"):
        modulated_rms_norm_cpu(x.transpose(0, 1).contiguous().transpose(0, 1), weight, scale,
                               shift, **ok)  # fmt: skip
    with pytest.raises(ValueError, match="x must be a float32"):
        modulated_rms_norm_cpu(x.bfloat16(), weight, scale, shift, **ok)
    with pytest.raises(ValueError, match="scale and shift together"):
        modulated_rms_norm_cpu(x, weight, scale, None, **ok)
    with pytest.raises(ValueError, match="weight must be a float32 CPU tensor of shape"):
        rms_norm_cpu(x, weight[:4], 1e-5)


def test_without_the_kernels_the_op_says_why(monkeypatch):
    monkeypatch.setattr(_ext, "_CPU", None)
    x, weight, scale, shift = _inputs(1, 1, 8)
    with pytest.raises(RuntimeError, match="modulated_rms_norm"):
        modulated_rms_norm_cpu(x, weight, scale, shift, 1e-5, post=True)


@torch.no_grad()
def test_denoiser_with_the_kernel_matches_eager():
    """The default model's denoiser logits for a block at several t: the fast path with the
    kernels (modulated norms, addcmul residuals) against the plain eager path."""
    model = twotower_rt.load()
    lm = model.lm
    from twotower_rt.model.cache import ContextCache

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, lm.cfg.vocab_size, (2, 32), generator=g)
    block = torch.randint(4, lm.cfg.vocab_size, (2, 16), generator=g)
    block[0, 5:] = 3
    block[1, :] = 3
    results = {}
    for name in ("fast", "eager"):
        cache = ContextCache.allocate(lm.cfg, 2, 64, lm.dtype, lm.device)
        ctx = fastpath.disabled() if name == "eager" else contextlib.nullcontext()
        with ctx:
            lm.context_forward(prompt, cache)
            t = (block == 3).sum(-1).float() / 16
            results[name] = lm.denoiser_logits(block, cache, prefix_len=cache.lengths,
                                               mamba_states=cache.mamba, t=t)  # fmt: skip
    torch.testing.assert_close(results["fast"], results["eager"], rtol=1e-4, atol=1e-4)
