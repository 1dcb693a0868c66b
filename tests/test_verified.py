"""The verified mode: greedy output equals ``ar`` token for token, sampled output is distributed as
AR sampling, and the rollback leaves the context a pass over the kept tokens would."""

import math

import pytest
import torch
from conftest import load_cases

from twotower_rt import fastpath
from twotower_rt.engine import Engine
from twotower_rt.generate import _prefill
from twotower_rt.model.mamba import MambaState
from twotower_rt.model.rollback import _replay, recorded_context_forward, roll_back
from twotower_rt.ops.verify_sampling import verify_sampled

CASES = load_cases("cases.jsonl")
AR_CASES = [c for c in CASES if c["mode"] == "ar"]
DEFAULT_PROMPTS = [
    "ROMEO. But soft, what light",
    "And God said, Let there be",
    "KING HENRY. Once more unto the breach, dear friends",
    "JULIET.",
    "In the beginning",
    "HAMLET. To be, or not to be, that is the question:",
    "The LORD is my shepherd",
    "O",
]


@pytest.mark.parametrize("case", AR_CASES, ids=[c["id"] for c in AR_CASES])
@pytest.mark.parametrize("draft_steps", [1, 3])
def test_golden_ar_cases(golden_model, case, draft_steps):
    out = golden_model.generate(
        [case["input_ids"]], mode="verified", draft_steps=draft_steps, **case["params"]
    )
    assert out.sequences[0] == case["output_ids"], case["id"]
    assert out.finish_reason[0] == ("eos" if case["params"]["eos_token_id"] else "length")
    rounds = out.accepted_per_round[0]
    assert out.nfe[0] == draft_steps * len(rounds)
    assert sum(rounds) + len(rounds) >= case["num_generated"]


def test_golden_prompts_longer_batched(golden_model):
    """Every golden prompt, 40 tokens, in one batch and with block sizes 2, 8, 16: ar's tokens."""
    prompts = [c["input_ids"] for c in CASES]
    want = golden_model.generate(prompts, mode="ar", max_new_tokens=40).sequences
    for size in (2, 16):
        got = golden_model.generate(prompts, mode="verified", max_new_tokens=40, block_size=size)
        assert got.sequences == want, size


@pytest.fixture(scope="module")
def default_prompts(default_model):
    return [default_model.encode(t) for t in DEFAULT_PROMPTS]


@pytest.fixture(scope="module")
def default_ar(default_model, default_prompts):
    return default_model.generate(default_prompts, mode="ar", max_new_tokens=32)


@pytest.mark.parametrize("draft_steps", [1, 2, 4, 16])
def test_default_model_batched(default_model, default_prompts, default_ar, draft_steps):
    want = default_ar
    got = default_model.generate(
        default_prompts, mode="verified", max_new_tokens=32, draft_steps=draft_steps,
        confidence_threshold=0.8,
    )  # fmt: skip
    assert got.sequences == want.sequences


def test_default_model_alone_with_eos(default_model, default_prompts, draft_steps=1):
    """Alone, with an EOS that the text reaches (newline-ish tokens of the model): cut as ar."""
    eos = default_model.encode(".")[-1]
    for prompt in default_prompts:
        want = default_model.generate([prompt], mode="ar", max_new_tokens=32, eos_token_id=eos)
        got = default_model.generate(
            [prompt], mode="verified", max_new_tokens=32, eos_token_id=eos,
            draft_steps=draft_steps,
        )  # fmt: skip
        assert got.sequences == want.sequences
        assert got.finish_reason == want.finish_reason


def test_engine_shares_steps_with_other_modes(default_model, default_prompts):
    """Verified requests amid ar / mask-diffusion / mock-AR traffic, greedy and sampled, come out
    as alone; requests arriving while others run."""
    engine = Engine(default_model, max_slots=6, context=256)
    alone_engine = Engine(default_model, max_slots=1, context=256)
    jobs = [
        (default_prompts[0], "verified", {"max_new_tokens": 30}),
        (default_prompts[1], "mask_diffusion", {"max_new_tokens": 32}),
        (default_prompts[2], "verified", {"max_new_tokens": 25, "temperature": 0.9, "seed": 3}),
        (default_prompts[3], "ar", {"max_new_tokens": 20, "temperature": 0.7, "seed": 1}),
        (default_prompts[4], "verified", {"max_new_tokens": 33, "draft_steps": 3}),
        (default_prompts[5], "mock_ar", {"max_new_tokens": 10}),
        (default_prompts[6], "verified", {"max_new_tokens": 17, "temperature": 1.0, "seed": 9,
                                          "top_k": 50, "draft_steps": 2}),
    ]  # fmt: skip
    ids = [engine.add_request(p, m, **kw) for p, m, kw in jobs[:4]]
    for _ in range(3):
        engine.step()
    ids += [engine.add_request(p, m, **kw) for p, m, kw in jobs[4:]]
    engine.run()
    for rid, (prompt, mode, kw) in zip(ids, jobs):
        got = engine.pop(rid)
        (alone,) = alone_engine.generate([prompt], mode, **kw)
        assert got.generated == alone.generated, (mode, kw)
        assert len(got.generated) == kw["max_new_tokens"]
        if mode == "verified" and not kw.get("temperature"):
            (ar,) = alone_engine.generate([prompt], "ar", max_new_tokens=kw["max_new_tokens"])
            assert got.generated == ar.generated


def test_padded_buckets_change_nothing(default_model, default_prompts):
    """Bucketed (padded) batches of 3 rows run as 4, the spare slot taking the extra row."""
    prompts = default_prompts[:3]
    for temperature in (0.0, 0.8):
        kw = {"max_new_tokens": 24, "temperature": temperature, "seed": [1, 2, 3]}
        plain = Engine(default_model, max_slots=3, context=128).generate(prompts, "verified", **kw)
        padded = Engine(default_model, max_slots=3, context=128, pad_batches=True)
        assert [o.generated for o in padded.generate(prompts, "verified", **kw)] == [
            o.generated for o in plain
        ]


@pytest.mark.parametrize("keep", [[1, 16, 7, 3], [5], [16]])
@pytest.mark.parametrize("fast", [True, False], ids=["cpu_fast", "eager"])
def test_replay_is_the_mixer_with_n_valid(default_model, keep, fast):
    """Per Mamba layer, the replay from the recorded in_proj output is bitwise the mixer's own
    forward over the block with n_valid = keep (conv and SSM state), through the CPU fast path's
    state-only replay and through the plain one (ssm_scan), and leaves ``before`` as it was."""
    lm = default_model.lm
    cfg = lm.cfg
    keep = torch.tensor(keep)
    b = len(keep)
    for i, block in enumerate(lm.context_tower.layers):
        if block.kind != "mamba":
            continue
        mixer = block.mixer
        h = torch.randn(b, 16, cfg.hidden_size)
        state = MambaState(torch.randn(b, cfg.mamba_conv_dim, cfg.conv_kernel),
                           torch.randn(b, cfg.mamba_num_heads, cfg.mamba_head_dim,
                                       cfg.ssm_state_size))  # fmt: skip
        saved = MambaState(state.conv.clone(), state.ssm.clone())
        with torch.inference_mode(), fastpath.forced(fast):
            _, want = mixer(h, state, n_valid=keep)
            got = _replay(mixer, state, mixer.in_proj(h), keep)
        assert torch.equal(got.conv, want.conv), i
        assert torch.equal(got.ssm, want.ssm), i
        assert torch.equal(state.conv, saved.conv) and torch.equal(state.ssm, saved.ssm)


def test_rollback_equals_a_pass_over_the_kept_tokens(default_model, default_prompts):
    """roll_back after a pass over a 16-token block leaves (to fp32 rounding: the MoE's expert
    matmuls see other token groups) the states of a pass over the same block with n_valid = keep
    and those of a prefill of the kept tokens alone; lengths are the kept ones and the kept K/V
    are the pass's."""
    lm = default_model.lm
    prompts = default_prompts[:4]
    block = torch.randint(4, lm.cfg.vocab_size, (len(prompts), 16))
    keep = torch.tensor([1, 16, 7, 3])
    with torch.inference_mode():
        cache, *_ = _prefill(lm, prompts, 128, False)
        rows = torch.arange(len(prompts))
        before = cache.lengths.clone()
        ref = cache.index_select(rows)
        lm.context_forward(block, ref, n_valid=keep)
        fresh = cache.index_select(rows)
        width = int(keep.max())
        for r in range(len(prompts)):  # each row alone: a prefill of exactly its kept tokens
            one = fresh.index_select(torch.tensor([r]))
            lm.context_forward(block[r : r + 1, : int(keep[r])], one)
            for i, s in one.mamba.items():
                fresh.mamba[i].conv[r], fresh.mamba[i].ssm[r] = s.conv[0], s.ssm[0]
        _, record = recorded_context_forward(lm, block, cache)
        roll_back(lm, cache, record, keep)
    assert torch.equal(cache.lengths, before + keep)
    for i, state in cache.mamba.items():
        torch.testing.assert_close(state.conv, ref.mamba[i].conv, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(state.ssm, ref.mamba[i].ssm, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(state.conv, fresh.mamba[i].conv, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(state.ssm, fresh.mamba[i].ssm, atol=1e-5, rtol=1e-4)
    for i in cache.keys:
        for r in range(len(prompts)):
            span = slice(int(before[r]), int(before[r] + keep[r]))
            torch.testing.assert_close(cache.keys[i][r, span], ref.keys[i][r, span])
    assert width == 16


def _markov_round(p_table, q_table, prev, draft_len, seed, offset, use_q):
    """One round of a toy verified decoder over a Markov 'model': the draft proposes draft_len
    tokens from q_table given the previous token (its own torch generator), the target's p at each
    block position comes from p_table given the block's token there."""
    gen = torch.Generator().manual_seed(int(seed[0]) * 7919 + int(offset[0]))
    block = [prev]
    for _ in range(draft_len):
        block.append(torch.multinomial(q_table[block[-1]], 1, generator=gen)[:, 0])
    block = torch.stack(block, dim=1)  # (B, S)
    p = p_table[block]  # (B, S, V): position j predicts j + 1
    if use_q:
        q = q_table[block[:, :-1]]
    else:  # q = one_hot(draft): the rule for tokens fixed before the draft's last forward
        q = torch.nn.functional.one_hot(block[:, 1:], p.shape[-1]).float()
    return verify_sampled(p, q, block, seed, offset)


@pytest.mark.parametrize("use_q", [True, False])
def test_sampling_rule_is_ar_sampling(use_q):
    """The rule over whole generations of a Markov target with a different Markov draft: the
    first three emitted tokens' joint frequencies match the target chain's (chi-square over 64
    outcomes, 60000 sequences); no emitted token is one the target gives probability 0."""
    torch.manual_seed(0)
    V, S, B = 4, 4, 30000
    p_table = torch.softmax(torch.randn(V, V) * 1.5, dim=-1)
    p_table[:, 3] = 0.0  # token 3 never follows anything in the target
    p_table /= p_table.sum(-1, keepdim=True)
    q_table = torch.softmax(torch.randn(V, V) * 1.5, dim=-1)  # proposes 3 often enough
    seed = torch.arange(B, dtype=torch.long) + 12345
    offset = torch.zeros(B, dtype=torch.long)
    prev = torch.zeros(B, dtype=torch.long)
    emitted = torch.zeros(B, 3, dtype=torch.long)
    have = torch.zeros(B, dtype=torch.long)
    while int(have.min()) < 3:
        out = _markov_round(p_table, q_table, prev, S - 1, seed, offset, use_q)
        for j in range(S):  # the round's j-th token lands at have + j where that is < 3
            at = have + j
            take = (j < out.count) & (at < 3)
            emitted[take, at[take]] = out.tokens[take, j]
        have = have + out.count
        prev = out.next
        offset = offset + 2
    counts = torch.zeros(V * V * V)
    counts.index_add_(0, emitted[:, 0] * V * V + emitted[:, 1] * V + emitted[:, 2],
                      torch.ones(B))  # fmt: skip
    counts = counts.reshape(V, V, V)
    expected = p_table[0][:, None, None] * p_table[:, :, None] * p_table[None, :, :] * B
    assert counts[expected == 0].sum() == 0
    live = expected > 5
    chi2 = (((counts - expected) ** 2 / expected.clamp_min(1e-9))[live]).sum().item()
    dof = int(live.sum()) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)  # ~5 sigma


def test_sampled_first_tokens_follow_ar(golden_model):
    """End to end on tiny-a at temperature 0.8: the first two tokens of 3000 verified generations
    (one batch, a seed per row) against the AR model's exact probabilities of them."""
    prompt = CASES[0]["input_ids"]
    n, temperature = 2000, 0.8
    out = golden_model.generate(
        [prompt] * n, mode="verified", max_new_tokens=2, temperature=temperature,
        seed=list(range(n)), block_size=4,
    )  # fmt: skip
    lm = golden_model.lm
    firsts = torch.tensor([g[0] for g in out.generated])
    with torch.inference_mode():
        _, hidden, _, _ = _prefill(lm, [prompt], 8, False)
        p1 = torch.softmax(lm.context_logits(hidden) / temperature, dim=-1)[0]
    counts = torch.bincount(firsts, minlength=p1.shape[0]).float()
    expected = p1 * n
    live = expected > 5
    chi2 = (((counts - expected) ** 2 / expected)[live]).sum().item()
    dof = int(live.sum()) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)
    assert counts[~live].sum() <= max(10.0, 3 * expected[~live].sum().item())
    # Rows are independent: a row's tokens are those of its seed alone.
    alone = golden_model.generate([prompt], mode="verified", max_new_tokens=2,
                                  temperature=temperature, seed=17, block_size=4)  # fmt: skip
    assert alone.generated[0] == out.generated[17]


@pytest.mark.parametrize(
    ("params", "match"),
    [({"block_size": 1}, "block_size must be >= 2"), ({"draft_steps": 0}, "draft_steps")],
)
def test_bad_parameters(builtin_model, params, match):
    with pytest.raises(ValueError, match=match):
        builtin_model.generate([[1, 2]], mode="verified", max_new_tokens=4, **params)
