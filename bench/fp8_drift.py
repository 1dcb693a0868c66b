"""FP8 weights: memory saved and drift, on the CPU.

    python bench/fp8_drift.py [--golden DIR] [--out bench/results/fp8_drift.json]

For the golden tiny model (its 18 conformance cases, float32; random weights) and the shipped
default model (8 prompts x 64 new tokens, greedy), in each decoding mode: the float32 model's
tokens against those of its FP8 copy (``twotower-rt quantize``, per output channel and in 32 x 32
blocks), computed in float32 after dequantization, so the only difference is the weights'
rounding. Free-running: the share of generated positions that match (one early flip changes all
that follows) and of whole continuations. Teacher-forced, which isolates one step's drift: the
AR tower's next-token argmax along the float32 model's own AR continuations, and the denoiser's
first-step argmax over a fully masked block after each prompt. Also the real model's weight bytes
in bf16 and FP8, computed from its shapes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

import twotower_rt  # noqa: E402
from twotower_rt.api import DEFAULT_MODEL_DIR  # noqa: E402
from twotower_rt.quantize import quantize_checkpoint  # noqa: E402

MODES = ("ar", "mock_ar", "mask_diffusion")
SCHEMES = {"per_channel": (1, 0), "block_32x32": (32, 32)}
DEFAULT_PROMPTS = [
    "ROMEO. But soft, what light",
    "And God said, Let there be",
    "KING HENRY. Once more unto the",
    "In the beginning was the",
    "HAMLET. To be, or not to be",
    "And it came to pass, when",
    "First Citizen. Before we proceed",
    "Blessed are the meek: for",
]


def param_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.lm.state_dict().values())


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    same = total = whole = 0
    for x, y in zip(a, b):
        n = max(len(x), len(y))
        same += sum(1 for i in range(min(len(x), len(y))) if x[i] == y[i])
        total += n
        whole += x == y
    return same / max(total, 1), whole / max(len(a), 1)


prompt_sets: dict[str, list[list[int]]] = {}


def golden_runs(model, cases, mode):
    outs = []
    prompt_sets["golden tiny-a"] = [c["input_ids"] for c in cases if c["mode"] == "ar"]
    for case in (c for c in cases if c["mode"] == mode):
        params = {k: v for k, v in case["params"].items() if v is not None}
        out = model.generate([case["input_ids"]], mode=mode, **params)
        outs.append(out.generated[0])
    return outs


def default_runs(model, mode):
    prompts = [model.encode(p) for p in DEFAULT_PROMPTS]
    prompt_sets["default model"] = prompts
    return model.generate(prompts, mode=mode, max_new_tokens=64).generated


def teacher_forced(base, fp8, sequences, prompt_lens) -> dict[str, float]:
    """Top-1 agreement of the AR tower along ``sequences`` (after each prompt) and of the
    denoiser's first step on an all-mask block after each prompt."""
    from twotower_rt.generate import _prefill
    from twotower_rt.model.cache import ContextCache

    ar_same = ar_total = dn_same = dn_total = 0
    with torch.inference_mode():
        for seq, p in zip(sequences, prompt_lens):
            ids = torch.tensor([seq])
            tops = []
            for model in (base, fp8):
                lm = model.lm
                cache = ContextCache.allocate(lm.cfg, 1, len(seq), torch.float32, "cpu")
                tops.append(lm.context_logits(lm.context_forward(ids, cache))[0].argmax(-1))
            ar_same += int((tops[0][p - 1 : -1] == tops[1][p - 1 : -1]).sum())
            ar_total += len(seq) - p
            tops = []
            for model in (base, fp8):
                lm = model.lm
                cache, _, _, _ = _prefill(lm, [seq[:p]], p + 16, keep_before=False)
                block = torch.full((1, 16), 3)
                logits = lm.denoiser_logits(block, cache, prefix_len=cache.lengths,
                                            mamba_states=cache.mamba, t=torch.ones(1))  # fmt: skip
                logits[..., 3] = -1e12
                tops.append(logits[0].argmax(-1))
            dn_same += int((tops[0] == tops[1]).sum())
            dn_total += 16
    return {
        "ar_next_token_top1": round(ar_same / max(ar_total, 1), 4),
        "denoiser_first_step_top1": round(dn_same / max(dn_total, 1), 4),
    }


def real_model_bytes() -> dict[str, int]:
    """Weight bytes of the real model (TWOTOWER.md's shapes, both towers): bf16 vs FP8 with one
    scale per output channel."""
    from twotower_rt.checkpoint import expected_fixed_dtypes, expected_shapes
    from twotower_rt.config import TwoTowerConfig

    pattern = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
    cfg = TwoTowerConfig(hidden_size=2688, vocab_size=131072, hybrid_override_pattern=pattern)
    bf16 = sum(2 * torch.Size(s).numel() for s in expected_shapes(cfg).values())
    qcfg = TwoTowerConfig(hidden_size=2688, vocab_size=131072, hybrid_override_pattern=pattern,
                          fp8_weight_block=(1, 0))  # fmt: skip
    fixed = expected_fixed_dtypes(qcfg)
    fp8 = 0
    for name, shape in expected_shapes(qcfg).items():
        size = {torch.float8_e4m3fn: 1, torch.float32: 4}.get(fixed.get(name), 2)
        fp8 += size * torch.Size(shape).numel()
    return {"bf16": bf16, "fp8_per_channel": fp8, "saved_fraction": round(1 - fp8 / bf16, 4)}


def measure(name, src, runs, tmp) -> list[dict]:
    base = twotower_rt.load(src, dtype="float32")
    base_out = {mode: runs(base, mode) for mode in MODES}
    rows = []
    for scheme, block in SCHEMES.items():
        dst = Path(tmp) / f"{name}-{scheme}"
        report = quantize_checkpoint(src, dst, block)
        fp8 = twotower_rt.load(dst, dtype="float32")
        row = {
            "model": name,
            "scheme": scheme,
            "weight_block": list(block),
            "checkpoint_bytes": {"before": report["bytes_before"], "after": report["bytes_after"]},
            "checkpoint_saved_fraction": report["saved_fraction"],
            "weights_in_memory_bytes": {
                "float32": param_bytes(base),
                "fp8_float32_rest": param_bytes(fp8),
            },
            "modes": {},
        }
        for mode in MODES:
            tok, seq = agreement(base_out[mode], runs(fp8, mode))
            row["modes"][mode] = {
                "sequences": len(base_out[mode]),
                "token_agreement": round(tok, 4),
                "sequences_identical": round(seq, 4),
            }
        prompts = prompt_sets[name]
        full = [p + g for p, g in zip(prompts, base_out["ar"])]
        row["teacher_forced"] = teacher_forced(base, fp8, full, [len(p) for p in prompts])
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--golden", type=Path, default=REPO.parent / "shared/golden/tiny-a")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/fp8_drift.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cases = [json.loads(x) for x in (args.golden / "cases.jsonl").read_text().splitlines() if x]
    with tempfile.TemporaryDirectory() as tmp:
        results = measure("golden tiny-a", args.golden, lambda m, mode: golden_runs(m, cases, mode),
                          tmp)  # fmt: skip
        results += measure("default model", DEFAULT_MODEL_DIR, default_runs, tmp)
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "compute": "float32 on the CPU; FP8 weights dequantized per call",
        "real_model_weight_bytes": real_model_bytes(),
        "results": results,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{'model':<14} {'scheme':<12} {'saved':>6}  " + "  ".join(f"{m:>16}" for m in MODES))
    for r in results:
        cells = "  ".join(
            f"{r['modes'][m]['token_agreement']:>7.3f} ({r['modes'][m]['sequences_identical']:.2f})"
            for m in MODES
        )
        tf = r["teacher_forced"]
        print(
            f"{r['model']:<14} {r['scheme']:<12} {r['checkpoint_saved_fraction']:>6.1%}  {cells}"
            f"  tf-ar {tf['ar_next_token_top1']:.3f} tf-dn {tf['denoiser_first_step_top1']:.3f}"
        )
    real = record["real_model_weight_bytes"]
    print(
        f"real model weights: {real['bf16'] / 1e9:.1f} GB bf16 -> "
        f"{real['fp8_per_channel'] / 1e9:.1f} GB fp8 ({real['saved_fraction']:.1%} saved)"
    )
    print(f"token agreement (share of whole sequences identical); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
