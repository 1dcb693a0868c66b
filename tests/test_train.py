"""The trainer's diffusion rows see exactly what inference gives the denoiser: for block j of a
window, the context K/V of the first 16 j tokens and the Mamba states after them."""

import math

import pytest
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
    assert ar["ci95"]["quality_nll_ratio"] == [1.0, 1.0]
    lo, hi = md["ci95"]["quality_nll_ratio"]
    assert lo <= md["quality_nll_ratio"] <= hi


def _builtin_windows(seed: int):
    lm = load_builtin_model().lm
    g = torch.Generator().manual_seed(seed)
    return lm, torch.randint(4, lm.cfg.vocab_size, (2, 48), generator=g)


def _rows(lm, windows, teacher=False):
    """context_rows of the trainer (its chunked scan on), without autograd."""
    set_scan_chunk(lm, 16)
    try:
        with torch.no_grad():
            return context_rows(lm, windows, 16, teacher=teacher)
    finally:
        set_scan_chunk(lm, 0)


def test_context_rows_teacher_is_the_ar_next_token_distribution():
    """The teacher row for position i of block j is the AR tower's distribution after the
    window's first 16 j + i tokens, as a prefill of just those tokens gives it."""
    lm, windows = _builtin_windows(5)
    targets, _, logp = _rows(lm, windows, teacher=True)
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


def test_inference_masks_and_kl_positions():
    from twotower_rt.train.distill import inference_masks, kl_positions

    g = torch.Generator().manual_seed(0)
    masked, t = inference_masks(4000, 16, p_full=0.25, p_suffix=0.5, g=g)
    n = masked.sum(-1)
    assert bool((n >= 1).all()) and torch.equal(t, n.float() / 16)
    assert 0.25 < float((n == 16).float().mean()) < 0.35  # 25% full, + 1/16 of the rest
    # A suffix mask is n contiguous positions ending at the block's end.
    suffix = torch.stack([masked[r, 16 - int(n[r]) :].all() for r in range(4000)])
    assert 0.45 < float(suffix.float().mean()) < 0.65
    first = kl_positions(masked, "first")
    assert torch.equal(first.sum(-1), torch.ones(4000, dtype=torch.long))
    pos = first.float().argmax(-1)
    assert torch.equal(pos, masked.float().argmax(-1))  # the leftmost masked position
    assert torch.equal(kl_positions(masked, "all"), masked)


def test_distill_stage_from_the_cli(tmp_path):
    """``python -m twotower_rt.train distill`` on a tiny run: the distillation set is the
    context tower's greedy text, the context tower stays frozen, the denoiser moves, the log has
    the KL, certainty-forcing and rollout terms, and ``export`` then ships stage 3's weights."""
    import json
    import os
    import shutil

    import numpy as np
    from safetensors.torch import load_file, save_file

    import twotower_rt
    from twotower_rt.api import DEFAULT_MODEL_DIR, TwoTowerModel
    from twotower_rt.checkpoint import build_model
    from twotower_rt.train.__main__ import main

    d = tmp_path / "data"
    run = d / "runs" / "t"
    (d / "tokens").mkdir(parents=True)
    run.mkdir(parents=True)
    shutil.copy(os.path.join(DEFAULT_MODEL_DIR, "tokenizer.json"), d / "tokenizer.json")
    g = torch.Generator().manual_seed(0)
    np.save(d / "tokens" / "train.npy",
            torch.randint(4, 2048, (4000,), generator=g).numpy().astype(np.uint16))  # fmt: skip
    (run / "model_config.json").write_text(json.dumps({"size": "tiny"}))
    stage2 = {k: v.float() for k, v in load_file(
        os.path.join(DEFAULT_MODEL_DIR, "model.safetensors")).items()}  # fmt: skip
    save_file(stage2, str(run / "diffusion.safetensors"))
    main(["--data-dir", str(d), "--run", "t", "--threads", "1", "distill", "--steps", "3",
          "--prompts", "3", "--prompt-len", "16", "--gen-tokens", "16", "--batch", "2",
          "--gen-batch", "3", "--kl-weight", "1", "--cf-start", "0.5",
          "--rollout-steps", "2", "--onpolicy-weight", "1", "--onpolicy-start", "0.5",
          "--onpolicy-rows", "2"])  # fmt: skip

    seqs = np.load(run / "distill_3x16+16_seed0.npy").astype(np.int64).tolist()
    assert [len(s) for s in seqs] == [32, 32, 32]
    lm = build_model(twotower_rt.load().config, stage2)
    ar = TwoTowerModel(lm, "stage 2").generate(
        [s[:16] for s in seqs], mode="ar", max_new_tokens=16, temperature=0.0
    )
    assert seqs == ar.sequences

    out = load_file(str(run / "distill.safetensors"))
    frozen = [k for k in out if k.startswith(("context_tower.", "context_lm_head."))]
    trained = [k for k in out if k.startswith("denoiser_tower.") and "bias" not in k]
    assert frozen and trained
    assert all(torch.equal(out[k], stage2[k]) for k in frozen)
    assert any(not torch.equal(out[k], stage2[k]) for k in trained)
    log = [json.loads(line) for line in (run / "distill_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2]
    assert all(r["kl"] >= 0 for r in log)
    assert all(0 <= r["rollout_err"] <= 1 and r["rollout_commits"] >= 0 for r in log)
    assert log[0]["cf_weight"] == 0 and log[-1]["cf_weight"] == 0.3
    assert "onpolicy_loss" not in log[0] and log[-1]["onpolicy_loss"] >= 0
    assert log[-1]["onpolicy_ar_nll"] > 0

    ship = tmp_path / "ship"
    main(["--data-dir", str(d), "--run", "t", "export", "--out", str(ship)])
    shipped = load_file(str(ship / "model.safetensors"))
    assert all(torch.equal(shipped[k], out[k].to(torch.bfloat16)) for k in trained)


def test_distill_curves_picture(tmp_path):
    """evaluate's stage-3 picture from a log (needs the train extra: matplotlib)."""
    pytest.importorskip("matplotlib")
    from twotower_rt.train.evaluate import plot_distill

    records = [{"step": i, "ce": 3.0 - i / 100, "kl": 1.0 / (i + 1), "acc": i / 200,
                "conf_gt_0.8": i / 300, "cf_weight": 0.5 if i >= 60 else 0.0}
               for i in range(100)]  # fmt: skip
    path = tmp_path / "d" / "distill.png"
    plot_distill(records, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_verified_row(default_model):
    """The verified row: AR's continuation (so AR's quality exactly), its accept length and
    tokens per model forward counted from the same generation run directly."""
    from twotower_rt.train.evaluate import evaluate

    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [40, 41, 42, 43, 44, 45, 46, 47]]
    truths = [[9] * 16, [10] * 16]
    ar, ver = evaluate(default_model, prompts, truths, 32, [("ar", None), ("verified", None)])
    assert ver["ar_nll"] == ar["ar_nll"] and ver["quality_nll_ratio"] == 1.0
    out = default_model.generate(prompts, mode="verified", max_new_tokens=32, block_size=16,
                                 draft_steps=1)  # fmt: skip
    rounds = [a for per_row in out.accepted_per_round for a in per_row]
    assert ver["accepted_per_round"] == sum(rounds) / len(rounds)
    assert ver["tokens_per_model_forward"] == 64 / (sum(out.nfe) + len(rounds))


def test_rollout_masks_follow_the_decoding_teacher_forced():
    """rollout_masks against the runtime's own decision op, one row at a time: after r steps a
    row's masked positions are those that r calls of mask_sampling_ref leave masked, when each
    step's committed positions are given the row's targets; the error count is the commits
    whose prediction was not the target."""
    from twotower_rt.ops.mask_sampling import mask_sampling_ref
    from twotower_rt.train.distill import rollout_masks

    lm, windows = _builtin_windows(7)
    targets, cache = _rows(lm, windows)
    steps = torch.tensor([0, 1, 3, 5])
    masked, committed, wrong = rollout_masks(lm, targets, cache, steps, gamma=0.3)
    assert masked.shape == (4, 16) and bool(masked[0].all())
    want_committed = want_wrong = 0
    with torch.no_grad():
        for r in range(4):
            block = torch.full((1, 16), 3)
            one = cache.index_select(torch.tensor([r]))
            for j in range(int(steps[r])):
                if not bool((block == 3).any()):
                    break
                logits = lm.denoiser_logits(block, one, prefix_len=one.lengths,
                                            mamba_states=one.mamba,
                                            t=(block == 3).sum(-1).float() / 16)  # fmt: skip
                out = mask_sampling_ref(logits, block, mask_token_id=3, step=j,
                                        steps_per_block=16, confidence_threshold=0.3)  # fmt: skip
                new = (block == 3) & ~out.masked
                want_committed += int(new.sum())
                want_wrong += int((new & (out.block != targets[r : r + 1])).sum())
                block = torch.where(new, targets[r : r + 1], block)
            assert torch.equal(masked[r], (block == 3)[0]), r
    assert committed == want_committed > 0
    assert wrong == want_wrong


def test_own_decoding_is_the_runtime_decoding():
    """own_decoding against the runtime's decision op, one row at a time: each row's block is
    what repeated mask_sampling_ref calls on the denoiser's own commits give, and the state
    handed back is the masked set before one of the steps that row went through."""
    from twotower_rt.ops.mask_sampling import mask_sampling_ref
    from twotower_rt.train.distill import own_decoding

    lm, windows = _builtin_windows(8)
    _, cache = _rows(lm, windows)
    blocks, masked = own_decoding(lm, cache, 0.3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for r in range(cache.lengths.shape[0]):
            block, one, seen = torch.full((1, 16), 3), cache.index_select(torch.tensor([r])), []
            for j in range(16):
                if not bool((block == 3).any()):
                    break
                seen.append(block[0] == 3)
                logits = lm.denoiser_logits(block, one, prefix_len=one.lengths,
                                            mamba_states=one.mamba,
                                            t=(block == 3).sum(-1).float() / 16)  # fmt: skip
                out = mask_sampling_ref(logits, block, mask_token_id=3, step=j,
                                        steps_per_block=16, confidence_threshold=0.3)  # fmt: skip
                block = out.block
            assert torch.equal(blocks[r], block[0]) and not bool((block == 3).any()), r
            assert any(torch.equal(masked[r], s) for s in seen), r


def test_ar_on_blocks_reads_the_blocks_own_text():
    """ar_on_blocks against the teacher of context_rows on windows whose block 1 is replaced
    by the given tokens: the same AR distribution at every position of that block."""
    from twotower_rt.train.distill import ar_on_blocks

    lm, windows = _builtin_windows(9)
    _, cache, logp = _rows(lm, windows[:, :32], teacher=True)  # one row per window: block 1
    own = torch.randint(4, lm.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    got = ar_on_blocks(lm, cache, own, logp[:, 0])
    _, _, want = _rows(lm, torch.cat([windows[:, :16], own, windows[:, 32:48]], 1), teacher=True)
    want = want[0::2].clone()  # rows of block 1 (block 2 follows in each window)
    want[..., 3] = -1e12
    want = torch.log_softmax(want, dim=-1)
    keep = torch.ones(lm.cfg.vocab_size, dtype=torch.bool)
    keep[3] = False
    torch.testing.assert_close(got[..., keep], want[..., keep], atol=1e-4, rtol=1e-4)
    assert bool((got[..., 3] < -1e6).all())


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.5])
def test_onpolicy_loss_targets(monkeypatch, temperature):
    """onpolicy_loss on a given decoding (blocks, state): at temperature 0 the cross-entropy
    towards the AR tower's argmax after the block's own text; else KL(AR at that temperature
    || denoiser), written out as sum p (log p - log q) per masked position."""
    from twotower_rt.train import distill

    lm, windows = _builtin_windows(10)
    _, cache, logp = _rows(lm, windows[:, :32], teacher=True)
    g = torch.Generator().manual_seed(2)
    blocks = torch.randint(4, lm.cfg.vocab_size, (2, 16), generator=g)
    masked = torch.rand(2, 16, generator=g) < 0.5
    masked[:, 0] = True
    monkeypatch.setattr(distill, "own_decoding", lambda *a: (blocks, masked))
    cfg = distill.DistillConfig(onpolicy_weight=1.0, onpolicy_rows=2,
                                onpolicy_temperature=temperature)  # fmt: skip
    # two rows of two: every row, in the order randperm picks them
    rows = torch.randperm(2, generator=torch.Generator().manual_seed(3))
    blocks, masked = blocks[rows], masked[rows]
    with torch.no_grad():
        loss, stats = distill.onpolicy_loss(lm, cache, logp, cfg, torch.Generator().manual_seed(3))
        sub = cache.index_select(rows)
        ar = distill.ar_on_blocks(lm, sub, blocks, logp[rows, 0])[masked]
        t = masked.sum(-1).float() / 16
        q = torch.log_softmax(distill.masked_logits(lm, blocks, sub, masked, t), dim=-1)
    if temperature == 0:
        want = -q.gather(-1, ar.argmax(-1, keepdim=True)).mean()
    else:
        p = torch.softmax(ar / temperature, dim=-1)
        want = (p * (torch.log(p.clamp_min(1e-30)) - q)).sum(-1).mean()
    torch.testing.assert_close(loss, want, atol=1e-4, rtol=1e-4)
    assert stats["onpolicy_loss"] == pytest.approx(float(loss))


def test_measure_speed_times_the_kernel_stream(default_model, monkeypatch, tmp_path):
    """The stream configuration (evaluate.STREAM) is timed beside the thread counts: the stream
    on with one kernel thread during its turns, off during the others, and both settings put back
    after; the picture draws its series too."""
    pytest.importorskip("matplotlib")
    from twotower_rt import _ext, threads
    from twotower_rt.train import evaluate as ev

    if _ext.cpu_kernels() is None:
        pytest.skip("the CPU kernels are not built")
    modes = [("ar", None), ("mask_diffusion", 0.8)]
    monkeypatch.setattr(ev, "MODES", modes)
    states = []
    real_run = ev.run_mode
    monkeypatch.setattr(ev, "run_mode", lambda *a: states.append(
        (threads.kernel_stream(), threads.kernel_threads())) or real_run(*a))  # fmt: skip
    stream, kernel_threads = threads.kernel_stream(), threads.kernel_threads()
    prompts = [[5, 9, 100, 7], [44, 17, 8, 2]]
    speeds = ev.measure_speed(default_model, prompts, 16, repeats=1,
                              kernel_threads=(1, ev.STREAM), batches=(1,))  # fmt: skip
    assert set(speeds) == {1, ev.STREAM}
    assert set(states) == {(False, 1), (True, 1)} and len(states) == 2 * 2 * 2 * 2
    assert all(v["tok_s"] > 0 for v in speeds[ev.STREAM]["batch_1"].values())
    assert threads.kernel_stream() == stream and threads.kernel_threads() == kernel_threads
    rows = ev.evaluate(default_model, prompts, [[1] * 16] * 2, 16, modes)
    speeds = {k: {**v, "batch_64": v["batch_1"]} for k, v in speeds.items()}
    ev.plot_tradeoff(rows, speeds, str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_measure_speed_side_by_side_and_the_tradeoff_picture(default_model, monkeypatch,
                                                               tmp_path):  # fmt: skip
    """measure_speed times every mode at every kernel-thread count in the same rounds, gives AR
    the ratio 1, leaves torch's and the kernels' threads as it found them; the picture is drawn
    from its result."""
    pytest.importorskip("matplotlib")
    from twotower_rt import threads
    from twotower_rt.train import evaluate as ev

    modes = [("ar", None), ("mask_diffusion", 0.8)]
    monkeypatch.setattr(ev, "MODES", modes)
    monkeypatch.setattr(ev, "SPEED_BATCHES", (1, 64))
    seen = []
    real_set = threads.set_kernel_threads
    monkeypatch.setattr(threads, "set_kernel_threads", lambda n: seen.append(n) or real_set(n))
    torch_threads, kernel_threads = torch.get_num_threads(), threads.kernel_threads()
    prompts = [[5, 9, 100, 7], [44, 17, 8, 2], [1000, 3, 250, 9], [9, 71, 20, 4]]
    calls = []
    real_run = ev.run_mode
    monkeypatch.setattr(ev, "run_mode", lambda m, group, mode, *a: calls.append(
        (len(group), group[0][0], mode)) or real_run(m, group, mode, *a))  # fmt: skip
    probes = []
    speeds = ev.measure_speed(default_model, prompts, 16, repeats=2, kernel_threads=(1, 2),
                              probes=probes)  # fmt: skip
    assert set(speeds) == {1, 2}
    # a probe per timed round, batch and count; each the median / least over the round's groups
    assert [(p["batch"], p["round"], p["kernel_threads"]) for p in probes] == [
        (b, r, k) for b in (1, 64) for r in (1, 2) for k in (1, 2)]  # fmt: skip
    assert all(0 < p["matmul_gflops_min"] <= p["matmul_gflops_median"] for p in probes)
    for count in (1, 2):
        assert set(speeds[count]) == {"batch_1", "batch_64"}
        for row in speeds[count].values():
            assert set(row) == {"ar", "mask_diffusion@0.8"}
            assert row["ar"]["cpu_vs_ar"] == row["ar"]["wall_vs_ar"] == 1.0
            assert row["ar"]["tokens_per_forward"] == 1.0
            assert all(v["tok_s"] > 0 and v["cpu_tok_s"] > 0 for v in row.values())
            assert row["ar"]["wall_vs_ar_rounds"] == row["ar"]["cpu_vs_ar_rounds"] == [1.0, 1.0]
            md = row["mask_diffusion@0.8"]
            assert len(md["wall_vs_ar_rounds"]) == len(md["cpu_vs_ar_rounds"]) == 2
            lo, hi = min(md["wall_vs_ar_rounds"]), max(md["wall_vs_ar_rounds"])
            assert lo - 1e-3 <= md["wall_vs_ar"] <= hi + 1e-3  # (of two rounds: their mean)
    # each batch: a warm-up round and two timed ones, each switching 1 -> 2; then put back
    assert seen == [1, 2] * 3 * 2 + [kernel_threads]
    # within a round the modes take turns prompt by prompt (batch 1), each prompt starting one
    # mode later; then all 4 prompts at once
    order = (("ar", "mask_diffusion"), ("mask_diffusion", "ar"))
    one_round = [(1, q[0], m) for i, q in enumerate(prompts) for m in order[i % 2]]
    assert calls[: len(one_round)] == one_round
    assert calls[len(one_round) * 6 :][:2] == [(4, 5, "ar"), (4, 5, "mask_diffusion")]
    assert threads.kernel_threads() == kernel_threads and torch.get_num_threads() == torch_threads
    rows = ev.evaluate(default_model, prompts, [[1] * 16] * 4, 16, modes)
    # batch 64 holds the 4 prompts at once, as evaluate's one batch: the same generations
    timed = speeds[1]["batch_64"]["mask_diffusion@0.8"]
    assert timed["tokens_per_forward"] == rows[1]["tokens_per_forward"]
    path = tmp_path / "tradeoff.png"
    ev.plot_tradeoff(rows, speeds, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sampled_distillation_set(tmp_path, default_model):
    """--gen-temperature: the continuations are sampled, each prompt with its own seed, so the
    set is the same however it is batched (here 2 + 1 against 1 + 1 + 1), and is cached apart
    from the greedy one."""
    from twotower_rt.train.distill import DistillConfig, distill_set

    stream = torch.randint(4, 2048, (2000,), generator=torch.Generator().manual_seed(1))
    sizes = dict(prompts=3, prompt_len=16, gen_tokens=16, seed=5)
    cfg = DistillConfig(gen_batch=2, gen_temperature=0.8, **sizes)
    sampled = distill_set(default_model, stream, cfg, str(tmp_path))
    assert (tmp_path / "distill_3x16+16_seed5_t0.8.npy").is_file()
    alone = DistillConfig(gen_batch=1, gen_temperature=0.8, **sizes)
    one_by_one = distill_set(default_model, stream, alone, str(tmp_path / "b"))
    assert torch.equal(sampled, one_by_one)
    for i, row in enumerate(sampled.tolist()):  # an independent generation of each row
        out = default_model.generate([row[:16]], mode="ar", max_new_tokens=16, temperature=0.8,
                                     seed=5 * 1000003 + i)  # fmt: skip
        assert out.sequences[0] == row
    greedy = distill_set(default_model, stream, DistillConfig(gen_batch=2, **sizes), str(tmp_path))
    assert (tmp_path / "distill_3x16+16_seed5.npy").is_file()
    assert torch.equal(greedy[:, :16], sampled[:, :16]) and not torch.equal(greedy, sampled)
    with pytest.raises(ValueError, match="gen_temperature"):
        DistillConfig(gen_temperature=-0.1)


def test_bootstrap_ratios_intervals():
    """The paired bootstrap: a mode equal to AR has every interval at exactly 1; a mode whose
    per-prompt NLL is twice AR's has its NLL interval at exactly 0.5 on every draw; a mode that
    repeats one bigram everywhere, against AR whose bigrams are all distinct, lies between the
    extremes a draw can give (1 / (2 * 4) with every prompt drawn, 1 / 2 with one)."""
    import numpy as np

    from twotower_rt.train.evaluate import bigram_ids, bootstrap_ratios

    nll = np.array([1.5, 2.0, 2.5, 3.0])
    acc = np.array([1, 0, 2, 3])
    distinct = bigram_ids([[10 * i, 10 * i + 1, 10 * i + 2] for i in range(4)])
    same = bootstrap_ratios((nll, acc, distinct), (nll, acc, distinct), 200)
    assert same == {k: [1.0, 1.0] for k in same}
    repeat = bigram_ids([[7, 7, 7]] * 4)
    worse = bootstrap_ratios((nll, acc, distinct), (2 * nll, 2 * acc, repeat), 200)
    assert worse["quality_nll_ratio"] == [0.5, 0.5]
    assert worse["quality_accuracy_ratio"] == [2.0, 2.0]
    lo, hi = worse["distinct_2_ratio"]
    assert 1 / 8 <= lo < hi <= 1 / 2
    # no right token in a draw: that draw has no accuracy ratio; none in any draw: None
    none_right = bootstrap_ratios((nll, 0 * acc, distinct), (nll, acc, distinct), 50)
    assert none_right["quality_accuracy_ratio"] is None


def test_spread_picks_evenly():
    from twotower_rt.train.evaluate import spread

    assert spread(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert spread(list(range(3)), 5) == [0, 1, 2]
    assert spread(list(range(512)), 64)[:3] == [0, 8, 16]


def test_distill_rows_mix_real_text(monkeypatch):
    """real_frac: each step trains on (1 - real_frac) x batch distillation sequences, from their
    first generated block, plus real_frac x batch windows of the training text, from their second
    block (the first is their only context); real_frac 0 draws no text at all."""
    import twotower_rt.train.distill as distill
    from twotower_rt.api import load_builtin_model

    lm = load_builtin_model().lm
    lm.load_state_dict({k: v.clone() for k, v in lm.state_dict().items()})  # trainable copies
    g = torch.Generator().manual_seed(3)
    seqs = torch.randint(4, 200, (5, 48), generator=g)  # prompt 32 + 16 generated tokens
    real = torch.arange(200, 500)  # any window of it is a run of consecutive ids (vocab 512)
    calls = []
    rows_of = distill.rows_of

    def spy(lm_, windows, first_block, teacher=False):
        calls.append((windows.clone(), first_block))
        return rows_of(lm_, windows, first_block, teacher=teacher)

    monkeypatch.setattr(distill, "rows_of", spy)
    sizes = dict(batch=4, prompt_len=32, gen_tokens=16, minutes=5.0, cf_weight=0.0)
    cfg = distill.DistillConfig(real_frac=0.5, **sizes)
    summary = distill.train(lm, seqs, real, cfg, lambda rec: None, max_steps=2)
    assert summary["steps"] == 2 and len(calls) == 4
    # rows = blocks trained: 2 sequences x 1 generated block, 2 windows x blocks 1 and 2
    assert summary["rows_per_step_distill"] == 2 and summary["rows_per_step_real"] == 4
    for (gen, gen_first), (text, text_first) in zip(calls[::2], calls[1::2]):
        assert gen.shape == (2, 48) and gen_first == 2
        assert all(any(torch.equal(row, s) for s in seqs) for row in gen)
        assert text.shape == (2, 48) and text_first == 1
        assert torch.equal(text - text[:, :1], torch.arange(48).expand(2, 48))
        assert int(text.min()) >= 200

    calls.clear()
    distill.train(lm, seqs, real, distill.DistillConfig(real_frac=0.0, **sizes), lambda rec: None,
                  max_steps=1)  # fmt: skip
    assert len(calls) == 1 and calls[0][0].shape == (4, 48)


def test_doubt_term_penalises_confident_wrong_predictions(monkeypatch):
    """doubt_weight adds weight x the mean top probability at the masked positions predicted
    wrong (none added where all are right), and its gradient lowers the wrong token's logit."""
    import twotower_rt.train.distill as distill

    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1],  # target 0: right
                          [0.6, 0.2, 0.1, 0.1],  # target 1: wrong, confidence 0.6
                          [0.1, 0.1, 0.3, 0.5]])  # target 2: wrong, confidence 0.5  # fmt: skip
    logits = probs.log().requires_grad_(True)
    targets = torch.tensor([[0, 1, 2]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    monkeypatch.setattr(distill, "inference_masks", lambda *a: (mask, torch.ones(1)))
    monkeypatch.setattr(distill, "masked_logits", lambda *a: logits)
    cfg = distill.DistillConfig(rollout_steps=0)  # the masks as given
    g = torch.Generator().manual_seed(0)
    base, _ = distill.step_loss(None, targets, None, cfg, g, 0.0)
    loss, stats = distill.step_loss(None, targets, None, cfg, g, 0.0, doubt_weight=2.0)
    ce = -(torch.log(torch.tensor(0.7)) + torch.log(torch.tensor(0.2))
           + torch.log(torch.tensor(0.3))) / 3  # fmt: skip
    assert base.item() == pytest.approx(ce.item(), rel=1e-6)
    assert stats["wrong_conf"] == pytest.approx(0.55)
    assert (loss - base).item() == pytest.approx(2.0 * 0.55, rel=1e-6)
    (grad,) = torch.autograd.grad(loss - base, logits)
    assert grad[1, 0] > 0 and grad[2, 3] > 0  # descent lowers the confident wrong tokens
    assert torch.all(grad[0] == 0)  # the right prediction is left to cross-entropy
    monkeypatch.setattr(distill, "masked_logits", lambda *a: logits[:1])
    right_only = torch.tensor([[0]])
    monkeypatch.setattr(distill, "inference_masks", lambda *a: (mask[:, :1], torch.ones(1)))
    _, stats = distill.step_loss(None, right_only, None, cfg, g, 0.0, doubt_weight=2.0)
    assert "wrong_conf" not in stats


def test_doubt_weight_is_checked():
    import twotower_rt.train.distill as distill

    with pytest.raises(ValueError, match="doubt_weight"):
        distill.DistillConfig(doubt_weight=-1.0)


def test_kl_temperature_sharpens_the_soft_target(monkeypatch):
    """kl_temperature tau: the soft-target term is KL(p_tau || q) with p_tau proportional to
    p_AR ** (1 / tau) (the mask token excluded), computed here by hand; tau = 1 is the AR
    distribution itself, and a small tau is cross-entropy towards the AR argmax."""
    import twotower_rt.train.distill as distill
    from twotower_rt.train.tokenizer import MASK_ID

    assert MASK_ID == 3  # the vocabulary below: six tokens, the mask among them
    q = torch.softmax(torch.tensor([[0.3, -0.2, 0.5, 0.0, 0.1, 0.2]]), -1)
    logits = q.log()
    p_ar = torch.tensor([0.5, 0.2, 0.1, 0.0, 0.15, 0.05])  # no mass on the mask
    teacher = p_ar.clamp_min(1e-30).log()[None, None]  # (rows, S, vocab)
    targets = torch.tensor([[0]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    monkeypatch.setattr(distill, "inference_masks", lambda *a: (mask, torch.ones(1)))
    monkeypatch.setattr(distill, "masked_logits", lambda *a: logits)
    g = torch.Generator().manual_seed(0)
    for tau in (1.0, 0.5):
        cfg = distill.DistillConfig(rollout_steps=0, kl_weight=1.0, kl_scope="all",
                                    kl_temperature=tau)  # fmt: skip
        _, stats = distill.step_loss(None, targets, None, cfg, g, 0.0, teacher)
        sharp = [x ** (1 / tau) if i != MASK_ID else 0.0 for i, x in enumerate(p_ar.tolist())]
        total = sum(sharp)
        want = sum(s / total * math.log((s / total) / float(q[0, i]))
                   for i, s in enumerate(sharp) if s > 0)  # fmt: skip
        assert stats["kl"] == pytest.approx(want, rel=1e-5)
    cfg = distill.DistillConfig(rollout_steps=0, kl_weight=1.0, kl_scope="all",
                                kl_temperature=0.01)  # fmt: skip
    _, stats = distill.step_loss(None, targets, None, cfg, g, 0.0, teacher)
    assert stats["kl"] == pytest.approx(-math.log(float(q[0, 0])), rel=1e-4)
    with pytest.raises(ValueError, match="kl_temperature"):
        distill.DistillConfig(kl_temperature=0.0)
