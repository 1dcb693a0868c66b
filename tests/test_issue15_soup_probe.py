"""bench/issue15_soup.py (the mean of several runs' weights), bench/issue15_size_probe.py (the
per-block costs behind the speed target) and the frontier's soup rows."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import issue15_frontier  # noqa: E402
import issue15_size_probe  # noqa: E402
import issue15_soup  # noqa: E402


def _run(path: Path, tensors: dict) -> str:
    path.mkdir()
    save_file(tensors, str(path / "float32.safetensors"))
    (path / "config.json").write_text('{"hidden_size": 4}')
    (path / "tokenizer.json").write_text("{}")
    return str(path)


def test_soup_is_the_elementwise_mean(tmp_path):
    a = {"w": torch.tensor([1.0, 2.0, 4.0]), "b": torch.tensor([0.5])}
    b = {"w": torch.tensor([3.0, 2.0, 0.0]), "b": torch.tensor([1.5])}
    c = {"w": torch.tensor([2.0, 5.0, 2.0]), "b": torch.tensor([1.0])}
    runs = [_run(tmp_path / n, t) for n, t in (("a", a), ("b", b), ("c", c))]
    issue15_soup.soup(runs, str(tmp_path / "out"))
    mean = load_file(str(tmp_path / "out" / "float32.safetensors"))
    assert torch.equal(mean["w"], torch.tensor([2.0, 3.0, 2.0]))
    assert torch.equal(mean["b"], torch.tensor([1.0]))
    shipped = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert shipped["w"].dtype == torch.bfloat16 and torch.equal(shipped["w"].float(), mean["w"])
    assert (tmp_path / "out" / "config.json").read_text() == '{"hidden_size": 4}'


def test_soup_refuses_runs_of_different_models(tmp_path):
    runs = [_run(tmp_path / "a", {"w": torch.ones(2)}), _run(tmp_path / "b", {"v": torch.ones(2)})]
    with pytest.raises(SystemExit, match="different tensors"):
        issue15_soup.soup(runs, str(tmp_path / "out"))


def test_size_probe_costs_recover_the_per_block_costs():
    # A = 1 ms per AR token, D = 2 ms per denoiser forward, C = 4 ms per context pass of 16:
    # gamma 0 runs a block in C + D = 6 ms, gamma 1 in C + 16 D = 36 ms.
    S = issue15_size_probe.S
    row = {"ar": {"r": 1000.0}, "mask_diffusion@0.0": {"r": S / 6e-3},
           "mask_diffusion@1.0": {"r": S / 36e-3}}  # fmt: skip
    got = issue15_size_probe.costs(row, "r")
    assert got["a"] == pytest.approx(4 / 16) and got["b"] == pytest.approx(2.0)
    # md/ar at tpf x is 0.25 + 2 / x; 1 / 1.3 = 0.25 + 2 / x at x = 2 / (1/1.3 - 0.25)
    assert got["tpf_for_1.3x"] == pytest.approx(2 / (1 / 1.3 - 0.25))
    row["mask_diffusion@0.0"]["r"] = S / 15e-3  # C = 13 ms: a > 1/1.3, no tpf is enough
    assert issue15_size_probe.costs(row, "r")["tpf_for_1.3x"] is None


def test_size_probe_widens_the_shipped_pattern():
    dims = issue15_size_probe.wider(256)
    tiny = issue15_size_probe.TINY
    assert dims["hybrid_override_pattern"] == tiny["hybrid_override_pattern"]
    assert dims["hidden_size"] == 256 and dims["mamba_num_heads"] == 8
    assert dims["mamba_num_heads"] % dims["n_groups"] == 0
    assert dims["num_attention_heads"] % dims["num_key_value_heads"] == 0
    assert dims["moe_intermediate_size"] % 32 == 0 and dims["head_dim"] == tiny["head_dim"]


def test_frontier_reads_soup_rows(tmp_path, monkeypatch):
    row = {"mode": "mask_diffusion", "confidence_threshold": 0.8, "quality_nll_ratio": 0.88,
           "tokens_per_forward": 3.0, "distinct_2_ratio": 0.7}  # fmt: skip
    ar = {"mode": "ar", "confidence_threshold": None}
    report = {"soups": {"soup4": {"results": [ar, row]}, "soup5": {"results": [ar]}}}
    (tmp_path / "issue15_soup.json").write_text(json.dumps(report))
    monkeypatch.setattr(issue15_frontier, "RESULTS", tmp_path)
    curves = issue15_frontier.collect()
    label = next(k for k in curves if k.startswith("soup of 4"))
    want = {"nll_ratio": 0.88, "tokens_per_forward": 3.0, "distinct_2_ratio": 0.7,
            "report": "issue15_soup.json"}  # fmt: skip
    assert curves[label] == {0.8: want}
