"""MoE: the float64 router on borderline scores, the grouped (sync-free) expert path against the
reference loop (exactly, with a per-group matmul; within bf16 rounding, with torch._grouped_mm),
awkward token counts and experts with no tokens; the shared expert folded into the grouped GEMMs
as one extra group against the reference layer (routed sum cast, then + the shared module), its
fallback, the CUDA wrapper's extra-group plumbing with a stand-in extension; on a GPU, the same
inside a CUDA graph, at the real model's shapes."""

import pytest
import torch
from helpers import install_fake_extension, raw_view
from torch import nn

from twotower_rt import fastpath
from twotower_rt.builtin import load_builtin
from twotower_rt.model import moe as moe_model
from twotower_rt.model.moe import MoE
from twotower_rt.ops import moe as moe_ops
from twotower_rt.ops import moe_gemm as moe_gemm_ops
from twotower_rt.ops.moe import (
    fold_shared_expert,
    gemm_cutlass,
    gemm_loop,
    gemm_torch,
    grouped_unsupported_reason,
    moe_experts_grouped,
    moe_experts_ref,
)


def moe_layer(lm) -> MoE:
    return next(b.mixer for b in lm.context_tower.layers if b.kind == "moe")


def routing(T, E, k, seed, device="cpu", skew=False):
    g = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(T, E, device=device, generator=g)
    if skew:  # most tokens on the first experts, the last ones never chosen
        scores = scores * torch.linspace(2.0, 0.0, E, device=device)
    expert_ids = scores.topk(k, dim=-1).indices
    weights = torch.rand(T, k, device=device, generator=g)
    return expert_ids, weights


@pytest.mark.parametrize("T", [1, 7, 16, 37, 300])
@pytest.mark.parametrize("skew", [False, True])
def test_grouped_path_is_the_loop_exactly_in_fp32(T, skew):
    lm = load_builtin(dtype=torch.float32)
    moe = moe_layer(lm)
    H = moe.cfg.hidden_size
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
    expert_ids, weights = routing(T, moe.cfg.n_routed_experts, moe.cfg.num_experts_per_tok, T,
                                  skew=skew)  # fmt: skip
    want = moe_experts_ref(x, expert_ids, weights, moe.experts)
    up, down = moe.stacked_weights()
    got = moe_experts_grouped(x, expert_ids, weights, up, down, gemm=gemm_loop)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # The experts' own weights are now views of the stacks, not copies.
    assert moe.experts[1].up_proj.weight.data_ptr() == up[1].data_ptr()


def test_grouped_path_with_torch_grouped_mm_in_bf16():
    lm = load_builtin(dtype=torch.bfloat16)
    moe = moe_layer(lm)
    T, H = 37, moe.cfg.hidden_size
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(1)).bfloat16()
    expert_ids, weights = routing(T, moe.cfg.n_routed_experts, moe.cfg.num_experts_per_tok, 3)
    up, down = moe.stacked_weights()
    if grouped_unsupported_reason(x, up) is not None:
        pytest.skip(grouped_unsupported_reason(x, up))
    want = moe_experts_ref(x, expert_ids, weights, moe.experts)
    got = moe_experts_grouped(x, expert_ids, weights, up, down, gemm=gemm_torch)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_module_switch_runs_the_grouped_path_and_agrees():
    lm = load_builtin(dtype=torch.bfloat16)
    moe = moe_layer(lm)
    h = torch.randn(2, 19, moe.cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    h = h.bfloat16()
    with torch.inference_mode():
        want = moe(h)
        moe.grouped = True
        got = moe(h)
    if grouped_unsupported_reason(h.reshape(-1, h.shape[-1]), moe.stacked_weights()[0]):
        assert torch.equal(got, want)  # the switch falls back to the loop
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def reference_layer(moe: MoE, x, expert_ids, weights) -> torch.Tensor:
    """MoE.forward's combine with the loop: routed fp32 sum cast, then + the shared module."""
    routed = moe_experts_ref(x, expert_ids, weights, moe.experts)
    return routed.to(x.dtype) + moe.shared_experts(x)


@pytest.mark.parametrize("T", [1, 7, 19, 300])
@pytest.mark.parametrize("skew", [False, True])
def test_folded_shared_expert_is_the_reference_exactly_in_fp32(T, skew):
    """In fp32 relu^2 before or after the rounding is the same op, so the folded path with the
    per-group matmul is the reference layer bitwise."""
    lm = load_builtin(dtype=torch.float32)
    moe = moe_layer(lm)
    cfg = moe.cfg
    x = torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(T + 1))
    expert_ids, weights = routing(T, cfg.n_routed_experts, cfg.num_experts_per_tok, T, skew=skew)
    if skew:
        assert torch.unique(expert_ids).numel() < cfg.n_routed_experts  # experts with no tokens
    with torch.no_grad():
        with fastpath.disabled():  # the layer's modules as the eager path runs them
            want = reference_layer(moe, x, expert_ids, weights)
        shared = moe.folded_shared_weights()
        assert shared is not None and moe.shared_fold_reason is None
        got = moe_experts_grouped(x, expert_ids, weights, *moe.stacked_weights(), gemm=gemm_loop,
                                  shared=shared)  # fmt: skip
    assert got.dtype == x.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # The shared expert's own weights, not copies.
    up_s, down_s = shared
    assert up_s.shape == (1, cfg.moe_shared_expert_intermediate_size, cfg.hidden_size)
    assert up_s.data_ptr() == moe.shared_experts.up_proj.weight.data_ptr()
    assert down_s.data_ptr() == moe.shared_experts.down_proj.weight.data_ptr()


@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_folded_shared_expert_in_bf16(backend):
    lm = load_builtin(dtype=torch.bfloat16)
    moe = moe_layer(lm)
    cfg = moe.cfg
    T = 19
    x = torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(4)).bfloat16()
    expert_ids, weights = routing(T, cfg.n_routed_experts, cfg.num_experts_per_tok, 4, skew=True)
    up, down = moe.stacked_weights()
    if backend == "torch" and grouped_unsupported_reason(x, up) is not None:
        pytest.skip(grouped_unsupported_reason(x, up))
    gemm = gemm_loop if backend == "loop" else gemm_torch
    with torch.no_grad():
        want = reference_layer(moe, x, expert_ids, weights)
        got = moe_experts_grouped(x, expert_ids, weights, up, down, gemm=gemm,
                                  shared=moe.folded_shared_weights())  # fmt: skip
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_module_switch_folds_the_shared_expert(monkeypatch):
    lm = load_builtin(dtype=torch.bfloat16)
    moe = moe_layer(lm)
    h = torch.randn(2, 19, moe.cfg.hidden_size, generator=torch.Generator().manual_seed(6))
    h = h.bfloat16()
    if grouped_unsupported_reason(h.reshape(-1, h.shape[-1]), moe.stacked_weights()[0]):
        pytest.skip("no grouped GEMM here")
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("shared") is not None)
        return moe_experts_grouped(*args, **kwargs)

    monkeypatch.setattr(moe_model, "moe_experts_grouped", spy)
    with torch.inference_mode():
        want = moe(h)
        moe.grouped = True
        got = moe(h)
    assert calls == [True] and moe.shared_fold_reason is None
    assert got.shape == h.shape and got.dtype == h.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_module_switch_falls_back_to_the_unfolded_shared_expert(monkeypatch):
    """A shared expert that cannot fold (here: biased) runs as its own module after the grouped
    routed experts, exactly as the reference combines them."""
    lm = load_builtin(dtype=torch.float32)
    moe = moe_layer(lm)
    H = moe.cfg.hidden_size
    with torch.no_grad():
        biased = nn.Linear(H, moe.cfg.moe_shared_expert_intermediate_size)
        biased.weight.copy_(moe.shared_experts.up_proj.weight)
        moe.shared_experts.up_proj = biased
    # A grouped GEMM on the CPU in fp32: the per-group matmul.
    for module in (moe_model, moe_ops):
        monkeypatch.setattr(module, "grouped_unsupported_reason", lambda *args: None)
    monkeypatch.setattr(moe_ops, "grouped_gemm_for", lambda *args: gemm_loop)
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("shared") is not None)
        return moe_experts_grouped(*args, **kwargs)

    monkeypatch.setattr(moe_model, "moe_experts_grouped", spy)
    h = torch.randn(3, 7, H, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = moe(h)
        moe.grouped = True
        got = moe(h)
    assert calls == [False] and "bias" in moe.shared_fold_reason
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fold_shared_expert_refuses_what_cannot_fold():
    up = torch.randn(4, 32, 64)
    down = torch.randn(4, 64, 32)
    with pytest.raises(ValueError, match="must be"):
        fold_shared_expert(up, down, torch.randn(48, 64), torch.randn(64, 40))
    with pytest.raises(ValueError, match="bfloat16"):
        fold_shared_expert(up, down, torch.randn(48, 64).bfloat16(), torch.randn(64, 48))
    up_s, down_s = fold_shared_expert(up, down, torch.randn(48, 64), torch.randn(64, 48))
    assert up_s.shape == (1, 48, 64) and down_s.shape == (1, 64, 48)


class FakeExtension:
    """twotower_rt._C.moe_grouped_gemm as moe_gemm.cuh documents it, on raw CPU memory: rows of
    expert e ending at offsets[e]; the extra group with its own a (row stride extra_lda), w, d
    (row stride extra_ldd) and sizes; relu^2 on the fp32 accumulator."""

    def __init__(self):
        self.calls = []
        self.workspace_groups = []

    def moe_grouped_gemm_workspace_bytes(self, experts, epilogue, device, extra_group=False):
        self.workspace_groups.append(experts + int(extra_group))
        return 256 + 64 * (experts + int(extra_group))

    def moe_grouped_gemm(self, **a):
        keys = ("experts", "n", "k", "epilogue", "extra_rows", "extra_n", "extra_k")
        self.calls.append({key: a.get(key, 0) for key in keys})
        E, n, k = a["experts"], a["n"], a["k"]
        offs = raw_view(a["offsets"], (E,), (1,), torch.int32).tolist()
        rows = offs[-1]
        bf16 = torch.bfloat16
        x = raw_view(a["a"], (rows, k), (k, 1), bf16)
        w = raw_view(a["w"], (E, n, k), (n * k, k, 1), bf16)
        groups = [(x, w, raw_view(a["d"], (rows, n), (n, 1), bf16), offs)]
        if a.get("extra_w", 0):
            r, nx, kx = a["extra_rows"], a["extra_n"], a["extra_k"]
            x = raw_view(a["extra_a"], (r, kx), (a["extra_lda"], 1), bf16)
            w = raw_view(a["extra_w"], (1, nx, kx), (nx * kx, kx, 1), bf16)
            groups.append((x, w, raw_view(a["extra_d"], (r, nx), (a["extra_ldd"], 1), bf16), [r]))
        for x, w, d, ends in groups:
            start = 0
            for e, end in enumerate(ends):
                acc = x[start:end].float() @ w[e].float().T
                d[start:end] = (torch.relu(acc).square() if a["epilogue"] else acc).bfloat16()
                start = end


def test_gemm_cutlass_wrapper_passes_the_extra_group(monkeypatch):
    fake = install_fake_extension(monkeypatch, FakeExtension())
    monkeypatch.setattr(moe_gemm_ops, "_workspaces", {})
    E, n, k, n_x = 3, 24, 40, 48
    g = torch.Generator().manual_seed(8)
    w = torch.randn(E, n, k, generator=g).bfloat16()
    w_x = torch.randn(1, n_x, k, generator=g).bfloat16()
    counts = [5, 0, 11]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    a = torch.randn(sum(counts), k, generator=g).bfloat16()
    a_x = torch.randn(7, k + 16, generator=g).bfloat16()[:, :k]  # a row stride of its own
    for relu2 in (True, False):
        out, out_x = gemm_cutlass(a, w, offs, relu2, extra=(a_x, w_x))
        assert fake.calls[-1] == dict(experts=E, n=n, k=k, epilogue=int(relu2), extra_rows=7,
                                      extra_n=n_x, extra_k=k)  # fmt: skip
        acc = a_x.float() @ w_x[0].float().T
        assert torch.equal(out_x, (torch.relu(acc).square() if relu2 else acc).bfloat16())
        assert out_x.shape == (7, n_x)
        assert torch.equal(out, gemm_cutlass(a, w, offs, relu2))  # the routed groups unchanged
        assert fake.calls[-1]["extra_rows"] == 0
    assert sorted(set(fake.workspace_groups)) == [E, E + 1]
    with pytest.raises(ValueError, match="extra group"):
        gemm_cutlass(a, w, offs, True, extra=(a_x.float(), w_x))


def test_router_choice_is_float64_on_borderline_scores():
    """Two experts whose biased scores differ by ~1e-9: float32 cannot tell them apart, the
    router's float64 arithmetic must pick the larger one, as the reference does."""
    lm = load_builtin(dtype=torch.float32)
    router = moe_layer(lm).gate
    E, H = router.weight.shape
    x = torch.randn(1, H, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        router.weight.zero_()
        router.e_score_correction_bias.zero_()
        router.weight[:, 0] = -10.0  # everyone far below: sigmoid(-10 * x0) small
        x[0, 0] = 1.0
        # Experts 2 and 3 get logits 0 and 4e-9: sigmoid 0.5 and 0.5 + 1e-9, equal in float32.
        router.weight[2, 0] = 0.0
        router.weight[3, 0] = 4e-9
        router.weight[3, 1:] = 0.0
        router.weight[2, 1:] = 0.0
    ids, _ = router(x)
    scores64 = torch.sigmoid(x.double() @ router.weight.double().T)
    assert scores64[0, 3] > scores64[0, 2]
    scores32 = torch.sigmoid(x @ router.weight.T)
    assert scores32[0, 3] == scores32[0, 2]  # float32 sees a tie
    assert ids[0, 0].item() == 3 and 2 in ids[0].tolist()


# --- on a GPU ------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("T", [1, 16, 37, 2048])
@pytest.mark.parametrize("backend", ["cutlass", "torch"])
def test_grouped_gemm_on_gpu_matches_the_loop(T, backend):
    from twotower_rt.ops.moe import _cutlass_ready

    E, k, H, inter = 128, 6, 2688, 1856  # the real model's MoE layer
    g = torch.Generator(device="cuda").manual_seed(T)
    up = (torch.randn(E, inter, H, device="cuda", generator=g) * 0.02).bfloat16()
    down = (torch.randn(E, H, inter, device="cuda", generator=g) * 0.02).bfloat16()
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    if backend == "cutlass" and not _cutlass_ready(x):
        pytest.skip("twotower_rt._C.moe_grouped_gemm does not run here")
    if backend == "torch" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch has no _grouped_mm")
    gemm = gemm_cutlass if backend == "cutlass" else gemm_torch
    expert_ids, weights = routing(T, E, k, T, device="cuda", skew=True)

    def loop():
        return moe_experts_grouped(x, expert_ids, weights, up, down, gemm=gemm_loop)

    want = loop()
    out = torch.full_like(want, float("nan"))
    out.copy_(moe_experts_grouped(x, expert_ids, weights, up, down, gemm=gemm))
    torch.cuda.synchronize()
    scale = want.abs().max().item()
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2 * scale)
    # No host synchronisation: the grouped path captures into a CUDA graph and replays.
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(moe_experts_grouped(x, expert_ids, weights, up, down, gemm=gemm))
    new_ids, new_w = routing(T, E, k, T + 1, device="cuda")
    expert_ids.copy_(new_ids)
    weights.copy_(new_w)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    want = loop()
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


E_REAL, H_REAL, I_REAL, I_SHARED, TOP_K = 128, 2688, 1856, 3712, 6  # the real model's MoE layer


def real_bf16_layer(seed: int):
    """Routed stacks (E, I, H) / (E, H, I) and the shared expert (1, I_s, H) / (1, H, I_s)."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def w(*shape):
        return (torch.randn(*shape, device="cuda", generator=g) * 0.02).bfloat16()

    return (w(E_REAL, I_REAL, H_REAL), w(E_REAL, H_REAL, I_REAL), w(1, I_SHARED, H_REAL),
            w(1, H_REAL, I_SHARED))  # fmt: skip


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("T", [1, 19, 99, 989])
@pytest.mark.parametrize("relu2", [True, False])
def test_cutlass_extra_group_matches_its_fp32_product(T, relu2):
    """The kernel alone: the extra group (its own rows, width, K, row strides) against its fp32
    product, relu^2 on the accumulator; the routed groups bitwise what they are without it."""
    from twotower_rt.ops.moe import _cutlass_ready

    up, down, up_s, down_s = real_bf16_layer(T)
    w, w_x = (up, up_s) if relu2 else (down, down_s)
    _, n, k = w.shape
    k_x = w_x.shape[2]
    g = torch.Generator(device="cuda").manual_seed(T + 1)
    expert_ids, _ = routing(T, E_REAL, TOP_K, T, device="cuda", skew=True)
    counts = torch.zeros(E_REAL, dtype=torch.int64, device="cuda")
    counts.scatter_add_(0, expert_ids.flatten(), torch.ones_like(expert_ids.flatten()))
    offs = counts.cumsum(0).to(torch.int32)
    a = torch.randn(T * TOP_K, k, device="cuda", generator=g).bfloat16()
    a_x = torch.randn(T, k_x + 64, device="cuda", generator=g).bfloat16()[:, :k_x]
    if not _cutlass_ready(a):
        pytest.skip("twotower_rt._C.moe_grouped_gemm does not run here")
    routed_only = gemm_cutlass(a, w, offs, relu2)
    out, out_x = gemm_cutlass(a, w, offs, relu2, extra=(a_x, w_x))
    torch.cuda.synchronize()
    assert out_x.shape == (T, w_x.shape[1]) and torch.isfinite(out_x).all()
    assert torch.equal(out, routed_only)
    ref = a_x.float() @ w_x[0].float().T
    lowprec = (a_x @ w_x[0].T).float()  # what bf16 itself costs
    if relu2:
        ref, lowprec = torch.relu(ref).square(), torch.relu(lowprec).square()
    err = (out_x.float() - ref).abs().max().item()
    lowprec_err = (lowprec - ref).abs().max().item()
    assert err <= 2 * lowprec_err + 1e-3 * ref.abs().max().item(), (err, lowprec_err)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("T", [1, 16, 37, 2048])
@pytest.mark.parametrize("backend", ["cutlass", "torch"])
def test_folded_shared_expert_on_gpu_matches_the_loop_and_captures(T, backend):
    from twotower_rt.ops.moe import _cutlass_ready

    up, down, up_s, down_s = real_bf16_layer(T)
    g = torch.Generator(device="cuda").manual_seed(T + 2)
    x = torch.randn(T, H_REAL, device="cuda", generator=g).bfloat16()
    if backend == "cutlass" and not _cutlass_ready(x):
        pytest.skip("twotower_rt._C.moe_grouped_gemm does not run here")
    if backend == "torch" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch has no _grouped_mm")
    gemm = gemm_cutlass if backend == "cutlass" else gemm_torch
    shared = fold_shared_expert(up, down, up_s[0], down_s[0])
    expert_ids, weights = routing(T, E_REAL, TOP_K, T, device="cuda", skew=True)

    def run(gemm):
        return moe_experts_grouped(x, expert_ids, weights, up, down, gemm=gemm, shared=shared)

    def check(out):
        want = run(gemm_loop)
        scale = want.float().abs().max().item()
        torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2 * scale)

    out = torch.full((T, H_REAL), float("nan"), device="cuda", dtype=torch.bfloat16)  # poison
    out.copy_(run(gemm))
    torch.cuda.synchronize()
    check(out)
    graph = torch.cuda.CUDAGraph()  # no host synchronisation: captures and replays
    with torch.cuda.graph(graph):
        out.copy_(run(gemm))
    new_ids, new_w = routing(T, E_REAL, TOP_K, T + 1, device="cuda")
    expert_ids.copy_(new_ids)
    weights.copy_(new_w)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check(out)


def test_backend_report():
    from twotower_rt.ops import OP_BACKENDS

    backend, reason = OP_BACKENDS["moe_experts"]("cpu", torch.bfloat16)
    assert backend == "torch" and "moe_experts_ref" in reason and "MoE.grouped" in reason
