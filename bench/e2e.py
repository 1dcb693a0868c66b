"""End-to-end throughput of the engine: AR and mask diffusion on the same random weights and GPU.

    python bench/run.py e2e [--layers 13] [--weights bf16|fp8] [--batch 1 16 32 64 128]
                            [--context 1024 8192] [--new-tokens 32] [--tokens-per-forward 1.78]

The model has the real model's shapes (hidden 2688, vocab 131072, 32/2 x 128 attention, 64 x 64 x
128 Mamba, 128 experts of 1856 + a shared one of 3712) and random weights; ``--layers`` keeps the
first N layers of the real 52-layer pattern where memory is short (both towers in bf16 are 63 GB).
Random weights make confidences meaningless, so diffusion runs a fixed commit schedule: a
confidence threshold no prediction reaches and ``steps_per_block = round(16 / tokens-per-forward)``,
so the ceil rule commits ``16 / steps`` tokens per denoiser forward (1.78 at gamma 0.8 on the real
model). Prompts are random; the prefill is not timed.

Roofline (``../shared/spec/PERFORMANCE.md``, recomputed here): a forward over n tokens reads every
weight of its tower except the routed experts once, plus E(n) = E (1 - (1 - k/E)^n) experts per MoE
layer, at the copy bandwidth measured now; AR: one context forward of B tokens per B tokens;
diffusion: per block of 16 B tokens, ``steps`` denoiser forwards and one context forward of 16 B
tokens. The Mamba state (read and written per AR step, read per denoiser forward) and the context
K/V are added. Each mode is reported as a fraction of its roofline, with the diffusion / AR ratio
and the speedup over the plain PyTorch path (``_ext.set_kernels_enabled(False)``).
Timings: wall clock over whole generations with torch.cuda.synchronize; measured, not projected.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

REAL_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
BLOCK = 16


def real_config(layers: int, fp8: bool, **overrides):
    from twotower_rt.config import TwoTowerConfig

    fields = dict(hidden_size=2688, vocab_size=131072, fp8_weight_block=(1, 0) if fp8 else None,
                  hybrid_override_pattern=REAL_PATTERN[:layers])  # fmt: skip
    fields.update(overrides)
    return TwoTowerConfig(**fields)


@torch.no_grad()
def random_model(cfg, device, dtype):
    """The model with random weights, made on the device (no host copy of 30+ GB): projections
    ~N(0, 1/fan_in), norms 1, Mamba A/D/dt as the builtin model has them; FP8 weights are random
    e4m3 values with per-channel scales of 1/fan_in^0.5 / 2."""
    from twotower_rt.model.linear import Fp8Linear
    from twotower_rt.model.tower import TwoTowerLM

    with torch.device(device):
        lm = cast(TwoTowerLM(cfg), dtype)
    for module in lm.modules():
        if isinstance(module, Fp8Linear):
            module.weight.copy_(torch.randn_like(module.weight, dtype=torch.float16).clamp(-4, 4))
            module.weight_scale.fill_(0.5 / math.sqrt(module.in_features))
    for name, p in lm.named_parameters():
        if p.dtype == torch.float8_e4m3fn or name.endswith("weight_scale"):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name and leaf == "weight":
            p.fill_(1.0)
        elif leaf == "A_log":
            p.copy_(torch.log(torch.rand_like(p, dtype=torch.float32) * 15 + 1))
        elif leaf in ("D", "dt_bias"):
            p.uniform_(0.5, 1.0) if leaf == "D" else p.fill_(-2.0)
        elif p.dim() >= 2:
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
        else:
            p.normal_(0.0, 0.02)
    return lm


def cast(lm, dtype):
    """Every parameter to ``dtype`` but those whose dtype an FP8 checkpoint fixes (``Module.to``
    would turn the float8 weights and their fp32 scales into ``dtype`` too)."""
    from twotower_rt.model.linear import fixed_dtypes

    fixed = fixed_dtypes(lm)
    for name, p in lm.named_parameters():
        if name not in fixed:
            p.data = p.data.to(dtype)
    return lm


def weight_bytes(lm, tower: str) -> tuple[int, int, int]:
    """(bytes of the tower and its head without the routed experts, bytes of one routed expert,
    MoE layers) for tower "context" or "denoiser"."""
    tower_mod = lm.context_tower if tower == "context" else lm.denoiser_tower
    head = lm.context_lm_head if tower == "context" else lm.lm_head
    experts = [m for n, m in tower_mod.named_modules() if n.endswith("mixer.experts")]
    routed = sum(p.numel() * p.element_size() for e in experts for p in e.parameters())
    total = sum(p.numel() * p.element_size() for p in tower_mod.parameters())
    total += head.weight.numel() * head.weight.element_size()
    if tower == "denoiser":
        total += sum(p.numel() * p.element_size() for p in lm.t_embedder.parameters())
    n_experts = lm.cfg.n_routed_experts
    per_expert = routed // max(1, len(experts) * n_experts)
    return total - routed, per_expert, len(experts)


def touched_experts(cfg, tokens: int) -> float:
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    return E * (1 - (1 - k / E) ** tokens)


def roofline_tok_s(lm, mode: str, batch: int, context: int, steps: int, copy_gbps: float) -> float:
    """Tokens per second if every forward moved only its floor bytes at the copy bandwidth."""
    cfg = lm.cfg
    kinds = cfg.layer_kinds
    state = (cfg.mamba_num_heads * cfg.mamba_head_dim * cfg.ssm_state_size * 4
             * kinds.count("mamba"))  # fmt: skip
    kv = 2 * cfg.num_key_value_heads * cfg.head_dim * lm.dtype.itemsize * kinds.count("attention")

    def forward(tower, tokens, state_rw, seqs):
        base, per_expert, moe_layers = weight_bytes(lm, tower)
        experts = touched_experts(cfg, tokens) * per_expert * moe_layers
        return base + experts + state_rw * state * seqs + kv * context * seqs

    if mode == "ar":
        seconds = forward("context", batch, 2, batch) / (copy_gbps * 1e9)
        return batch / seconds
    n = BLOCK * batch
    per_block = steps * forward("denoiser", n, 1, batch) + forward("context", n, 2, batch)
    return n / (per_block / (copy_gbps * 1e9))


def run_mode(engine, mode, batch, context, new_tokens, steps, vocab, seed) -> float:
    """Seconds to generate new_tokens for `batch` prompts of `context` tokens, prefill excluded."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(max_new_tokens=new_tokens)
    if mode == "mask_diffusion":
        params.update(block_size=BLOCK, steps_per_block=steps, confidence_threshold=2.0)
    ids = [engine.add_request(torch.randint(4, vocab, (context,), generator=gen).tolist(), mode,
                              **params) for _ in range(batch)]  # fmt: skip
    reqs = [engine._requests[i] for i in ids]
    while not all(r.started for r in reqs):  # the prefill, untimed
        engine.step()
    sync()
    start = time.perf_counter()
    engine.run()
    sync()
    seconds = time.perf_counter() - start
    for i in ids:
        engine.pop(i)
    return seconds


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_copy_gbps(device) -> float:
    if device.type != "cuda":
        return float("nan")
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync()
    start = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    sync()
    return 2 * x.numel() * 20 / (time.perf_counter() - start) / 1e9


def bench(args) -> dict:
    from twotower_rt import _ext
    from twotower_rt.engine import Engine

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = real_config(args.layers, args.weights == "fp8", **args.overrides)
    lm = random_model(cfg, device, dtype)
    from twotower_rt.model.mamba import Mamba2Mixer
    from twotower_rt.model.moe import MoE

    for module in lm.modules():
        if isinstance(module, MoE):
            module.grouped = args.grouped
        if isinstance(module, Mamba2Mixer):
            module.states_in_place = args.in_place
    copy_gbps = args.copy_gbps or measure_copy_gbps(device)
    steps = max(1, round(BLOCK / args.tokens_per_forward))
    context = max(args.context) + args.new_tokens + 1
    engine = Engine(lm, max_slots=max(args.batch), context=context, prefill_chunk=8192,
                    graphs=args.graphs)  # fmt: skip
    rows = []
    for ctx in args.context:
        for batch in args.batch:
            row = {"batch": batch, "context": ctx}
            for mode in ("ar", "mask_diffusion"):
                seconds = run_mode(engine, mode, batch, ctx, args.new_tokens, steps,
                                   cfg.vocab_size, batch + ctx)  # fmt: skip
                tok_s = batch * args.new_tokens / seconds
                roof = roofline_tok_s(lm, mode, batch, ctx, steps, copy_gbps)
                row[mode] = {"tok_s": round(tok_s, 2), "roofline_tok_s": round(roof, 2),
                             "fraction_of_roofline": round(tok_s / roof, 4)}  # fmt: skip
                if args.baseline:
                    _ext.set_kernels_enabled(False)
                    try:
                        base = run_mode(engine, mode, batch, ctx, args.new_tokens, steps,
                                        cfg.vocab_size, batch + ctx)  # fmt: skip
                    finally:
                        _ext.set_kernels_enabled(True)
                    row[mode]["pytorch_tok_s"] = round(batch * args.new_tokens / base, 2)
                    row[mode]["speedup_over_pytorch"] = round(base / seconds, 3)
            ar, md = row["ar"], row["mask_diffusion"]
            row["diffusion_over_ar"] = round(md["tok_s"] / ar["tok_s"], 3)
            row["roofline_diffusion_over_ar"] = round(
                md["roofline_tok_s"] / ar["roofline_tok_s"], 3
            )
            rows.append(row)
            print(f"B={batch:4d} ctx={ctx:6d}  AR {ar['tok_s']:9.1f} tok/s "
                  f"({100 * ar['fraction_of_roofline']:5.1f}% roof)  diffusion "
                  f"{md['tok_s']:9.1f} ({100 * md['fraction_of_roofline']:5.1f}%)  ratio "
                  f"{row['diffusion_over_ar']:.2f} (roofline "
                  f"{row['roofline_diffusion_over_ar']:.2f})", flush=True)  # fmt: skip
    return {
        "benchmark": "e2e",
        "layers": args.layers,
        "weights": args.weights,
        "model_dtype": str(dtype).replace("torch.", ""),
        "tokens_per_forward": round(BLOCK / steps, 3),
        "steps_per_block": steps,
        "new_tokens": args.new_tokens,
        "copy_gbps": round(copy_gbps, 1),
        "timing": "wall clock per whole generation (prefill excluded), measured",
        "graphs": args.graphs,
        "moe_grouped": args.grouped,
        "mamba_states_in_place": args.in_place,
        "rows": rows,
    }


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=len(REAL_PATTERN),
                        help="first N layers of the real 52-layer pattern")  # fmt: skip
    parser.add_argument("--weights", choices=("bf16", "fp8"), default="fp8")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 32, 64, 128])
    parser.add_argument("--context", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--new-tokens", type=int, default=32, help="a multiple of 16")
    parser.add_argument("--tokens-per-forward", type=float, default=1.78)
    parser.add_argument("--copy-gbps", type=float, default=None, help="skip the copy measurement")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the plain-PyTorch runs")  # fmt: skip
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--graphs", action="store_true", help="the engine's CUDA graphs")
    parser.add_argument("--no-grouped", dest="grouped", action="store_false",
                        help="the MoE reference loop instead of the grouped GEMMs")  # fmt: skip
    parser.add_argument(
        "--no-in-place",
        dest="in_place",
        action="store_false",
        help="gather and scatter the Mamba states instead of the pool's rows",
    )
    parser.set_defaults(overrides={})
