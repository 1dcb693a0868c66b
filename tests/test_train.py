"""The trainer's diffusion rows see exactly what inference gives the denoiser: for block j of a
window, the context K/V of the first 16 j tokens and the Mamba states after them."""

import torch

from twotower_rt.api import load_builtin_model
from twotower_rt.model.cache import ContextCache
from twotower_rt.train.model_init import set_scan_chunk
from twotower_rt.train.train import context_rows, mask_blocks


def test_context_rows_match_inference_prefill():
    lm = load_builtin_model().lm
    g = torch.Generator().manual_seed(3)
    windows = torch.randint(4, lm.cfg.vocab_size, (2, 64), generator=g)
    set_scan_chunk(lm, 16)
    try:
        targets, cache = context_rows(lm, windows, 16)
    finally:
        set_scan_chunk(lm, 0)
    assert targets.shape == (2 * 3, 16)
    noisy, masked, t = mask_blocks(targets, g)
    assert torch.equal(noisy[masked], torch.full_like(noisy[masked], 3))
    assert torch.equal(t, masked.sum(-1).float() / 16) and bool((t > 0).all())
    with torch.no_grad():
        rows = lm.denoiser_logits(
            noisy, cache, prefix_len=cache.lengths, mamba_states=cache.mamba, t=t
        )
        for r in range(targets.shape[0]):
            seq, j = divmod(r, 3)
            prefix = windows[seq : seq + 1, : 16 * (j + 1)]
            ref_cache = ContextCache.allocate(lm.cfg, 1, 64, lm.dtype, lm.device)
            lm.context_forward(prefix, ref_cache)
            assert torch.equal(targets[r], windows[seq, 16 * (j + 1) : 16 * (j + 2)])
            ref = lm.denoiser_logits(
                noisy[r : r + 1], ref_cache, prefix_len=ref_cache.lengths,
                mamba_states=ref_cache.mamba, t=t[r : r + 1],
            )  # fmt: skip
            torch.testing.assert_close(rows[r], ref[0], rtol=1e-4, atol=1e-4)


def test_distinct_n_counts_distinct_grams():
    from twotower_rt.train.evaluate import distinct_n

    assert distinct_n([[1, 2, 1, 2]], 2) == 2 / 3  # (1,2) (2,1) (1,2)
    assert distinct_n([[1, 2, 3], [1, 2]], 2) == 2 / 3  # (1,2) (2,3) (1,2)
    assert distinct_n([[7]], 2) == 0.0


def test_evaluate_rows_against_a_direct_generation(default_model):
    """train.evaluate's rows (shared by bench/issue15_distill.py): AR first as the ratios' base,
    the work counted from the same generation run directly."""
    from twotower_rt.train.evaluate import evaluate

    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]]
    truths = [[9] * 16, [10] * 16]
    modes = [("ar", None), ("mask_diffusion", 0.8)]
    ar, md = evaluate(default_model, prompts, truths, 16, modes)
    assert (ar["mode"], md["confidence_threshold"]) == ("ar", 0.8)
    assert ar["quality_nll_ratio"] == 1.0 and ar["distinct_2_ratio"] == 1.0
    params = {"block_size": 16, "steps_per_block": 16, "confidence_threshold": 0.8}
    out = default_model.generate(prompts, mode="mask_diffusion", max_new_tokens=16, **params)
    assert md["denoiser_forwards"] == sum(out.nfe)
    assert md["tokens_per_forward"] == 32 / sum(out.nfe)
    hits = sum(a == b for g, t in zip(out.generated, truths) for a, b in zip(g, t))
    assert md["next_block_accuracy"] == hits / 32
    assert md["quality_nll_ratio"] == ar["ar_nll"] / md["ar_nll"]


def test_context_rows_teacher_is_the_ar_next_token_distribution():
    """The teacher row for position i of block j is the AR tower's distribution after the
    window's first 16 j + i tokens, as a prefill of just those tokens gives it."""
    lm = load_builtin_model().lm
    g = torch.Generator().manual_seed(5)
    windows = torch.randint(4, lm.cfg.vocab_size, (2, 48), generator=g)
    set_scan_chunk(lm, 16)
    try:
        with torch.no_grad():
            targets, _, logp = context_rows(lm, windows, 16, teacher=True)
    finally:
        set_scan_chunk(lm, 0)
    assert logp.shape == (2 * 2, 16, lm.cfg.vocab_size)
    with torch.no_grad():
        for r, i in [(0, 0), (1, 7), (2, 15), (3, 3)]:
            seq, j = divmod(r, 2)
            n = 16 * (j + 1) + i
            cache = ContextCache.allocate(lm.cfg, 1, 48, lm.dtype, lm.device)
            hidden = lm.context_forward(windows[seq : seq + 1, :n], cache)
            ref = torch.log_softmax(lm.context_logits(hidden[:, -1]), dim=-1)[0]
            torch.testing.assert_close(logp[r, i], ref, rtol=1e-4, atol=1e-4)
            assert int(targets[r, i]) == int(windows[seq, n])
