"""Two GPUs, projected from one: tower placement vs tensor parallelism (TP = 2) for the real model.

    python bench/projection.py [--results bench/results/2026-11-27-nvidia-h200.json]
                               [--link-gbps 450] [--all-reduce-us 10] [--batch 1 16 64 128]

No multi-GPU machine has been lent, so these are PROJECTIONS, labelled so in the JSON: the
roofline of bench/e2e.py (weights and states at the measured copy bandwidth of ONE GPU, read from
a committed results file) applied to each layout:

- one GPU: both towers on it (mask diffusion: per block of 16 B tokens, ``steps`` denoiser
  forwards and one context forward); AR: one context forward per token;
- tower placement: context tower on GPU 0, denoiser on GPU 1; with several sequences pipelined,
  a block costs max(denoiser time, context time) plus the hand-off of the new K/V and Mamba states
  to the denoiser's GPU over the link (AR leaves GPU 1 idle: the same as one GPU);
- TP = 2: each GPU reads half of every forward's weights, plus two all-reduces per layer at the
  given latency (the issue's target for the custom one-shot all-reduce: under 10 us).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BLOCK = 16


def model_on_meta(weights: str):
    from twotower_rt.model.tower import TwoTowerLM

    cfg = e2e.real_config(len(e2e.REAL_PATTERN), weights == "fp8")
    with torch.device("meta"):
        return e2e.cast(TwoTowerLM(cfg), torch.bfloat16)


def project(lm, *, copy_gbps: float, link_gbps: float, all_reduce_us: float, batch: int,
            context: int, tokens_per_forward: float) -> dict:  # fmt: skip
    """Tokens/s of AR and mask diffusion in the three layouts at this batch and context."""
    cfg = lm.cfg
    steps = max(1, round(BLOCK / tokens_per_forward))
    kinds = cfg.layer_kinds
    state = cfg.mamba_num_heads * cfg.mamba_head_dim * cfg.ssm_state_size * 4 * kinds.count("mamba")
    kv_token = 2 * cfg.num_key_value_heads * cfg.head_dim * 2 * kinds.count("attention")
    bw = copy_gbps * 1e9

    def forward_s(tower, tokens, state_rw, seqs, shards=1):
        base, per_expert, moe_layers = e2e.weight_bytes(lm, tower)
        experts = e2e.touched_experts(cfg, tokens) * per_expert * moe_layers
        moved = (base + experts) / shards + (state_rw * state + kv_token * context) * seqs / shards
        comm = 0.0 if shards == 1 else 2 * cfg.num_layers * all_reduce_us * 1e-6
        return moved / bw + comm

    n = BLOCK * batch
    ar_one = forward_s("context", batch, 2, batch)
    ar_tp = forward_s("context", batch, 2, batch, shards=2)
    dn = steps * forward_s("denoiser", n, 1, batch)
    ctx = forward_s("context", n, 2, batch)
    handoff = (kv_token * BLOCK + state) * batch / (link_gbps * 1e9)  # new K/V + states per block
    dn_tp = steps * forward_s("denoiser", n, 1, batch, shards=2)
    ctx_tp = forward_s("context", n, 2, batch, shards=2)
    return {
        "batch": batch,
        "context": context,
        "ar_tok_s": {"one_gpu": batch / ar_one, "tower_placement": batch / ar_one,
                     "tp2": batch / ar_tp},
        "diffusion_tok_s": {"one_gpu": n / (dn + ctx),
                            "tower_placement": n / (max(dn, ctx) + handoff),
                            "tp2": n / (dn_tp + ctx_tp)},
    }  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--results", type=Path, default=REPO / "bench" / "results" / "2026-11-27-nvidia-h200.json"
    )
    parser.add_argument("--weights", choices=("bf16", "fp8"), default="bf16")
    parser.add_argument(
        "--link-gbps",
        type=float,
        default=450.0,
        help="GPU-to-GPU bandwidth for the hand-off (H100 NVLink: ~450 GB/s)",
    )
    parser.add_argument("--all-reduce-us", type=float, default=10.0)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 128])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--tokens-per-forward", type=float, default=1.78)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)  # fmt: skip
    measured = json.loads(args.results.read_text())
    lm = model_on_meta(args.weights)
    rows = [project(lm, copy_gbps=measured["peak"]["copy_gbps"], link_gbps=args.link_gbps,
                    all_reduce_us=args.all_reduce_us, batch=b, context=args.context,
                    tokens_per_forward=args.tokens_per_forward) for b in args.batch]  # fmt: skip
    record = {
        "kind": "PROJECTION: no multi-GPU machine; the roofline at one GPU's measured copy rate",
        "from": {"file": str(args.results.relative_to(REPO)), "device": measured["device"],
                 "commit": measured["commit"], "copy_gbps": measured["peak"]["copy_gbps"]},
        "assumptions": {"weights": args.weights, "link_gbps": args.link_gbps,
                        "all_reduce_us": args.all_reduce_us, "context": args.context,
                        "tokens_per_forward": args.tokens_per_forward},
        "rows": rows,
    }  # fmt: skip
    for r in rows:
        ar, md = r["ar_tok_s"], r["diffusion_tok_s"]
        print(f"B={r['batch']:4d}  AR one {ar['one_gpu']:8.0f}  TP2 {ar['tp2']:8.0f} | diffusion "
              f"one {md['one_gpu']:8.0f}  placement {md['tower_placement']:8.0f}  TP2 "
              f"{md['tp2']:8.0f} tok/s  (projection)")  # fmt: skip
    out = args.out or REPO / "bench" / "results" / "projection-two-gpus.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
