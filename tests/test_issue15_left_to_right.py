"""bench/issue15_left_to_right.py (the denoiser decoding one position per forward, left to right)
and bench/issue15_frontier.py (every evaluated model as a curve over gamma)."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import issue15_frontier  # noqa: E402
import issue15_left_to_right  # noqa: E402

from twotower_rt.generate import _prefill  # noqa: E402
from twotower_rt.train.tokenizer import MASK_ID  # noqa: E402


def test_left_to_right_forced_on_its_own_text_predicts_it(builtin_model):
    """Teacher-forced on the continuation it wrote itself, every prediction is that token (the
    forced tokens go where its own went, in the block and in the context); forced on other text,
    the predictions differ, and position 0 is the denoiser's argmax on a fully masked block."""
    lm = builtin_model.lm
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, lm.cfg.vocab_size, (3, 16), generator=g).tolist()
    own = issue15_left_to_right.left_to_right(lm, prompts, 32, batch=2)
    assert [len(x) for x in own] == [32, 32, 32]
    assert issue15_left_to_right.left_to_right(lm, prompts, 32, forced=own, batch=2) == own
    other = torch.randint(4, lm.cfg.vocab_size, (3, 32), generator=g).tolist()
    forced = issue15_left_to_right.left_to_right(lm, prompts, 32, forced=other)
    assert forced != own
    with torch.no_grad():
        cache, _, _, _ = _prefill(lm, prompts, 64, False)
        block = torch.full((3, 16), MASK_ID)
        logits = lm.denoiser_logits(block, cache, prefix_len=cache.lengths,
                                    mamba_states=cache.mamba, t=torch.ones(3))  # fmt: skip
        logits[..., MASK_ID] = float("-inf")
    first = logits[:, 0].argmax(-1).tolist()
    assert [x[0] for x in own] == first == [x[0] for x in forced]


def test_agreement_by_position_and_block_start():
    # Two prompts, two blocks: prompt 0 misses position 0 of block 0 and position 5 of block 1,
    # prompt 1 misses position 0 of both blocks.
    ref = [list(range(32)), list(range(100, 132))]
    pred = [list(r) for r in ref]
    pred[0][0] = pred[0][16 + 5] = pred[1][0] = pred[1][16] = -1
    agree = issue15_left_to_right.agreement(pred, ref)
    assert agree[""] == pytest.approx(60 / 64)
    assert agree["_block_start"] == [0.0, 0.5]
    by_position = agree["_by_position"]
    assert by_position[0] == 0.25 and by_position[5] == 0.75
    assert by_position[1:5] == [1.0] * 4 and by_position[6:] == [1.0] * 10
    by_block = agree["_by_block"]
    assert by_block[0] == [0.0] + [1.0] * 15
    assert by_block[1] == [0.5] + [1.0] * 4 + [0.5] + [1.0] * 10


def test_by_block_distinct_2_ratio():
    # Each block of the reference has 2 x 15 distinct bigrams; the second block of the other
    # text repeats one token, so 1 distinct bigram of 30 there.
    ref = [list(range(32)), list(range(100, 132))]
    seqs = [r[:16] + [7] * 16 for r in ref]
    ratios = issue15_left_to_right.by_block_distinct_2_ratio(seqs, ref)
    assert ratios == [1.0, round(1 / 30, 4)]


def _row(gamma, nll, tpf, d2):
    return {"mode": "mask_diffusion", "confidence_threshold": gamma, "quality_nll_ratio": nll,
            "tokens_per_forward": tpf, "distinct_2_ratio": d2}  # fmt: skip


def test_frontier_collects_curves_and_draws(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    ar = {"mode": "ar", "confidence_threshold": None}
    (tmp_path / "default_model.json").write_text(json.dumps(
        {"results": [ar, _row(0.9, 0.9, 3.0, 0.6), _row(0.8, 0.84, 4.0, 0.7)]}))  # fmt: skip
    (tmp_path / "issue15_distill_s2ext80.json").write_text(json.dumps({"after": {
        "candidate": {"results": [ar, _row(0.99, 0.94, 2.1, 0.5), _row(0.8, 0.1, 9.0, 9.0)]},
        "candidate_nocf": {"results": [ar, _row(0.8, 0.9, 2.5, 0.7)]}}}))  # fmt: skip
    cf10 = {"results": [ar, _row(0.8, 0.84, 4.0, 0.7)]}
    (tmp_path / "issue15_distill_cf10.json").write_text(json.dumps(
        {"extra_eval": {"python/twotower_rt/default_model": cf10}}))  # fmt: skip
    (tmp_path / "issue15_distill_ro03l.json").write_text(json.dumps({"after": {
        "candidate": {"results": [ar, _row(0.8, 0.87, 3.3, 0.71)]},
        "candidate_nocf": {"results": [ar, _row(0.8, 0.93, 2.5, 0.67)]}}}))  # fmt: skip
    monkeypatch.setattr(issue15_frontier, "RESULTS", tmp_path)
    curves = issue15_frontier.collect()
    shipped = curves[issue15_frontier.SHIPPED]
    assert list(shipped) == [0.8, 0.9, 0.99]  # sorted; the evaluate row wins at 0.8
    assert shipped[0.8]["nll_ratio"] == 0.84 and shipped[0.99]["tokens_per_forward"] == 2.1
    assert curves["rollouts + cf 0.3, 60 min, before cf"][0.8]["nll_ratio"] == 0.93
    assert "on-policy" not in curves  # no report: left out
    assert issue15_frontier.LR90 not in curves
    assert list(curves["cf10 (shipped before lr90)"]) == [0.8]
    issue15_frontier.plot(curves, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _speed(points):
    return {"batch_1": {"ar": {"wall_vs_ar": 1.0, "tokens_per_forward": 1.0},
                        **{f"mask_diffusion@{g}": {"wall_vs_ar": r, "tokens_per_forward": t}
                           for g, (t, r) in points.items()}}}  # fmt: skip


def test_speed_model_recovers_the_cost_per_token():
    # ar/md = 0.4 + 1.6 / tpf exactly: the fit returns a, b and solves 1/1.3 = 0.4 + 1.6 / tpf
    # for tpf = 1.6 / (1/1.3 - 0.4) = 4.3333...; 2 kernel threads: 0.1 + 2.2 / tpf -> 3.2874...
    def pts(a, b):
        return {g: (t, 1.0 / (a + b / t)) for g, t in ((0.5, 5.0), (0.8, 4.0), (0.9, 3.0))}

    report = {"speed": _speed(pts(0.4, 1.6)), "speed_kernel_threads": {"2": _speed(pts(0.1, 2.2))}}
    model = issue15_frontier.speed_model(report)
    assert model["1"]["a"] == pytest.approx(0.4) and model["1"]["b"] == pytest.approx(1.6)
    assert model["1"]["tpf_for_target"] == pytest.approx(4.333333, rel=1e-5)
    assert model["2"]["tpf_for_target"] == pytest.approx(3.287356, rel=1e-5)
    assert model["1"]["fit_worst_error"] < 1e-9
    # A cost that no tokens per forward brings to 1.3x: no answer rather than a negative one.
    slow = issue15_frontier.speed_model({"speed": _speed(pts(0.9, 1.0))})
    assert slow["1"]["tpf_for_target"] is None


def test_best_at_reads_each_curve_at_a_tokens_per_forward():
    curves = {
        "a": {0.9: {"tokens_per_forward": 2.0, "nll_ratio": 0.9},
              0.8: {"tokens_per_forward": 4.0, "nll_ratio": 0.8}},
        "b": {0.9: {"tokens_per_forward": 1.2, "nll_ratio": 0.95}},
    }  # fmt: skip
    best = issue15_frontier.best_at(curves, 3.0)
    assert best["a"] == pytest.approx(0.85)  # halfway between (2, 0.9) and (4, 0.8)
    assert best["b"] is None  # never gets to 3 tokens per forward
    assert issue15_frontier.best_at(curves, 1.0)["a"] == pytest.approx(0.9)  # its best point
