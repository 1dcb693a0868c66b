"""Issue 15: the denoiser as a next-token predictor, with no parallel commits.

    python bench/issue15_left_to_right.py MODEL_DIR [MODEL_DIR ...] [--data-dir .data]
        [--json-out bench/results/issue15_left_to_right.json]

A diagnostic, not a runtime mode: on ``train.evaluate``'s held-out prompts (512 x 32 tokens -> 64
new, greedy) each block of 16 is decoded strictly left to right, one position per denoiser
forward (position j committed with its argmax at step j, every position left of it committed,
every one right of it masked), then consumed by the context tower as at inference. So the
denoiser predicts each token from what the AR tower sees there, plus the knowledge that S - j - 1
masked positions follow. Reported as ``train.evaluate`` reports a mode: the AR-NLL quality ratio
and the distinct-2 ratio to ``ar``'s greedy continuation, and the share of tokens equal to
``ar``'s at the same position; and, teacher-forced on ``ar``'s continuation (every token left
of position j, in the block and before it, is ``ar``'s), the share of positions where the
denoiser's argmax is ``ar``'s token: its one-token agreement with the AR tower, overall, by
block position j (``..._by_position``), at each block's first position by block
(``..._block_start``: j = 0, where nothing of the block is known and the denoiser has only the
context tower's caches to tell it the next token, which AR's head reads straight from its last
hidden state) and at every position of every block (``..._by_block``), beside the AR tower's own
probability of its greedy token there (``ar_top_probability_by_block``: how sure AR itself is);
and how often mask diffusion's first token at gamma 0.8 differs from ``ar``'s.
If these are short of AR, the gap at gamma 0.8 is not (only) the parallel commits: it is the
denoiser's one-token prediction.

Where the diversity goes, at gamma 0.8: the distinct-2 ratio of each block of mask diffusion's
continuation against the same block of ``ar``'s (``gamma_0.8_distinct_2_ratio_by_block``), and of
a continuation whose first block is ``ar``'s and whose later blocks mask diffusion decodes after
it (``gamma_0.8_after_ar_first_block``: its distinct-2 and NLL ratios over all 64 tokens): how
much of the gap is the first block, the one after real text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
from issue15_distill import report_header, write_report  # noqa: E402

import twotower_rt  # noqa: E402
from twotower_rt.generate import _prefill  # noqa: E402
from twotower_rt.train import evaluate as ev  # noqa: E402
from twotower_rt.train.tokenizer import MASK_ID  # noqa: E402

BLOCK = 16


@torch.no_grad()
def left_to_right(lm, prompts: list[list[int]], new_tokens: int, forced=None, batch: int = 128):
    """Each prompt's continuation, every block decoded one position per forward, left to
    right (prompts of one length: the held-out ones are). With ``forced`` (a continuation per
    prompt), teacher-forced: position j is predicted with ``forced``'s tokens left of it (in
    the block and in the context), and the predictions are returned, not fed back."""
    out = []
    for i in range(0, len(prompts), batch):
        group = prompts[i : i + batch]
        cache, _, _, _ = _prefill(lm, group, len(group[0]) + new_tokens + BLOCK, False)
        preds = []
        for b in range(new_tokens // BLOCK):
            block = torch.full((len(group), BLOCK), MASK_ID)
            truth = None
            if forced is not None:
                rows = forced[i : i + batch]
                truth = torch.tensor([f[b * BLOCK : (b + 1) * BLOCK] for f in rows])
            for j in range(BLOCK):
                t = torch.full((len(group),), (BLOCK - j) / BLOCK)  # the masked fraction
                logits = lm.denoiser_logits(block, cache, prefix_len=cache.lengths,
                                            mamba_states=cache.mamba, t=t)  # fmt: skip
                logits[..., MASK_ID] = float("-inf")
                preds.append(logits[:, j].argmax(-1))
                block[:, j] = preds[-1] if truth is None else truth[:, j]
            lm.context_forward(block, cache)
        out += torch.stack(preds, dim=1).tolist()
    return out


def agreement(predicted: list[list[int]], reference: list[list[int]]) -> dict:
    """The share of ``predicted`` tokens equal to ``reference``'s (continuations of one length, a
    multiple of BLOCK): overall (key ""), by block position (``_by_position``, S values) and at
    each block's first position, block by block (``_block_start``)."""
    hits = (torch.tensor(predicted) == torch.tensor(reference)).float()  # (prompts, tokens)
    by_block = hits.view(hits.shape[0], -1, BLOCK).mean(0)  # (blocks, S)
    return {
        "": float(hits.mean()),
        "_by_position": [round(float(a), 4) for a in by_block.mean(0)],
        "_block_start": [round(float(a), 4) for a in by_block[:, 0]],
        "_by_block": [[round(float(a), 4) for a in row] for row in by_block],
    }


def by_block_distinct_2_ratio(seqs: list[list[int]], reference: list[list[int]]) -> list[float]:
    """Per block of BLOCK tokens: distinct-2 of ``seqs``' tokens there over ``reference``'s."""
    blocks = len(reference[0]) // BLOCK
    cut = lambda rows, b: [r[b * BLOCK : (b + 1) * BLOCK] for r in rows]  # noqa: E731
    return [round(ev.distinct_n(cut(seqs, b), 2) / ev.distinct_n(cut(reference, b), 2), 4)
            for b in range(blocks)]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data-dir", default=str(REPO / ".data"))
    ap.add_argument("--json-out", default=str(REPO / "bench/results/issue15_left_to_right.json"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    for path in args.models:
        model = twotower_rt.load(path)
        windows = ev.heldout_windows(model.tokenizer, args.data_dir, ev.HELDOUT_PROMPTS,
                                     ev.PROMPT_LEN + ev.NEW_TOKENS)  # fmt: skip
        prompts = [w[: ev.PROMPT_LEN] for w in windows]
        ar, _ = ev.run_mode(model, prompts, "ar", None, ev.NEW_TOKENS)
        ar = [s[len(p) :] for s, p in zip(ar.sequences, prompts)]
        own = left_to_right(model.lm, prompts, ev.NEW_TOKENS)
        md = ev.run_mode(model, prompts, "mask_diffusion", 0.8, ev.NEW_TOKENS)[0].generated
        first_differs = sum(g[0] != a[0] for g, a in zip(md, ar)) / len(ar)
        after = [p + a[:BLOCK] for p, a in zip(prompts, ar)]  # ar's first block, then md
        after = ev.run_mode(model, after, "mask_diffusion", 0.8, ev.NEW_TOKENS - BLOCK)[0]
        after = [a[:BLOCK] + g for a, g in zip(ar, after.generated)]
        nll_scores = ev.ar_token_scores(model.lm, prompts, ar)[0]  # ar's own greedy tokens
        top_p = torch.exp(-nll_scores).view(len(ar), -1, BLOCK).mean(0)
        nll_ar, nll = float(nll_scores.mean()), ev.ar_nll(model.lm, prompts, own)
        d2_ar, d2_own = ev.distinct_n(ar, 2), ev.distinct_n(own, 2)
        same = sum(a == b for x, y in zip(own, ar) for a, b in zip(x, y))
        forced = left_to_right(model.lm, prompts, ev.NEW_TOKENS, forced=ar)
        agree = agreement(forced, ar)
        rows[path] = {
            "ar_nll": nll,
            "quality_nll_ratio": nll_ar / nll,
            "distinct_2": d2_own,
            "distinct_2_ratio": d2_own / d2_ar,
            "same_token_as_ar": same / (len(own) * ev.NEW_TOKENS),
            "first_token_differs_at_gamma_0.8": first_differs,
            **{f"teacher_forced_agreement{k}": v for k, v in agree.items()},
            "ar_top_probability_by_block": [[round(float(a), 4) for a in r] for r in top_p],
            "gamma_0.8_distinct_2_ratio": ev.distinct_n(md, 2) / d2_ar,
            "gamma_0.8_distinct_2_ratio_by_block": by_block_distinct_2_ratio(md, ar),
            "gamma_0.8_after_ar_first_block": {
                "distinct_2_ratio": ev.distinct_n(after, 2) / d2_ar,
                "quality_nll_ratio": nll_ar / ev.ar_nll(model.lm, prompts, after),
                "distinct_2_ratio_by_block": by_block_distinct_2_ratio(after, ar),
            },
            "sample": model.tokenizer.decode(own[0]),
        }
        brief = {k: v for k, v in rows[path].items() if not isinstance(v, (str, list))}
        print(path, brief, flush=True)
    write_report(args.json_out, {
        **report_header(),
        "eval": {"prompts": ev.HELDOUT_PROMPTS, "prompt_tokens": ev.PROMPT_LEN,
                 "new_tokens": ev.NEW_TOKENS, "block_size": BLOCK},  # fmt: skip
        "results": rows,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
