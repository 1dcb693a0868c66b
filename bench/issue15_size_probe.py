"""Issue 15: would a bigger default model pay on this CPU's speed? Measured before training one.

    python bench/issue15_size_probe.py [--data-dir .data] [--repeats 5]
        [--json-out bench/results/issue15_size_probe.json]

Mask diffusion beats AR at batch 1 when a block of S = 16 tokens, (S / tpf) denoiser forwards and
one context pass of the block, costs less than S AR steps. Per block, with A the cost of one AR
step, D of one denoiser forward and C of the context pass:

    md time / ar time = C / (S A) + (D / A) / tpf          (a + b / tpf, as bench/issue15_frontier)

so the tokens per forward a model needs for 1.3x AR is b / (1 / 1.3 - a). On this CPU the
shipped model's denoiser forward costs ~1.8 AR steps (compute-bound: 16 rows against 1), and the
need is ~2.8 tokens per forward (2 kernel threads). A wider model's AR step is more bound by
reading its weights, which 16 rows share, so b may fall as the model grows; this measures it.

For each size (the shipped dims, then wider ones with the same layer pattern, all under the
50 MB limit in bf16) a randomly initialised model (``train.model_init``; speed does not depend on
the weights' values) is written as a checkpoint and timed through the public ``generate`` on
``train.evaluate``'s held-out prompts, batch 1, with ``train.evaluate.measure_speed`` (torch on one
thread, the CPU kernels on 1 and 2 threads, a warm-up, the modes alternating, medians): ``ar``,
``mask_diffusion`` at gamma 0 (every position above it: one forward per block) and at gamma 1
(none above it: the commit rule's floor of one per step, 16 forwards per block). Then
D = (t(gamma 1) - t(gamma 0)) / 15 per block, C = t(gamma 0) - D, A = t(ar) / S.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
from issue15_distill import report_header, write_report  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import twotower_rt  # noqa: E402
from twotower_rt.api import DEFAULT_MODEL_DIR  # noqa: E402
from twotower_rt.train import evaluate as ev  # noqa: E402
from twotower_rt.train.model_init import SIZES, config_of, init_state_dict  # noqa: E402
from twotower_rt.train.train import config_json, write_json  # noqa: E402

S = 16
TARGET = 1.3
TINY = SIZES["tiny"]


def wider(hidden: int) -> dict:
    """The shipped layer pattern at ``hidden``: Mamba and attention heads, and the MoE widths
    (to a multiple of 32), scaled with it (head dims kept)."""
    f = hidden / TINY["hidden_size"]

    def width(key: str) -> int:  # a multiple of 32
        return 32 * max(1, round(TINY[key] * f / 32))

    return {**TINY, "hidden_size": hidden,
            "mamba_num_heads": round(TINY["mamba_num_heads"] * f),
            "num_attention_heads": round(TINY["num_attention_heads"] * f),
            "moe_intermediate_size": width("moe_intermediate_size"),
            "moe_shared_expert_intermediate_size":
                width("moe_shared_expert_intermediate_size")}  # fmt: skip


def write_checkpoint(dims: dict, vocab: int, out_dir: str) -> int:
    cfg = config_of(dims, vocab, f"<size probe, hidden {dims['hidden_size']}>")
    state = init_state_dict(cfg, seed=0)
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sorted(state.items())},
              os.path.join(out_dir, "model.safetensors"))  # fmt: skip
    write_json(os.path.join(out_dir, "config.json"), config_json(cfg))
    shutil.copyfile(os.path.join(DEFAULT_MODEL_DIR, "tokenizer.json"),
                    os.path.join(out_dir, "tokenizer.json"))  # fmt: skip
    return sum(v.numel() for v in state.values())


def costs(row: dict, key: str) -> dict:
    """Per-block costs (in AR steps) from one kernel-thread count's rates at batch 1."""
    sec = {m: 1.0 / row[m][key] for m in ("ar", "mask_diffusion@0.0", "mask_diffusion@1.0")}
    A = sec["ar"]  # per token
    D = (sec["mask_diffusion@1.0"] - sec["mask_diffusion@0.0"]) * S / 15
    C = sec["mask_diffusion@0.0"] * S - D
    a, b = C / (S * A), D / A
    need = b / (1 / TARGET - a) if 1 / TARGET > a else None
    return {"a": a, "b": b, "tpf_for_1.3x": need, "ar_tok_s": row["ar"][key]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--data-dir", default=str(REPO / ".data"))
    ap.add_argument("--hidden", type=int, nargs="+", default=[192, 256, 320])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json-out", default=str(REPO / "bench/results/issue15_size_probe.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    shipped = twotower_rt.load()
    vocab = shipped.config.vocab_size
    windows = ev.heldout_windows(shipped.tokenizer, args.data_dir, args.prompts, 32)
    modes = [("ar", None), ("mask_diffusion", 0.0), ("mask_diffusion", 1.0)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for hidden in args.hidden:
            dims = TINY if hidden == TINY["hidden_size"] else wider(hidden)
            path = os.path.join(tmp, f"h{hidden}")
            params = write_checkpoint(dims, vocab, path)
            model = twotower_rt.load(path, device="cpu")
            out = model.generate(windows, mode="ar", max_new_tokens=64, temperature=0.0)
            assert all(len(g) == 64 for g in out.generated), "an EOS cut a timed row short"
            speed = ev.measure_speed(model, windows, 64, args.repeats, (1, 2), modes, (1,))
            results[f"hidden_{hidden}"] = {
                "dims": dims, "parameters": params,
                "bf16_bytes": os.path.getsize(os.path.join(path, "model.safetensors")),
                "one_kernel_thread_cpu": costs(speed[1]["batch_1"], "cpu_tok_s"),
                "two_kernel_threads_wall": costs(speed[2]["batch_1"], "tok_s"),
                "speed": {k: v["batch_1"] for k, v in speed.items()},
            }  # fmt: skip
            print(hidden, {k: v for k, v in results[f"hidden_{hidden}"].items()
                           if k.endswith(("cpu", "wall"))}, flush=True)  # fmt: skip
    report = {**report_header(), "target": TARGET, "block_size": S, "results": results}
    write_report(args.json_out, report)


if __name__ == "__main__":
    main()
