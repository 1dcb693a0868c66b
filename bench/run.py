"""Kernel benchmarks: one subcommand per kernel family, defaults at the real model's shapes.

    python bench/run.py rmsnorm [--rows 16 64 256 1024] [--dtype bf16]
    python bench/run.py mask_sampling [--batch 1 16 64] [--block-size 16] [--vocab 131072]
    python bench/run.py sample_tokens [--batch 1 16 64] [--vocab 131072]
    python bench/run.py block_attention [--batch 1 16 64] [--context 1024 8192 32768]
    python bench/run.py mamba [--batch 1 16 64] [--dtype bf16]    # ssm_scan: decode, block, prefill
    python bench/run.py moe [--tokens 16 64 256 1024 2048]        # grouped experts (bf16, fp8)
    python bench/run.py all_reduce [--rows 16 256 1024 1536] [--world N]   # needs >= 2 GPUs
    python bench/run.py --check            # every family, few shapes, few repetitions
    python bench/run.py all                # every family's full sweep, one JSON
    python bench/run.py cpu [--batch 1 16 64]  # CPU steps: fast paths vs the plain eager path
    python bench/run.py e2e [--layers N] [--weights fp8|bf16] [--batch ...] [--context ...]
                                           # the engine end to end (bench/e2e.py)

Each case: correctness against the family's PyTorch reference, then the median over --reps timed
replays of a CUDA graph holding --inner launches (so launch overhead is excluded; inputs are
L2-warm, as they are inside a forward pass), the same for the PyTorch reference, and derived GB/s
and TFLOP/s, quoted against the device-to-device copy bandwidth and bf16 matmul rate measured in
the same run. Prints a table; writes JSON to bench/results/<date>-<gpu>.json (or --out).

Exit codes: 0 all cases correct; 1 some case incorrect; 2 nothing to run here (no CUDA GPU, or the
kernels cannot run on it: the message says why). A family that cannot run here (all_reduce on one
GPU) is skipped with its reason (in the JSON's "skipped") when others ran.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from benchlib import REPO, NothingToRun, measure_peaks
from families import FAMILIES

# --- driver -------------------------------------------------------------------------------------


def git_commit() -> str:
    """TWOTOWER_RT_COMMIT when set (gpu_check.sh passes it: the device machine's copy of the tree
    may carry a stale .git), else git's HEAD."""
    if os.environ.get("TWOTOWER_RT_COMMIT"):
        return os.environ["TWOTOWER_RT_COMMIT"]
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if result.returncode == 0:
            return result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def print_table(results: list[dict], peaks: dict[str, float]) -> None:
    print(
        f"\npeaks: copy {peaks['copy_gbps']:.0f} GB/s, bf16 matmul {peaks['bf16_tflops']:.0f} "
        "TFLOP/s (measured now)"
    )
    header = (
        f"{'kernel':<15} {'shape':<38} {'us':>8} {'ref us':>9} {'GB/s':>7} {'%copy':>6} "
        f"{'TF/s':>6}  ok"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['kernel']:<15} {r['shape']:<38} {r['median_us']:>8.2f} "
            f"{r['baseline_median_us']:>9.2f} {r['achieved_gbps']:>7.0f} "
            f"{100 * r['fraction_of_copy']:>5.0f}% {r['achieved_tflops']:>6.1f}  "
            f"{'yes' if r['correct'] else 'NO'}"
        )


def main_e2e(argv: list[str]) -> int:
    """``bench/run.py e2e``: the engine end to end (bench/e2e.py); its own JSON schema."""
    sys.path.insert(0, str(REPO / "bench"))
    import e2e

    parser = argparse.ArgumentParser(
        prog="bench/run.py e2e",
        description=e2e.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e2e.add_args(parser)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.project_only:
        args.device = "meta"
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/run.py e2e: no CUDA GPU visible; use --device cpu for a smoke run",
              file=sys.stderr)  # fmt: skip
        return 2
    record = e2e.project_only(args) if args.project_only else e2e.bench(args)
    now = datetime.datetime.now(datetime.timezone.utc)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    if args.project_only:
        device = "projection"
    record = {"device": device, "date": now.isoformat(timespec="seconds"),
              "commit": git_commit(), "torch": torch.__version__, **record}  # fmt: skip
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    out = args.out or REPO / "bench" / "results" / f"{now:%Y-%m-%d}-{slug}-e2e.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def main_cpu(argv: list[str]) -> int:
    """``bench/run.py cpu``: per-step CPU cost, fast paths vs the plain eager path
    (bench/cpu_steps.py); runs anywhere, writes bench/results/cpu_steps.json by default."""
    sys.path.insert(0, str(REPO / "bench"))
    import platform

    import cpu_steps

    from twotower_rt.env import cpu_report

    parser = argparse.ArgumentParser(
        prog="bench/run.py cpu",
        description=cpu_steps.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cpu_steps.add_args(parser)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cpu_steps.json")
    args = parser.parse_args(argv)
    record = cpu_steps.bench(args)
    now = datetime.datetime.now(datetime.timezone.utc)
    machine = {"platform": platform.platform(), "cpu": cpu_report(), "torch": torch.__version__}
    record = {"date": now.isoformat(timespec="seconds"), "commit": git_commit(),
              "machine": machine, **record}  # fmt: skip
    cpu_steps.print_table(record)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["e2e"]:
        return main_e2e(argv[1:])
    if argv[:1] == ["cpu"]:
        return main_cpu(argv[1:])

    def add_common(p: argparse.ArgumentParser, suppress: bool) -> None:
        # Accepted before and after the family name; SUPPRESS keeps a subparser from overwriting
        # a value given before it with its default.
        default = (lambda value: argparse.SUPPRESS) if suppress else (lambda value: value)
        p.add_argument(
            "--check",
            action="store_true",
            default=default(False),
            help="every family at a few shapes, few repetitions",
        )
        p.add_argument(
            "--out",
            type=Path,
            default=default(None),
            help="JSON path (default bench/results/<date>-<gpu>.json)",
        )
        p.add_argument("--reps", type=int, default=default(50), help="timed graph replays per case")
        p.add_argument("--inner", type=int, default=default(20), help="launches per graph replay")

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common(parser, suppress=False)
    sub = parser.add_subparsers(dest="family")
    for name, (add_args, _) in FAMILIES.items():
        family_parser = sub.add_parser(name, help=f"benchmark the {name} kernels")
        add_common(family_parser, suppress=True)
        add_args(family_parser)
    all_parser = sub.add_parser("all", help="every family's full sweep at its defaults")
    add_common(all_parser, suppress=True)
    args = parser.parse_args(argv)
    if not args.check and args.family is None:
        parser.error("name a kernel family or pass --check")

    if not torch.cuda.is_available():
        print(
            f"bench/run.py: no CUDA GPU visible to PyTorch {torch.__version__} "
            f"(CUDA {torch.version.cuda or 'none'}); nothing to time.",
            file=sys.stderr,
        )
        return 2

    families = list(FAMILIES) if args.check or args.family == "all" else [args.family]
    device = torch.cuda.get_device_name()
    print(f"device: {device}; timing: median of CUDA-graph replays, L2-warm inputs")
    peaks = measure_peaks(quick=args.check)
    results: list[dict] = []
    skipped: dict[str, str] = {}
    for name in families:
        add_args, run = FAMILIES[name]
        family_args = args
        if args.family != name:  # --check / all: this family's defaults
            family_parser = argparse.ArgumentParser()
            add_args(family_parser)
            family_args = family_parser.parse_args([])
        family_args.reps, family_args.inner = args.reps, args.inner
        try:
            results += run(family_args, args.check, peaks)
        except NothingToRun as exc:
            print(f"bench/run.py: {name}: {exc}", file=sys.stderr)
            skipped[name] = str(exc)
    if not results:
        return 2

    print_table(results, peaks)
    now = datetime.datetime.now(datetime.timezone.utc)
    record = {
        "device": device,
        "date": now.isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "timing": "median of CUDA-event-timed CUDA-graph replays, L2-warm inputs",
        "peak": peaks,
        "results": results,
        "skipped": skipped,
    }
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    out = args.out or REPO / "bench" / "results" / f"{now:%Y-%m-%d}-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["correct"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
