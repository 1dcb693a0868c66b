"""The trainer's chunked (SSD-style) scan against the per-token fp32 recurrence, the oracle:
seeded with non-zero initial states, on sequences shorter than, equal to and longer than the chunk
(ragged tails), with padding, and through a Mamba mixer (outputs, final and per-chunk states)."""

import pytest
import torch

from twotower_rt.builtin import load_builtin
from twotower_rt.model.mamba import MambaState, selective_scan_chunked, selective_scan_ref


def _inputs(b, n, H, P, N, g):
    x = torch.randn(b, n, H, P, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(b, n, H, generator=g) - 1.0)
    A = -torch.exp(torch.randn(H, generator=g))
    B = torch.randn(b, n, H, N, generator=g)
    C = torch.randn(b, n, H, N, generator=g)
    D = torch.randn(H, generator=g)
    state = torch.randn(b, H, P, N, generator=g)
    return x, dt, A, B, C, D, state


@pytest.mark.parametrize("n", [1, 5, 16, 19, 48, 99])
@pytest.mark.parametrize("chunk", [8, 16, 128])
def test_chunked_matches_ref_with_initial_state(n, chunk):
    g = torch.Generator().manual_seed(1000 * n + chunk)
    x, dt, A, B, C, D, state = _inputs(2, n, 3, 5, 7, g)
    seed_state = state.clone()
    y_ref, s_ref = selective_scan_ref(x, dt, A, B, C, D, state)
    y, s, chunks = selective_scan_chunked(x, dt, A, B, C, D, state, chunk=chunk)
    assert torch.equal(state, seed_state), "the initial state must not be modified"
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-4)
    assert chunks.shape == (2, -(-n // chunk), 3, 5, 7)
    for c in range(chunks.shape[1]):  # the state after chunk c is the ref's after that many tokens
        end = min((c + 1) * chunk, n)
        _, s_c = selective_scan_ref(x[:, :end], dt[:, :end], A, B[:, :end], C[:, :end], D, state)
        torch.testing.assert_close(chunks[:, c], s_c, rtol=1e-4, atol=1e-4)


def test_chunked_padding_carries_state():
    g = torch.Generator().manual_seed(7)
    x, dt, A, B, C, D, state = _inputs(3, 21, 2, 4, 6, g)
    valid = torch.arange(21)[None, :] < torch.tensor([21, 9, 1])[:, None]
    y_ref, s_ref = selective_scan_ref(x, dt, A, B, C, D, state, valid)
    y, s, _ = selective_scan_chunked(x, dt, A, B, C, D, state, valid, chunk=16)
    torch.testing.assert_close(y[valid], y_ref[valid], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-4)


def test_chunked_gradients_match_ref():
    g = torch.Generator().manual_seed(11)
    inputs = [t.requires_grad_() for t in _inputs(2, 37, 2, 3, 4, g)]
    grads = []
    for scan in (selective_scan_ref, lambda *a: selective_scan_chunked(*a, chunk=16)[:2]):
        y, s = scan(*inputs)
        grads.append(torch.autograd.grad((y.square().sum() + s.sum()), inputs))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("n", [3, 16, 40])
def test_mixer_chunked_switch(n):
    """A mixer with scan_chunk set gives the reference's outputs and states, seeded from a
    non-zero state, and its chunk_states are the states the reference reaches at each boundary."""
    lm = load_builtin()
    mixer = lm.context_tower.layers[0].mixer
    cfg = lm.cfg
    g = torch.Generator().manual_seed(n)
    h = torch.randn(2, n, cfg.hidden_size, generator=g)
    seed = MambaState(torch.randn(2, cfg.mamba_conv_dim, cfg.conv_kernel, generator=g),
                      torch.randn(2, cfg.mamba_num_heads, cfg.mamba_head_dim,
                                  cfg.ssm_state_size, generator=g))  # fmt: skip
    out_ref, st_ref = mixer(h, seed)
    try:
        mixer.scan_chunk = 16
        out, st = mixer(h, seed)
        chunks = mixer.chunk_states
    finally:
        mixer.scan_chunk = 0
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(st.ssm, st_ref.ssm, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(st.conv, st_ref.conv)
    for c in range(chunks.ssm.shape[1]):
        end = min((c + 1) * 16, n)
        _, st_c = mixer(h[:, :end], seed)
        torch.testing.assert_close(chunks.ssm[:, c], st_c.ssm, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(chunks.conv[:, c], st_c.conv)
