"""The CPU fast paths (twotower_rt.fastpath, model/cpu_fast.py) against the plain eager path.

Each piece that claims bitwise equality is checked bitwise against its reference on fresh random
inputs at awkward shapes; the whole model is checked by generation: the same tokens with the fast
paths on and off, in every mode, alone and batched (the golden cases run with them on, as
everything does by default: tests/test_golden.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import twotower_rt
from twotower_rt import fastpath
from twotower_rt.model import cpu_fast
from twotower_rt.ops.moe import moe_experts_ref, moe_experts_sorted
from twotower_rt.ops.rmsnorm import rms_norm, rms_norm_ref
from twotower_rt.ops.ssm_scan import selective_scan_fast, selective_scan_ref, ssm_scan_ref


@pytest.fixture(scope="module")
def default_model():
    return twotower_rt.load()


@pytest.mark.parametrize(
    "b,n", [(1, 1), (2, 1), (16, 1), (2, 2), (1, 16), (3, 7), (5, 19), (16, 16)]
)
@pytest.mark.parametrize("ragged", [False, True])
def test_selective_scan_fast_is_the_recurrence_bitwise(b, n, ragged):
    g = torch.Generator().manual_seed(b * 100 + n)
    H, P, N = 6, 64, 32
    x = torch.randn(b, n, H, P, generator=g)
    dt = torch.rand(b, n, H, generator=g)
    A, D = -torch.rand(H, generator=g), torch.randn(H, generator=g)
    B, C = torch.randn(b, n, H, N, generator=g), torch.randn(b, n, H, N, generator=g)
    state = torch.randn(b, H, P, N, generator=g)
    valid = torch.rand(b, n, generator=g) < 0.7 if ragged else None
    before = state.clone()
    y_ref, s_ref = selective_scan_ref(x, dt, A, B, C, D, state, valid)
    y, s = selective_scan_fast(x, dt, A, B, C, D, state, valid)
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref)
    assert torch.equal(state, before)  # the given state is not modified


@pytest.mark.parametrize("n", [1, 4, 16])
def test_ssm_scan_ref_fast_with_groups_and_padding(n):
    g = torch.Generator().manual_seed(n)
    b, H, P, G, N = 2, 6, 64, 2, 32
    x = torch.randn(b, n, H, P, generator=g)
    dt = torch.rand(b, n, H, generator=g)
    A, D = -torch.rand(H, generator=g), torch.randn(H, generator=g)
    B, C = torch.randn(b, n, G, N, generator=g), torch.randn(b, n, G, N, generator=g)
    state = torch.randn(b, H, P, N, generator=g)
    n_valid = torch.tensor([n, max(n - 2, 0)])
    with fastpath.disabled():
        y_ref, s_ref = ssm_scan_ref(x, dt, A, B, C, D, state, n_valid)
    y, s = ssm_scan_ref(x, dt, A, B, C, D, state, n_valid)
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize("b,n", [(1, 1), (1, 16), (7, 3), (16, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_taps_is_conv1d_bitwise(b, n, bias):
    g = torch.Generator().manual_seed(b + n)
    C, K = 1664, 4
    window = torch.randn(b, K - 1 + n, C, generator=g)  # time-major
    weight = torch.randn(C, 1, K, generator=g)
    conv_bias = torch.randn(C, generator=g) if bias else None
    want = F.conv1d(window.transpose(1, 2).contiguous(), weight, conv_bias, groups=C)
    taps = weight[:, 0].t().contiguous().unbind(0)
    got = cpu_fast.conv_taps(window, taps, conv_bias, n)
    assert torch.equal(got, want.transpose(1, 2))


@pytest.mark.parametrize("tokens", [1, 2, 16, 19, 64, 257])
def test_moe_experts_sorted_is_the_loop_bitwise(default_model, tokens):
    moe = next(b.mixer for b in default_model.lm.denoiser_tower.layers if b.kind == "moe")
    x = torch.randn(tokens, default_model.config.hidden_size,
                    generator=torch.Generator().manual_seed(tokens))  # fmt: skip
    with torch.no_grad():
        ids, weights = moe.gate(x)
        with fastpath.disabled():  # the experts' own modules, as the eager path runs them
            want = moe_experts_ref(x, ids, weights, moe.experts)
        got = moe_experts_sorted(x, ids, weights, *moe.stacked_weights())
    assert torch.equal(got, want)


def test_router_fast_equals_router(default_model):
    moe = next(b.mixer for b in default_model.lm.context_tower.layers if b.kind == "moe")
    x = torch.randn(33, default_model.config.hidden_size)
    with torch.no_grad():
        with fastpath.disabled():
            want = moe.gate(x)
        got = moe.gate(x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("shape", [(1, 1, 192), (3, 16, 192), (2, 5, 384)])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_fast_is_the_reference_bitwise(shape, gated, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).to(dtype)
    w = torch.randn(shape[-1], generator=g).to(dtype)
    gate = torch.randn(shape, generator=g).to(dtype) if gated else None
    group = shape[-1] // 2 if gated else None
    want = rms_norm_ref(x, w, 1e-5, gate=gate, group_size=group)
    assert torch.equal(rms_norm(x, w, 1e-5, gate=gate, group_size=group), want)


def test_rms_norm_fast_still_refuses_bad_arguments():
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(torch.randn(2, 8), torch.randn(7), 1e-5)
    with pytest.raises(ValueError, match="group_size"):
        rms_norm(torch.randn(2, 8), torch.randn(8), 1e-5, group_size=3)


def test_switch_and_environment():
    assert fastpath.enabled()
    with fastpath.disabled():
        assert not fastpath.enabled()
        with fastpath.forced(True):
            assert fastpath.enabled()
        assert not fastpath.enabled()
    assert fastpath.enabled()


def test_constants_follow_weight_updates(default_model):
    """A cached derived tensor (the K-major weight copy) is remade after an in-place write."""
    lm = twotower_rt.load().lm
    head = lm.context_lm_head
    h = torch.randn(1, 3, lm.cfg.hidden_size)
    with torch.no_grad():
        first = head(h)
        head.weight.mul_(2)
        second = head(h)
    torch.testing.assert_close(second, 2 * first)


PROMPTS = [[5, 17, 301, 44, 9], [1, 2], [800, 4, 4, 4, 12, 13, 99, 1000, 7]]


@pytest.mark.parametrize("mode", ["ar", "mask_diffusion", "mock_ar"])
@pytest.mark.parametrize("sampled", [False, True])
def test_generation_equals_the_eager_path(default_model, mode, sampled):
    params = dict(max_new_tokens=16, seed=[3, 4, 5])
    if sampled:
        params["temperature"] = 0.8
    if mode == "mask_diffusion":
        params["confidence_threshold"] = 0.8
    with fastpath.disabled():
        want = default_model.generate(PROMPTS, mode=mode, **params)
    got = default_model.generate(PROMPTS, mode=mode, **params)
    assert got.sequences == want.sequences
    assert got.nfe == want.nfe
    # batch invariance: each row alone gives its batched tokens
    for i, prompt in enumerate(PROMPTS):
        alone = default_model.generate([prompt], mode=mode, **{**params, "seed": params["seed"][i]})
        assert alone.sequences[0] == got.sequences[i]


def test_modulation_by_value_follows_the_time_embedding():
    """The denoiser's modulation on the fast path: without the CPU kernels, the eager sum
    bitwise; with them, made once per value of t from a one-row time embedding (so each row is
    the same whatever its batch, bitwise), close to the batched eager sum, and remade after a
    weight update."""
    from twotower_rt import _ext

    lm = twotower_rt.load().lm
    t = torch.tensor([1.0, 0.5, 1.0, 0.0625, 0.5])
    with torch.no_grad():
        eager = torch.stack(list(lm.scale_shift_tables))[:, None] + lm.time_embedding(t)
        with _ext.kernels_disabled():
            assert torch.equal(cpu_fast.modulation(lm, t), eager)
        if _ext.cpu_kernels() is None:
            pytest.skip(f"no CPU kernels: {_ext.cpu_kernels_error()}")
        got = cpu_fast.modulation(lm, t)
        assert got.shape == eager.shape
        torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)
        for i in range(len(t)):
            assert torch.equal(got[:, i], cpu_fast.modulation(lm, t[i : i + 1])[:, 0])
        assert torch.equal(got[:, 0], got[:, 2])
        lm.t_block[1].weight.mul_(2)
        moved = cpu_fast.modulation(lm, t)
        want = torch.stack(list(lm.scale_shift_tables))[:, None] + lm.time_embedding(t)
        torch.testing.assert_close(moved, want, rtol=1e-6, atol=1e-6)
        assert not torch.equal(moved, got)
        lm.scale_shift_tables[3].add_(0.25)  # a table's write is seen too
        shifted = cpu_fast.modulation(lm, t)
        want = torch.stack(list(lm.scale_shift_tables))[:, None] + lm.time_embedding(t)
        torch.testing.assert_close(shifted, want, rtol=1e-6, atol=1e-6)
        assert not torch.equal(shifted[3], moved[3]) and torch.equal(shifted[2], moved[2])
