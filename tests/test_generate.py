"""generate(): parameter validation, batching semantics, seeds, EOS, dtypes."""

import pytest
import torch

from twotower_rt.model.tower import TimestepEmbedder

MODES = ("ar", "mock_ar", "mask_diffusion")


def random_prompts(n, seed, vocab=512, max_len=40):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (n,), generator=g).tolist()
    return [torch.randint(4, vocab, (k,), generator=g).tolist() for k in lengths]


@pytest.mark.parametrize(
    "params, message",
    [
        ({"mode": "greedy"}, "mode 'greedy' is not one of"),
        ({"max_new_tokens": 20}, r"max_new_tokens \(20\) must be a multiple of block_size \(16\)"),
        ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 0"),
        ({"max_new_tokens": 16.0}, "max_new_tokens must be an integer"),
        ({"block_size": 0}, "block_size must be an integer >= 1"),
        ({"steps_per_block": 0}, "steps_per_block must be an integer >= 1"),
        ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k must be an integer >= 1"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, "top_p"),
        ({"confidence_threshold": float("inf")}, "confidence_threshold"),
        ({"mask_token_id": 512}, "mask_token_id 512 is outside the vocabulary"),
        ({"eos_token_id": 600}, "eos_token_id 600 is not a token id"),
        ({"seed": [1, 2, 3]}, "seed has 3 entries for 2 prompts"),
        ({"seed": -1}, "seed must be a non-negative integer"),
    ],
)
def test_bad_parameters(builtin_model, params, message):
    params = {"mode": "mask_diffusion", "max_new_tokens": 16, **params}
    with pytest.raises(ValueError, match=message):
        builtin_model.generate([[5, 6], [7]], **params)


def test_unknown_parameter(builtin_model):
    with pytest.raises(TypeError, match="temprature"):
        builtin_model.generate([[5, 6]], temprature=1.0)


@pytest.mark.parametrize(
    "input_ids, message",
    [
        ([], "non-empty list of token-id lists"),
        ([5, 6, 7], "wrap a single prompt"),
        ([[5, 6], []], r"input_ids\[1\] must be a non-empty list"),
        ([[5, 512]], r"input_ids\[0\]\[1\] = 512 is not a token id in \[0, 512\)"),
        ([[5, -1]], r"input_ids\[0\]\[1\] = -1"),
        ([[5, "a"]], r"input_ids\[0\]\[1\] = 'a'"),
        ([[5, True]], r"input_ids\[0\]\[1\] = True"),
        (torch.zeros(3, dtype=torch.long), "must be 2-D"),
    ],
)
def test_bad_input_ids(builtin_model, input_ids, message):
    with pytest.raises(ValueError, match=message):
        builtin_model.generate(input_ids, max_new_tokens=16)


def test_tensor_input_ids(builtin_model):
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    a = builtin_model.generate(ids, mode="ar", max_new_tokens=4)
    b = builtin_model.generate(ids.tolist(), mode="ar", max_new_tokens=4)
    assert a.sequences == b.sequences


@pytest.mark.parametrize("mode", MODES)
def test_zero_new_tokens(builtin_model, mode):
    out = builtin_model.generate([[5, 6], [7]], mode=mode, max_new_tokens=0)
    assert out.sequences == [[5, 6], [7]] and out.nfe == [0, 0] and out.generated == [[], []]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_rows_do_not_depend_on_the_batch(builtin_model, mode, temperature):
    prompts = random_prompts(5, seed=MODES.index(mode) * 10 + int(temperature * 10))
    params = dict(
        mode=mode,
        max_new_tokens=32,
        temperature=temperature,
        seed=123,
        confidence_threshold=0.8,
        top_k=50 if mode != "mask_diffusion" else None,
    )
    batched = builtin_model.generate(prompts, **params)
    for row, prompt in enumerate(prompts):
        alone = builtin_model.generate([prompt], **params)
        assert batched.sequences[row] == alone.sequences[0]
        assert batched.nfe[row] == alone.nfe[0]
        assert batched.finish_reason[row] == alone.finish_reason[0]


@pytest.mark.parametrize("mode", MODES)
def test_seeds(builtin_model, mode):
    prompts = [[5, 6, 7]] * 3
    params = dict(mode=mode, max_new_tokens=32, temperature=1.5)
    same = builtin_model.generate(prompts, seed=7, **params)
    assert same.sequences[0] == same.sequences[1] == same.sequences[2]
    again = builtin_model.generate(prompts, seed=7, **params)
    assert again.sequences == same.sequences
    per_row = builtin_model.generate(prompts, seed=[7, 8, 9], **params)
    assert per_row.sequences[0] == same.sequences[0]
    assert per_row.sequences[1] != per_row.sequences[2]  # 32 tokens at T=1.5: never all equal
    torch.manual_seed(0)
    unseeded = builtin_model.generate(prompts, **params)
    assert len({tuple(s) for s in unseeded.sequences}) > 1  # fresh entropy per row


@pytest.mark.parametrize("mode", ["ar", "mock_ar"])
def test_per_row_eos_token_by_token(builtin_model, mode):
    prompts = random_prompts(3, seed=5)
    free = builtin_model.generate(prompts, mode=mode, max_new_tokens=12)
    eos = free.generated[1][4]  # row 1 emits this at step 4 (maybe earlier too)
    stopped = builtin_model.generate(prompts, mode=mode, max_new_tokens=12, eos_token_id=eos)
    for row in range(3):
        gen = free.generated[row]
        cut = gen.index(eos) + 1 if eos in gen else len(gen)
        assert stopped.generated[row] == gen[:cut]
        assert stopped.finish_reason[row] == ("eos" if eos in gen else "length")
    assert stopped.finish_reason[1] == "eos"


def test_per_row_eos_blockwise(builtin_model):
    prompts = random_prompts(3, seed=6)
    params = dict(mode="mask_diffusion", max_new_tokens=48, confidence_threshold=0.8)
    free = builtin_model.generate(prompts, **params)
    eos = free.generated[0][20]  # somewhere in block 1 of row 0
    stopped = builtin_model.generate(prompts, eos_token_id=[eos, 511], **params)
    for row in range(3):
        gen = free.generated[row]
        hits = [i for i, t in enumerate(gen) if t in (eos, 511)]
        cut = (hits[0] // 16 + 1) * 16 if hits else len(gen)  # the whole block stays
        assert stopped.generated[row] == gen[:cut]
        assert len(stopped.commits_per_step[row]) == cut // 16
        assert stopped.nfe[row] == sum(len(c) for c in stopped.commits_per_step[row])


def test_diffusion_commit_bookkeeping(builtin_model):
    out = builtin_model.generate(
        random_prompts(4, seed=8),
        mode="mask_diffusion",
        max_new_tokens=32,
        block_size=8,
        steps_per_block=5,
        confidence_threshold=0.95,
    )
    for row in range(4):
        assert len(out.commits_per_step[row]) == 4
        for block in out.commits_per_step[row]:
            assert sum(block) == 8 and 1 <= len(block) <= 5 and all(c >= 1 for c in block)
        assert out.nfe[row] == sum(len(b) for b in out.commits_per_step[row])
        assert 3 not in out.generated[row]  # the mask token is never produced


def test_bf16_time_rounding():
    """The released bf16 model rounds t * 1000 to bf16 (values from the golden README)."""
    t = torch.tensor([0.9375, 0.3125, 0.5625, 0.875, 0.0625], dtype=torch.bfloat16)
    feats = TimestepEmbedder.sinusoid(t)
    assert feats.dtype == torch.float32
    # Feature 128 + 0 is sin(t * 1000 * freq_0) with freq_0 = 1; invert it through feature 0 too.
    args = torch.atan2(feats[:, 128], feats[:, 0])
    want = torch.tensor([936.0, 312.0, 564.0, 876.0, 62.5])
    wrapped = torch.remainder(want + torch.pi, 2 * torch.pi) - torch.pi
    torch.testing.assert_close(args, wrapped, atol=1e-4, rtol=0)  # fp32 sin/cos of ~1e3 rad
    exact = TimestepEmbedder.sinusoid(t.float())
    assert not torch.allclose(exact[:4], feats[:4], atol=1e-3)  # fp32 keeps 937.5 etc.
