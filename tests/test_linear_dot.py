"""The CPU projections by bfloat16 dot products (twotower_rt._cpu's linear_dot and the MoE
kernel's weights_dot; ops/linear_cpu.py, ops/moe_cpu.py): bitwise against the step-by-step chain
in PyTorch (dot_chain_ref), row by row and whatever the thread count, and the model's projections
and MoE layers taking them exactly where torch's float32 matmul precision is "medium"."""

from __future__ import annotations

import pytest
import torch

import twotower_rt
from twotower_rt import _ext
from twotower_rt.model import cpu_fast
from twotower_rt.ops import linear_cpu
from twotower_rt.ops.linear_cpu import (
    dot_allowed,
    dot_chain_ref,
    k_pairs,
    linear_dot_cpu,
    linear_dot_ref,
    pair_words,
)
from twotower_rt.ops.moe_cpu import dot_weights, moe_forward, moe_forward_ref, moe_weights
from twotower_rt.threads import kernel_threads, set_kernel_threads

C = _ext.cpu_kernels()
pytestmark = pytest.mark.skipif(
    C is None or not C.linear_dot_supported(),
    reason="no CPU kernels, or a CPU without AVX512_BF16",
)

# rows: one, the 4-row tiles and each remainder; in: even, odd (a pair with a zero), one; out:
# 64-wide tiles, 16-wide vectors and a last partial vector.
SHAPES = [(1, 192, 902), (16, 192, 902), (3, 384, 192), (16, 192, 2048), (5, 37, 70),
          (7, 192, 15), (4, 1, 17), (2, 33, 129), (17, 64, 80), (9, 130, 65)]  # fmt: skip


@pytest.fixture
def medium():
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    yield
    torch.set_float32_matmul_precision(old)


def _case(rows, k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    weight = torch.randn(n, k, generator=g) / k**0.5
    return x, weight, torch.randn(n, generator=g)


def test_chain_ref_is_the_fused_chain():
    """The oracle itself, against a float64 loop written out by hand: one input pair, whose two
    products land on the accumulator in the order high input first, each rounded to float32 (two
    roundings, not one; a case where the order and the rounding both matter)."""
    x = torch.tensor([[1.0, 2.0**-9]])  # bfloat16 values
    w = torch.tensor([[2.0**-14], [1.0]])  # K-major (in, out)
    bias = torch.tensor([1.0])
    # high first: 1 + 2^-9 = 1.001953125 (exact in fp32); + 2^-14 -> rounds to 1.0020141601...
    step = torch.tensor(1.0 + 2.0**-9, dtype=torch.float32)
    want = (step.double() + 2.0**-14).float()
    assert torch.equal(dot_chain_ref(x, w, bias), want.reshape(1, 1))


@pytest.mark.parametrize("rows,k,n", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_is_the_chain_bitwise(rows, k, n, with_bias):
    x, weight, bias = _case(rows, k, n)
    bias = bias if with_bias else None
    got = linear_dot_cpu(x, k_pairs(weight), bias, out_features=n)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert torch.equal(got, linear_dot_ref(x, weight, bias))
    # and near the float32 product: the inputs rounded to bfloat16 (relative 2^-9 each)
    exact = x.double() @ weight.double().t() + (0 if bias is None else bias.double())
    bound = 2 * 2.0**-8 * (x.abs() @ weight.abs().t()).double() + 1e-6
    assert ((got.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("rows,k,n", [(16, 192, 902), (9, 130, 65), (5, 384, 192)])
def test_rows_and_threads_do_not_change_the_bits(rows, k, n):
    x, weight, bias = _case(rows, k, n, seed=1)
    pairs = k_pairs(weight)
    before = kernel_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            set_kernel_threads(threads)
            outs.append(linear_dot_cpu(x, pairs, bias, out_features=n))
    finally:
        set_kernel_threads(before)
    assert all(torch.equal(o, outs[0]) for o in outs)
    for r in range(rows):  # each row alone, and from a strided view
        alone = linear_dot_cpu(x[r : r + 1], pairs, bias, out_features=n)
        assert torch.equal(alone, outs[0][r : r + 1])
    wide = torch.randn(rows, k + 7)
    wide[:, :k] = x
    assert torch.equal(linear_dot_cpu(wide[:, :k], pairs, bias, out_features=n), outs[0])


def test_pair_layout():
    w = torch.tensor([[1.0, -2.0, 3.0]])  # (out 1, in 3): pairs (1, -2), (3, 0)
    words = k_pairs(w)
    assert words.shape == (2, 16) and words.dtype == torch.int32
    bits = lambda v: int(torch.tensor(v).bfloat16().view(torch.int16)) & 0xFFFF  # noqa: E731
    assert int(words[0, 0]) & 0xFFFF == bits(1.0)
    assert (int(words[0, 0]) >> 16) & 0xFFFF == bits(-2.0)
    assert int(words[1, 0]) == bits(3.0)
    assert not words[:, 1:].any()
    assert pair_words(torch.ones(2, 3, 4)).shape == (2, 2, 4)


def test_bad_inputs_are_refused():
    x, weight, bias = _case(4, 16, 32)
    pairs = k_pairs(weight)
    with pytest.raises(ValueError, match="linear_dot"):
        linear_dot_cpu(x.double(), pairs, bias, out_features=32)
    with pytest.raises(ValueError, match="linear_dot"):
        linear_dot_cpu(x[:, :13], pairs, bias, out_features=32)  # 7 pairs of inputs, not 8
    with pytest.raises(ValueError, match="linear_dot"):
        linear_dot_cpu(x, pairs, bias[:5], out_features=32)
    with pytest.raises(ValueError, match="linear_dot"):
        linear_dot_cpu(x, pairs, bias, out_features=33)
    with pytest.raises(ValueError, match="linear_dot"):
        linear_dot_cpu(x.t(), pairs, bias, out_features=32)
    with pytest.raises(ValueError, match="w_stride"):  # the kernel's own check, through run_dot
        linear_cpu.run_dot(C, x, pairs[:, :8].contiguous(), None, 8)


def _moe(shared: bool, inter: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    E, H, Is = 8, 192, 256
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.1).bfloat16().float()  # noqa: E731
    return moe_weights(torch.randn(E, H, generator=g), torch.randn(E, generator=g) * 0.1,
                       mk(E, inter, H), mk(E, H, inter), mk(Is, H) if shared else None,
                       mk(H, Is) if shared else None, top_k=2)  # fmt: skip


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("tokens", [1, 3, 16, 37])
def test_moe_dot_is_the_chain_bitwise(shared, tokens):
    weights = _moe(shared)
    dot = dot_weights(weights)
    assert dot.up.dtype == torch.int32
    x = torch.randn(tokens, 192, generator=torch.Generator().manual_seed(tokens))
    got = moe_forward(x, dot)
    assert torch.equal(got, moe_forward_ref(x, dot))
    assert torch.equal(moe_forward(x[-1:], dot), got[-1:])  # a token alone: the same bits
    torch.testing.assert_close(got, moe_forward_ref(x, weights), atol=0.1, rtol=0.02)


def test_moe_dot_needs_sizes_in_sixteens():
    assert dot_weights(_moe(False, inter=40)) is None


def test_precision_switch(medium):
    assert dot_allowed()
    torch.set_float32_matmul_precision("highest")
    assert not dot_allowed()
    torch.set_float32_matmul_precision("high")
    assert not dot_allowed()


@pytest.fixture(scope="module")
def model():
    return twotower_rt.load()  # the default model: a bfloat16 checkpoint, loaded as float32


def _layers(lm):
    tower = lm.denoiser_tower
    moe = next(b.mixer for b in tower.layers if b.kind == "moe")
    mamba = next(b.mixer for b in tower.layers if b.kind == "mamba")
    return moe, mamba


@torch.inference_mode()
def test_model_layers_take_the_dot_products(model, medium):
    """Under "medium" a projection of the model is the dot products' chain (its weight rounded
    to bfloat16: exact for this bf16 checkpoint), and an MoE layer the dot kernel; under
    "highest" they are the float32 kernels' again."""
    moe, mamba = _layers(model.lm)
    h = torch.randn(16, 192, generator=torch.Generator().manual_seed(3))
    proj = mamba.in_proj
    assert torch.equal(proj(h), linear_dot_ref(h, proj.weight, proj.bias))
    got = moe(h[None])[0]
    assert torch.equal(got, cpu_fast.moe_forward(moe, h[None])[0])
    assert torch.equal(got, moe_forward_ref(h, moe.__dict__["_cpu_dot_weight"][1]))
    torch.set_float32_matmul_precision("highest")
    want = linear_cpu.linear_cpu(h, linear_cpu.k_major(proj.weight), out_features=proj.out_features)
    assert torch.equal(proj(h), want)


@torch.inference_mode()
def test_generation_under_medium_is_batch_invariant(model, medium):
    """Every kernel computes a row alone, so a prompt's tokens do not depend on its batch under
    "medium" either, in both modes."""
    prompts = [[5, 9, 200, 31, 7, 8], [44, 12, 9], [300, 301, 302, 303]]
    for mode, extra in (("ar", {}), ("mask_diffusion", {"confidence_threshold": 0.8})):
        together = model.generate(prompts, mode=mode, max_new_tokens=32, **extra).sequences
        alone = [model.generate([p], mode=mode, max_new_tokens=32, **extra).sequences[0]
                 for p in prompts]  # fmt: skip
        assert together == alone


@torch.inference_mode()
def test_verified_is_still_ar_under_medium(model, medium):
    """The verified mode's promise (greedy output equals ``ar``'s, token for token) under the dot
    products too: its verify pass computes each row as ``ar``'s one-token steps do."""
    prompts = [model.encode(t) for t in ("ROMEO. But soft, what light", "JULIET.", "O")]
    want = model.generate(prompts, mode="ar", max_new_tokens=48).sequences
    for draft_steps in (1, 3):
        got = model.generate(prompts, mode="verified", max_new_tokens=48, draft_steps=draft_steps,
                             confidence_threshold=0.8)  # fmt: skip
        assert got.sequences == want


@torch.inference_mode()
def test_time_conditioning_follows_the_precision(model, medium):
    """The denoiser's per-t modulation is made once per value and kept: one made under "highest"
    is not served under "medium" (its time embedding's projections differ), and back."""
    lm = model.lm
    t = torch.tensor([1.0, 0.5])
    want_medium = cpu_fast.stacked_tables(lm)[:, None] + lm.time_embedding(t[:1])[0][None, None]
    torch.set_float32_matmul_precision("highest")
    highest = cpu_fast.modulation(lm, t)
    torch.set_float32_matmul_precision("medium")
    medium = cpu_fast.modulation(lm, t)
    assert not torch.equal(highest, medium)
    assert torch.equal(medium[:, :1], want_medium)
    torch.set_float32_matmul_precision("highest")
    assert torch.equal(cpu_fast.modulation(lm, t), highest)
