"""The fused Mamba-2 mixer middle on the CPU (twotower_rt._cpu, ops/mamba_cpu.py) against its
PyTorch reference (the model's eager ops), and the model's Mamba layers with it against the plain
eager path. The kernel agrees to float32 rounding, not bitwise; every row is computed alone, so
batching is checked bitwise."""

from __future__ import annotations

import math
import os

import pytest
import torch

import twotower_rt
from twotower_rt import _ext, fastpath
from twotower_rt.model.mamba import MambaState
from twotower_rt.ops.mamba_cpu import mamba_chunk, mamba_chunk_ref, mamba_weights

needs_kernel = pytest.mark.skipif(
    _ext.cpu_kernels() is None, reason=f"no CPU kernels: {_ext.cpu_kernels_error()}"
)


def test_kernels_built_where_expected():
    """CI builds the wheel with a C++ compiler: there the CPU kernels must be in it."""
    if os.environ.get("TWOTOWER_RT_EXPECT_CPU_KERNELS") != "1":
        pytest.skip("TWOTOWER_RT_EXPECT_CPU_KERNELS is not set")
    assert _ext.cpu_kernels() is not None, _ext.cpu_kernels_error()


def _layer(H, P, N, G, K, bias=True, limit=(0.0, math.inf), seed=0):
    g = torch.Generator().manual_seed(seed)
    d_inner = H * P
    conv_dim = d_inner + 2 * G * N
    weights = mamba_weights(
        torch.randn(K, conv_dim, generator=g) * 0.5,
        torch.randn(conv_dim, generator=g) if bias else None,
        torch.randn(H, generator=g), -torch.rand(H, generator=g) * 2 - 0.1,
        torch.randn(H, generator=g), torch.randn(d_inner, generator=g),
        heads=H, groups=G, eps=1e-5, time_step_limit=limit,
    )  # fmt: skip
    return weights, conv_dim


def _inputs(b, n, H, P, N, conv_dim, K, seed=1):
    g = torch.Generator().manual_seed(seed)
    zxbcdt = torch.randn(b, n, H * P + conv_dim + H, generator=g)
    conv_state = torch.randn(b, conv_dim, K, generator=g)
    ssm_state = torch.randn(b, H, P, N, generator=g)
    return zxbcdt, conv_state, ssm_state


SHAPES = [  # (H, P, N, G, K): the default model's, then awkward ones
    (6, 64, 32, 2, 4),
    (4, 8, 5, 2, 3),
    (3, 5, 9, 1, 4),
    (6, 3, 13, 3, 2),
    (2, 17, 8, 1, 1),
]


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("b,n", [(1, 1), (3, 1), (1, 16), (2, 7), (3, 19)])
@pytest.mark.parametrize("ragged", [False, True])
def test_kernel_matches_reference(shape, b, n, ragged):
    H, P, N, G, K = shape
    weights, conv_dim = _layer(H, P, N, G, K, bias=(n != 7))
    zxbcdt, conv_state, ssm_state = _inputs(b, n, H, P, N, conv_dim, K)
    n_valid = torch.tensor([(n * (r + 1)) // b - r % 2 for r in range(b)]).clamp(0, n)
    n_valid = n_valid if ragged else None
    before = (conv_state.clone(), ssm_state.clone())
    out, conv, ssm = mamba_chunk(zxbcdt, conv_state, ssm_state, weights, n_valid)
    ref_out, ref_conv, ref_ssm = mamba_chunk_ref(zxbcdt, conv_state, ssm_state, weights, n_valid)
    assert torch.equal(conv_state, before[0]) and torch.equal(ssm_state, before[1])  # read only
    assert torch.equal(conv, ref_conv)  # raw columns: copied, not computed
    torch.testing.assert_close(ssm, ref_ssm, rtol=2e-5, atol=2e-5)
    # Padding rows' outputs are garbage in both; compare the real tokens.
    valid = torch.ones(b, n, dtype=torch.bool) if n_valid is None else (
        torch.arange(n)[None, :] < n_valid[:, None])  # fmt: skip
    torch.testing.assert_close(out[valid], ref_out[valid], rtol=2e-5, atol=2e-5)
    assert torch.isfinite(out).all()


@needs_kernel
def test_time_step_limit_is_applied():
    H, P, N, G, K = 4, 8, 5, 2, 3
    weights, conv_dim = _layer(H, P, N, G, K, limit=(0.2, 0.6))
    args = _inputs(2, 5, H, P, N, conv_dim, K)
    got = mamba_chunk(*args, weights)
    want = mamba_chunk_ref(*args, weights)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)
    unclamped, _ = _layer(H, P, N, G, K)
    assert not torch.allclose(mamba_chunk(*args, unclamped)[2], got[2])


@needs_kernel
@pytest.mark.parametrize("n", [1, 16])
def test_rows_do_not_depend_on_the_batch(n):
    """Each row alone gives bitwise its batched result, ragged or not."""
    H, P, N, G, K = SHAPES[0]
    weights, conv_dim = _layer(H, P, N, G, K)
    zxbcdt, conv_state, ssm_state = _inputs(5, n, H, P, N, conv_dim, K)
    n_valid = torch.tensor([n, 0, max(n - 3, 0), 1, n])
    batched = mamba_chunk(zxbcdt, conv_state, ssm_state, weights, n_valid)
    for r in range(5):
        alone = mamba_chunk(zxbcdt[r : r + 1], conv_state[r : r + 1], ssm_state[r : r + 1],
                            weights, n_valid[r : r + 1])  # fmt: skip
        for a, full in zip(alone, batched):
            assert torch.equal(a[0], full[r])


@needs_kernel
def test_state_only_call_gives_the_same_states():
    """The rollback's replay (no output, the scan stops at n_valid) leaves bitwise the states
    of the full call with the same n_valid."""
    H, P, N, G, K = SHAPES[0]
    weights, conv_dim = _layer(H, P, N, G, K)
    zxbcdt, conv_state, ssm_state = _inputs(4, 16, H, P, N, conv_dim, K)
    keep = torch.tensor([0, 3, 16, 9])
    out, conv, ssm = mamba_chunk(zxbcdt, conv_state, ssm_state, weights, keep)
    none, conv2, ssm2 = mamba_chunk(zxbcdt, conv_state, ssm_state, weights, keep, False)
    assert none is None and torch.equal(conv, conv2) and torch.equal(ssm, ssm2)
    assert torch.equal(ssm2[0], ssm_state[0])  # keep 0: the state before the block


@needs_kernel
def test_bad_arguments_are_refused():
    H, P, N, G, K = SHAPES[1]
    weights, conv_dim = _layer(H, P, N, G, K)
    zxbcdt, conv_state, ssm_state = _inputs(2, 4, H, P, N, conv_dim, K)
    with pytest.raises(ValueError, match="zxbcdt"):
        mamba_chunk(zxbcdt.double(), conv_state, ssm_state, weights)
    with pytest.raises(ValueError, match="contiguous"):
        mamba_chunk(zxbcdt, conv_state.transpose(1, 2).contiguous().transpose(1, 2), ssm_state,
                    weights)  # fmt: skip
    with pytest.raises(ValueError, match="ssm_state"):
        mamba_chunk(zxbcdt, conv_state, ssm_state[:, :, :, :-1].contiguous(), weights)
    with pytest.raises(ValueError, match="n_valid"):
        mamba_chunk(zxbcdt, conv_state, ssm_state, weights, torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"n_valid outside \[0, n\]"):
        mamba_chunk(zxbcdt, conv_state, ssm_state, weights, torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="conv_dim"):
        mamba_weights(weights.conv_taps[:, :-1].contiguous(), None, weights.dt_bias, weights.A,
                      weights.D, weights.norm_weight, heads=H, groups=G, eps=1e-5)  # fmt: skip


def test_without_the_kernels_the_op_says_why():
    weights, conv_dim = _layer(*SHAPES[1])
    args = _inputs(1, 2, 4, 8, 5, conv_dim, 3)
    with _ext.kernels_disabled(), pytest.raises(RuntimeError, match="mamba_chunk.*turned off"):
        mamba_chunk(*args, weights)


@pytest.fixture(scope="module")
def mixer():
    return twotower_rt.load().lm.context_tower.layers[0].mixer


@needs_kernel
@pytest.mark.parametrize("n,ragged", [(1, False), (16, False), (16, True), (5, True)])
def test_model_layer_with_the_kernel_matches_the_eager_layer(mixer, n, ragged):
    """Mamba2Mixer.forward on the CPU fast path with the kernel vs the plain eager path and vs
    the fast path with the kernels off (the PyTorch ops)."""
    cfg = mixer.cfg
    g = torch.Generator().manual_seed(n)
    h = torch.randn(3, n, cfg.hidden_size, generator=g)
    state = MambaState.zeros(cfg, 3, torch.float32, "cpu")
    state.conv.normal_(generator=g)
    state.ssm.normal_(generator=g)
    n_valid = torch.tensor([n, n // 2, 0]) if ragged else None
    with torch.no_grad():
        with fastpath.disabled():
            want, want_state = mixer(h, state, n_valid)
        got, got_state = mixer(h, state, n_valid)
        with _ext.kernels_disabled():
            py_fast, py_state = mixer(h, state, n_valid)
    rows = [0, 1] if ragged else [0, 1, 2]
    for ref, ref_state in ((want, want_state), (py_fast, py_state)):
        torch.testing.assert_close(got[rows], ref[rows], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_state.ssm, ref_state.ssm, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_state.conv, ref_state.conv)
    # The new conv state is the last K raw xBC columns of the kernel path's own in_proj (each
    # row's up to its last real token), bitwise.
    with torch.no_grad():
        xbc = mixer.in_proj(h)[..., cfg.mamba_d_inner : cfg.mamba_d_inner + cfg.mamba_conv_dim]
    K = cfg.conv_kernel
    for r in range(3):
        end = n if n_valid is None else int(n_valid[r])
        history = torch.cat([state.conv[r].t(), xbc[r]])  # (K + n, conv_dim), time-major
        assert torch.equal(got_state.conv[r], history[end : end + K].t())
