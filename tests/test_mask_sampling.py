"""mask_sampling / sample_tokens and their references: Philox against Random123's known answers,
the commit rule on hand-made confidences, the Gumbel-max draws by distribution, and, on a GPU, the
CUDA kernels against the references (same draws for the same seed and offset)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_frequencies, install_fake_extension, raw_view

from twotower_rt.ops import (
    mask_sampling,
    mask_sampling_backend,
    mask_sampling_ref,
    sample_tokens,
    sample_tokens_backend,
    sample_tokens_ref,
)
from twotower_rt.ops.mask_sampling import MASKED_LOGIT, allocate_output, commit_rule
from twotower_rt.ops.philox import gumbel_ref, philox4x32_10, uniform_ref

MASK = 3

# Random123's tests/kat_vectors (https://github.com/DEShawResearch/random123), the three
# "philox4x32 10" lines: counter (4 words), key (2 words) -> expected output (4 words).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (
        (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
        (0xFFFFFFFF, 0xFFFFFFFF),
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def seeds(*values, device="cpu"):
    return torch.tensor(values, dtype=torch.int64, device=device)


# --- Philox and the noise ------------------------------------------------------------------------


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    out = philox4x32_10(torch.tensor(counter), torch.tensor(key))
    assert out.tolist() == list(expected)


def test_philox_broadcasts_over_counters():
    counters = torch.tensor([c for c, _, _ in PHILOX_KAT])
    keys = torch.tensor([k for _, k, _ in PHILOX_KAT])
    assert philox4x32_10(counters, keys).tolist() == [list(e) for _, _, e in PHILOX_KAT]


def test_uniform_layout_and_range():
    u = uniform_ref(seeds(7, 2**40 + 3), seeds(0, 2**33 + 1), positions=3, vocab=10)
    assert u.shape == (2, 3, 10) and u.dtype == torch.float32
    assert (u > 0).all() and (u < 1).all()
    # u = (2k + 1) / 2**24 exactly
    odd = u.double() * 2**24
    assert torch.equal(odd, odd.round()) and (odd.round().long() % 2 == 1).all()
    # Element v is word v % 4 of quad v // 4 at counter (v // 4, position, offset lo, offset hi).
    seed, offset, position, v = 2**40 + 3, 2**33 + 1, 2, 9
    words = philox4x32_10(
        torch.tensor([v // 4, position, offset & 0xFFFFFFFF, offset >> 32]),
        torch.tensor([seed & 0xFFFFFFFF, seed >> 32]),
    )
    assert u[1, position, v].item() == ((words[v % 4].item() >> 9) * 2 + 1) * 2.0**-24


def test_noise_is_per_row_not_per_batch():
    alone = uniform_ref(seeds(11), seeds(5), 4, 33)
    batched = uniform_ref(seeds(3, 11, 11), seeds(5, 5, 6), 4, 33)
    assert torch.equal(batched[1], alone[0])
    assert not torch.equal(batched[2], alone[0])  # another offset: other numbers
    assert not torch.equal(batched[0], alone[0])  # another seed
    assert not torch.equal(alone[0, 0], alone[0, 1])  # positions differ


def test_gumbel_moments():
    g = gumbel_ref(seeds(*range(8)), seeds(*range(8)), 16, 4096).double()
    euler_gamma = 0.5772156649
    assert abs(g.mean().item() - euler_gamma) < 0.01
    assert abs(g.var().item() - math.pi**2 / 6) < 0.02
    assert g.max().item() < 17.0  # the kernels' kGumbelMax bound


# --- the commit rule on hand-made confidences ----------------------------------------------------


def rule(confidence, masked, step, steps=4, threshold=0.9):
    conf = torch.tensor([confidence])
    m = torch.tensor([masked])
    commit, k = commit_rule(conf, m, torch.tensor([step]), steps, threshold)
    return commit[0].tolist(), k.item()


def test_rule_threshold_schedule_and_at_least_one():
    # 3 above 0.9, schedule ceil(6 / 4) = 2 -> the 3 confident ones.
    conf = [0.95, 0.5, 0.92, 0.3, 0.91, 0.2]
    assert rule(conf, [True] * 6, 0) == ([True, False, True, False, True, False], 3)
    # none above: ceil(6 / 3) = 2, the two most confident.
    conf = [0.5, 0.6, 0.7, 0.3, 0.4, 0.2]
    assert rule(conf, [True] * 6, 1) == ([False, True, True, False, False, False], 2)
    # at least one when the schedule asks for less.
    assert rule(conf, [True] * 6, 0, steps=16)[1] == 1


def test_rule_threshold_is_strict_and_only_masked_count():
    assert rule([0.9, 0.95], [True, False], 0, steps=16) == ([True, False], 1)
    assert rule([0.9, 0.5], [True, True], 0, steps=16, threshold=0.9)[1] == 1


def test_rule_last_step_and_nothing_masked():
    assert rule([0.1, 0.2, 0.3], [True, False, True], 3) == ([True, False, True], 2)
    assert rule([0.1, 0.2, 0.3], [True, False, True], 7) == ([True, False, True], 2)  # past the end
    assert rule([0.1, 0.2], [False, False], 0) == ([False, False], 0)


def test_rule_ties_commit_the_lower_position():
    assert rule([0.5, 0.7, 0.7, 0.7], [True] * 4, 0, steps=2) == ([False, True, True, False], 2)


def test_rule_per_row_steps():
    conf = torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 3)
    masked = torch.ones(3, 4, dtype=torch.bool)
    commit, k = commit_rule(conf, masked, torch.tensor([0, 2, 3]), 4, 0.9)
    assert k.tolist() == [1, 2, 4]
    assert commit.tolist() == [[False, False, False, True], [False, False, True, True], [True] * 4]


# --- mask_sampling_ref ---------------------------------------------------------------------------


def call_ref(logits, block, step=0, steps=16, threshold=0.9, **kw):
    return mask_sampling_ref(
        logits, block, mask_token_id=MASK, step=step, steps_per_block=steps,
        confidence_threshold=threshold, **kw,
    )  # fmt: skip


def test_ref_greedy_prediction_and_confidence():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 40, generator=gen) * 3
    logits[..., MASK] = 100.0  # the largest raw logit: must be ignored
    block = torch.full((3, 5), MASK)
    block[1, 2] = 17
    out = call_ref(logits, block)
    x = logits.clone()
    x[..., MASK] = float("-inf")
    probs = torch.softmax(x, -1)
    want_pred = torch.where(block == MASK, x.argmax(-1), block)
    assert torch.equal(out.prediction, want_pred)
    want_conf = probs.max(-1).values
    masked = block == MASK
    torch.testing.assert_close(out.confidence[masked], want_conf[masked])
    assert out.confidence[1, 2].item() == float("inf")
    assert out.block[1, 2].item() == 17 and not out.masked[1, 2]
    assert torch.equal(out.num_committed, (out.block != block).sum(-1))
    assert torch.equal(out.masked, out.block == MASK)


def test_ref_gumbel_distribution_and_mask_never_drawn():
    """Rows with the same logits and different seeds: the prediction follows softmax(logp / T)
    over the non-mask tokens."""
    gen = torch.Generator().manual_seed(1)
    V, n = 8, 6000
    row = torch.randn(V, generator=gen)
    row[MASK] = 30.0
    logits = row.expand(n, 1, V).clone()
    out = call_ref(
        logits, torch.full((n, 1), MASK), temperature=0.8, seed=torch.arange(n),
        offset=torch.full((n,), 5),
    )  # fmt: skip
    counts = torch.bincount(out.prediction[:, 0], minlength=V).double()
    masked_row = row.clone()
    masked_row[MASK] = float("-inf")
    assert_frequencies(counts, torch.softmax(masked_row / 0.8, -1).double())


def test_ref_offsets_give_fresh_draws_and_confidence_is_untempered():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 16, 64, generator=gen)
    block = torch.full((1, 16), MASK)
    kw = dict(temperature=1.0, seed=seeds(9))
    a = call_ref(logits, block, offset=seeds(0), **kw)
    b = call_ref(logits, block, offset=seeds(1), **kw)
    assert not torch.equal(a.prediction, b.prediction)
    assert torch.equal(a.prediction, call_ref(logits, block, offset=seeds(0), **kw).prediction)
    logp = torch.log_softmax(logits.masked_fill(torch.arange(64) == MASK, MASKED_LOGIT), -1)
    torch.testing.assert_close(a.confidence, logp.gather(-1, a.prediction[..., None])[..., 0].exp())


# --- mask_sampling on the CPU: the reference, out=, argument checks ------------------------------


def _same_decision(got, want):
    """The CPU's decision against the reference: exact, but for the confidences, which the CPU
    kernel (where built: tests/test_mask_decide_cpu.py) sums in its own order, to float32
    rounding."""
    for name in ("block", "masked", "num_committed", "prediction"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    torch.testing.assert_close(got.confidence, want.confidence, rtol=2e-6, atol=0)


def test_cpu_is_the_reference_and_out_is_written():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 7, 99, generator=gen)
    block = torch.full((2, 7), MASK)
    block[0, :3] = 5
    kw = dict(mask_token_id=MASK, step=2, steps_per_block=4, confidence_threshold=0.2)
    want = mask_sampling_ref(logits, block, **kw)
    got = mask_sampling(logits, block, **kw)
    _same_decision(got, want)
    out = allocate_output(2, 7, "cpu")
    assert mask_sampling(logits, block, **kw, out=out) is out
    _same_decision(out, want)
    assert torch.equal(out.confidence, got.confidence)


def _bad_calls():
    logits = torch.randn(2, 4, 10)
    block = torch.full((2, 4), MASK)
    kw = dict(mask_token_id=MASK, step=0, steps_per_block=4, confidence_threshold=0.9)
    return [
        ("logits must be", lambda: mask_sampling(logits[0], block, **kw)),
        ("block must be", lambda: mask_sampling(logits, block[:, :3], **kw)),
        ("block must be", lambda: mask_sampling(logits, block.int(), **kw)),
        ("mask_token_id", lambda: mask_sampling(logits, block, **{**kw, "mask_token_id": 10})),
        ("steps_per_block", lambda: mask_sampling(logits, block, **{**kw, "steps_per_block": 0})),
        ("temperature", lambda: mask_sampling(logits, block, **kw, temperature=-1.0)),
        ("seed is required", lambda: mask_sampling(logits, block, **kw, temperature=1.0)),
        (
            "offset must be",
            lambda: mask_sampling(
                logits, block, **kw, temperature=1.0, seed=seeds(1, 2), offset=seeds(1)
            ),
        ),
        ("step must have", lambda: mask_sampling(logits, block, **{**kw, "step": seeds(1, 2, 3)})),
        ("top_k", lambda: sample_tokens(logits[0], 1.0, top_k=0, seed=seeds(1), offset=seeds(1))),
        ("top_p", lambda: sample_tokens(logits[0], 1.0, top_p=0.0, seed=seeds(1), offset=seeds(1))),
        ("seed is required", lambda: sample_tokens(logits[0], 1.0)),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_argument_errors(index):
    message, call = _bad_calls()[index]
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_backends_on_cpu():
    assert mask_sampling_backend("cpu")[0] == "torch"
    assert sample_tokens_backend("cpu")[0] == "torch"


def test_backends_for_cuda_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    for backend in (mask_sampling_backend, sample_tokens_backend):
        chosen, reason = backend("cuda")
        assert chosen == "none" and "no CUDA device" in reason


# --- sample_tokens_ref ---------------------------------------------------------------------------


def test_sample_tokens_ref_greedy_and_filters():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 300, generator=gen)
    assert torch.equal(sample_tokens_ref(logits, 0.0), logits.argmax(-1))
    s, o = torch.arange(5), torch.zeros(5, dtype=torch.int64)
    top1 = sample_tokens_ref(logits, 1.0, top_k=1, seed=s, offset=o)
    assert torch.equal(top1, logits.argmax(-1))
    for trial in range(20):
        o = torch.full((5,), trial)
        tok = sample_tokens_ref(logits, 1.5, top_k=7, seed=s, offset=o)
        top7 = logits.topk(7, -1).indices
        assert (top7 == tok[:, None]).any(-1).all()


def test_sample_tokens_ref_top_p_distribution():
    probs = torch.tensor([0.10, 0.50, 0.15, 0.25])
    n = 8000
    tok = sample_tokens_ref(
        probs.log().expand(n, 4), 1.0, top_p=0.7, seed=torch.arange(n), offset=torch.zeros(n).long()
    )
    counts = torch.bincount(tok, minlength=4).double()
    assert_frequencies(counts, torch.tensor([0.0, 0.5, 0.0, 0.25]).double() / 0.75)


# --- the CUDA wrappers' plumbing, on the CPU ------------------------------------------------------


class FakeExtension:
    """Stands in for twotower_rt._C on the CPU: reads the raw pointers and strides it is given and
    computes with the references, so the wrappers' pointer/stride/dtype plumbing is checked here."""

    DTYPE_FLOAT32, DTYPE_BFLOAT16 = 0, 1
    DTYPES = {0: torch.float32, 1: torch.bfloat16}

    def __init__(self):
        self.calls = []

    def mask_sampling_workspace_bytes(self, batch, block_size, vocab):
        return 16 * batch * block_size

    def mask_sampling(self, **a):
        self.calls.append(a)
        B, S, V = a["batch"], a["block_size"], a["vocab"]
        assert a["workspace_bytes"] >= 16 * B * S and a["workspace"] % 16 == 0
        i64 = torch.int64
        logits = raw_view(
            a["logits"], (B, S, V), (a["logits_batch_stride"], a["logits_position_stride"], 1),
            self.DTYPES[a["dtype"]],
        )  # fmt: skip
        block = raw_view(a["block"], (B, S), (a["block_row_stride"], 1), i64).clone()
        sampled = a["temperature"] > 0
        ref = mask_sampling_ref(
            logits, block, mask_token_id=a["mask_token_id"],
            step=raw_view(a["step"], (B,), (1,), i64), steps_per_block=a["steps_per_block"],
            confidence_threshold=a["confidence_threshold"], temperature=a["temperature"],
            seed=raw_view(a["seed"], (B,), (1,), i64) if sampled else None,
            offset=raw_view(a["offset"], (B,), (1,), i64) if sampled else None,
        )  # fmt: skip
        raw_view(a["out_block"], (B, S), (S, 1), i64).copy_(ref.block)
        raw_view(a["out_masked"], (B, S), (S, 1), torch.bool).copy_(ref.masked)
        raw_view(a["out_num_committed"], (B,), (1,), i64).copy_(ref.num_committed)
        raw_view(a["out_prediction"], (B, S), (S, 1), i64).copy_(ref.prediction)
        raw_view(a["out_confidence"], (B, S), (S, 1), torch.float32).copy_(ref.confidence)

    def sample_tokens_split_size(self, batch, vocab, splits, sm_count):
        return 8 * splits if splits > 1 else 0  # not the launcher's rule: plumbing only

    def sample_tokens_workspace_bytes(self, batch, split_size):
        return batch * (8 * 256 + 4) * 8 if split_size else 0

    def sample_tokens(self, **a):
        self.calls.append(a)
        if a["split_size"]:
            need = self.sample_tokens_workspace_bytes(a["batch"], a["split_size"])
            assert a["workspace"] and a["workspace_bytes"] >= need
        B, V = a["batch"], a["vocab"]
        logits = raw_view(a["logits"], (B, V), (a["logits_row_stride"], 1), self.DTYPES[a["dtype"]])
        sampled = a["temperature"] > 0
        tok = sample_tokens_ref(
            logits, a["temperature"], a["top_k"] or None,
            a["top_p"] if a["top_p"] < 1 else None,
            raw_view(a["seed"], (B,), (1,), torch.int64) if sampled else None,
            raw_view(a["offset"], (B,), (1,), torch.int64) if sampled else None,
        )  # fmt: skip
        raw_view(a["out"], (B,), (1,), torch.int64).copy_(tok)


@pytest.fixture
def fake_extension(monkeypatch):
    return install_fake_extension(monkeypatch, FakeExtension())


def test_mask_sampling_wrapper_plumbing(fake_extension):
    from twotower_rt.ops.mask_sampling import _mask_sampling_cuda

    gen = torch.Generator().manual_seed(7)
    B, S, V = 3, 5, 37
    wide = torch.randn(S, B, V + 4, generator=gen).to(torch.bfloat16)
    logits = wide.transpose(0, 1)[..., 2 : V + 2]  # strided batch and positions, offset start
    block = torch.full((B, S), MASK)
    block[0, 1] = 9
    seed_t, offset_t = seeds(4, 5, 6), seeds(1, 1, 2)
    args = (MASK, torch.tensor([0, 1, 3]), 4, 0.3, 0.9, seed_t, offset_t)
    want = mask_sampling_ref(
        logits, block, mask_token_id=MASK, step=args[1], steps_per_block=4,
        confidence_threshold=0.3, temperature=0.9, seed=seed_t, offset=offset_t,
    )  # fmt: skip
    got = _mask_sampling_cuda(logits, block, *args, None)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    call = fake_extension.calls[-1]
    assert (call["logits_batch_stride"], call["logits_position_stride"]) == (V + 4, B * (V + 4))

    # In place into block, greedy, int step; a vocab-strided input is copied first.
    out = allocate_output(B, S, "cpu")._replace(block=block)
    xt = torch.randn(B, V, S, generator=gen).transpose(1, 2)
    want = mask_sampling_ref(
        xt, block.clone(), mask_token_id=MASK, step=2, steps_per_block=4, confidence_threshold=0.3
    )
    assert _mask_sampling_cuda(xt, block, MASK, 2, 4, 0.3, 0.0, None, None, out) is out
    assert torch.equal(block, want.block) and torch.equal(out.masked, want.masked)
    assert fake_extension.calls[-1]["seed"] == 0


def test_sample_tokens_wrapper_plumbing(fake_extension):
    from twotower_rt.ops.sample_tokens import _sample_tokens_cuda

    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(4, 300, generator=gen)[:, 10:260]
    seed_t, offset_t = seeds(1, 2, 3, 4), seeds(0, 0, 5, 5)
    want = sample_tokens_ref(logits, 0.8, 20, 0.9, seed_t, offset_t)
    assert torch.equal(_sample_tokens_cuda(logits, 0.8, 20, 0.9, seed_t, offset_t, None), want)
    assert fake_extension.calls[-1]["logits_row_stride"] == 300
    assert fake_extension.calls[-1]["split_size"] == 0  # 250 logits: too few to split
    out = torch.full((8,), -1)[::2]  # non-contiguous out: written through a temporary
    assert _sample_tokens_cuda(logits, 0.0, None, None, None, None, out) is out
    assert torch.equal(out, logits.argmax(-1))
    # Split rows: the split size asked for is passed on, with a workspace (the fake checks it).
    got = _sample_tokens_cuda(logits, 0.8, 20, 0.9, seed_t, offset_t, None, splits=3)
    assert torch.equal(got, want) and fake_extension.calls[-1]["split_size"] == 24
    with pytest.raises(ValueError, match="splits"):
        sample_tokens(logits, 0.8, 20, 0.9, seed_t, offset_t, splits=-1)


# --- the CUDA kernels -----------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)


def _require_kernels(dtype=torch.float32):
    for backend in (mask_sampling_backend, sample_tokens_backend):
        chosen, reason = backend("cuda", dtype)
        if chosen != "cuda":
            pytest.skip(f"the CUDA kernel does not run here: {reason}")


def _scores_margin(logits32, temperature, seed, offset):
    """The reference's decision scores per position (B, S, V) and their top-2 margin (B, S)."""
    B, S, V = logits32.shape
    x = logits32.clone()
    x[..., MASK] = MASKED_LOGIT
    logp = torch.log_softmax(x, -1)
    scores = logp / temperature + gumbel_ref(seed, offset, S, V) if temperature > 0 else logp
    if V == 1:
        return torch.full((B, S), float("inf"), device=logits32.device)
    top2 = scores.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def check_mask_sampling(out, logits, block, step, steps, threshold, temperature, seed, offset):
    """The kernel's outputs vs mask_sampling_ref on the fp32 upcast: identical predictions wherever
    the reference's decision is not a near-tie, confidences to fp32 rounding, and a commit decision
    that is exactly the rule applied to the kernel's own confidences."""
    ref = mask_sampling_ref(
        logits.float(), block, mask_token_id=MASK, step=step, steps_per_block=steps,
        confidence_threshold=threshold, temperature=temperature, seed=seed, offset=offset,
    )  # fmt: skip
    masked = block == MASK
    margin = _scores_margin(logits.float(), temperature, seed, offset)
    clear = ~masked | (margin > 1e-3 * max(1.0, 1.0 / temperature if temperature > 0 else 1.0))
    assert torch.equal(out.prediction[clear], ref.prediction[clear])
    assert (out.prediction != ref.prediction).float().mean() < 0.01
    same = out.prediction == ref.prediction
    torch.testing.assert_close(out.confidence[same], ref.confidence[same], rtol=1e-4, atol=1e-7)
    assert (out.prediction[masked] != MASK).all(), "the mask token was predicted"
    step_t = step if isinstance(step, torch.Tensor) else torch.full_like(out.num_committed, step)
    commit, k = commit_rule(out.confidence, masked, step_t, steps, threshold)
    assert torch.equal(out.num_committed, k)
    assert torch.equal(out.block, torch.where(commit, out.prediction, block))
    assert torch.equal(out.masked, masked & ~commit)
    if torch.equal(out.prediction, ref.prediction) and torch.equal(out.confidence, ref.confidence):
        assert torch.equal(out.block, ref.block)


def poisoned_output(B, S):
    out = allocate_output(B, S, "cuda")
    out.block.fill_(-7)
    out.masked.fill_(True)
    out.num_committed.fill_(-7)
    out.prediction.fill_(-7)
    out.confidence.fill_(float("nan"))
    return out


def make_case(B, S, V, dtype, seed=0, committed_fraction=0.3):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(B, S, V, device="cuda", generator=gen) * 2.5).to(dtype)
    logits[..., MASK] += 20  # tempting, never allowed
    committed = torch.rand(B, S, device="cuda", generator=gen) < committed_fraction
    tokens = torch.randint(4, V, (B, S), device="cuda", generator=gen) if V > 4 else 0
    block = torch.where(committed, tokens, torch.full((B, S), MASK, device="cuda"))
    seed_t = torch.randint(0, 2**62, (B,), device="cuda", generator=gen)
    offset_t = torch.randint(0, 2**40, (B,), device="cuda", generator=gen)
    return logits, block, seed_t, offset_t


SHAPES = [(1, 16, 131072), (3, 7, 1001), (64, 16, 4099), (3, 1, 99), (1, 16, 8), (64, 1, 131072)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("B,S,V", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_kernel_matches_ref(B, S, V, dtype, temperature):
    _require_kernels(dtype)
    logits, block, seed_t, offset_t = make_case(B, S, V, dtype, seed=B * S + V)
    for step, steps, threshold in [(0, 16, 0.9), (2, 4, 0.3), (15, 16, 0.9)]:
        out = poisoned_output(B, S)
        result = mask_sampling(
            logits, block, mask_token_id=MASK, step=step, steps_per_block=steps,
            confidence_threshold=threshold, temperature=temperature, seed=seed_t, offset=offset_t,
            out=out,
        )  # fmt: skip
        assert result is out
        torch.cuda.synchronize()
        check_mask_sampling(
            out, logits, block, step, steps, threshold, temperature, seed_t, offset_t
        )


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_noncontiguous_unaligned_per_row_step(dtype):
    _require_kernels(dtype)
    B, S, V = 3, 16, 4096 + 5
    gen = torch.Generator(device="cuda").manual_seed(5)
    wide = torch.randn(S, B, V + 3, device="cuda", generator=gen).to(dtype)
    block = torch.full((B, S), MASK, device="cuda")
    block[1, ::3] = 9
    step = torch.tensor([0, 5, 15], device="cuda")
    seed_t, offset_t = seeds(1, 2, 3, device="cuda"), seeds(0, 0, 7, device="cuda")
    for logits in (wide.transpose(0, 1)[..., :V], wide.transpose(0, 1)[..., 1 : V + 1]):
        for temperature in (0.0, 1.3):
            out = mask_sampling(
                logits, block, mask_token_id=MASK, step=step, steps_per_block=16,
                confidence_threshold=0.5, temperature=temperature, seed=seed_t, offset=offset_t,
            )  # fmt: skip
            check_mask_sampling(out, logits, block, step, 16, 0.5, temperature, seed_t, offset_t)


@pytest.mark.gpu
@needs_gpu
def test_kernel_draws_identical_noise_to_ref():
    """Flat logits make the draw all noise: the kernel must pick what the reference picks."""
    _require_kernels()
    B, S, V = 4, 16, 50000
    logits = torch.zeros(B, S, V, device="cuda")
    block = torch.full((B, S), MASK, device="cuda")
    seed_t, offset_t = (
        seeds(0, 1, 2**63 - 1, 12345, device="cuda"),
        seeds(0, 1, 2, 2**35, device="cuda"),
    )
    out = mask_sampling(
        logits, block, mask_token_id=MASK, step=0, steps_per_block=16, confidence_threshold=0.9,
        temperature=1.0, seed=seed_t, offset=offset_t,
    )  # fmt: skip
    noise = gumbel_ref(seed_t, offset_t, S, V)
    noise[..., MASK] = float("-inf")
    top2 = noise.topk(2, -1)
    clear = top2.values[..., 0] - top2.values[..., 1] > 1e-5
    assert clear.float().mean() > 0.9
    assert torch.equal(out.prediction[clear], top2.indices[..., 0][clear])


@pytest.mark.gpu
@needs_gpu
def test_kernel_in_place_graph_replay_and_determinism():
    _require_kernels()
    B, S, V = 16, 16, 131072
    logits, _, seed_t, offset_t = make_case(B, S, V, torch.float32, seed=6)
    start = torch.full((B, S), MASK, device="cuda")
    kw = dict(mask_token_id=MASK, steps_per_block=16, confidence_threshold=0.9, temperature=0.9)
    first = mask_sampling(logits, start, step=0, seed=seed_t, offset=offset_t, **kw)
    again = mask_sampling(logits, start, step=0, seed=seed_t, offset=offset_t, **kw)
    for a, b in zip(first, again):
        assert torch.equal(a, b)

    # In place, captured in a graph: each replay reads the bumped offset and step.
    block = start.clone()
    step_t = torch.zeros(B, dtype=torch.int64, device="cuda")
    offset_dev = offset_t.clone()
    out = allocate_output(B, S, "cuda")
    out = out._replace(block=block)
    mask_sampling(logits, block.clone(), step=step_t, seed=seed_t, offset=offset_dev, **kw)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mask_sampling(logits, block, step=step_t, seed=seed_t, offset=offset_dev, out=out, **kw)
        offset_dev.add_(1)
        step_t.add_(1)
    for replay in range(16):
        before = block.clone()
        graph.replay()
        torch.cuda.synchronize()
        check_mask_sampling(
            out._replace(block=block), logits, before, replay, 16, 0.9, 0.9, seed_t,
            offset_t + replay,
        )  # fmt: skip
        assert torch.equal(out.num_committed, (block != before).sum(-1))
    assert not (block == MASK).any(), "the last step commits everything"


def draw_keeping_ties(logits, temperature, top_k, top_p, seed_t, offset_t):
    """sample_tokens_ref, except that every token tied with the last one kept by top-k or top-p is
    kept too: the kernel's documented semantics, which differ from torch.topk's only at ties
    (frequent in bfloat16)."""
    scaled = logits.float() / temperature
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if top_k is not None:
        keep = scaled >= scaled.topk(top_k, -1).values[:, -1:]
    if top_p is not None and top_p < 1:
        probs = torch.softmax(scaled.masked_fill(~keep, float("-inf")), -1)
        sorted_probs, order = probs.sort(-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_x = scaled.gather(-1, order)
        cut = torch.where(before < top_p, sorted_x, float("inf")).min(-1, keepdim=True).values
        keep &= scaled >= cut
    noise = gumbel_ref(seed_t, offset_t, 1, logits.shape[-1])[:, 0]
    return torch.where(keep, scaled + noise, float("-inf")).argmax(-1)


def check_sample_tokens(tok, logits, temperature, top_k, top_p, seed_t, offset_t):
    """The same token as the reference up to ties at the cut-offs; rounding at a cut-off or between
    two scores may flip a rare row."""
    want = draw_keeping_ties(logits, temperature, top_k, top_p, seed_t, offset_t)
    assert (tok == want).float().mean().item() >= 0.98, (tok, want)
    if logits.dtype == torch.float32:  # no ties to speak of: the reference itself
        ref = sample_tokens_ref(logits, temperature, top_k, top_p, seed_t, offset_t)
        assert (tok == ref).float().mean().item() >= 0.98
    if top_k is not None:
        scaled = logits.float() / temperature
        kth = scaled.topk(top_k, -1).values[:, -1]
        assert (scaled.gather(-1, tok[:, None])[:, 0] >= kth).all(), "drawn outside the top-k"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("B,V", [(1, 131072), (3, 1001), (64, 4099), (5, 99)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(0.0, None, None), (0.8, None, None), (1.0, 50, None), (0.7, None, 0.9), (1.2, 20, 0.8)],
)
def test_sample_tokens_matches_ref(B, V, dtype, temperature, top_k, top_p):
    _require_kernels(dtype)
    gen = torch.Generator(device="cuda").manual_seed(B + V)
    logits = (torch.randn(B, V, device="cuda", generator=gen) * 3).to(dtype)
    seed_t = torch.randint(0, 2**62, (B,), device="cuda", generator=gen)
    offset_t = torch.randint(0, 2**40, (B,), device="cuda", generator=gen)
    out = torch.full((B,), -7, dtype=torch.int64, device="cuda")
    assert sample_tokens(logits, temperature, top_k, top_p, seed_t, offset_t, out=out) is out
    if temperature == 0:
        assert torch.equal(out, logits.float().argmax(-1))
    else:
        check_sample_tokens(out, logits, temperature, top_k, top_p, seed_t, offset_t)


@pytest.mark.gpu
@needs_gpu
def test_sample_tokens_distribution_on_gpu():
    _require_kernels()
    probs = torch.tensor([0.10, 0.50, 0.15, 0.25, 0.0], device="cuda")
    n = 20000
    logits = probs.log().expand(n, 5).contiguous()
    tok = sample_tokens(
        logits, 1.0, top_p=0.7, seed=torch.arange(n, device="cuda"),
        offset=torch.zeros(n, dtype=torch.int64, device="cuda"),
    )  # fmt: skip
    counts = torch.bincount(tok, minlength=5).double().cpu()
    assert_frequencies(counts, torch.tensor([0.0, 0.5, 0.0, 0.25, 0.0]).double() / 0.75)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("B,V", [(1, 131072), (3, 1001), (2, 99), (8, 50000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(0.0, None, None), (0.8, None, None), (1.0, 50, None), (0.7, None, 0.9), (1.2, 20, 0.8)],
)
def test_sample_tokens_split_rows_equal_one_cta(B, V, dtype, temperature, top_k, top_p):
    """Rows split over CTAs give bitwise the one-CTA kernel's token (integer histograms, the same
    selections, max-then-lowest-index merges), for automatic and forced slice counts, including
    slices that do not divide the row; a strided row takes the scalar loads."""
    _require_kernels(dtype)
    gen = torch.Generator(device="cuda").manual_seed(B * V)
    wide = (torch.randn(B, V + 3, device="cuda", generator=gen) * 3).to(dtype)
    seed_t = torch.randint(0, 2**62, (B,), device="cuda", generator=gen)
    offset_t = torch.randint(0, 2**40, (B,), device="cuda", generator=gen)
    for logits in (wide[:, :V].contiguous(), wide[:, 3:]):  # aligned, and an odd offset
        one = sample_tokens(logits, temperature, top_k, top_p, seed_t, offset_t, splits=1)
        for splits in (0, 3, 64):
            out = torch.full((B,), -7, dtype=torch.int64, device="cuda")
            sample_tokens(logits, temperature, top_k, top_p, seed_t, offset_t, out=out,
                          splits=splits)  # fmt: skip
            assert torch.equal(out, one), (splits, out, one)
