"""MoE with FP8 expert weights: stacked scales dequantize exactly as Fp8Linear; the grouped
(sync-free) expert path over FP8 stacks against the reference loop (exactly, in fp32); the shared
expert folded in as the extra group (its scales regrouped to the experts' group size) against the
reference layer, and the fallback where it cannot fold; the CUDA wrapper's contract with a
stand-in extension; on a GPU, the CUTLASS FP8 grouped GEMM against its fp32 reference on the real
model's shapes, uneven experts, awkward row counts, both epilogues, with and without the shared
expert's extra group."""

import math

import pytest
import torch
from helpers import install_fake_extension, raw_view

from twotower_rt.builtin import builtin_config
from twotower_rt.model import moe as moe_model
from twotower_rt.model.linear import Fp8Linear, dequantize_weight, quantize_weight, scale_shape
from twotower_rt.model.moe import MoE
from twotower_rt.ops import moe as moe_ops
from twotower_rt.ops import moe_gemm as moe_gemm_ops
from twotower_rt.ops.moe import (
    Fp8ExpertWeights,
    fold_shared_expert,
    gemm_cutlass_fp8,
    gemm_fp8_ref,
    gemm_loop,
    grouped_unsupported_reason,
    moe_experts_grouped,
    moe_experts_ref,
)

# (rows, cols) blocks: per-channel (the default), several rows per scale, one scale for the whole
# matrix, blocks along K, and blocks wider than K (one per row in effect).
BLOCKS = [(1, 0), (4, 0), (0, 0), (1, 32), (8, 64), (16, 200)]


def quantized_stack(E, n, k, block, seed=0, device="cpu", std=1.0):
    """E random (n, k) weights quantized one by one: (fp8 (E, n, k), scales as Fp8Linear's)."""
    g = torch.Generator(device=device).manual_seed(seed)
    qs, scales = [], []
    for _ in range(E):
        w = torch.randn(n, k, generator=g, device=device) * std
        w *= torch.logspace(-1, 1, n, device=device)[:, None]  # channels of different ranges
        q, s = quantize_weight(w, block)
        qs.append(q)
        scales.append(s)
    return torch.stack(qs), torch.stack(scales)


def fp8_moe(block, seed=0, **sizes) -> MoE:
    """The built-in tiny MoE layer (hidden 64, 8 experts of 32, top 2, shared expert of 64; or
    ``sizes`` overrides) with FP8 experts."""
    cfg = builtin_config(fp8_weight_block=block, **sizes)
    moe = MoE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in moe.modules():
            if isinstance(module, Fp8Linear):
                w = torch.randn(module.out_features, module.in_features, generator=g)
                q, s = quantize_weight(w / math.sqrt(module.in_features), block)
                module.weight.copy_(q)
                module.weight_scale.copy_(s)
        moe.gate.weight.copy_(torch.randn(moe.gate.weight.shape, generator=g))
        moe.gate.e_score_correction_bias.zero_()
    return moe


def routing(T, E, k, seed, device="cpu", skew=False):
    g = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(T, E, device=device, generator=g)
    if skew:  # most tokens on the first experts, the last ones never chosen
        scores = scores * torch.linspace(2.0, 0.0, E, device=device)
    expert_ids = scores.topk(k, dim=-1).indices
    weights = torch.rand(T, k, device=device, generator=g)
    return expert_ids, weights


def offsets_for(counts: list[int], device="cpu") -> torch.Tensor:
    return torch.tensor(counts, device=device).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("block", BLOCKS)
def test_stacked_scales_dequantize_as_fp8linear(block):
    E, n, k = 3, 40, 96
    q, scale = quantized_stack(E, n, k, block)
    w = Fp8ExpertWeights.from_checkpoint(q, scale, block)
    cols = block[1] or k
    assert w.group_size == min(cols, k)
    assert w.scale.shape == (E, math.ceil(k / w.group_size), n)
    for e in range(E):
        for dtype in (torch.float32, torch.bfloat16):
            want = dequantize_weight(q[e], scale[e], block, dtype)
            assert torch.equal(w.dequantize(e, dtype), want)
    if block == (1, 0):  # per-channel scales are already the kernel's layout: a view
        assert w.scale.data_ptr() == scale.data_ptr()


def test_fp8_expert_weights_are_validated():
    q, scale = quantized_stack(2, 16, 64, (1, 0))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        Fp8ExpertWeights(q.float(), scale.view(2, 1, 16), 64)
    with pytest.raises(ValueError, match="expected"):
        Fp8ExpertWeights(q, scale.view(2, 1, 16), 32)  # group 32 needs (2, 2, 16) scales


@pytest.mark.parametrize("counts", [[0, 1, 0], [19, 0, 80], [5, 0, 0], [0, 0, 0]])
def test_fp8_ref_in_fp32_is_the_loop_exactly(counts):
    E, n, k = 3, 48, 64
    q, scale = quantized_stack(E, n, k, (8, 32), seed=1)
    w = Fp8ExpertWeights.from_checkpoint(q, scale, (8, 32))
    a = torch.randn(sum(counts), k, generator=torch.Generator().manual_seed(2))
    offs = offsets_for(counts)
    for relu2 in (False, True):
        want = torch.zeros(sum(counts), n)
        start = 0
        for e, c in enumerate(counts):
            if c:
                h = a[start : start + c] @ dequantize_weight(q[e], scale[e], (8, 32), a.dtype).T
                want[start : start + c] = torch.relu(h).square() if relu2 else h
            start += c
        torch.testing.assert_close(gemm_fp8_ref(a, w, offs, relu2), want, rtol=0, atol=0)
        torch.testing.assert_close(gemm_loop(a, w, offs, relu2), want, rtol=0, atol=0)


@pytest.mark.parametrize("T", [1, 7, 19, 37, 300])
@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("block", [(1, 0), (16, 32)])
def test_fp8_grouped_path_is_the_loop_exactly_in_fp32(T, skew, block):
    moe = fp8_moe(block, seed=T)
    cfg = moe.cfg
    x = torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(T))
    expert_ids, weights = routing(T, cfg.n_routed_experts, cfg.num_experts_per_tok, T, skew=skew)
    with torch.no_grad():
        want = moe_experts_ref(x, expert_ids, weights, moe.experts)
        up, down = moe.stacked_weights()
        assert isinstance(up, Fp8ExpertWeights) and isinstance(down, Fp8ExpertWeights)
        for gemm in (gemm_loop, gemm_fp8_ref):
            got = moe_experts_grouped(x, expert_ids, weights, up, down, gemm=gemm)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    # The experts' own weights and scales are now views of the stacks, not copies.
    assert moe.experts[1].up_proj.weight.data_ptr() == up.weight[1].data_ptr()
    assert moe.experts[2].down_proj.weight.data_ptr() == down.weight[2].data_ptr()
    scales = moe.experts[1].up_proj.weight_scale
    assert scales.shape == scale_shape(cfg.moe_intermediate_size, cfg.hidden_size, block)
    if block == (1, 0):
        assert scales.data_ptr() == up.scale[1].data_ptr()


def test_fp8_module_switch_falls_back_to_the_loop_off_cuda():
    moe = fp8_moe((1, 0))
    h = torch.randn(2, 19, moe.cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    h = h.bfloat16()
    with torch.inference_mode():
        want = moe(h)
        moe.grouped = True
        got = moe(h)
    reason = grouped_unsupported_reason(h.reshape(-1, h.shape[-1]), *moe.stacked_weights())
    assert reason is not None and "CUDA" in reason
    assert torch.equal(got, want)


def test_fp8_unsupported_shapes_and_blocks_say_why():
    x = torch.randn(3, 96).bfloat16()
    q, scale = quantized_stack(2, 48, 96, (1, 32))
    w = Fp8ExpertWeights.from_checkpoint(q, scale, (1, 32))
    assert "multiple of 64" in grouped_unsupported_reason(x, w)
    assert "bfloat16" in grouped_unsupported_reason(x.float(), w)
    q, scale = quantized_stack(2, 40, 96, (1, 0))
    w = Fp8ExpertWeights.from_checkpoint(q, scale, (1, 0))
    assert "multiples of 16" in grouped_unsupported_reason(x, w)
    with pytest.raises(ValueError, match="no grouped GEMM"):
        moe_experts_grouped(x, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), w, w)


@pytest.mark.parametrize(
    "block, k, group_size",
    [((1, 0), 256, 128), ((1, 0), 256, 64), ((8, 64), 256, 64), ((1, 128), 256, 64),
     ((1, 0), 96, 200)],
)  # fmt: skip
def test_regrouped_scales_dequantize_the_same(block, k, group_size):
    """The shared expert's scales presented at the experts' group size (per-channel scales of a
    wider K repeated over its chunks) dequantize to the same weights."""
    q, scale = quantized_stack(1, 48, k, block, seed=3)
    w = Fp8ExpertWeights.from_checkpoint(q, scale, block)
    r = w.regrouped(group_size)
    assert r.group_size == group_size and r.weight is w.weight
    assert r.scale.shape == (1, math.ceil(k / group_size), 48)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(r.dequantize(0, dtype), w.dequantize(0, dtype))


def test_regrouping_refuses_chunks_that_straddle_two_scales():
    q, scale = quantized_stack(1, 48, 256, (1, 96), seed=3)
    w = Fp8ExpertWeights.from_checkpoint(q, scale, (1, 96))
    assert "straddle" in w.regroup_reason(64)
    with pytest.raises(ValueError, match="straddle"):
        w.regrouped(64)
    assert w.regroup_reason(32) is None  # 96 = 3 x 32


def reference_layer(moe: MoE, x, expert_ids, weights) -> torch.Tensor:
    """MoE.forward's combine with the loop: routed fp32 sum cast, then + the shared module."""
    routed = moe_experts_ref(x, expert_ids, weights, moe.experts)
    return routed.to(x.dtype) + moe.shared_experts(x)


@pytest.mark.parametrize("T", [1, 7, 19, 300])
@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("block", [(1, 0), (16, 32)])
def test_fp8_folded_shared_expert_is_the_reference_exactly_in_fp32(T, skew, block):
    """Per-channel: the shared down's one scale per channel (K 64) presented as 2 chunks of the
    experts' 32; blocks of 32 columns: the same group size already."""
    moe = fp8_moe(block, seed=T)
    cfg = moe.cfg
    x = torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(T))
    expert_ids, weights = routing(T, cfg.n_routed_experts, cfg.num_experts_per_tok, T, skew=skew)
    with torch.no_grad():
        want = reference_layer(moe, x, expert_ids, weights)
        shared = moe.folded_shared_weights()
        assert shared is not None, moe.shared_fold_reason
        up, down = moe.stacked_weights()
        assert shared[1].group_size == down.group_size == 32
        assert shared[1].weight.data_ptr() == moe.shared_experts.down_proj.weight.data_ptr()
        for gemm in (gemm_loop, gemm_fp8_ref):
            got = moe_experts_grouped(x, expert_ids, weights, up, down, gemm=gemm, shared=shared)
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "block, sizes, folds, why",
    [
        ((1, 0), dict(moe_intermediate_size=64, moe_shared_expert_intermediate_size=128), True,
         None),
        # The experts' per-channel group (K 32) is not a multiple of the kernel's 64-wide k tile.
        ((1, 0), {}, False, "multiple of 64"),
        # Shared scale blocks of 96 columns cannot be read in the experts' chunks of 64.
        ((1, 96), dict(moe_intermediate_size=64, moe_shared_expert_intermediate_size=128), False,
         "straddle"),
    ],
)  # fmt: skip
def test_fp8_module_folds_or_falls_back(monkeypatch, block, sizes, folds, why):
    """MoE.forward with the grouped switch (a CPU stand-in for the FP8 kernel's availability):
    the shared expert folds where the FP8 kernel can take it, else runs as its own module; either
    way the output is the reference layer's, exactly in fp32."""
    moe = fp8_moe(block, seed=5, **sizes)
    for module in (moe_model, moe_ops):
        monkeypatch.setattr(module, "grouped_unsupported_reason", lambda *args: None)
    monkeypatch.setattr(moe_ops, "grouped_gemm_for", lambda *args: gemm_loop)
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("shared") is not None)
        return moe_experts_grouped(*args, **kwargs)

    monkeypatch.setattr(moe_model, "moe_experts_grouped", spy)
    h = torch.randn(2, 19, moe.cfg.hidden_size, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = moe(h)
        moe.grouped = True
        got = moe(h)
    assert calls == [folds]
    if why is not None:
        assert why in moe.shared_fold_reason
    torch.testing.assert_close(got, want, rtol=0, atol=0)


class FakeFp8Extension:
    """twotower_rt._C.moe_grouped_gemm_fp8 as moe_gemm_fp8.cuh documents it, on raw CPU memory:
    scales[e][c / group_size][j], rows of expert e ending at offsets[e], relu^2 on fp32; the extra
    group with its own a (row stride extra_lda), w, scales at the same group_size, d (row stride
    extra_ldd) and sizes."""

    def __init__(self):
        self.calls = []
        self.workspace_groups = []

    def moe_grouped_gemm_fp8_workspace_bytes(self, experts, epilogue, device, extra_group=False):
        self.workspace_groups.append(experts + int(extra_group))
        return 256 + 64 * (experts + int(extra_group))

    def moe_grouped_gemm_fp8(self, **a):
        self.calls.append({key: a[key] for key in ("experts", "n", "k", "group_size", "epilogue")})
        E, n, k, g = a["experts"], a["n"], a["k"], a["group_size"]
        offs = raw_view(a["offsets"], (E,), (1,), torch.int32).tolist()
        rows = offs[-1]
        groups = [(a["a"], a["w"], a["scales"], a["d"], offs, n, k, k, n)]
        if a.get("extra_w", 0):
            self.calls[-1].update(extra_rows=a["extra_rows"], extra_n=a["extra_n"],
                                  extra_k=a["extra_k"])  # fmt: skip
            groups.append((a["extra_a"], a["extra_w"], a["extra_scales"], a["extra_d"],
                           [a["extra_rows"]], a["extra_n"], a["extra_k"], a["extra_lda"],
                           a["extra_ldd"]))  # fmt: skip
        for a_ptr, w_ptr, s_ptr, d_ptr, ends, n, k, lda, ldd in groups:
            E, rows, sk = len(ends), ends[-1], math.ceil(k / g)
            w = raw_view(w_ptr, (E, n, k), (n * k, k, 1), torch.uint8).view(torch.float8_e4m3fn)
            s = raw_view(s_ptr, (E, sk, n), (sk * n, n, 1), torch.float32)
            x = raw_view(a_ptr, (rows, k), (lda, 1), torch.bfloat16)
            d = raw_view(d_ptr, (rows, n), (ldd, 1), torch.bfloat16)
            start = 0
            for e, end in enumerate(ends):
                scale = s[e].T.repeat_interleave(g, dim=1)[:, :k]
                weight = (w[e].float() * scale).bfloat16()
                acc = x[start:end].float() @ weight.float().T
                d[start:end] = (torch.relu(acc).square() if a["epilogue"] else acc).bfloat16()
                start = end


def test_gemm_cutlass_fp8_wrapper_keeps_the_kernel_contract(monkeypatch):
    fake = install_fake_extension(monkeypatch, FakeFp8Extension())
    monkeypatch.setattr(moe_gemm_ops, "_workspaces", {})
    E, n, k, block = 4, 48, 192, (1, 64)
    q, scale = quantized_stack(E, n, k, block, seed=4)
    w = Fp8ExpertWeights.from_checkpoint(q, scale, block)
    counts = [3, 0, 19, 1]
    offs = offsets_for(counts)
    a = torch.randn(sum(counts), k, generator=torch.Generator().manual_seed(5)).bfloat16()
    for relu2 in (True, False):
        out = torch.full((sum(counts), n), float("nan"), dtype=torch.bfloat16)
        got = gemm_cutlass_fp8(a, w, offs, relu2, out=out)
        assert got is out
        assert torch.equal(out, gemm_fp8_ref(a, w, offs, relu2).bfloat16())
        assert fake.calls[-1] == dict(experts=E, n=n, k=k, group_size=64, epilogue=int(relu2))
    with pytest.raises(ValueError, match="bfloat16"):
        gemm_cutlass_fp8(a.float(), w, offs, True)


@pytest.mark.parametrize(
    "k, k_x, block",
    [(192, 192, (1, 64)), (128, 256, (1, 0)), (128, 256, (16, 128))],
)
def test_gemm_cutlass_fp8_wrapper_passes_the_extra_group(monkeypatch, k, k_x, block):
    """The extra group (a K of its own: per-channel scales repeated over 2 chunks) through the
    wrapper: what the stand-in computes from the pointers it gets is the fp32 reference."""
    fake = install_fake_extension(monkeypatch, FakeFp8Extension())
    monkeypatch.setattr(moe_gemm_ops, "_workspaces", {})
    E, n, n_x = 3, 48, 64
    q, scale = quantized_stack(E, n, k, block, seed=6)
    w = Fp8ExpertWeights.from_checkpoint(q, scale, block)
    q, scale = quantized_stack(1, n_x, k_x, block, seed=7)
    w_x = Fp8ExpertWeights.from_checkpoint(q, scale, block).regrouped(w.group_size)
    counts = [4, 0, 9]
    offs = offsets_for(counts)
    g = torch.Generator().manual_seed(8)
    a = torch.randn(sum(counts), k, generator=g).bfloat16()
    a_x = torch.randn(5, k_x + 32, generator=g).bfloat16()[:, :k_x]  # a row stride of its own
    for relu2 in (True, False):
        out, out_x = gemm_cutlass_fp8(a, w, offs, relu2, extra=(a_x, w_x))
        assert fake.calls[-1] == dict(experts=E, n=n, k=k, group_size=w.group_size,
                                      epilogue=int(relu2), extra_rows=5, extra_n=n_x,
                                      extra_k=k_x)  # fmt: skip
        want, want_x = gemm_fp8_ref(a, w, offs, relu2, extra=(a_x, w_x))
        assert torch.equal(out, want.bfloat16()) and torch.equal(out_x, want_x.bfloat16())
    assert set(fake.workspace_groups) == {E + 1}


def test_gemm_cutlass_fp8_refuses_an_extra_group_it_cannot_run(monkeypatch):
    install_fake_extension(monkeypatch, FakeFp8Extension())
    monkeypatch.setattr(moe_gemm_ops, "_workspaces", {})
    q, scale = quantized_stack(2, 48, 96, (1, 0), seed=9)
    w = Fp8ExpertWeights.from_checkpoint(q, scale, (1, 0))  # per-channel, K 96
    q, scale = quantized_stack(1, 64, 192, (1, 0), seed=10)
    w_x = Fp8ExpertWeights.from_checkpoint(q, scale, (1, 0))
    a = torch.randn(3, 96).bfloat16()
    a_x = torch.randn(2, 192).bfloat16()
    offs = offsets_for([1, 2])
    with pytest.raises(ValueError, match="one group size"):  # not regrouped
        gemm_cutlass_fp8(a, w, offs, True, extra=(a_x, w_x))
    with pytest.raises(ValueError, match="multiple of 64"):  # K 192 read in chunks of 96
        gemm_cutlass_fp8(a, w, offs, True, extra=(a_x, w_x.regrouped(96)))


# --- on a GPU ------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)

E_REAL, H_REAL, I_REAL, TOP_K = 128, 2688, 1856, 6  # the real model's MoE layer
I_SHARED = 3712


def _fp8_kernel_reason() -> str | None:
    from twotower_rt import _ext

    return _ext.cuda_unsupported_reason(torch.device("cuda"), "moe_grouped_gemm_fp8")


@pytest.fixture(scope="module")
def real_fp8_stacks():
    """{(projection, block): Fp8ExpertWeights} at the real shapes, built once; projections "up",
    "down" (the routed experts) and "shared_up", "shared_down" (the shared expert, one-expert
    stacks folded beside the routed ones: scales at their group size)."""
    if not torch.cuda.is_available() or _fp8_kernel_reason() is not None:
        pytest.skip(_fp8_kernel_reason() or "needs a CUDA GPU")
    stacks = {}
    shapes = {"up": (E_REAL, I_REAL, H_REAL), "down": (E_REAL, H_REAL, I_REAL),
              "shared_up": (1, I_SHARED, H_REAL), "shared_down": (1, H_REAL, I_SHARED)}  # fmt: skip
    for proj, (E, n, k) in shapes.items():
        for block in [(1, 0), (128, 128)]:
            q, scale = quantized_stack(E, n, k, block, seed=len(stacks), device="cuda",
                                       std=0.02)  # fmt: skip
            stacks[proj, block] = Fp8ExpertWeights.from_checkpoint(q, scale, block)
    for block in [(1, 0), (128, 128)]:
        projs = ("up", "down", "shared_up", "shared_down")
        folded = fold_shared_expert(*(stacks[proj, block] for proj in projs))
        stacks["shared_up", block], stacks["shared_down", block] = folded
    return stacks


def uneven_counts(rows: int, E: int, kind: str, seed: int) -> list[int]:
    """Rows per expert: 'skew' (decaying, every 7th and the last experts empty) or 'one' (all
    rows on one expert in the middle)."""
    if kind == "one":
        counts = [0] * E
        counts[E // 2] = rows
        return counts
    probs = torch.linspace(1.0, 0.0, E) ** 2
    probs[::7] = 0.0
    g = torch.Generator().manual_seed(seed)
    picks = torch.multinomial(probs, rows, replacement=True, generator=g)
    return torch.bincount(picks, minlength=E).tolist()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("rows", [1, 19, 99, 989])
@pytest.mark.parametrize("kind", ["skew", "one"])
@pytest.mark.parametrize("proj", ["up", "down"])
@pytest.mark.parametrize("relu2", [True, False])
@pytest.mark.parametrize("block", [(1, 0), (128, 128)])
def test_fp8_grouped_gemm_kernel_matches_the_reference(
    real_fp8_stacks, rows, kind, proj, relu2, block
):
    w = real_fp8_stacks[proj, block]
    E, n, k = w.shape
    counts = uneven_counts(rows, E, kind, seed=rows)
    assert 0 in counts and sum(counts) == rows
    offs = offsets_for(counts, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(rows)
    a = torch.randn(rows, k, device="cuda", generator=g).bfloat16()
    out = torch.full((rows, n), float("nan"), device="cuda", dtype=torch.bfloat16)  # poison
    gemm_cutlass_fp8(a, w, offs, relu2, out=out)
    torch.cuda.synchronize()
    ref = gemm_fp8_ref(a, w, offs, relu2)  # fp32, the kernel's dequantized weights
    lowprec = gemm_loop(a, w, offs, relu2)  # bf16 matmuls: what Fp8Linear costs in bf16
    assert torch.isfinite(out).all(), "unwritten (NaN) or non-finite outputs"
    err = (out.float() - ref).abs().max().item()
    lowprec_err = (lowprec.float() - ref).abs().max().item()
    assert err <= 2 * lowprec_err + 1e-3 * ref.abs().max().item(), (err, lowprec_err)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("T", [1, 37, 2048])
def test_fp8_grouped_path_on_gpu_matches_the_loop_and_captures(real_fp8_stacks, T):
    up, down = real_fp8_stacks["up", (1, 0)], real_fp8_stacks["down", (1, 0)]
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, H_REAL, device="cuda", generator=g).bfloat16()
    expert_ids, weights = routing(T, E_REAL, TOP_K, T, device="cuda", skew=True)
    assert grouped_unsupported_reason(x, up, down) is None

    def loop():
        return moe_experts_grouped(x, expert_ids, weights, up, down, gemm=gemm_loop)

    want = loop()
    out = torch.full_like(want, float("nan"))
    out.copy_(moe_experts_grouped(x, expert_ids, weights, up, down))  # picks gemm_cutlass_fp8
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    graph = torch.cuda.CUDAGraph()  # no host synchronisation: captures and replays
    with torch.cuda.graph(graph):
        out.copy_(moe_experts_grouped(x, expert_ids, weights, up, down, gemm=gemm_cutlass_fp8))
    new_ids, new_w = routing(T, E_REAL, TOP_K, T + 1, device="cuda")
    expert_ids.copy_(new_ids)
    weights.copy_(new_w)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    want = loop()
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("T", [1, 19, 99, 989])
@pytest.mark.parametrize("proj", ["up", "down"])
@pytest.mark.parametrize("block", [(1, 0), (128, 128)])
def test_fp8_extra_group_kernel_matches_the_reference(real_fp8_stacks, T, proj, block):
    """The shared expert as the extra group at the real shapes (down: K 3712 against the experts'
    1856, per-channel scales repeated over 2 chunks), its own row stride; the routed groups
    bitwise what they are without it."""
    w, w_x = real_fp8_stacks[proj, block], real_fp8_stacks["shared_" + proj, block]
    relu2 = proj == "up"
    E, n, k = w.shape
    k_x = w_x.shape[2]
    counts = uneven_counts(T * TOP_K, E, "skew", seed=T)
    offs = offsets_for(counts, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(T)
    a = torch.randn(T * TOP_K, k, device="cuda", generator=g).bfloat16()
    a_x = torch.randn(T, k_x + 64, device="cuda", generator=g).bfloat16()[:, :k_x]
    routed_only = gemm_cutlass_fp8(a, w, offs, relu2)
    out, out_x = gemm_cutlass_fp8(a, w, offs, relu2, extra=(a_x, w_x))
    torch.cuda.synchronize()
    assert torch.equal(out, routed_only)
    _, ref = gemm_fp8_ref(a, w, offs, relu2, extra=(a_x, w_x))
    _, lowprec = gemm_loop(a, w, offs, relu2, extra=(a_x, w_x))  # bf16 matmul of Fp8Linear
    assert out_x.shape == (T, w_x.shape[1]) and torch.isfinite(out_x).all()
    err = (out_x.float() - ref).abs().max().item()
    lowprec_err = (lowprec.float() - ref).abs().max().item()
    assert err <= 2 * lowprec_err + 1e-3 * ref.abs().max().item(), (err, lowprec_err)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("T", [1, 37, 2048])
@pytest.mark.parametrize("block", [(1, 0), (128, 128)])
def test_fp8_folded_shared_expert_on_gpu_matches_the_loop_and_captures(real_fp8_stacks, T, block):
    up, down = real_fp8_stacks["up", block], real_fp8_stacks["down", block]
    shared = real_fp8_stacks["shared_up", block], real_fp8_stacks["shared_down", block]
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, H_REAL, device="cuda", generator=g).bfloat16()
    expert_ids, weights = routing(T, E_REAL, TOP_K, T, device="cuda", skew=True)
    assert moe_ops.shared_unsupported_reason(x, up, down, shared) is None

    def run(gemm):
        return moe_experts_grouped(x, expert_ids, weights, up, down, gemm=gemm, shared=shared)

    def check(out):
        want = run(gemm_loop)
        scale = want.float().abs().max().item()
        torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2 * scale)

    out = torch.full((T, H_REAL), float("nan"), device="cuda", dtype=torch.bfloat16)  # poison
    out.copy_(run(None))  # picks gemm_cutlass_fp8
    torch.cuda.synchronize()
    check(out)
    graph = torch.cuda.CUDAGraph()  # no host synchronisation: captures and replays
    with torch.cuda.graph(graph):
        out.copy_(run(gemm_cutlass_fp8))
    new_ids, new_w = routing(T, E_REAL, TOP_K, T + 1, device="cuda")
    expert_ids.copy_(new_ids)
    weights.copy_(new_w)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check(out)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    "sizes, folds",
    [({}, False), (dict(moe_intermediate_size=64, moe_shared_expert_intermediate_size=128), True)],
)
def test_fp8_module_switch_on_gpu_runs_the_kernel_and_agrees(sizes, folds):
    """Tiny sizes: experts of 32 cannot take the shared expert (their per-channel group is not a
    multiple of 64: it runs as its own module); experts of 64 can."""
    if _fp8_kernel_reason() is not None:
        pytest.skip(_fp8_kernel_reason())
    moe = fp8_moe((1, 0), **sizes).cuda()
    h = torch.randn(2, 19, moe.cfg.hidden_size, device="cuda").bfloat16()
    with torch.inference_mode():
        want = moe(h)
        moe.grouped = True
        got = moe(h)
    assert grouped_unsupported_reason(h.reshape(-1, h.shape[-1]), *moe.stacked_weights()) is None
    assert (moe.shared_fold_reason is None) == folds, moe.shared_fold_reason
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@needs_gpu
def test_fp8_kernel_refuses_a_scale_group_that_splits_a_k_tile():
    if _fp8_kernel_reason() is not None:
        pytest.skip(_fp8_kernel_reason())
    q, scale = quantized_stack(2, 64, 128, (1, 32), device="cuda")
    w = Fp8ExpertWeights.from_checkpoint(q, scale, (1, 32))
    a = torch.randn(3, 128, device="cuda").bfloat16()
    with pytest.raises(ValueError, match="group_size"):
        gemm_cutlass_fp8(a, w, offsets_for([1, 2], device="cuda"), True)
