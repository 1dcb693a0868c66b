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

Verified mode (``verified`` rows): random weights make the draft agree with the context tower
almost never, so its measured tokens/s is that of near-zero acceptance. What a real checkpoint
would give is PROJECTED from the measured time per round (``draft_steps`` denoiser forwards + one
context pass of 16 B tokens + rollback) and an assumed number of accepted drafts per round
(``--accepted-per-round``, default the default model's measured figure, bench/results/
verified_cpu.json): ``projected_tok_s = B (accepted + 1) / seconds per round``; its roofline
likewise. ``--project-only`` (no GPU needed) builds the model on the meta device and gives the
rooflines of all three modes at ``--copy-gbps`` (default: the H200's measured 4224 GB/s), every
number a projection, labelled so.
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


def roofline_tok_s(lm, mode: str, batch: int, context: int, steps: int, copy_gbps: float,
                   draft_steps: int = 1, accepted: float = 0.0) -> float:  # fmt: skip
    """Tokens per second if every forward moved only its floor bytes at the copy bandwidth
    (verified: ``draft_steps`` denoiser forwards and one context pass per round of 16 B tokens,
    ``accepted + 1`` tokens emitted per row and round)."""
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
    if mode == "verified":
        per_round = draft_steps * forward("denoiser", n, 1, batch) + forward("context", n, 2, batch)
        return batch * (accepted + 1) / (per_round / (copy_gbps * 1e9))
    per_block = steps * forward("denoiser", n, 1, batch) + forward("context", n, 2, batch)
    return n / (per_block / (copy_gbps * 1e9))


def run_mode(engine, mode, batch, context, new_tokens, steps, vocab, seed, outs=None) -> float:
    """Seconds to generate new_tokens for `batch` prompts of `context` tokens, prefill excluded
    (``outs``: a list that receives the requests' outputs)."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(max_new_tokens=new_tokens)
    if mode == "mask_diffusion":
        params.update(block_size=BLOCK, steps_per_block=steps, confidence_threshold=2.0)
    if isinstance(mode, tuple):  # ("verified", draft_steps)
        mode, draft_steps = mode
        params.update(block_size=BLOCK, draft_steps=draft_steps, confidence_threshold=2.0)
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
        out = engine.pop(i)
        if outs is not None:
            outs.append(out)
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
    from twotower_rt.params import VERIFIED_SPARE_BLOCKS

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
    context = max(args.context) + args.new_tokens + 1 + VERIFIED_SPARE_BLOCKS * BLOCK
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
            row["verified"] = verified_row(engine, lm, args, batch, ctx, steps, copy_gbps)
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


def verified_row(engine, lm, args, batch, ctx, steps, copy_gbps) -> dict:
    """The verified mode measured (random weights: near-zero acceptance) and PROJECTED at
    ``args.accepted_per_round`` from the measured time per round."""
    outs = []
    seconds = run_mode(engine, ("verified", args.draft_steps), batch, ctx, args.new_tokens, steps,
                       lm.cfg.vocab_size, batch + ctx, outs)  # fmt: skip
    rounds = [a for o in outs for a in o.accepted_per_round]
    per_round = seconds / (len(rounds) / batch)  # the rows run their rounds side by side
    a = args.accepted_per_round
    return {
        "draft_steps": args.draft_steps,
        "measured_tok_s": round(batch * args.new_tokens / seconds, 2),
        "measured_accepted_per_round": round(sum(rounds) / len(rounds), 3),
        "seconds_per_round": round(per_round, 6),
        "assumed_accepted_per_round": a,
        "projected_tok_s": round(batch * (a + 1) / per_round, 2),
        "roofline_tok_s": round(
            roofline_tok_s(lm, "verified", batch, ctx, steps, copy_gbps, args.draft_steps, a), 2
        ),  # fmt: skip
        "label": "PROJECTED: measured time per round x assumed accepted drafts per round",
    }


def project_only(args) -> dict:
    """Rooflines of ar, mask_diffusion and verified on the meta device: no GPU, all PROJECTED."""
    from twotower_rt.model.tower import TwoTowerLM

    cfg = real_config(args.layers, args.weights == "fp8", **args.overrides)
    with torch.device("meta"):
        lm = cast(TwoTowerLM(cfg), torch.bfloat16)
    gbps = args.copy_gbps or H200_COPY_GBPS
    steps = max(1, round(BLOCK / args.tokens_per_forward))
    rows = []
    for ctx in args.context:
        for batch in args.batch:
            ar = roofline_tok_s(lm, "ar", batch, ctx, steps, gbps)
            md = roofline_tok_s(lm, "mask_diffusion", batch, ctx, steps, gbps)
            ver = roofline_tok_s(lm, "verified", batch, ctx, steps, gbps, args.draft_steps,
                                 args.accepted_per_round)  # fmt: skip
            rows.append({"batch": batch, "context": ctx, "ar_tok_s": round(ar, 1),
                         "mask_diffusion_tok_s": round(md, 1), "verified_tok_s": round(ver, 1),
                         "verified_over_ar": round(ver / ar, 3)})  # fmt: skip
            print(f"B={batch:4d} ctx={ctx:6d}  roofline AR {ar:9.1f}  diffusion {md:9.1f}  "
                  f"verified {ver:9.1f} tok/s ({ver / ar:.2f}x AR)  [PROJECTED]")  # fmt: skip
    return {
        "benchmark": "e2e",
        "kind": "PROJECTION: rooflines at the copy bandwidth, nothing measured",
        "layers": args.layers,
        "weights": args.weights,
        "copy_gbps": gbps,
        "tokens_per_forward": round(BLOCK / steps, 3),
        "draft_steps": args.draft_steps,
        "accepted_per_round": args.accepted_per_round,
        "rows": rows,
    }


H200_COPY_GBPS = 4224.0  # bench/results/2026-11-27-nvidia-h200.json
# Accepted drafts per round of the default model on the CPU (greedy, draft_steps 1, batch 1; see
# bench/results/verified_cpu.json); the real model's is not measured yet.
DEFAULT_ACCEPTED = 1.3


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
    parser.add_argument("--draft-steps", type=int, default=1, help="verified: draft forwards")
    parser.add_argument(
        "--accepted-per-round",
        type=float,
        default=DEFAULT_ACCEPTED,
        help="verified: accepted drafts per round assumed by the projection",
    )
    parser.add_argument(
        "--project-only",
        action="store_true",
        help="no GPU: the three modes' rooflines on the meta device (PROJECTED)",
    )
    parser.set_defaults(overrides={})
