"""block_attention's CUDA kernel: the split planner, the variant choice and the wrapper's plumbing
on the CPU (a fake extension that runs the kernel's split-and-merge algorithm in PyTorch on the raw
pointers it is handed), and the kernels themselves (mma_sync and the unverified wgmma variant)
against block_attention_ref on a GPU."""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import install_fake_extension, raw_view

from twotower_rt import _ext
from twotower_rt.ops import block_attention, block_attention_backend, block_attention_ref
from twotower_rt.ops.block_attention import MAX_SPLITS, VARIANTS, kernel_variant, plan_splits

# --- the split planner --------------------------------------------------------------------------


def test_plan_fills_the_gpu_at_batch_one_and_stays_whole_when_full():
    # Real model, one sequence, 8k context: 8 CTAs without splitting, so split.
    s = plan_splits(1, 16, 32, 2, 128, 8192 + 16, num_sms=132)
    assert s > 8
    # Each split keeps >= 256 keys (one per row), so partials never outweigh the K/V they merge.
    assert math.ceil((8192 + 16) / 64) // s >= 4
    # Batch 64 already has 512 CTAs: no split.
    assert plan_splits(64, 16, 32, 2, 128, 8192 + 16, num_sms=132) == 1
    # Decode: 16 rows per KV head, splits of >= 2 tiles.
    d = plan_splits(1, 1, 32, 2, 128, 32768, num_sms=132)
    assert 1 < d <= MAX_SPLITS and 512 / d >= 2
    # Batch 64 decode: 128 CTAs, 396 slots: 3 splits fill one wave; 4 would need a second.
    assert plan_splits(64, 1, 32, 2, 128, 8192, num_sms=132) == 3


@pytest.mark.parametrize("max_keys", [0, 1, 63, 64, 65, 1000, 10**6])
@pytest.mark.parametrize("batch", [1, 3, 64, 1000])
def test_plan_bounds(max_keys, batch):
    s = plan_splits(batch, 16, 6, 2, 64, max_keys, num_sms=132)
    assert 1 <= s <= MAX_SPLITS
    assert s == 1 or math.ceil(max_keys / 64) // s >= 2


# --- the kernel variant -------------------------------------------------------------------------


def test_variant_wgmma_covers_the_denoise_step_at_head_dim_128():
    assert kernel_variant("wgmma", 16, 32, 2, 128) == ("wgmma", None)  # the real model
    assert kernel_variant("wgmma", 17, 4, 4, 128) == ("wgmma", None)  # 17 rows: past decode
    assert kernel_variant("mma_sync", 16, 32, 2, 128) == ("mma_sync", None)
    assert kernel_variant("mma_sync", 1, 32, 2, 64) == ("mma_sync", None)


@pytest.mark.parametrize(
    "seq, hq, hkv, d, why",
    [
        (16, 32, 2, 64, "head_dim 128, not 64"),
        (16, 8, 2, 32, "head_dim 128, not 32"),
        (1, 32, 2, 128, "16 query rows per KV head (decode)"),
        (4, 4, 1, 128, "16 query rows per KV head"),
        (3, 4, 4, 128, "3 query rows per KV head"),
    ],
)
def test_variant_wgmma_falls_back_with_a_reason(seq, hq, hkv, d, why):
    variant, reason = kernel_variant("wgmma", seq, hq, hkv, d)
    assert variant == "mma_sync" and why in reason


def test_unknown_variant_is_rejected_on_every_path():
    with pytest.raises(ValueError, match="variant must be one of"):
        kernel_variant("tma", 16, 32, 2, 128)
    q, kc, vc, lens, kb, vb = _case(2, 3, 4, 2, 16, 9, [9, 4])
    with pytest.raises(ValueError, match="variant must be one of"):
        block_attention(q, kc, vc, lens, kb, vb, variant="WGMMA")
    # The PyTorch path ignores a valid variant.
    got = block_attention(q, kc, vc, lens, kb, vb, variant="wgmma")
    assert torch.equal(got, block_attention_ref(q, kc, vc, lens, kb, vb))


@pytest.mark.skipif(
    "block_attention" not in _ext.extension_info().get("ops", ()),
    reason="the extension is not built with block_attention here",
)
def test_launcher_rejects_a_bad_variant_before_touching_the_gpu():
    C = _ext.extension_module()
    args = dict(
        q=256, q_strides=(0, 0, 128), k_cache=256, k_cache_strides=(0, 128, 128), v_cache=256,
        v_cache_strides=(0, 128, 128), context_lens=256, cache_slots=0, k_block=0,
        k_block_strides=(0, 0, 0), v_block=0, v_block_strides=(0, 0, 0), out=256,
        out_strides=(0, 0, 128), partial_out=0, partial_lse=0, batch=1, seq=16, q_heads=2,
        kv_heads=1, head_dim=128, block_len=0, num_splits=1, softmax_scale=0.1, variant=1,
        device=0, stream=0,
    )  # fmt: skip
    with pytest.raises(ValueError, match="variant must be 0"):
        C.block_attention(**{**args, "variant": 2})
    with pytest.raises(ValueError, match="wgmma variant is built for head_dim 128 only, got 64"):
        C.block_attention(**{**args, "head_dim": 64, "q_strides": (0, 0, 64)})


# --- the wrapper's plumbing, on the CPU ---------------------------------------------------------


class FakeExtension:
    """Stands in for twotower_rt._C.block_attention on the CPU: reads the pointers and strides it
    is given and runs the kernel's algorithm (each sequence's key tiles dealt to the splits,
    partial outputs with their log2-sum-exp, the merge in split order) with fp32 PyTorch ops."""

    def __init__(self):
        self.calls = []

    def block_attention(self, **a):
        self.calls.append(a)
        B, S, hq, hkv, D = (a[k] for k in ("batch", "seq", "q_heads", "kv_heads", "head_dim"))
        nb, splits = a["block_len"], a["num_splits"]
        bf16 = torch.bfloat16
        q = raw_view(a["q"], (B, S, hq, D), (*a["q_strides"], 1), bf16).float()
        lens = raw_view(a["context_lens"], (B,), (1,), torch.int32)
        slots = raw_view(a["cache_slots"], (B,), (1,), torch.int32) if a["cache_slots"] else None
        out = raw_view(a["out"], (B, S, hq, D), (*a["out_strides"], 1), bf16)
        for b in range(B):
            slot = int(slots[b]) if slots is not None else b
            n_ctx = int(lens[b])
            keys, values = [], []
            for name, ks in (("k", keys), ("v", values)):
                cache = raw_view(a[f"{name}_cache"], (slot + 1, n_ctx, hkv, D),
                              (*a[f"{name}_cache_strides"], 1), bf16)  # fmt: skip
                ks.append(cache[slot].float())
                if nb:
                    blk = raw_view(a[f"{name}_block"], (B, nb, hkv, D),
                                (*a[f"{name}_block_strides"], 1), bf16)  # fmt: skip
                    ks.append(blk[b].float())
            k, v = torch.cat(keys), torch.cat(values)
            tiles = -(-k.shape[0] // 64)
            per_split = -(-tiles // splits)
            lse, parts = [], []
            for s in range(splits):
                lo, hi = s * per_split * 64, min(k.shape[0], (s + 1) * per_split * 64)
                qh = q[b].reshape(S, hkv, hq // hkv, D)
                if lo >= hi:
                    lse.append(torch.full((S, hkv, hq // hkv), -math.inf))
                    parts.append(torch.zeros(S, hkv, hq // hkv, D))
                    continue
                scores = torch.einsum("skgd,lkd->skgl", qh, k[lo:hi]) / math.sqrt(D)
                lse.append(torch.logsumexp(scores, -1))
                parts.append(torch.einsum("skgl,lkd->skgd", scores.softmax(-1), v[lo:hi]))
            lse_t = torch.stack(lse)
            w = torch.softmax(lse_t, 0).nan_to_num(0.0)[..., None]
            merged = (w * torch.stack(parts)).sum(0)
            out[b].copy_(merged.reshape(S, hq, D).to(bf16))


@pytest.fixture
def fake_extension(monkeypatch):
    module = importlib.import_module("twotower_rt.ops.block_attention")
    monkeypatch.setattr(module, "_num_sms", lambda index: 132)
    return install_fake_extension(monkeypatch, FakeExtension(), module.__name__)


def _case(B, S, hq, hkv, D, cap, lens, block=True, seed=0, slots=None):
    g = torch.Generator().manual_seed(seed)
    bf = torch.bfloat16
    rows = B if slots is None else max(slots) + 1
    q = torch.randn(B, S, hq, D, generator=g).to(bf)
    kc, vc = (torch.randn(rows, cap, hkv, D, generator=g).to(bf) for _ in range(2))
    kb, vb = (torch.randn(B, S, hkv, D, generator=g).to(bf) for _ in range(2))
    return (q, kc, vc, torch.tensor(lens), *((kb, vb) if block else (None, None)))


@pytest.mark.parametrize("max_context_len", [None, 5])
def test_wrapper_plumbing_with_splits(fake_extension, max_context_len):
    q, kc, vc, lens, kb, vb = _case(2, 3, 6, 2, 32, 700, [650, 1], seed=1)
    got = block_attention(q, kc, vc, lens, kb, vb, max_context_len=max_context_len)
    want = block_attention_ref(q.float(), kc.float(), vc.float(), lens, kb.float(), vb.float())
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    call = fake_extension.calls[-1]
    assert call["num_splits"] == (
        1 if max_context_len == 5 else plan_splits(2, 3, 6, 2, 32, 703, 132)
    )
    assert call["num_splits"] > 1 or max_context_len == 5
    assert call["block_len"] == 3 and call["k_cache_strides"] == (700 * 64, 64, 32)


def test_wrapper_plumbing_strided_slots_and_out(fake_extension):
    # q as a slice of a fused projection, caches in a slot pool, out non-contiguous.
    g = torch.Generator().manual_seed(2)
    B, S, hq, hkv, D = 3, 1, 4, 2, 64
    fused = torch.randn(B, S, hq + 2 * hkv, D, generator=g).to(torch.bfloat16)
    q = fused[:, :, :hq]
    kc, vc = (torch.randn(5, 90, hkv, D, generator=g).to(torch.bfloat16) for _ in range(2))
    slots = torch.tensor([4, 0, 2])
    lens = torch.tensor([90, 17, 64])
    out = torch.full((B, hq, S, D), float("nan"), dtype=torch.bfloat16).transpose(1, 2)
    result = block_attention(q, kc, vc, lens, cache_slots=slots, out=out)
    assert result is out
    want = block_attention_ref(q.float(), kc.float(), vc.float(), lens, cache_slots=slots)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
    call = fake_extension.calls[-1]
    assert (
        call["q_strides"] == (S * (hq + 2 * hkv) * D, 0, D)
        and call["block_len"] == 0
        and call["k_block"] == 0
    )


@pytest.mark.parametrize(
    "variant, S, D, code",
    [("mma_sync", 16, 128, 0), ("wgmma", 16, 128, 1), ("wgmma", 16, 64, 0), ("wgmma", 1, 128, 0)],
)
def test_wrapper_passes_the_variant_it_runs(fake_extension, variant, S, D, code):
    q, kc, vc, lens, kb, vb = _case(2, S, 32, 2, D, 70, [70, 3], seed=3)
    got = block_attention(q, kc, vc, lens, kb, vb, variant=variant)
    assert fake_extension.calls[-1]["variant"] == code
    want = block_attention_ref(q.float(), kc.float(), vc.float(), lens, kb.float(), vb.float())
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_ref_cache_slots_pick_rows():
    q, kc, vc, lens, kb, vb = _case(2, 2, 4, 2, 16, 9, [9, 4], slots=[3, 1])
    slots = torch.tensor([3, 1])
    got = block_attention_ref(q, kc, vc, lens, kb, vb, cache_slots=slots)
    want = block_attention_ref(q, kc[slots], vc[slots], lens, kb, vb)
    assert torch.equal(got, want)


def test_backend_reports_the_kernel_or_why_not():
    backend, reason = block_attention_backend("cuda", torch.bfloat16)
    assert backend in ("cuda", "torch", "none") and reason
    backend, reason = block_attention_backend("cuda", torch.float32)
    assert backend != "cuda"


# --- the CUDA kernel ----------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)


def _require_kernel(variant="mma_sync", shape=None):
    """Skips unless the kernel runs here and, for a (seq, hq, hkv, D) shape, unless `variant` is the
    kernel that shape gets (a fallback would only repeat the mma_sync test)."""
    backend, reason = block_attention_backend("cuda", torch.bfloat16)
    if backend != "cuda":
        pytest.skip(f"the CUDA kernel does not run here: {reason}")
    if shape is not None:
        runs, why = kernel_variant(variant, *shape)
        if runs != variant:
            pytest.skip(f"variant {variant} runs {runs} here: {why}")


def _gpu_case(B, S, hq, hkv, D, cap, lens, block, seed, slots_rows=None):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    bf = torch.bfloat16
    rows = slots_rows or B
    q = torch.randn(B, S, hq, D, device="cuda", generator=gen).to(bf)
    kc, vc = (torch.randn(rows, cap, hkv, D, device="cuda", generator=gen).to(bf) for _ in range(2))
    kb, vb = (
        (torch.randn(B, S, hkv, D, device="cuda", generator=gen).to(bf) for _ in range(2))
        if block
        else (None, None)
    )
    return q, kc, vc, torch.tensor(lens, device="cuda"), kb, vb


def _sdpa_bf16(q, kc, vc, lens, kb, vb, slots=None):
    """Per sequence: torch SDPA in bf16 over [cache[:len] ; block] (the low-precision yardstick)."""
    outs = []
    for b in range(q.shape[0]):
        row = int(slots[b]) if slots is not None else b
        n = int(lens[b])
        k, v = kc[row, :n], vc[row, :n]
        if kb is not None:
            k, v = torch.cat([k, kb[b]]), torch.cat([v, vb[b]])
        o = F.scaled_dot_product_attention(
            q[b].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), enable_gqa=True
        )
        outs.append(o.transpose(0, 1))
    return torch.stack(outs)


def _check(out, q, kc, vc, lens, kb, vb, slots=None):
    f32 = lambda t: t.float() if t is not None else None  # noqa: E731
    ref = block_attention_ref(f32(q), f32(kc), f32(vc), lens, f32(kb), f32(vb), cache_slots=slots)
    low = _sdpa_bf16(q, kc, vc, lens, kb, vb, slots)
    assert torch.isfinite(out).all(), "unwritten or non-finite output"
    err = (out.float() - ref).abs().max().item()
    low_err = (low.float() - ref).abs().max().item()
    assert err <= 2 * low_err + 1e-3, (err, low_err)


GPU_CASES = [
    # B, S, hq, hkv, D, capacity, lens, block
    (2, 16, 32, 2, 128, 1100, [1000, 37], True),  # the real model's denoise step
    (3, 1, 32, 2, 128, 4200, [4097, 1, 300], False),  # its AR decode
    (1, 16, 32, 2, 128, 20000, [19999], True),  # long context: many splits
    (4, 7, 6, 2, 64, 99, [99, 0, 1, 64], True),  # odd S, an empty context, GQA 3
    (2, 5, 8, 1, 32, 130, [129, 65], True),  # MQA, head_dim 32
    (2, 3, 4, 4, 64, 40, [40, 19], False),  # MHA, no block
    (5, 1, 16, 2, 128, 989, [989, 1, 2, 64, 65], False),  # decode at tile edges
]
# Shapes for the wgmma kernel (head_dim 128, > 16 rows per KV head): row tiles that end mid-way,
# GQA ratios 1 to 32, lengths at every key-tile edge, empty contexts.
WGMMA_CASES = [
    (6, 16, 32, 2, 128, 200, [0, 1, 63, 64, 65, 200], True),  # tile edges around 64 keys
    (3, 7, 12, 4, 128, 129, [127, 128, 129], True),  # GQA 3: 21 rows, one mostly padded tile
    (2, 9, 16, 2, 128, 99, [99, 19], True),  # 72 rows: a second tile of 8 rows
    (2, 17, 4, 4, 128, 19, [19, 0], True),  # MHA, 17 rows
    (2, 16, 32, 1, 128, 500, [500, 250], False),  # MQA: 512 rows, no block
    (1, 16, 32, 2, 128, 8192, [8192], True),  # long context: many splits
]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("B,S,hq,hkv,D,cap,lens,block", GPU_CASES + WGMMA_CASES)
def test_kernel_matches_ref(B, S, hq, hkv, D, cap, lens, block, variant):
    _require_kernel(variant, (S, hq, hkv, D))
    q, kc, vc, lens_t, kb, vb = _gpu_case(B, S, hq, hkv, D, cap, lens, block, seed=B * cap + S)
    for max_len in (None, min(lens)):  # the planner's split count never changes the result much
        out = torch.full_like(q, float("nan"))
        block_attention(q, kc, vc, lens_t, kb, vb, out=out, max_context_len=max_len,
                        variant=variant)  # fmt: skip
        torch.cuda.synchronize()
        _check(out, q, kc, vc, lens_t, kb, vb)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_strided_inputs_slots_and_int64_lengths(variant):
    B, S, hq, hkv, D = 3, 16, 8, 2, 128
    _require_kernel(variant, (S, hq, hkv, D))
    gen = torch.Generator(device="cuda").manual_seed(11)
    bf = torch.bfloat16
    fused = torch.randn(B, S, hq + 2 * hkv, D, device="cuda", generator=gen).to(bf)
    q, kb, vb = fused[:, :, :hq], fused[:, :, hq : hq + hkv], fused[:, :, hq + hkv :]
    pool_k, pool_v = (
        torch.randn(6, 300, hkv, D, device="cuda", generator=gen).to(bf) for _ in range(2)
    )
    slots = torch.tensor([5, 0, 3], device="cuda")
    lens = torch.tensor([300, 2, 150], device="cuda", dtype=torch.int64)
    out = torch.full((B, hq, S, D), float("nan"), device="cuda", dtype=bf).transpose(1, 2)
    got = block_attention(q, pool_k, pool_v, lens, kb, vb, cache_slots=slots, out=out,
                          variant=variant)  # fmt: skip
    assert got is out
    _check(out, q, pool_k, pool_v, lens, kb, vb, slots)
    # Unaligned head_dim rows (an odd element offset) are copied, not misread.
    base = torch.randn(B * S * hq * D + 1, device="cuda", generator=gen).to(bf)
    q_odd = base[1:].view(B, S, hq, D)
    _check(block_attention(q_odd, pool_k, pool_v, lens, kb, vb, cache_slots=slots, variant=variant),
           q_odd, pool_k, pool_v, lens, kb, vb, slots)  # fmt: skip


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("S, variant", [(1, "mma_sync"), (16, "mma_sync"), (16, "wgmma")])
def test_kernel_deterministic_and_no_keys_gives_zeros(S, variant):
    _require_kernel(variant, (S, 32, 2, 128))
    q, kc, vc, lens, _, _ = _gpu_case(3, S, 32, 2, 128, 5000, [4999, 0, 3000], False, seed=4)
    first = block_attention(q, kc, vc, lens, variant=variant)
    second = block_attention(q, kc, vc, lens, variant=variant)
    assert torch.equal(first, second)
    assert torch.equal(first[1], torch.zeros_like(first[1]))
    _check(first[[0, 2]], q[[0, 2]], kc[[0, 2]], vc[[0, 2]], lens[[0, 2]], None, None)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_in_a_cuda_graph_follows_device_lengths(variant):
    _require_kernel(variant, (16, 32, 2, 128))
    q, kc, vc, lens, kb, vb = _gpu_case(2, 16, 32, 2, 128, 3000, [2500, 10], True, seed=9)
    out = torch.empty_like(q)
    block_attention(q, kc, vc, lens, kb, vb, out=out, variant=variant)  # warm-up, not captured
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        block_attention(q, kc, vc, lens, kb, vb, out=out, variant=variant)
    for new_lens in ([2999, 1], [7, 3000], [0, 640]):
        lens.copy_(torch.tensor(new_lens))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check(out, q, kc, vc, lens, kb, vb)


@pytest.mark.gpu
@needs_gpu
def test_default_model_bf16_on_gpu_uses_the_kernel():
    _require_kernel()
    import twotower_rt

    model = twotower_rt.load(device="cuda", dtype="bfloat16")
    for mode in ("mask_diffusion", "ar"):  # the denoiser's block attention; AR decode
        out = model.generate([[1, 5, 9, 33], [1, 7]], mode=mode, max_new_tokens=32)
        for row in range(2):
            assert len(out.generated[row]) == 32 or out.finish_reason[row] == "eos"
