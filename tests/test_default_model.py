"""The tiny trained model shipped in the package: what load() with no path gives, its tokenizer,
and properties only a trained model has (the bounds are loose versions of what
bench/results/default_model.json measured on held-out text)."""

import json
import os

import pytest
import torch

import twotower_rt
from twotower_rt.api import DEFAULT_MODEL_DIR
from twotower_rt.model.cache import ContextCache

PROMPTS = [
    "KING HENRY. Now, lords, for France; the enterprise whereof",
    "And it came to pass, when the men of the city",
    "ROMEO. But soft, what light through yonder window breaks?",
    "4 And the LORD spake unto Moses, saying,",
]


def test_load_without_path_is_the_shipped_model(default_model):
    assert os.path.samefile(default_model.source, DEFAULT_MODEL_DIR)
    assert default_model.tokenizer is not None
    cfg = default_model.config
    with open(os.path.join(DEFAULT_MODEL_DIR, "config.json")) as f:
        raw = json.load(f)
    assert raw["architectures"] == ["NemotronHTwoTowerForCausalLM"]
    assert set(cfg.hybrid_override_pattern) == {"M", "E", "*"}  # the released model's layer kinds
    size = sum(os.path.getsize(os.path.join(DEFAULT_MODEL_DIR, f))
               for f in os.listdir(DEFAULT_MODEL_DIR))  # fmt: skip
    assert size < 50 * 2**20


def test_tokenizer_special_ids(default_model):
    tok, cfg = default_model.tokenizer, default_model.config
    assert tok.token_to_id("<pad>") == cfg.pad_token_id
    assert tok.token_to_id("<s>") == cfg.bos_token_id
    assert tok.token_to_id("</s>") == cfg.eos_token_id
    assert tok.token_to_id("<mask>") == 3  # the runtime's default mask_token_id
    assert tok.get_vocab_size() == cfg.vocab_size
    text = "Thou art a villain; and the LORD said unto him"
    assert default_model.decode(default_model.encode(text)) == text


@pytest.mark.parametrize("mode", twotower_rt.MODES)
def test_generates_text_in_every_mode(default_model, mode):
    prompts = [default_model.encode(p) for p in PROMPTS[:2]]
    out = default_model.generate(prompts, mode=mode, max_new_tokens=16, confidence_threshold=0.8)
    for ids in out.generated:
        assert len(ids) == 16 and 3 not in ids
        text = default_model.decode(ids)
        assert any(c.isalpha() for c in text), text


def test_context_tower_prefers_real_text(default_model):
    """A trained LM: held-out-like English is far more likely than the same tokens shuffled."""
    lm = default_model.lm
    ids = default_model.encode(" ".join(PROMPTS))
    g = torch.Generator().manual_seed(0)
    shuffled = [ids[i] for i in torch.randperm(len(ids), generator=g).tolist()]

    def nll(seq):
        x = torch.tensor([seq])
        cache = ContextCache.allocate(lm.cfg, 1, x.shape[1], lm.dtype, lm.device)
        with torch.no_grad():
            logits = lm.context_logits(lm.context_forward(x[:, :-1], cache))
        return float(torch.nn.functional.cross_entropy(logits[0], x[0, 1:]))

    assert nll(ids) < nll(shuffled) - 1.0
    assert nll(ids) < 6.0  # uniform over the vocabulary would be ~7.6


def test_diffusion_commits_more_than_one_token_per_forward(default_model):
    """Measured: 1.03 tokens per forward here and 1.04 on held-out text at gamma 0.5 (see
    bench/results/default_model.json); an untrained denoiser commits exactly 1."""
    prompts = [default_model.encode(p) for p in PROMPTS]
    out = default_model.generate(
        prompts, mode="mask_diffusion", max_new_tokens=32, confidence_threshold=0.5
    )
    assert sum(map(len, out.generated)) / sum(out.nfe) > 1.0


def test_denoiser_fills_in_masked_tokens(default_model):
    """The denoiser, reading the context tower's caches, restores 4 masked tokens of a 16-token
    block of familiar text far above chance (measured 0.36; chance is 1 / 2048)."""
    lm = default_model.lm
    ids = default_model.encode(
        "And the LORD spake unto Moses, saying, Speak unto the children of Israel, and say "
        "unto them, When a man shall make a vow unto the LORD, and he shall be clean."
    )
    context, block = torch.tensor([ids[:20]]), torch.tensor(ids[20:36])
    g = torch.Generator().manual_seed(0)
    hits = 0
    for _ in range(20):
        masked = torch.randperm(16, generator=g)[:4]
        noisy = block.clone()
        noisy[masked] = 3
        cache = ContextCache.allocate(lm.cfg, 1, 64, lm.dtype, lm.device)
        with torch.no_grad():
            lm.context_forward(context, cache)
            logits = lm.denoiser_logits(
                noisy[None], cache, prefix_len=cache.lengths, mamba_states=cache.mamba,
                t=torch.tensor([4 / 16]),
            )  # fmt: skip
        hits += int((logits[0, masked].argmax(-1) == block[masked]).sum())
    assert hits / 80 > 0.2, hits / 80
