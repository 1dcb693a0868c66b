"""mamba_decode_step: the reference is the mixer's own arithmetic for one token (bitwise), the
mixer's switch, the wrapper's plumbing on the CPU (a fake extension reading the raw pointers), and
the fused kernel against the reference on a GPU."""

import math

import pytest
import torch
from helpers import install_fake_extension, raw_view

from twotower_rt import _ext
from twotower_rt.builtin import load_builtin
from twotower_rt.generate import generate
from twotower_rt.model.mamba import MambaState
from twotower_rt.ops import mamba_decode_backend, mamba_decode_step, mamba_decode_step_ref


def mixers(lm):
    return [b.mixer for t in (lm.context_tower, lm.denoiser_tower) for b in t.layers
            if b.kind == "mamba"]  # fmt: skip


def random_state(cfg, b, dtype, gen, scale=1.0, device="cpu"):
    conv = torch.randn(b, cfg.mamba_conv_dim, cfg.conv_kernel, generator=gen, device=device)
    ssm = torch.randn(b, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size,
                      generator=gen, device=device) * scale  # fmt: skip
    return MambaState(conv.to(dtype), ssm)


def ref_args(mixer, zxbcdt, state):
    return (zxbcdt, state.conv, mixer.conv1d.weight, mixer.conv1d.bias, mixer.dt_bias,
            mixer.A_log, mixer.D, state.ssm, mixer.norm.weight)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_mixer_bitwise(dtype):
    lm = load_builtin(dtype=dtype)
    mixer = mixers(lm)[0]
    cfg = mixer.cfg
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 1, cfg.hidden_size, generator=gen).to(dtype)
    state = random_state(cfg, 3, dtype, gen)
    # The mixer in PyTorch ops, projections included: the CPU kernels (twotower_rt._cpu) round
    # their own way.
    with torch.inference_mode(), _ext.kernels_disabled():
        out, new = mixer(h, state)
        y, conv, ssm = mamba_decode_step_ref(*ref_args(mixer, mixer.in_proj(h)[:, 0], state),
                                             cfg.layer_norm_epsilon, cfg.n_groups,
                                             cfg.time_step_limit)  # fmt: skip
        assert torch.equal(mixer.out_proj(y[:, None]), out)
    assert torch.equal(conv, new.conv) and torch.equal(ssm, new.ssm)


def test_mixer_switch_gives_the_same_generation():
    lm = load_builtin(dtype=torch.float32)
    prompts = [[1, 5, 9, 33], [1, 7]]
    want = generate(lm, prompts, mode="ar", max_new_tokens=12).sequences
    for mixer in mixers(lm):
        mixer.fused_decode = True
    got = generate(lm, prompts, mode="ar", max_new_tokens=12).sequences
    assert got == want


class FakeExtension:
    """Stands in for twotower_rt._C.mamba_decode_step on the CPU: reads the pointers and
    computes with mamba_decode_step_ref."""

    def __init__(self, n_groups, dtype, has_bias):
        self.calls, self.n_groups, self.dtype, self.has_bias = [], n_groups, dtype, has_bias

    def mamba_decode_step(self, **a):
        self.calls.append(a)
        b, H, P, N, G, K = (a[k] for k in ("batch", "heads", "head_dim", "state_size", "groups",
                                            "kernel"))  # fmt: skip
        dt = self.dtype
        d_inner, conv_dim = H * P, H * P + 2 * G * N
        row = d_inner + conv_dim + H
        zx = raw_view(a["zxbcdt"], (b, row), (a["zxbcdt_stride"], 1), dt)
        conv = raw_view(a["conv_state"], (b, conv_dim, K), (conv_dim * K, K, 1), dt)
        w = raw_view(a["conv_weight"], (conv_dim, K), (K, 1), dt)
        bias = raw_view(a["conv_bias"], (conv_dim,), (1,), dt) if a["conv_bias"] else None
        vec = {k: raw_view(a[k], (H,), (1,), dt) for k in ("dt_bias", "A_log", "D")}
        ssm = raw_view(a["ssm_state"], (b, H, P, N), (H * P * N, P * N, N, 1), torch.float32)
        norm_w = raw_view(a["norm_weight"], (d_inner,), (1,), dt)
        y, new_conv, new_ssm = mamba_decode_step_ref(
            zx, conv, w, bias, vec["dt_bias"], vec["A_log"], vec["D"], ssm, norm_w, a["eps"], G,
            (a["dt_min"], a["dt_max"]),
        )  # fmt: skip
        raw_view(a["out"], (b, d_inner), (d_inner, 1), dt).copy_(y)
        raw_view(a["conv_state_out"], (b, conv_dim, K), (conv_dim * K, K, 1), dt).copy_(new_conv)
        raw_view(a["ssm_state_out"], (b, H, P, N), (H * P * N, P * N, N, 1), torch.float32).copy_(
            new_ssm
        )


def test_wrapper_plumbing(monkeypatch):
    lm = load_builtin(dtype=torch.bfloat16)
    mixer = mixers(lm)[1]
    cfg = mixer.cfg
    fake = FakeExtension(cfg.n_groups, torch.bfloat16, mixer.conv1d.bias is not None)
    install_fake_extension(monkeypatch, fake, "twotower_rt.ops.mamba_decode")
    gen = torch.Generator().manual_seed(3)
    state = random_state(cfg, 2, torch.bfloat16, gen)
    wide = torch.randn(2, cfg.mamba_in_proj_dim + 5, generator=gen).bfloat16()
    zxbcdt = wide[:, 3 : 3 + cfg.mamba_in_proj_dim]  # a strided row
    with torch.inference_mode():
        args = ref_args(mixer, zxbcdt, state)
        got = mamba_decode_step(*args, cfg.layer_norm_epsilon, cfg.n_groups, (0.0, math.inf))
        want = mamba_decode_step_ref(*args, cfg.layer_norm_epsilon, cfg.n_groups)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert fake.calls[-1]["zxbcdt_stride"] == cfg.mamba_in_proj_dim + 5


# --- the CUDA kernel -----------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)

GPU_CONFIGS = [
    # the real model's Mamba layer (hidden kept small: only in_proj's output matters here)
    dict(hidden_size=64, mamba_num_heads=64, mamba_head_dim=64, n_groups=8, ssm_state_size=128),
    dict(hidden_size=64, mamba_num_heads=6, mamba_head_dim=64, n_groups=2, ssm_state_size=32),
    dict(hidden_size=64, mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16),
]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("overrides", GPU_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("limit", [(0.0, math.inf), (0.01, 0.5)])
def test_kernel_matches_ref(overrides, dtype, limit):
    backend, reason = mamba_decode_backend("cuda", dtype)
    if backend != "cuda":
        pytest.skip(f"the CUDA kernel does not run here: {reason}")
    lm = load_builtin(device="cuda", dtype=dtype, **overrides)
    mixer = mixers(lm)[0]
    cfg = mixer.cfg
    gen = torch.Generator(device="cuda").manual_seed(7)
    for b, scale in ((1, 1.0), (5, 1e3)):
        state = random_state(cfg, b, dtype, gen, scale=scale, device="cuda")
        zxbcdt = torch.randn(b, cfg.mamba_in_proj_dim, generator=gen, device="cuda").to(dtype)
        before = (state.conv.clone(), state.ssm.clone())
        with torch.inference_mode():
            args = ref_args(mixer, zxbcdt, state)
            got = mamba_decode_step(*args, cfg.layer_norm_epsilon, cfg.n_groups, limit)
            want = mamba_decode_step_ref(*args, cfg.layer_norm_epsilon, cfg.n_groups, limit)
        torch.cuda.synchronize()
        assert torch.equal(state.conv, before[0]) and torch.equal(state.ssm, before[1])
        assert torch.equal(got[1], want[1])  # the shifted conv state is a copy
        # bf16: the conv's fp32 sum in another order can round x, B or C to a neighbouring bf16.
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got[2], want[2], rtol=tol, atol=tol * scale)
        torch.testing.assert_close(got[0].float(), want[0].float(), rtol=tol, atol=tol)
