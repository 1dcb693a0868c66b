"""The dense CPU projection (twotower_rt._cpu's linear, ops/linear_cpu.py) against float64 and
torch.mm, row by row bitwise, its padded and unpadded weights alike, and the model's projections
through it against the eager layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import twotower_rt
from twotower_rt import _ext, fastpath
from twotower_rt.model import cpu_fast
from twotower_rt.ops.linear_cpu import k_major, linear_cpu, linear_cpu_ref

pytestmark = pytest.mark.skipif(
    _ext.cpu_kernels() is None, reason=f"no CPU kernels: {_ext.cpu_kernels_error()}"
)

# rows: one, the 4-row tiles and each remainder; in / out: the default model's projections and
# widths that leave every kind of column tail (64-wide blocks, 16-wide, < 16).
SHAPES = [(1, 192, 902), (16, 192, 902), (3, 384, 192), (16, 192, 2048), (5, 37, 70),
          (7, 192, 15), (4, 1, 17), (2, 33, 129), (17, 64, 80), (6, 5, 1)]  # fmt: skip


def _case(rows, k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    weight = torch.randn(n, k, generator=g) / k**0.5  # as a Linear holds it: (out, in)
    bias = torch.randn(n, generator=g)
    return x, weight, bias


@pytest.mark.parametrize("rows,k,n", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_float64(rows, k, n, with_bias):
    x, weight, bias = _case(rows, k, n)
    bias = bias if with_bias else None
    want = x.double() @ weight.double().t() + (0 if bias is None else bias.double())
    padded = linear_cpu(x, k_major(weight), bias, out_features=n)
    plain = linear_cpu(x, weight.t().contiguous(), bias)
    # fp32 chains of k fused multiply-adds: within k ulps of the magnitudes summed
    bound = 2 * k * torch.finfo(torch.float32).eps * (x.abs() @ weight.abs().t() + 1)
    for got in (padded, plain):
        assert got.shape == (rows, n) and got.dtype == torch.float32
        assert ((got.double() - want).abs() <= bound.double()).all()
    torch.testing.assert_close(plain, linear_cpu_ref(x, weight.t().contiguous(), bias))
    # The vector tail over padded rows and the one-at-a-time tail compute the same chains.
    assert torch.equal(padded, plain)


@pytest.mark.parametrize("rows,k,n", SHAPES[:6])
def test_bf16_weights_give_the_fp32_bits(rows, k, n):
    """A weight whose values are all bfloat16 values is kept as bfloat16 (k_major), half the
    bytes, and widened exactly: the outputs are bitwise those of the same weight as float32. One
    value off the bf16 grid keeps it float32."""
    x, weight, bias = _case(rows, k, n, seed=2)
    weight = weight.bfloat16().float()
    packed = k_major(weight)
    assert packed.dtype == torch.bfloat16
    got = linear_cpu(x, packed, bias, out_features=n)
    assert torch.equal(got, linear_cpu(x, packed.float(), bias, out_features=n))
    torch.testing.assert_close(got, linear_cpu_ref(x, packed, bias, out_features=n))
    weight[0, 0] += 1e-3
    assert k_major(weight).dtype == torch.float32


def test_exact_where_every_sum_is_representable():
    """Small integers: every product and partial sum is exact in float32, so the result is the
    exact integer product, whatever the order (an independent check of what is summed)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-8, 9, (9, 40), generator=g).float()
    weight = torch.randint(-8, 9, (75, 40), generator=g).float()
    bias = torch.randint(-100, 100, (75,), generator=g).float()
    want = (x.long() @ weight.long().t() + bias.long()).float()
    assert torch.equal(linear_cpu(x, k_major(weight), bias, out_features=75), want)


@pytest.mark.parametrize("rows,k,n", [(16, 192, 902), (13, 64, 80), (3, 384, 192)])
def test_rows_do_not_depend_on_the_call(rows, k, n):
    """Each row alone, or in another group of rows, gives the same bits as in the full call."""
    x, weight, bias = _case(rows, k, n, seed=1)
    w = k_major(weight)
    together = linear_cpu(x, w, bias, out_features=n)
    for r in range(rows):
        assert torch.equal(linear_cpu(x[r : r + 1], w, bias, out_features=n)[0], together[r])
    for start in (1, 2, 3):
        part = linear_cpu(x[start:], w, bias, out_features=n)
        assert torch.equal(part, together[start:])


def test_strided_rows():
    """x may be a view with a row stride beyond its width (a slice of a wider projection)."""
    x, weight, _ = _case(5, 48, 40)
    wide = torch.randn(5, 100)
    wide[:, 10:58] = x
    view = wide[:, 10:58]
    assert view.stride() == (100, 1)
    w = k_major(weight)
    assert torch.equal(linear_cpu(view, w, out_features=40), linear_cpu(x, w, out_features=40))


def test_empty_and_degenerate():
    w = torch.randn(8, 16)
    assert linear_cpu(torch.randn(0, 8), w).shape == (0, 16)
    assert linear_cpu(torch.randn(3, 8), w, out_features=0).shape == (3, 0)
    bias = torch.randn(5)
    out = linear_cpu(torch.randn(2, 0), torch.randn(0, 5), bias)
    assert torch.equal(out, bias.expand(2, 5))


def test_bad_arguments():
    x, w = torch.randn(3, 8), torch.randn(8, 16)
    with pytest.raises(ValueError, match="float32 CPU"):
        linear_cpu(x.double(), w)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        linear_cpu(x, w.half())
    with pytest.raises(ValueError, match="K-major"):
        linear_cpu(x, torch.randn(16, 8))
    with pytest.raises(ValueError, match="out_features"):
        linear_cpu(x, w, out_features=17)
    with pytest.raises(ValueError, match="bias must be"):
        linear_cpu(x, w, torch.randn(15))
    with pytest.raises(ValueError, match="contiguous"):
        linear_cpu(x, torch.randn(16, 8).t())
    with pytest.raises(ValueError, match="unit column stride"):
        linear_cpu(torch.randn(8, 3).t(), w)
    with pytest.raises(ValueError, match="do not overlap"):
        linear_cpu(torch.randn(1, 8).expand(3, 8), w)
    with pytest.raises(ValueError, match=r"\(rows, in\)"):
        linear_cpu(torch.randn(8), w)
    with _ext.kernels_disabled(), pytest.raises(RuntimeError, match="linear.*turned off"):
        linear_cpu(x, w)


@pytest.fixture(scope="module")
def lm():
    return twotower_rt.load().lm


def test_model_projections_match_the_eager_layers(lm):
    """A Mamba in_proj, a head and an attention's q/k/v through the kernel vs F.linear."""
    attention = next(b.mixer for b in lm.context_tower.layers if b.kind == "attention")
    mamba = next(b.mixer for b in lm.context_tower.layers if b.kind == "mamba")
    h = torch.randn(2, 16, lm.cfg.hidden_size)
    with torch.no_grad():
        for layer in (mamba.in_proj, mamba.out_proj, lm.lm_head):
            x = torch.randn(2, 16, layer.in_features)
            got = layer(x)
            assert got.shape == (2, 16, layer.out_features) and got.is_contiguous()
            torch.testing.assert_close(got, F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
        got = cpu_fast.qkv(attention, h)
        for out, proj in zip(got, (attention.q_proj, attention.k_proj, attention.v_proj)):
            torch.testing.assert_close(out, F.linear(h, proj.weight), rtol=1e-5, atol=1e-5)


def test_the_kernel_runs_only_on_the_fast_path(lm, monkeypatch):
    calls = []
    C = _ext.cpu_kernels()

    class Spy:
        def __getattr__(self, name):
            return getattr(C, name)

        def linear(self, *args):
            calls.append(args[4:7])
            return C.linear(*args)

    monkeypatch.setattr(_ext, "_CPU", Spy())
    x = torch.randn(1, 3, lm.cfg.hidden_size)
    with torch.no_grad():
        lm.lm_head(x)
        assert calls == [(3, lm.cfg.hidden_size, lm.cfg.vocab_size)]
        with fastpath.disabled():
            lm.lm_head(x)
    assert len(calls) == 1


def test_weight_writes_are_followed(lm):
    """The kernel's padded copy is remade after an in-place write, as the K-major copy of the
    kernel-less path is."""
    head = lm.context_lm_head
    h = torch.randn(1, 3, lm.cfg.hidden_size)
    for kernels in (True, False):
        with torch.no_grad(), _ext.kernels_disabled() if not kernels else torch.no_grad():
            first = head(h)
            head.weight.mul_(2)
            second = head(h)
            head.weight.div_(2)
        torch.testing.assert_close(second, 2 * first)


def test_denoiser_head_on_the_needed_rows_alone(lm):
    """denoiser_logits(needed=...): the head runs on the needed positions alone, their logits
    bitwise the full head's, zeros elsewhere; without the kernels it is the full head."""
    from twotower_rt.model.cache import ContextCache

    cfg = lm.cfg
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(4, cfg.vocab_size, (2, 12), generator=g)
    cache = ContextCache.allocate(cfg, 2, 64, lm.dtype, lm.device)
    with torch.no_grad():
        lm.context_forward(prompt, cache)
        block = torch.randint(4, cfg.vocab_size, (2, 16), generator=g)
        needed = torch.rand(2, 16, generator=g) < 0.5
        needed[0, 0] = True
        block[needed] = 3
        args = dict(prefix_len=torch.tensor([12, 12]), mamba_states=cache.mamba,
                    t=needed.sum(-1).float() / 16)  # fmt: skip
        full = lm.denoiser_logits(block, cache, **args)
        part = lm.denoiser_logits(block, cache, **args, needed=needed)
        assert torch.equal(part[needed], full[needed])
        assert not part[~needed].any()
        none = lm.denoiser_logits(block, cache, **args, needed=torch.zeros_like(needed))
        assert not none.any() and none.shape == full.shape
        with _ext.kernels_disabled():
            eager_full = lm.denoiser_logits(block, cache, **args)
            assert torch.equal(lm.denoiser_logits(block, cache, **args, needed=needed), eager_full)
