"""The MoE layer on the CPU (twotower_rt._cpu, ops/moe_cpu.py) against its PyTorch reference (the
model's router and expert loop), and the model's MoE with it against the plain eager path. The
kernel agrees to float32 rounding; tokens are computed alone, so that is checked bitwise."""

from __future__ import annotations

import pytest
import torch

import twotower_rt
from twotower_rt import _ext, fastpath
from twotower_rt.model import cpu_fast
from twotower_rt.ops.moe_cpu import moe_forward, moe_forward_ref, moe_weights

pytestmark = pytest.mark.skipif(
    _ext.cpu_kernels() is None, reason=f"no CPU kernels: {_ext.cpu_kernels_error()}"
)


def _weights(E, hidden, inter, shared_inter, top_k, norm=True, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    shared = (None, None)
    if shared_inter:
        shared = (torch.randn(shared_inter, hidden, generator=g) / hidden**0.5,
                  torch.randn(hidden, shared_inter, generator=g) / shared_inter**0.5)  # fmt: skip
    return moe_weights(
        torch.randn(E, hidden, generator=g) / hidden**0.5, torch.randn(E, generator=g) * 0.1,
        torch.randn(E, inter, hidden, generator=g) / hidden**0.5,
        torch.randn(E, hidden, inter, generator=g) / inter**0.5, *shared, top_k=top_k,
        norm_topk_prob=norm, routed_scaling_factor=scale,
    )  # fmt: skip


CASES = [  # (E, hidden, inter, shared_inter, top_k, norm, scale)
    (8, 192, 128, 256, 2, True, 1.0),  # the default model's
    (5, 70, 33, 0, 1, True, 1.0),
    (7, 129, 64, 19, 3, False, 2.5),
    (3, 64, 5, 64, 3, True, 0.5),
    (1, 17, 1, 0, 1, True, 1.0),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tokens", [1, 3, 5, 16, 19])
def test_kernel_matches_reference(case, tokens):
    E, hidden, inter, shared_inter, top_k, norm, scale = case
    weights = _weights(E, hidden, inter, shared_inter, top_k, norm, scale)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens))
    got = moe_forward(x, weights)
    want = moe_forward_ref(x, weights)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("case", CASES[:3])
def test_tokens_do_not_depend_on_each_other(case):
    """Each token alone gives bitwise its output among 19 (whatever experts the others pick)."""
    E, hidden, inter, shared_inter, top_k, norm, scale = case
    weights = _weights(E, hidden, inter, shared_inter, top_k, norm, scale)
    x = torch.randn(19, hidden, generator=torch.Generator().manual_seed(1))
    together = moe_forward(x, weights)
    for t in range(19):
        assert torch.equal(moe_forward(x[t : t + 1].contiguous(), weights)[0], together[t])


def test_bad_arguments_are_refused():
    weights = _weights(*CASES[1][:5])
    with pytest.raises(ValueError, match="x must be a float32"):
        moe_forward(torch.randn(2, 70, dtype=torch.float64), weights)
    with pytest.raises(ValueError, match=r"\(T, 70\)"):
        moe_forward(torch.randn(2, 71), weights)
    with pytest.raises(ValueError, match="contiguous"):
        moe_forward(torch.randn(70, 2).t(), weights)
    with pytest.raises(ValueError, match="top_k"):
        moe_weights(torch.randn(4, 8), torch.randn(4), torch.randn(4, 3, 8), torch.randn(4, 8, 3),
                    top_k=5)  # fmt: skip
    with pytest.raises(ValueError, match="shared"):
        moe_weights(torch.randn(4, 8), torch.randn(4), torch.randn(4, 3, 8), torch.randn(4, 8, 3),
                    torch.randn(6, 8), None, top_k=2)  # fmt: skip
    with pytest.raises(ValueError, match="expert shapes"):
        moe_weights(torch.randn(4, 8), torch.randn(4), torch.randn(4, 3, 8), torch.randn(4, 3, 8),
                    top_k=2)  # fmt: skip


@pytest.mark.parametrize("tokens", [1, 16, 48])
def test_model_moe_with_the_kernel_matches_the_eager_layer(tokens):
    moe = twotower_rt.load().lm.denoiser_tower.layers[1].mixer
    h = torch.randn(1, tokens, moe.cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert cpu_fast.moe_forward(moe, h) is not None  # the kernel serves this MoE
        with fastpath.disabled():
            want = moe(h)
        got = moe(h)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_weight_updates_reach_the_kernel():
    """The K-major copies are remade after an in-place write to an expert."""
    moe = twotower_rt.load().lm.context_tower.layers[1].mixer
    h = torch.randn(1, 4, moe.cfg.hidden_size)
    with torch.no_grad():
        first = moe(h)
        for expert in moe.experts:
            expert.down_proj.weight.mul_(2)
        moe.shared_experts.down_proj.weight.mul_(2)
        second = moe(h)
    torch.testing.assert_close(second, 2 * first)


@pytest.mark.parametrize("case", CASES[:3])
def test_bf16_weights_are_kept_as_bf16_with_the_same_bits(case):
    """Expert weights that are all bfloat16 values (a bf16 checkpoint loaded as fp32) are kept as
    bfloat16, half the bytes; the kernel widens them exactly, so its outputs are those of the
    same weights kept as fp32, bitwise. One value off the bf16 grid keeps them all fp32."""
    import dataclasses

    E, hidden, inter, shared, k, norm, scale = case
    g = torch.Generator().manual_seed(5)
    raw = [torch.randn(E, inter, hidden, generator=g) / hidden**0.5,
           torch.randn(E, hidden, inter, generator=g) / inter**0.5]  # fmt: skip
    if shared:
        raw += [torch.randn(shared, hidden, generator=g) / hidden**0.5,
                torch.randn(hidden, shared, generator=g) / shared**0.5]  # fmt: skip
    raw = [w.bfloat16().float() for w in raw]
    router, bias = torch.randn(E, hidden, generator=g), torch.randn(E, generator=g) * 0.1
    pair = raw[2:] if shared else []
    packed = moe_weights(router, bias, *raw[:2], *pair, top_k=k, norm_topk_prob=norm,
                         routed_scaling_factor=scale)  # fmt: skip
    assert packed.up.dtype == packed.down.dtype == torch.bfloat16
    as_fp32 = dataclasses.replace(
        packed, up=packed.up.float(), down=packed.down.float(),
        shared_up=None if not shared else packed.shared_up.float(),
        shared_down=None if not shared else packed.shared_down.float(),
    )  # fmt: skip
    x = torch.randn(19, hidden, generator=g)
    got = moe_forward(x, packed)
    assert torch.equal(got, moe_forward(x, as_fp32))
    torch.testing.assert_close(got, moe_forward_ref(x, packed), rtol=1e-4, atol=1e-5)
    raw[0][0, 0, 0] += 1e-3  # off the grid: every expert weight stays fp32
    off = moe_weights(router, bias, *raw[:2], *pair, top_k=k)
    assert off.up.dtype == off.down.dtype == torch.float32
