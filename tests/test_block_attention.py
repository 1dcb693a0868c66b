"""block_attention: the reference against an independent per-row SDPA, and argument checks.
(GPU tests of the kernel: tests/test_block_attention_gpu.py.)"""

import pytest
import torch
import torch.nn.functional as F

from twotower_rt.ops import OP_BACKENDS, block_attention


def sdpa_row(q, k, v):
    """q (S, Hq, D), k/v (L, Hkv, D) -> (S, Hq, D) by torch SDPA with repeated KV heads."""
    rep = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).double(),
        k.transpose(0, 1).repeat_interleave(rep, 0).double(),
        v.transpose(0, 1).repeat_interleave(rep, 0).double(),
    )
    return out.transpose(0, 1)


@pytest.mark.parametrize("hq, hkv, S", [(32, 2, 16), (4, 4, 1), (6, 2, 7)])
@pytest.mark.parametrize("with_block", [True, False])
def test_against_sdpa_per_row(hq, hkv, S, with_block):
    g = torch.Generator().manual_seed(hq * 100 + S)
    B, L, D = 4, 19, 16
    q = torch.randn(B, S, hq, D, generator=g)
    k_cache, v_cache = (torch.randn(B, L, hkv, D, generator=g) for _ in range(2))
    k_block, v_block = (torch.randn(B, S, hkv, D, generator=g) for _ in range(2))
    lens = torch.tensor([19, 1, 0 if with_block else 5, 11])
    out = block_attention(q, k_cache, v_cache, lens, *((k_block, v_block) if with_block else ()))
    for b, n in enumerate(lens.tolist()):
        k, v = k_cache[b, :n], v_cache[b, :n]
        if with_block:
            k, v = torch.cat([k, k_block[b]]), torch.cat([v, v_block[b]])
        torch.testing.assert_close(out[b].double(), sdpa_row(q[b], k, v), atol=1e-5, rtol=1e-5)


def test_bf16_within_low_precision_cost():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 16, 8, 32, generator=g)
    kc, vc = (torch.randn(2, 40, 2, 32, generator=g) for _ in range(2))
    kb, vb = (torch.randn(2, 16, 2, 32, generator=g) for _ in range(2))
    lens = torch.tensor([40, 23])
    ref = block_attention(q, kc, vc, lens, kb, vb)
    low = block_attention(*(t.bfloat16() for t in (q, kc, vc)), lens, kb.bfloat16(), vb.bfloat16())
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05


@pytest.mark.parametrize(
    "change, message",
    [
        ({"q": torch.zeros(2, 4, 8)}, "expected q"),
        (
            {"k_cache": torch.zeros(2, 9, 3, 16), "v_cache": torch.zeros(2, 9, 3, 16)},
            "does not fit",
        ),
        ({"context_lens": torch.tensor([1, 2, 3])}, "context_lens must be"),
        ({"k_block": None}, "both k_block and v_block"),
        ({"k_block": torch.zeros(2, 5, 2, 16)}, "k_block and v_block must be"),
    ],
)
def test_bad_arguments(change, message):
    args = dict(
        q=torch.zeros(2, 4, 8, 16),
        k_cache=torch.zeros(2, 9, 2, 16),
        v_cache=torch.zeros(2, 9, 2, 16),
        context_lens=torch.tensor([3, 4]),
        k_block=torch.zeros(2, 4, 2, 16),
        v_block=torch.zeros(2, 4, 2, 16),
    )
    args.update(change)
    with pytest.raises(ValueError, match=message):
        block_attention(**args)


def test_backend_is_reported_honestly():
    backend, reason = OP_BACKENDS["block_attention"]("cpu")
    assert backend == "torch" and "block_attention_ref" in reason


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefix_causal_attention_on_gpu_matches_ref(dtype):
    """The context tower's multi-token append on a GPU (SDPA with the causal-prefix mask) against
    the fp32 reference (bf16: P and the products in bf16 inside SDPA)."""
    from twotower_rt.model.attention import prefix_causal_attention
    from twotower_rt.ops.block_attention import attention_ref

    g = torch.Generator(device="cuda").manual_seed(0)
    b, n, hq, hkv, d, span = 3, 37, 32, 2, 128, 300
    q = torch.randn(b, n, hq, d, device="cuda", generator=g).to(dtype)
    k = torch.randn(b, span, hkv, d, device="cuda", generator=g).to(dtype)
    v = torch.randn(b, span, hkv, d, device="cuda", generator=g).to(dtype)
    prefix = torch.tensor([0, 100, span - n], device="cuda")
    pos = prefix[:, None] + torch.arange(n, device="cuda")[None]
    allowed = torch.arange(span, device="cuda")[None, None] <= pos[:, :, None]
    out = prefix_causal_attention(q, k, v, allowed)
    ref = attention_ref(q.float(), k.float(), v.float(), allowed)
    atol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=atol)
