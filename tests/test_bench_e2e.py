"""bench/run.py e2e on the CPU at tiny dimensions: it runs both modes through the engine, with and
without the compiled kernels, and its roofline arithmetic is the spec's."""

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import e2e  # noqa: E402

TINY = dict(hidden_size=64, vocab_size=512, mamba_num_heads=8, mamba_head_dim=16, n_groups=2,
            ssm_state_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=64)  # fmt: skip


@pytest.mark.parametrize("weights", ["bf16", "fp8"])
def test_e2e_runs_on_the_cpu(weights):
    args = argparse.Namespace(layers=6, weights=weights, batch=[1, 2], context=[8], new_tokens=16,
                              tokens_per_forward=1.78, copy_gbps=100.0, baseline=True,
                              device="cpu", overrides=TINY, graphs=False,
                              grouped=weights == "bf16", in_place=True, draft_steps=1,
                              accepted_per_round=1.3)  # fmt: skip
    record = e2e.bench(args)
    assert record["steps_per_block"] == 9 and record["tokens_per_forward"] == pytest.approx(1.778)
    assert [(r["batch"], r["context"]) for r in record["rows"]] == [(1, 8), (2, 8)]
    for row in record["rows"]:
        for mode in ("ar", "mask_diffusion"):
            assert row[mode]["tok_s"] > 0 and row[mode]["pytorch_tok_s"] > 0
            assert row[mode]["roofline_tok_s"] > 0
        verified = row["verified"]
        assert verified["label"].startswith("PROJECTED") and verified["projected_tok_s"] > 0
        assert verified["assumed_accepted_per_round"] == 1.3 and verified["seconds_per_round"] > 0


def test_e2e_project_only_needs_no_gpu(tmp_path):
    """--project-only: the three modes' rooflines on the meta device, labelled a projection;
    verified at 0 accepted drafts is slower than AR, and its roofline grows with acceptance."""
    import run

    out = tmp_path / "p.json"
    argv = ["e2e", "--project-only", "--layers", "6", "--batch", "1", "64", "--context", "1024",
            "--accepted-per-round", "0", "--out", str(out)]  # fmt: skip
    assert run.main(argv) == 0
    import json

    record = json.loads(out.read_text())
    assert record["kind"].startswith("PROJECTION") and record["device"] == "projection"
    for row in record["rows"]:
        assert row["verified_over_ar"] < 1
    cfg = e2e.real_config(6, fp8=True)
    with torch.device("meta"):
        from twotower_rt.model.tower import TwoTowerLM

        lm = e2e.cast(TwoTowerLM(cfg), torch.bfloat16)
    low, high = (e2e.roofline_tok_s(lm, "verified", 1, 1024, 9, 1000.0, 1, a) for a in (0, 3))
    assert high == pytest.approx(4 * low)


def test_touched_experts_is_the_spec_table():
    cfg = e2e.real_config(52, fp8=False)
    # PERFORMANCE.md: E(1) = 6, E(16) = 69, E(64) = 122, E(>=256) ~ 128.
    got = [round(e2e.touched_experts(cfg, n)) for n in (1, 16, 64, 256)]
    assert got == [6, 69, 122, 128]


def test_roofline_of_a_real_layer_subset():
    """Bytes per AR token at batch 1 for the first 6 real layers in fp8: the tower's weights but
    its routed experts, 6 of each MoE layer's 128 experts, the head, and the states."""
    cfg = e2e.real_config(6, fp8=True)
    with torch.device("meta"):
        from twotower_rt.model.tower import TwoTowerLM

        lm = e2e.cast(TwoTowerLM(cfg), torch.bfloat16)
    base, per_expert, moe_layers = e2e.weight_bytes(lm, "context")
    assert moe_layers == 2  # "MEMEM*" has two E layers
    # One routed expert in FP8 with per-channel scales: 2 x 1856 x 2688 bytes + 2688 + 1856 fp32.
    assert per_expert == 2 * 1856 * 2688 + 4 * (1856 + 2688)
    tok_s = e2e.roofline_tok_s(lm, "ar", 1, 1024, 9, copy_gbps=1000.0)
    state = 64 * 64 * 128 * 4 * 3  # three Mamba layers, read and written
    kv = 2 * 2 * 128 * 2 * 1 * 1024  # one attention layer's K/V for 1024 tokens, bf16
    want = (base + 6 * per_expert * 2 + 2 * state + kv) / 1e12
    assert tok_s == pytest.approx(1 / want)


def test_two_gpu_projection(tmp_path):
    """bench/projection.py: labelled a projection, computed from a committed single-GPU result;
    tower placement never slower than one GPU, AR unchanged by it, TP = 2 faster at batch 64."""
    import json

    import projection

    out = tmp_path / "p.json"
    assert projection.main(["--batch", "1", "64", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["kind"].startswith("PROJECTION")
    assert record["from"]["copy_gbps"] > 0
    for row in record["rows"]:
        ar, md = row["ar_tok_s"], row["diffusion_tok_s"]
        assert ar["tower_placement"] == ar["one_gpu"]
        assert md["tower_placement"] >= md["one_gpu"]
    big = record["rows"][1]
    assert big["diffusion_tok_s"]["tp2"] > 1.5 * big["diffusion_tok_s"]["one_gpu"]
