"""MoE: the float64 router on borderline scores, the grouped (sync-free) expert path against the
reference loop (exactly, with a per-group matmul; within bf16 rounding, with torch._grouped_mm),
awkward token counts and experts with no tokens; on a GPU, the same inside a CUDA graph."""

import pytest
import torch

from twotower_rt.builtin import load_builtin
from twotower_rt.model.moe import MoE
from twotower_rt.ops.moe import (
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


def test_backend_report():
    from twotower_rt.ops import OP_BACKENDS

    backend, reason = OP_BACKENDS["moe_experts"]("cpu", torch.bfloat16)
    assert backend == "torch" and "moe_experts_ref" in reason and "MoE.grouped" in reason
