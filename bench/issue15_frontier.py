"""Issue 15: every stage-3 model evaluated on the 512 held-out prompts, as curves over gamma.

    python bench/issue15_frontier.py [--out docs/issue15_frontier.png]
        [--json-out bench/results/issue15_frontier.json]

Reads the reports already in ``bench/results`` (nothing is rerun): ``default_model.json`` (the
shipped model), the ``after`` rows of the ``issue15_distill_*.json`` runs evaluated on 512 prompts
(and the ``before`` rows of the runs whose base was a stage-2 model), and the ``extra_eval`` rows
that re-measured kept weights on 512. Each model is one curve: AR-NLL
quality ratio and distinct-2 ratio against tokens committed per denoiser forward, one point per
gamma, gamma 0.8 marked. What it shows: training moved the models along one trade-off, and the
gamma knob moves each model along it; the targets ask for a point above that trade-off.

The speed target as a tokens-per-forward target: every model has the shipped model's shape, so
at batch 1 a generated token costs about the same fixed share of an AR step (the context pass over
the block, the decision) plus 1/tpf denoiser forwards, whatever the weights (measured: the fit
moves by ~10% between two models' evaluations, so the answer is a rough one).
:func:`speed_model` fits ``ar_tok_s / md_tok_s = a + b / tpf`` to ``default_model.json``'s
batch-1 speeds (gamma 0.5-0.9, per kernel-thread count), solves it for 1.3x AR, and
:func:`best_at` reads off each curve the best NLL ratio at that tokens per forward or more: how
far the trade-off is from the target point.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

SHIPPED = "s2ext80 (shipped)"
LR90 = "lr90 (shipped before s2ext80)"
DEFAULT = "python/twotower_rt/default_model"


def with_before_cf(label: str, report: str) -> list[tuple[str, str, str]]:
    """A stage-3 run's two curves: its candidate after certainty forcing (``label``) and just
    before it (``label``, before cf)."""
    return [
        (label, report, "after/candidate"),
        (f"{label}, before cf", report, "after/candidate_nocf"),
    ]


# (label, report, where in it): "after/<name>", "extra/<model path>", "soup/<name>" or
# "evaluate"; only rows measured on the 512 prompts of train.evaluate.
SOURCES = [
    (SHIPPED, "default_model.json", "evaluate"),
    (SHIPPED, "issue15_distill_s2ext80.json", "after/candidate"),
    ("s2ext80, before cf", "issue15_distill_s2ext80.json", "after/candidate_nocf"),
    (LR90, "default_model_lr90.json", "evaluate"),
    (LR90, "issue15_distill_lr90.json", "after/candidate"),
    ("lr90, before cf", "issue15_distill_lr90.json", "after/candidate_nocf"),
    ("cf10 (shipped before lr90)", "default_model_cf10.json", "evaluate"),
    ("cf10 (shipped before lr90)", "issue15_distill_cf10.json", "extra/" + DEFAULT),
    ("cf05 (shipped before cf10)", "issue15_distill.json", "extra/" + DEFAULT),
    ("cf15", "issue15_distill_cf15.json", "extra/../exp/cf15/candidate"),
    ("cf15, before cf", "issue15_distill_cf15.json", "extra/../exp/cf15/candidate_nocf"),
    ("real-frac 0.25", "issue15_distill_realfrac.json", "extra/../exp/realfrac/candidate"),
    ("real-frac 0.5", "issue15_distill_realfrac50.json", "extra/../exp/realfrac50/candidate"),
    *with_before_cf("cf10 80 min", "issue15_distill_long80.json"),
    *with_before_cf("cf10 + rollouts", "issue15_distill_cf10ro.json"),
    *with_before_cf("rollouts + cf 0.3, 60 min", "issue15_distill_ro03l.json"),
    *with_before_cf("on-policy", "issue15_distill_onph.json"),
    ("rollouts + KL 3 + cf 0.3", "issue15_distill_rokl3.json", "after/candidate"),
    ("rollouts + KL 3, before cf", "issue15_distill_rokl3.json", "after/candidate_nocf"),
    ("rollouts + KL 3 everywhere + cf 0.3", "issue15_distill_roklall.json", "after/candidate"),
    (
        "rollouts + KL 3 everywhere, before cf",
        "issue15_distill_roklall.json",
        "after/candidate_nocf",
    ),
    ("cf10 + doubt 1", "issue15_distill_doubt.json", "after/candidate"),
    ("cf10 recipe before cf (doubt run)", "issue15_distill_doubt.json", "after/candidate_nocf"),
    *with_before_cf("cf10, seed 1", "issue15_distill_rep1.json"),
    (
        "rollouts + KL 3 everywhere at tau 0.4 + cf 0.3",
        "issue15_distill_klt04.json",
        "after/candidate",
    ),
    (
        "rollouts + KL 3 everywhere at tau 0.4, before cf",
        "issue15_distill_klt04.json",
        "after/candidate_nocf",
    ),
    (
        "rollouts + KL 3 everywhere at tau 0.6 + cf 0.3",
        "issue15_distill_klt06.json",
        "after/candidate",
    ),
    (
        "rollouts + KL 3 everywhere at tau 0.6, before cf",
        "issue15_distill_klt06.json",
        "after/candidate_nocf",
    ),
    ("soup of 4 runs (lr90, ro03l, tau 0.4, tau 0.6)", "issue15_soup.json", "soup/soup4"),
    ("soup of those 4 + cf10", "issue15_soup.json", "soup/soup5"),
    ("lr90 recipe, 3x distillation set, 50 min", "issue15_distill_md3x.json", "after/candidate"),
    (
        "lr90 recipe, 3x distillation set, before cf",
        "issue15_distill_md3x.json",
        "after/candidate_nocf",
    ),
    # The longer stage 2 (issue15_stage2_base.py), A/B: the lr90 recipe for 45 min from each.
    ("stage 2 (2,155 steps), no stage 3", "issue15_distill_s2base45.json", "before"),
    ("stage 2 (4,155 steps), no stage 3", "issue15_distill_s2ext45.json", "before"),
    *with_before_cf("lr90 recipe 45 min from stage 2", "issue15_distill_s2base45.json"),
    *with_before_cf("lr90 recipe 45 min, longer stage 2", "issue15_distill_s2ext45.json"),
    *with_before_cf("lr90 recipe 45 min, longer stage 2, seed 1", "issue15_distill_s2ext45s1.json"),
    # From the 6,155-step stage 2: the shipped recipe; a distillation set of 32,768 prompts x 32.
    ("stage 2 (6,155 steps), no stage 3", "issue15_distill_s2ext6155.json", "before"),
    *with_before_cf("s2ext80 recipe, stage 2 6,155 steps", "issue15_distill_s2ext6155.json"),
    *with_before_cf(
        "stage 2 6,155 steps, 32,768 prompts x 32", "issue15_distill_s2ext6155_blockstarts.json"
    ),
    # No real training text in the steps (--real-frac 0), A/B against s2ext80 and the run above.
    *with_before_cf("s2ext80 recipe, real-frac 0", "issue15_distill_s2ext80_real0.json"),
    *with_before_cf(
        "stage 2 6,155 steps, 32,768 prompts x 32, real-frac 0",
        "issue15_distill_s2ext6155_blockstarts_real0.json",
    ),
    # A wider denoiser (issue15_widen.py: 12 query heads, experts 256 wide; its forward costs
    # 23% more multiply-adds, so the speed fit's tokens per forward understate what it needs).
    *with_before_cf("s2ext80 recipe 50 min, 2x heads and experts", "issue15_distill_wide.json"),
]


def rows_of(report: dict, where: str) -> list[dict]:
    kind, _, name = where.partition("/")
    if kind == "evaluate":
        return report["results"]
    if kind == "before":  # the base a stage-3 run started from
        return report["before"]["results"]
    if kind == "after":
        return report["after"][name]["results"]
    if kind == "soup":
        return report["soups"][name]["results"]
    return report["extra_eval"][name]["results"]


def collect() -> dict[str, dict[float, dict]]:
    """label -> gamma -> {nll_ratio, tpf, distinct_2_ratio}, the first source of a (label,
    gamma) winning (default_model.json before the extra rows of the same model)."""
    curves: dict[str, dict[float, dict]] = {}
    for label, name, where in SOURCES:
        path = RESULTS / name
        if not path.is_file():
            continue
        for r in rows_of(json.loads(path.read_text()), where):
            gamma = r.get("confidence_threshold")
            if r["mode"] != "mask_diffusion" or gamma is None:
                continue
            curves.setdefault(label, {}).setdefault(gamma, {
                "nll_ratio": r["quality_nll_ratio"],
                "tokens_per_forward": r["tokens_per_forward"],
                "distinct_2_ratio": r["distinct_2_ratio"],
                "report": name,
            })  # fmt: skip
    return {k: dict(sorted(v.items())) for k, v in curves.items()}


SPEED_TARGET = 1.3  # mask diffusion's batch-1 tokens/s over AR's (issue 15)
NLL_TARGET = 0.95


def speed_model(report: dict) -> dict:
    """Per kernel-thread count: the least-squares fit of ``ar_tok_s / md_tok_s = a + b / tpf``
    over the batch-1 mask-diffusion rows of a ``train.evaluate`` report (wall-clock, the timed
    prompts' own tokens per forward), and the tokens per forward at which it reaches
    SPEED_TARGET x AR."""
    import numpy as np

    runs = {"1": report["speed"], **report.get("speed_kernel_threads", {})}
    out = {}
    for threads, speed in runs.items():
        rows = [r for k, r in speed["batch_1"].items() if k.startswith("mask_diffusion@")]
        x = np.array([1.0 / r["tokens_per_forward"] for r in rows])
        y = np.array([1.0 / r["wall_vs_ar"] for r in rows])
        b, a = np.polyfit(x, y, 1)
        worst = float(np.max(np.abs(1.0 / (a + b * x) - 1.0 / y)))
        out[threads] = {
            "a": float(a), "b": float(b),
            "points": [[r["tokens_per_forward"], r["wall_vs_ar"]] for r in rows],
            "fit_worst_error": worst,
            "tpf_for_target": float(b / (1.0 / SPEED_TARGET - a)) if 1.0 / SPEED_TARGET > a
            else None,
        }  # fmt: skip
    return out


def best_at(curves: dict, tpf: float) -> dict:
    """Per curve, the best NLL ratio at ``tpf`` tokens per forward or more: its points there and
    the straight line between the two points around ``tpf`` (None: the curve never gets there)."""
    out = {}
    for label, pts in curves.items():
        xy = sorted((p["tokens_per_forward"], p["nll_ratio"]) for p in pts.values())
        best = [y for x, y in xy if x >= tpf]
        for (x0, y0), (x1, y1) in zip(xy, xy[1:]):
            if x0 < tpf <= x1:
                best.append(y0 + (y1 - y0) * (tpf - x0) / (x1 - x0))
        out[label] = max(best) if best else None
    return out


def plot(curves: dict, path: Path, needed: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The legend below the plots: 5 columns, ~0.15 inch a row at its font size.
    legend_in = 0.15 * (-(-len(curves) // 5)) + 0.2
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2 + legend_in))
    colors = plt.get_cmap("tab20").colors + plt.get_cmap("tab20b").colors
    for ax, key, target, title in (
        (axes[0], "nll_ratio", (0.95, None), "AR-NLL quality ratio (1 = AR)"),
        (axes[1], "distinct_2_ratio", (0.9, 1.1), "distinct-2 ratio (1 = AR)"),
    ):
        for i, (label, pts) in enumerate(curves.items()):
            xs = [p["tokens_per_forward"] for p in pts.values()]
            ys = [p[key] for p in pts.values()]
            shipped = label == SHIPPED
            before = "before cf" in label
            color = "black" if shipped else colors[i % len(colors)]
            line = ax.plot(xs, ys, "-" if not before else "--", marker=".",
                           lw=2.5 if shipped else 1.2, color=color,
                           label=label, alpha=1.0 if shipped else 0.8)  # fmt: skip
            if 0.8 in pts:
                ax.plot(pts[0.8]["tokens_per_forward"], pts[0.8][key], "o", ms=8,
                        color=line[0].get_color(), mfc="white", mew=2)  # fmt: skip
        lo, hi = target
        ax.axhline(lo, color="tab:green", lw=1, ls=":")
        if hi is not None:
            ax.axhline(hi, color="tab:green", lw=1, ls=":")
        ax.axvline(1.5, color="tab:green", lw=1, ls=":")
        for threads, tpf in (needed or {}).items():
            ax.axvline(tpf, color="tab:red", lw=1, ls="--" if threads == "1" else "-.")
            plural = "s" if threads != "1" else ""
            text = f"{SPEED_TARGET}x AR at batch 1\n({threads} kernel thread{plural})"
            left = threads != "1"  # one thread needs more tokens per forward: its line is right
            ax.annotate(text, (tpf, 0.0), xycoords=ax.get_xaxis_transform(),
                        xytext=(-3 if left else 3, 4), textcoords="offset points",
                        ha="right" if left else "left", fontsize=7, color="tab:red")  # fmt: skip
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("tokens committed per denoiser forward (gamma from 0.99 on the left to 0.5)")
        ax.set_title(title + ": targets dotted; o = gamma 0.8")
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0.55, 1.02)
    axes[1].set_ylim(0.4, 1.5)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=7, frameon=False)
    fig.suptitle("Every stage-3 model on the 512 held-out prompts: one curve per model over gamma")
    fig.tight_layout(rect=(0, legend_in / (5.2 + legend_in), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "docs" / "issue15_frontier.png"))
    ap.add_argument("--json-out", default=str(RESULTS / "issue15_frontier.json"))
    args = ap.parse_args()
    curves = collect()
    for label, pts in curves.items():
        print(f"{label:40s} " + "  ".join(
            f"g{g:g}: {p['nll_ratio']:.3f}/{p['tokens_per_forward']:.2f}/"
            f"{p['distinct_2_ratio']:.2f}" for g, p in pts.items()))  # fmt: skip
    speed = speed_model(json.loads((RESULTS / "default_model.json").read_text()))
    needed = {t: m["tpf_for_target"] for t, m in speed.items() if m["tpf_for_target"]}
    gap = {}
    for threads, tpf in needed.items():
        best = best_at(curves, tpf)
        top = max((v, k) for k, v in best.items() if v is not None)
        gap[threads] = {"tokens_per_forward": tpf, "best_nll_ratio": top[0], "model": top[1],
                        "short_of_target_by": NLL_TARGET - top[0]}  # fmt: skip
        print(f"{SPEED_TARGET}x AR at batch 1 (kernel threads: {threads}) needs {tpf:.2f} tokens "
              f"per forward (ar/md = {speed[threads]['a']:.3f} + {speed[threads]['b']:.3f} / tpf); "
              f"best NLL ratio there: {top[0]:.3f} ({top[1]})")  # fmt: skip
    plot(curves, Path(args.out), needed)
    Path(args.json_out).write_text(json.dumps(
        {"issue": 15, "sources": SOURCES, "speed_model": speed, "target_gap": gap,
         "curves": {k: {str(g): p for g, p in v.items()} for k, v in curves.items()}},
        indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
