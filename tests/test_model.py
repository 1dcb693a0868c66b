"""Layer-level invariants of the PyTorch model (the oracle every kernel is checked against)."""

import math

import pytest
import torch
import torch.nn.functional as F

from twotower_rt.builtin import load_builtin
from twotower_rt.model.mamba import MambaState, selective_scan_ref
from twotower_rt.ops.block_attention import attention_ref


@pytest.fixture(scope="module")
def lm():
    return load_builtin()


def mamba_layer(lm):
    i = lm.cfg.layer_kinds.index("mamba")
    return i, lm.context_tower.layers[i].mixer


def random_state(cfg, b, g, scale=1.0):
    st = MambaState.zeros(cfg, b, torch.float32, "cpu")
    st.conv.normal_(generator=g)
    st.ssm.normal_(generator=g).mul_(scale)
    return st


def test_seeded_block_scan_equals_token_by_token(lm):
    """The known trap: a 16-token scan seeded with a context state must equal 16 decode steps."""
    g = torch.Generator().manual_seed(0)
    _, mixer = mamba_layer(lm)
    h = torch.randn(3, 16, lm.cfg.hidden_size, generator=g)
    seed = random_state(lm.cfg, 3, g)
    block_out, block_state = mixer(h, seed)
    state, outs = seed, []
    for i in range(16):
        out, state = mixer(h[:, i : i + 1], state)
        outs.append(out)
    torch.testing.assert_close(block_out, torch.cat(outs, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(block_state.ssm, state.ssm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(block_state.conv, state.conv)
    # the seed itself is never written
    assert not torch.equal(seed.ssm, block_state.ssm)


def test_scan_matches_float64_recurrence():
    g = torch.Generator().manual_seed(1)
    b, n, H, P, N = 2, 19, 4, 8, 5
    x, B, C = (torch.randn(b, n, H, k, generator=g) for k in (P, N, N))
    dt = F.softplus(torch.randn(b, n, H, generator=g))
    A, D = -torch.rand(H, generator=g) * 4, torch.rand(H, generator=g)
    s0 = torch.randn(b, H, P, N, generator=g)
    y, s = selective_scan_ref(x, dt, A, B, C, D, s0)
    s64, ys = s0.double(), []
    for t in range(n):  # written independently, in float64, one head at a time
        s64 = (
            s64 * torch.exp(dt[:, t].double() * A.double())[..., None, None]
            + (dt[:, t].double()[..., None] * x[:, t].double())[..., None]
            * B[:, t].double()[:, :, None, :]
        )
        ys.append((s64 * C[:, t].double()[:, :, None, :]).sum(-1) + D.double()[:, None] * x[:, t])
    torch.testing.assert_close(y.double(), torch.stack(ys, 1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s.double(), s64, atol=1e-4, rtol=1e-4)


def test_padded_rows_equal_unpadded(lm):
    """Rows of different lengths in one call (right padding) give each row's own result."""
    g = torch.Generator().manual_seed(2)
    _, mixer = mamba_layer(lm)
    lengths = torch.tensor([5, 1, 0, 9])
    h = torch.randn(4, 9, lm.cfg.hidden_size, generator=g)
    seed = random_state(lm.cfg, 4, g)
    out, state = mixer(h, seed, lengths)
    for r, n in enumerate(lengths.tolist()):
        row_seed = seed.index_select(torch.tensor([r]))
        if n == 0:
            torch.testing.assert_close(state.ssm[r], row_seed.ssm[0])
            torch.testing.assert_close(state.conv[r], row_seed.conv[0])
            continue
        o, s = mixer(h[r : r + 1, :n], row_seed)
        torch.testing.assert_close(out[r, :n], o[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state.ssm[r], s.ssm[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state.conv[r], s.conv[0])


def test_bf16_scan_stays_finite_with_large_states():
    """A bf16 model scans in fp32: large state values must not overflow to inf/NaN."""
    lm16 = load_builtin(dtype=torch.bfloat16)
    _, mixer = mamba_layer(lm16)
    g = torch.Generator().manual_seed(3)
    seed = random_state(lm16.cfg, 2, g, scale=1e30)
    seed.conv = seed.conv.to(torch.bfloat16)
    assert seed.ssm.dtype == torch.float32
    h = torch.randn(2, 16, lm16.cfg.hidden_size, generator=g).to(torch.bfloat16)
    out, state = mixer(h, seed)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert state.ssm.dtype == torch.float32 and torch.isfinite(state.ssm).all()


def test_attention_ref_against_sdpa():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 7, 8, 16, generator=g)
    k, v = torch.randn(2, 11, 2, 16, generator=g), torch.randn(2, 11, 2, 16, generator=g)
    allowed = torch.rand(2, 7, 11, generator=g) > 0.4
    allowed[..., 0] = True
    out = attention_ref(q, k, v, allowed)
    for r in range(2):
        want = F.scaled_dot_product_attention(
            q[r].transpose(0, 1),
            k[r].transpose(0, 1).repeat_interleave(4, 0),
            v[r].transpose(0, 1).repeat_interleave(4, 0),
            attn_mask=allowed[r],
        ).transpose(0, 1)
        torch.testing.assert_close(out[r], want, atol=1e-5, rtol=1e-5)


def test_denoiser_attention_sees_only_its_rows_prefix(lm):
    """Per-row context lengths over a padded cache: garbage past a row's length is never read."""
    i = lm.cfg.layer_kinds.index("attention")
    attn = lm.denoiser_tower.layers[i].mixer
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 4, lm.cfg.hidden_size, generator=g)
    cache_k = torch.randn(2, 10, 2, 16, generator=g)
    cache_v = torch.randn(2, 10, 2, 16, generator=g)
    lengths = torch.tensor([3, 7])
    out = attn(h, cache_k, cache_v, lengths, append=False)
    poisoned_k, poisoned_v = cache_k.clone(), cache_v.clone()
    for r, n in enumerate(lengths.tolist()):
        poisoned_k[r, n:] = 1e4
        poisoned_v[r, n:] = -1e4
    torch.testing.assert_close(attn(h, poisoned_k, poisoned_v, lengths, append=False), out)
    # and row 0 alone, with an exact-length cache, agrees
    alone = attn(h[:1], cache_k[:1, :3], cache_v[:1, :3], lengths[:1], append=False)
    torch.testing.assert_close(out[:1], alone, atol=1e-5, rtol=1e-5)


def test_router_float64_choice_and_weights(lm):
    i = lm.cfg.layer_kinds.index("moe")
    moe = lm.context_tower.layers[i].mixer
    cfg = lm.cfg
    g = torch.Generator().manual_seed(6)
    x = torch.randn(37, cfg.hidden_size, generator=g)
    ids, weights = moe.gate(x)
    bias = moe.gate.e_score_correction_bias.double()
    for t in range(37):  # per token, written from the spec
        scores = [
            1 / (1 + math.exp(-float(x[t].double() @ moe.gate.weight[e].double())))
            for e in range(cfg.n_routed_experts)
        ]
        biased = [s + float(b) for s, b in zip(scores, bias)]
        top = sorted(range(len(biased)), key=lambda e: -biased[e])[: cfg.num_experts_per_tok]
        assert sorted(ids[t].tolist()) == sorted(top)
        total = sum(scores[e] for e in top) + 1e-20
        for slot, e in enumerate(ids[t].tolist()):
            assert weights[t, slot].item() == pytest.approx(
                scores[e] / total * cfg.routed_scaling_factor, rel=1e-6
            )


def test_moe_output_against_per_token_loop(lm):
    i = lm.cfg.layer_kinds.index("moe")
    moe = lm.context_tower.layers[i].mixer
    g = torch.Generator().manual_seed(7)
    h = torch.randn(2, 9, lm.cfg.hidden_size, generator=g)
    out = moe(h)
    x = h.reshape(-1, h.shape[-1])
    ids, weights = moe.gate(x)
    want = []
    for t in range(x.shape[0]):
        acc = sum(weights[t, s] * moe.experts[e](x[t]) for s, e in enumerate(ids[t].tolist()))
        want.append(acc + moe.shared_experts(x[t]))
    torch.testing.assert_close(
        out.reshape(-1, h.shape[-1]), torch.stack(want), atol=1e-5, rtol=1e-5
    )


def test_dense_mlp_layers_run():
    """'-' layers (dense relu^2 MLP) load and run in every mode."""
    from twotower_rt.api import TwoTowerModel

    model = TwoTowerModel(load_builtin(hybrid_override_pattern="M-*E"), "test")
    for mode in ("ar", "mock_ar", "mask_diffusion"):
        out = model.generate([[4, 5, 6], [9]], mode=mode, max_new_tokens=16)
        assert [len(s) for s in out.sequences] == [19, 17]
