"""Issue 15: a wider denoiser from a checkpoint, the function unchanged (the capacity probe).

    python bench/issue15_widen.py BASE_DIR OUT_DIR [--heads 12] [--moe-intermediate 256]
    python bench/issue15_distill.py --base OUT_DIR ...

Both towers share one config, so the denoiser can only grow where the context tower grows too
and the context caches it reads keep their shapes: more query heads over the same KV heads
(``num_attention_heads``; head_dim and the KV heads are the caches' shapes) and wider routed
experts (``moe_intermediate_size``). Growth that leaves every output as it was:

- attention: GQA query head h reads KV head h // (Hq / Hkv), so each KV head's group of query
  heads grows in place (the old heads first); the new heads' rows of ``q_proj`` are drawn like
  the old ones (the denoiser) or zero (the context tower), and their columns of ``o_proj`` are
  zero in both towers: a new head adds exactly nothing until training moves its ``o_proj``.
- experts: the new rows of ``up_proj`` are drawn like the old (the denoiser) or zero (the
  context tower), the new columns of ``down_proj`` zero: relu(x)^2 of a zero row is zero, and a
  zero column adds nothing.

So the context tower is the same function (its new heads and expert units are zero, forever: it
is frozen), and the denoiser starts as the same function with new units that training can use.
What stays approximate: a matmul over more (zero) columns may round in another order, so a few
greedy tokens of either tower can differ at the last bit. The context tower's zero units still
cost arithmetic in every AR step: compare speeds against the base model's ``ar`` (the same
function), not only the wider one's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

DENOISER = "denoiser_tower."  # its new units are drawn; the context tower's are zero


def _drawn_like(old: torch.Tensor, rows: int, gen: torch.Generator) -> torch.Tensor:
    """``rows`` new rows with the old rows' standard deviation (normal, zero mean)."""
    std = float(old.float().std())
    return (torch.randn(rows, old.shape[1], generator=gen) * std).to(old.dtype)


def widen_attention(
    q: torch.Tensor,
    o: torch.Tensor,
    kv_heads: int,
    head_dim: int,
    heads: int,
    draw: bool,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q_proj (Hq*D, hidden) and o_proj (hidden, Hq*D) grown to ``heads`` query heads, each KV
    head's group grown in place (old heads first, then new)."""
    old_heads = q.shape[0] // head_dim
    g_old, g_new = old_heads // kv_heads, heads // kv_heads
    q_parts, o_parts = [], []
    for k in range(kv_heads):
        rows = slice(k * g_old * head_dim, (k + 1) * g_old * head_dim)
        extra = (g_new - g_old) * head_dim
        q_old = q[rows]
        new = _drawn_like(q_old, extra, gen) if draw else q.new_zeros(extra, q.shape[1])
        q_parts += [q_old, new]
        o_parts += [o[:, rows], o.new_zeros(o.shape[0], extra)]
    return torch.cat(q_parts, 0).contiguous(), torch.cat(o_parts, 1).contiguous()


def widen(base: dict[str, torch.Tensor], cfg: dict, heads: int, inter: int,
          seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:  # fmt: skip
    """(the wider checkpoint's tensors, its config)."""
    hq, hkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    old_inter = cfg["moe_intermediate_size"]
    if heads < hq or heads % hkv or inter < old_inter:
        raise ValueError(f"cannot grow {hq} heads / {old_inter} to {heads} / {inter}")
    gen = torch.Generator().manual_seed(seed)
    out = dict(base)
    for name in sorted(base):
        draw = name.startswith(DENOISER)
        if name.endswith("mixer.q_proj.weight") and heads > hq:
            o_name = name.replace("q_proj", "o_proj")
            out[name], out[o_name] = widen_attention(base[name], base[o_name], hkv, d, heads,
                                                     draw, gen)  # fmt: skip
        elif ".experts." in name and name.endswith("up_proj.weight") and inter > old_inter:
            up, down_name = base[name], name.replace("up_proj", "down_proj")
            extra = inter - old_inter
            new_rows = _drawn_like(up, extra, gen) if draw else up.new_zeros(extra, up.shape[1])
            out[name] = torch.cat([up, new_rows], 0).contiguous()
            down = base[down_name]
            out[down_name] = torch.cat([down, down.new_zeros(down.shape[0], extra)], 1).contiguous()
    return out, {**cfg, "num_attention_heads": heads, "moe_intermediate_size": inter}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--heads", type=int, default=12, help="query heads (default 12)")
    ap.add_argument("--moe-intermediate", type=int, default=256,
                    help="routed experts' width (default 256)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    base_dir, out_dir = Path(args.base_dir), Path(args.out_dir)
    cfg = json.loads((base_dir / "config.json").read_text())
    tensors, new_cfg = widen(load_file(str(base_dir / "model.safetensors")), cfg, args.heads,
                             args.moe_intermediate, args.seed)  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(dict(sorted(tensors.items())), str(out_dir / "model.safetensors"),
              metadata={"format": "pt", "source": "bench/issue15_widen.py"})  # fmt: skip
    (out_dir / "config.json").write_text(json.dumps(new_cfg, indent=2) + "\n")
    shutil.copyfile(base_dir / "tokenizer.json", out_dir / "tokenizer.json")
    grown = sum(t.numel() for t in tensors.values()) - sum(
        t.numel() for t in load_file(str(base_dir / "model.safetensors")).values()
    )
    print(f"{out_dir}: {args.heads} query heads, experts {args.moe_intermediate} wide "
          f"(+{grown:,} parameters)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
