"""``python -m twotower_rt.train COMMAND``: the default model from scratch.

    python -m twotower_rt.train data                 # fetch (pinned, sha256-checked) + split
    python -m twotower_rt.train tokenizer            # byte-level BPE + token streams
    python -m twotower_rt.train ar --minutes 33      # stage 1: the context tower (causal LM)
    python -m twotower_rt.train diffusion --minutes 25   # stage 2: the denoiser
    python -m twotower_rt.train distill              # stage 3: distillation (train/distill.py)
    python -m twotower_rt.train export               # -> python/twotower_rt/default_model/
    python -m twotower_rt.train evaluate             # -> bench/results/default_model.json + plot

Everything intermediate lives under --data-dir (default .data/, git-ignored). On a GPU pass
``--device cuda --size small`` and more steps; the recipe is the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

from . import data
from .distill import add_recipe_args
from .tokenizer import encode_documents, train_tokenizer

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "default_model")


def _paths(data_dir: str) -> dict[str, str]:
    return {
        "tokenizer": os.path.join(data_dir, "tokenizer.json"),
        "train_ids": os.path.join(data_dir, "tokens", "train.npy"),
        "heldout_ids": os.path.join(data_dir, "tokens", "heldout.npy"),
        "heldout_text": os.path.join(data_dir, "corpus", "heldout.txt"),
    }


def cmd_data(args) -> None:
    data.prepare(args.data_dir)


def cmd_tokenizer(args) -> None:
    corpus = os.path.join(args.data_dir, "corpus")
    if not os.path.isfile(os.path.join(corpus, "train.txt")):
        data.prepare(args.data_dir)
    p = _paths(args.data_dir)
    train_docs = data.read_documents(os.path.join(corpus, "train.txt"))
    tok = train_tokenizer(train_docs, args.vocab_size)
    tok.save(p["tokenizer"])
    os.makedirs(os.path.dirname(p["train_ids"]), exist_ok=True)
    for split, docs in (("train_ids", train_docs),
                        ("heldout_ids", data.read_documents(p["heldout_text"]))):  # fmt: skip
        ids = np.asarray(encode_documents(tok, docs), dtype=np.uint16)
        np.save(p[split], ids)
        print(f"{split}: {len(ids):,} tokens -> {p[split]}")


def _load_ids(path: str) -> torch.Tensor:
    return torch.from_numpy(np.load(path).astype(np.int64))


def _stage(args, stage: str) -> None:
    from safetensors.torch import load_file

    from ..checkpoint import build_model
    from .model_init import count_params, model_config, new_model, run_config
    from .train import StageConfig, init_denoiser_from_context, run_stage, write_json

    torch.set_num_threads(args.threads)
    p = _paths(args.data_dir)
    if not os.path.isfile(p["train_ids"]):
        cmd_tokenizer(args)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(p["tokenizer"]).get_vocab_size()
    run_dir = os.path.join(args.data_dir, "runs", args.run)
    os.makedirs(run_dir, exist_ok=True)
    cfg_path = os.path.join(run_dir, "model_config.json")
    if stage == "ar":
        cfg = model_config(args.size, vocab)
        write_json(cfg_path, {"size": args.size, **cfg.to_dict()})
        lm = new_model(cfg, args.seed)
    else:
        cfg = run_config(run_dir, vocab)
        resume = os.path.join(run_dir, "diffusion.safetensors") if args.resume else None
        state = load_file(resume or args.init or os.path.join(run_dir, "ar.safetensors"))
        lm = build_model(cfg, state)
        if not args.resume:
            init_denoiser_from_context(lm)
    lm = lm.to(args.device)
    sc = StageConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(StageConfig)
                        if getattr(args, f.name, None) is not None})  # fmt: skip
    suffix = "_resumed" if getattr(args, "resume", False) else ""
    stage_json = os.path.join(run_dir, f"{stage}_stage{suffix}.json")
    write_json(stage_json,
               {**dataclasses.asdict(sc), "params": count_params(lm), "device": args.device,
                "threads": args.threads})  # fmt: skip
    log_path = os.path.join(run_dir, f"{stage}_log.jsonl")
    first_step = 0
    if getattr(args, "resume", False):  # carry on the step count of the interrupted run
        with open(log_path) as f:
            first_step = max(json.loads(line)["step"] for line in f if line.strip()) + 1
    with open(log_path, "a" if first_step else "w", encoding="utf-8") as log_file:

        def log(record):
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

        t0 = time.time()
        run_stage(stage, lm, _load_ids(p["train_ids"]).to(args.device),
                  _load_ids(p["heldout_ids"]).to(args.device), sc, run_dir, log,
                  first_step)  # fmt: skip
    print(f"[{stage}] done in {time.time() - t0:.0f}s -> {run_dir}")


def cmd_distill(args) -> None:
    """Stage 3 from RUN/diffusion.safetensors (or --init): RUN/distill.safetensors, its log and
    its config. The stage-2 weights are rounded to bf16 first, as the exported checkpoint the
    shipped model was distilled from holds them."""
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer

    from ..api import TwoTowerModel
    from ..checkpoint import build_model
    from .distill import distill_set, recipe_from, train
    from .model_init import run_config
    from .train import write_json

    torch.set_num_threads(args.threads)
    p = _paths(args.data_dir)
    run_dir = os.path.join(args.data_dir, "runs", args.run)
    cfg = run_config(run_dir, Tokenizer.from_file(p["tokenizer"]).get_vocab_size())
    state = load_file(args.init or os.path.join(run_dir, "diffusion.safetensors"))
    lm = build_model(cfg, {k: v.to(torch.bfloat16).float() for k, v in state.items()})
    recipe = recipe_from(args)
    stream = _load_ids(p["train_ids"])
    with torch.inference_mode():
        seqs = distill_set(TwoTowerModel(lm, "stage 2"), stream, recipe, run_dir)
    write_json(os.path.join(run_dir, "distill_stage.json"),
               {**dataclasses.asdict(recipe), "threads": args.threads,
                "distill_set": list(seqs.shape)})  # fmt: skip
    with open(os.path.join(run_dir, "distill_log.jsonl"), "w", encoding="utf-8") as log_file:

        def log(record):
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

        summary = train(lm, seqs, stream, recipe, log, max_steps=args.steps)
    save_file({k: v.detach().contiguous() for k, v in lm.state_dict().items()},
              os.path.join(run_dir, "distill.safetensors"))  # fmt: skip
    print(f"[distill] {summary} -> {run_dir}")


def cmd_export(args) -> None:
    from .export import export

    export(os.path.join(args.data_dir, "runs", args.run), _paths(args.data_dir)["tokenizer"],
           args.out, args.dtype, args.stage)  # fmt: skip


def cmd_evaluate(args) -> None:
    from .evaluate import main as evaluate_main
    from .evaluate import matmul_precision

    torch.set_num_threads(args.threads)
    with matmul_precision(args.matmul_precision):
        evaluate_main(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m twotower_rt.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--data-dir", default=".data")
    ap.add_argument("--run", default="default", help="run name under DATA_DIR/runs/")
    ap.add_argument("--threads", type=int, default=2)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("data").set_defaults(fn=cmd_data)
    tok = sub.add_parser("tokenizer")
    tok.add_argument("--vocab-size", type=int, default=2048)
    tok.set_defaults(fn=cmd_tokenizer)
    for stage in ("ar", "diffusion"):
        sp = sub.add_parser(stage)
        sp.add_argument("--device", default="cpu")
        sp.add_argument("--vocab-size", type=int, default=2048)
        if stage == "ar":
            sp.add_argument("--size", default="tiny")
            sp.add_argument("--seed", type=int, default=0)
        else:
            sp.add_argument("--init", default=None, help="default: RUN/ar.safetensors")
            sp.add_argument(
                "--resume",
                action="store_true",
                help="continue from RUN/diffusion.safetensors (e.g. after a kill)",
            )
        for name in (
            "steps",
            "minutes",
            "batch_size",
            "seq_len",
            "lr",
            "warmup",
            "eval_every",
            "eval_batches",
            "bias_rate",
            "weight_decay",
        ):
            kind = float if name in ("minutes", "lr", "bias_rate", "weight_decay") else int
            sp.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None)
        sp.set_defaults(fn=lambda a, s=stage: _stage(a, s))
    di = sub.add_parser("distill", help="stage 3: the denoiser on the context tower's own text")
    di.add_argument("--init", default=None, help="default: RUN/diffusion.safetensors")
    di.add_argument("--steps", type=int, default=None, help="a step cap (default: time only)")
    add_recipe_args(di)
    di.set_defaults(fn=cmd_distill)
    ex = sub.add_parser("export")
    ex.add_argument(
        "--stage",
        default="auto",
        choices=["auto", "diffusion", "distill"],
        help="which weights of RUN: auto = distill.safetensors if stage 3 ran, else diffusion",
    )
    ex.add_argument("--out", default=DEFAULT_MODEL_DIR)
    ex.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ex.set_defaults(fn=cmd_export)
    from . import evaluate as evd  # its defaults

    ev = sub.add_parser("evaluate")
    ev.add_argument("--model", default=None, help="default: the shipped default model")
    ev.add_argument("--prompts", type=int, default=evd.HELDOUT_PROMPTS,
                    help="held-out prompts the quality columns are measured on")  # fmt: skip
    ev.add_argument("--prompt-len", type=int, default=evd.PROMPT_LEN)
    ev.add_argument("--new-tokens", type=int, default=evd.NEW_TOKENS)
    ev.add_argument("--json-out", default=os.path.join("bench", "results", "default_model.json"))
    ev.add_argument("--plot-out", default=os.path.join("docs", "default_model_training.png"))
    ev.add_argument("--tradeoff-out", default=os.path.join("docs", "default_model_tradeoff.png"))
    ev.add_argument("--distill-plot-out", default=os.path.join("docs", "default_model_distill.png"))
    ev.add_argument("--repeats", type=int, default=3, help="timed rounds per batch size")
    ev.add_argument("--speed-prompts", type=int, default=evd.SPEED_PROMPTS,
                    help="time N of the prompts, evenly spread over them (0: all)")  # fmt: skip
    ev.add_argument("--kernel-threads", type=int, nargs="+", default=[2],
                    help="also time the CPU kernels on these thread counts, side by side "
                         "with one (torch stays on --threads)")  # fmt: skip
    ev.add_argument("--no-kernel-stream", dest="kernel_stream", action="store_false",
                    help="do not also time the kernels' stream (threads.set_kernel_stream: one "
                         "kernel thread on a worker beside the Python, two cores)")  # fmt: skip
    ev.add_argument("--matmul-precision", default="highest", choices=["highest", "high", "medium"],
                    help="torch's float32 matmul precision for the generation and the timing "
                         "('medium': the CPU kernels' bfloat16 dot products where the CPU has "
                         "AVX512_BF16); the AR-NLL judge always runs at 'highest'")  # fmt: skip
    ev.set_defaults(fn=cmd_evaluate)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
