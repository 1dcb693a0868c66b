"""bench/issue15_widen.py: the wider checkpoint computes what the base computed (both towers, every
mode), its new denoiser units are drawn and its new context-tower units are zero, and shrinking
is refused."""

import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import issue15_widen  # noqa: E402

import twotower_rt  # noqa: E402
from twotower_rt.api import DEFAULT_MODEL_DIR  # noqa: E402

BASE = Path(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    out = tmp_path_factory.mktemp("wide")
    cfg = json.loads((BASE / "config.json").read_text())
    tensors, new_cfg = issue15_widen.widen(load_file(str(BASE / "model.safetensors")), cfg,
                                           heads=12, inter=256)  # fmt: skip
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(new_cfg))
    (out / "tokenizer.json").write_bytes((BASE / "tokenizer.json").read_bytes())
    return out, tensors, cfg


def test_the_wider_model_generates_what_the_base_generates(wide):
    out, _, _ = wide
    base = twotower_rt.load(str(BASE), device="cpu", dtype="float32")
    wider = twotower_rt.load(str(out), device="cpu", dtype="float32")
    assert wider.config.num_attention_heads == 12
    assert wider.config.moe_intermediate_size == 256
    prompts = [base.encode(t) for t in ("KING.\nWhat say you", "And God said unto Moses",
                                        "O Romeo, Romeo", "Enter two Gentlemen")]  # fmt: skip
    for mode, params in (("ar", {}), ("mock_ar", {}),
                         ("mask_diffusion", {"confidence_threshold": 0.8})):  # fmt: skip
        a = base.generate(prompts, mode=mode, max_new_tokens=32, temperature=0.0, **params)
        b = wider.generate(prompts, mode=mode, max_new_tokens=32, temperature=0.0, **params)
        assert a.generated == b.generated, mode
        assert a.nfe == b.nfe, mode  # the denoiser's confidences commit at the same steps


def test_new_units_are_drawn_in_the_denoiser_and_zero_in_the_context_tower(wide):
    _, t, cfg = wide
    d = cfg["head_dim"]
    for tower, drawn in (("denoiser_tower", True), ("context_tower", False)):
        q = t[f"{tower}.layers.3.mixer.q_proj.weight"].float()
        o = t[f"{tower}.layers.3.mixer.o_proj.weight"].float()
        assert q.shape == (12 * d, 192) and o.shape == (192, 12 * d)
        for k in range(2):  # KV head k: query heads 6k..6k+2 old, 6k+3..6k+5 new
            new = slice((6 * k + 3) * d, (6 * k + 6) * d)
            assert bool(q[new].abs().sum() > 0) == drawn
            assert float(o[:, new].abs().sum()) == 0.0
            assert float(q[6 * k * d : (6 * k + 3) * d].abs().sum()) > 0
        up = t[f"{tower}.layers.1.mixer.experts.0.up_proj.weight"].float()
        down = t[f"{tower}.layers.1.mixer.experts.0.down_proj.weight"].float()
        assert up.shape == (256, 192) and down.shape == (192, 256)
        assert bool(up[128:].abs().sum() > 0) == drawn
        assert float(down[:, 128:].abs().sum()) == 0.0


def test_shrinking_or_a_head_count_the_kv_heads_do_not_divide_is_refused():
    cfg = json.loads((BASE / "config.json").read_text())
    for heads, inter in ((4, 128), (9, 128), (6, 64)):
        with pytest.raises(ValueError, match="cannot grow"):
            issue15_widen.widen({}, cfg, heads, inter)
