"""Block attention on the CPU (twotower_rt._cpu's block_attention, ops/block_attention.py's
block_attention_cpu) against the PyTorch reference: the denoiser's whole block, the context
tower's causal append (cache writes included) and the one-token decode; each query alone,
bitwise; bad arguments refused before anything is written; the model's attention with it."""

from __future__ import annotations

import pytest
import torch

import twotower_rt
from twotower_rt import _ext
from twotower_rt.ops.block_attention import attention_ref, block_attention_cpu, block_attention_ref

pytestmark = pytest.mark.skipif(
    _ext.cpu_kernels() is None, reason=f"no CPU kernels: {_ext.cpu_kernels_error()}"
)

TOL = dict(rtol=2e-5, atol=2e-6)


def _case(B, S, hq, hkv, d, lens, capacity=None, rows=None, seed=0):
    """q, k_block, v_block as views of one fused projection (the model's layout), the caches,
    context lengths and a permutation of cache rows."""
    g = torch.Generator().manual_seed(seed)
    capacity = capacity or max(lens) + S + 3
    rows = rows or B + 1
    fused = torch.randn(B, S, (hq + 2 * hkv) * d, generator=g)
    q, k, v = torch.split(fused, [hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(B, S, hq, d), k.view(B, S, hkv, d), v.view(B, S, hkv, d)
    k_cache = torch.randn(rows, capacity, hkv, d, generator=g)
    v_cache = torch.randn(rows, capacity, hkv, d, generator=g)
    slots = torch.randperm(rows, generator=g)[:B]
    return q, k, v, k_cache, v_cache, torch.tensor(lens), slots


# (B, S, Hq, Hkv, D, lens): the default model's shapes, every GQA group size the kernel tiles
# (1..4 heads side by side, and 8 = 4 + 4), head dims with and without a 16-lane tail, contexts
# past one 64-key tile, and empty contexts.
SHAPES = [
    (1, 16, 6, 2, 32, [64]), (3, 16, 6, 2, 32, [64, 0, 17]), (2, 5, 4, 4, 16, [3, 130]),
    (2, 7, 8, 1, 7, [9, 1]), (1, 3, 12, 3, 64, [200]), (2, 4, 16, 2, 80, [5, 66]),
    (4, 1, 6, 2, 32, [80, 1, 0, 63]),
]  # fmt: skip


@pytest.mark.parametrize("B,S,hq,hkv,d,lens", SHAPES)
def test_whole_block_matches_the_reference(B, S, hq, hkv, d, lens):
    q, k, v, k_cache, v_cache, lens, slots = _case(B, S, hq, hkv, d, lens)
    before = k_cache.clone(), v_cache.clone()
    got = block_attention_cpu(q, k_cache, v_cache, lens, k, v, cache_slots=slots)
    want = block_attention_ref(q, k_cache, v_cache, lens, k, v, cache_slots=slots)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, **TOL)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])  # read only


@pytest.mark.parametrize("B,S,hq,hkv,d,lens", SHAPES)
def test_causal_append_matches_the_reference(B, S, hq, hkv, d, lens):
    """The context tower's append: the block's K/V written after each row's context, query s
    seeing the context and block keys [0, s]; the caches end up as the reference writes them."""
    q, k, v, k_cache, v_cache, lens, slots = _case(B, S, hq, hkv, d, lens, seed=1)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    pos = lens[:, None] + torch.arange(S)[None, :]
    want_k[slots[:, None], pos] = k
    want_v[slots[:, None], pos] = v
    span = int(lens.max()) + S
    allowed = torch.arange(span)[None, None, :] <= pos[:, :, None]
    want = attention_ref(q, want_k[slots, :span], want_v[slots, :span], allowed)
    got = block_attention_cpu(q, k_cache, v_cache, lens, k, v, cache_slots=slots, causal=True,
                              append=True)  # fmt: skip
    torch.testing.assert_close(got, want, **TOL)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def test_decode_is_a_causal_block_of_one():
    """The AR step: one new token over its prefix and itself, as the reference's decode reads
    it from the cache after the write."""
    q, k, v, k_cache, v_cache, lens, slots = _case(3, 1, 6, 2, 32, [64, 1, 30], seed=2)
    got = block_attention_cpu(q, k_cache, v_cache, lens, k, v, cache_slots=slots, causal=True,
                              append=True)  # fmt: skip
    want = block_attention_ref(q, k_cache, v_cache, lens + 1, cache_slots=slots)
    torch.testing.assert_close(got, want, **TOL)


def test_without_a_block_and_without_keys():
    """No block: the context alone (the reference's decode form); a query with no key at all
    gets zeros (the reference gives NaN there)."""
    q, _, _, k_cache, v_cache, lens, slots = _case(2, 1, 6, 2, 32, [10, 0], seed=3)
    got = block_attention_cpu(q, k_cache, v_cache, lens, cache_slots=slots)
    want = block_attention_ref(q, k_cache, v_cache, lens, cache_slots=slots)
    torch.testing.assert_close(got[0], want[0], **TOL)
    assert torch.equal(got[1], torch.zeros_like(got[1])) and want[1].isnan().all()
    # Without cache_slots each sequence reads its own row.
    plain = block_attention_cpu(q, k_cache[slots].contiguous(), v_cache[slots].contiguous(), lens)
    assert torch.equal(plain, got)


@pytest.mark.parametrize("causal", [False, True])
def test_each_query_alone(causal):
    """A sequence's outputs do not depend on the others in the call, nor on q/k/v being views
    of a fused projection or copies."""
    q, k, v, k_cache, v_cache, lens, slots = _case(3, 16, 6, 2, 32, [64, 5, 30], seed=4)
    together = block_attention_cpu(q, k_cache, v_cache, lens, k, v, cache_slots=slots,
                                   causal=causal)  # fmt: skip
    for b in range(3):
        alone = block_attention_cpu(q[b : b + 1].contiguous(), k_cache, v_cache, lens[b : b + 1],
                                    k[b : b + 1].contiguous(), v[b : b + 1].contiguous(),
                                    cache_slots=slots[b : b + 1], causal=causal)  # fmt: skip
        assert torch.equal(alone[0], together[b])
    if causal:  # and a query's output does not depend on the block keys after it
        first = block_attention_cpu(q[:, :4], k_cache, v_cache, lens, k[:, :4], v[:, :4],
                                    cache_slots=slots, causal=True)  # fmt: skip
        assert torch.equal(first, together[:, :4])


def test_bad_arguments_write_nothing():
    q, k, v, k_cache, v_cache, lens, slots = _case(2, 4, 6, 2, 32, [10, 20])
    before = k_cache.clone()

    def call(**over):
        args = dict(q=q, k_cache=k_cache, v_cache=v_cache, context_lens=lens, k_block=k,
                    v_block=v, cache_slots=slots, causal=True, append=True)  # fmt: skip
        args.update(over)
        return block_attention_cpu(**args)

    capacity = k_cache.shape[1]
    with pytest.raises(ValueError, match="context length is out of range"):
        call(context_lens=torch.tensor([10, capacity - 3]))  # the block would not fit
    with pytest.raises(ValueError, match="context length is out of range"):
        call(context_lens=torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="cache slot is out of range"):
        call(cache_slots=torch.tensor([0, k_cache.shape[0]]))
    assert torch.equal(k_cache, before)
    with pytest.raises(ValueError, match="float32 CPU"):
        call(q=q.double())
    with pytest.raises(ValueError, match="together"):
        call(v_block=None)
    with pytest.raises(ValueError, match="together"):
        call(k_block=None, v_block=None)  # append needs the block
    with pytest.raises(ValueError, match="must be"):
        call(k_block=k[:, :3], v_block=v[:, :3])
    with pytest.raises(ValueError, match="do not fit"):
        call(q=torch.randn(2, 4, 5, 32))
    with pytest.raises(ValueError, match="contiguous"):
        call(k_cache=k_cache.transpose(0, 1).contiguous().transpose(0, 1))
    with pytest.raises(ValueError, match="int CPU tensor"):
        call(context_lens=lens.float())
    with pytest.raises(ValueError, match="contiguous heads"):
        call(q=q.transpose(1, 2).contiguous().transpose(1, 2))
    assert torch.equal(k_cache, before)
    with _ext.kernels_disabled(), pytest.raises(RuntimeError, match="block_attention.*off"):
        call()


@pytest.mark.parametrize("append,n", [(False, 16), (True, 1), (True, 16)])
def test_model_attention_with_the_kernel_matches_the_pytorch_path(append, n):
    """Attention.forward with the kernel vs the fast path's PyTorch ops (kernels off): outputs
    close; the kernel path writes exactly its own k/v projections at [len, len + n) of each
    sequence's cache row and nothing else; ragged lengths and cache slots as the engine passes
    them."""
    from twotower_rt.model import cpu_fast

    lm = twotower_rt.load().lm
    attention = next(b.mixer for b in lm.context_tower.layers if b.kind == "attention")
    cfg = lm.cfg
    g = torch.Generator().manual_seed(n)
    h = torch.randn(2, n, cfg.hidden_size, generator=g)
    cache = torch.randn(2, 3, 64, cfg.num_key_value_heads, cfg.head_dim, generator=g)
    lens, slots = torch.tensor([40, 7]), torch.tensor([2, 0])
    k_cache, v_cache = cache[0].clone(), cache[1].clone()
    with torch.no_grad():
        got = attention(h, k_cache, v_cache, lens, append, slots, 40)
        _, k, v = cpu_fast.qkv(attention, h)
        with _ext.kernels_disabled():
            want = attention(h, cache[0].clone(), cache[1].clone(), lens, append, slots, 40)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want_k, want_v = cache[0].clone(), cache[1].clone()
    if append:
        pos = lens[:, None] + torch.arange(n)[None, :]
        want_k[slots[:, None], pos] = k.reshape(2, n, cfg.num_key_value_heads, cfg.head_dim)
        want_v[slots[:, None], pos] = v.reshape(2, n, cfg.num_key_value_heads, cfg.head_dim)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
