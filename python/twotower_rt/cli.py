"""The ``twotower-rt`` command (also ``python -m twotower_rt``).

    twotower-rt generate --input-ids 1,2,3 --mode mask_diffusion --max-new-tokens 32 [--json]
    twotower-rt generate --model ORG/NAME --prompt "Hello" --prompt "Bye" --device cuda --dtype bf16
    twotower-rt quantize --out DIR [--model DIR] [--block ROWS COLS]   # FP8 weights
    twotower-rt serve [MODEL] [--port 8000] [--api-key KEY]            # OpenAI-compatible HTTP
    twotower-rt batch IN.jsonl OUT.jsonl [--mode ar] [--max-new-tokens 64] # JSONL jobs, resumable
    twotower-rt env [--json]

A model is a checkpoint directory or a Hugging Face hub id (``--revision``; the hub cache,
HF_HUB_OFFLINE). ``--device auto`` (CUDA when there is a GPU) and ``--dtype auto`` (see
``api.choose_dtype``) are the defaults. Decoding flags are the reference's parameter names; a
flag left out is not passed, so the defaults are the checkpoint's generation_config.json and then
the API's (``SamplingParams``), never the CLI's.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import sys
import time

from . import __version__
from .api import TwoTowerModel, load
from .params import MODES, SamplingParams

PROG = "twotower-rt"
API_KEY_ENV = "TWOTOWER_RT_API_KEY"
TP_HELP = ("tensor parallelism over N processes (gloo on the CPU, NCCL with a GPU each); under "
           "torchrun: its ranks (default: 1)")  # fmt: skip
MODEL_HELP = ("checkpoint directory (config.json + safetensors [+ tokenizer.json]) or Hugging Face "
              "hub id ORG/NAME (from the hub cache, downloaded into it unless HF_HUB_OFFLINE=1); "
              "default: the model shipped in the package")  # fmt: skip
LOG_LEVELS = ("debug", "info", "warning", "error")


def default_model_path() -> str | None:
    """The model used when --model is not given. None = what ``twotower_rt.load()`` loads with no
    path: the small trained model shipped inside the package."""
    return None


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(tok) for tok in text.replace(" ", "").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integer token ids (e.g. 1,2,3)"
        ) from None
    return ids


def _int_or_ints(text: str) -> int | list[int]:
    ids = _token_ids(text)
    return ids[0] if len(ids) == 1 else ids


# flag type and help for every SamplingParams field; the default shown is read from the dataclass
PARAM_FLAGS = {
    "max_new_tokens": (int, "tokens to generate per row (mask_diffusion: a multiple of "
                            "--block-size)"),
    "block_size": (int, "mask_diffusion: tokens per block"),
    "steps_per_block": (int, "mask_diffusion: at most this many denoiser forwards per block"),
    "mask_token_id": (int, "mask_diffusion: the mask token id"),
    "temperature": (float, "0 = greedy; > 0 samples"),
    "top_k": (int, "ar/mock_ar sampling: keep the k most likely tokens"),
    "top_p": (float, "ar/mock_ar sampling: nucleus probability mass in (0, 1]"),
    "confidence_threshold": (float, "mask_diffusion: commit every masked position whose "
                                    "confidence is above this"),
    "draft_steps": (int, "verified: denoiser forwards that draft each block"),
    "eos_token_id": (_int_or_ints, "stop a row after this token (ID or ID,ID,...)"),
    "seed": (_int_or_ints, "random seed for every row, or one per row (S,S,...)"),
}  # fmt: skip


def _dtype_name(model: TwoTowerModel) -> str:
    return str(model.dtype).removeprefix("torch.")


def _default_mode() -> str:
    return inspect.signature(TwoTowerModel.generate).parameters["mode"].default


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump; main() turns it into exit code 2
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def _add_param_flags(parser: argparse.ArgumentParser, help_prefix: str) -> None:
    """A flag per SamplingParams field, then --device and --dtype; left out, none is passed (the
    API's defaults apply)."""
    for field in dataclasses.fields(SamplingParams):
        kind, text = PARAM_FLAGS[field.name]
        parser.add_argument("--" + field.name.replace("_", "-"), type=kind,
                            default=argparse.SUPPRESS,
                            help=f"{help_prefix}{text} (default: {field.default})")  # fmt: skip
    _add_device_flags(parser, default=argparse.SUPPRESS)
    _add_run_flags(parser)


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """--threads, --kernel-threads and --check-weights (generate, batch and serve)."""
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: the CPUs this process may run "
                             "on, its affinity)")  # fmt: skip
    parser.add_argument("--kernel-threads", type=int, default=None,
                        help="threads the CPU kernels split a call over (the same results "
                             "at every count; default: TWOTOWER_RT_KERNEL_THREADS, else "
                             "--threads)")  # fmt: skip
    parser.add_argument("--kernel-stream", action=argparse.BooleanOptionalAction, default=None,
                        help="run each forward's CPU kernels on a worker thread beside the "
                             "Python between them, the two threads sharing each big kernel "
                             "call (two cores; the same results); the kernels' threads then "
                             "default to 1. Default: TWOTOWER_RT_KERNEL_STREAM (auto, on or "
                             "off), else auto: on where this process may run on exactly two "
                             "CPUs and no --threads, --kernel-threads, TWOTOWER_RT_KERNEL_THREADS, "
                             "--tp or --ray says otherwise")  # fmt: skip
    parser.add_argument("--matmul-precision", default=None, choices=["highest", "high", "medium"],
                        help="torch.set_float32_matmul_precision for this process: 'medium' lets "
                             "the CPU kernels run float32 projections as bfloat16 dot products "
                             "where the CPU has AVX512_BF16 (faster at several rows, inputs "
                             "rounded to bfloat16); default: torch's ('highest')")  # fmt: skip
    parser.add_argument("--check-weights", action="store_true",
                        help="refuse a checkpoint with a NaN or infinite weight (scans every "
                             "tensor at load)")  # fmt: skip


def _load(path, args: argparse.Namespace, **load_kwargs) -> TwoTowerModel:
    """--threads, --kernel-threads and --kernel-stream applied, then the model loaded (with
    --check-weights)."""
    from .threads import set_kernel_stream, set_kernel_threads, set_threads

    if args.matmul_precision is not None:
        import torch

        torch.set_float32_matmul_precision(args.matmul_precision)
    threads = set_threads(args.threads)
    stream = _kernel_stream(args)
    set_kernel_stream(stream)
    if args.kernel_threads is not None:
        set_kernel_threads(args.kernel_threads)
    elif stream:
        set_kernel_threads(1)  # the stream's worker and the caller are the two threads
    elif not os.environ.get("TWOTOWER_RT_KERNEL_THREADS", "").strip():
        set_kernel_threads(threads)  # the kernels follow --threads
    return load(path, check_weights=args.check_weights, **load_kwargs)


def _kernel_stream(args: argparse.Namespace) -> bool:
    """Whether this command runs the CPU kernels on their stream (``threads.resolve_kernel_stream``:
    --kernel-stream / --no-kernel-stream, TWOTOWER_RT_KERNEL_STREAM, else auto, which a thread
    or process count turns off)."""
    from .threads import resolve_kernel_stream

    told = (args.threads is not None or args.kernel_threads is not None
            or getattr(args, "tp", 1) > 1 or getattr(args, "ray", None) is not None)  # fmt: skip
    return resolve_kernel_stream(getattr(args, "kernel_stream", None), told)[0]


def _add_device_flags(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--device", default=default,
                        help="auto, cpu or cuda[:N] (default: auto: CUDA when torch sees a "
                             "GPU)")  # fmt: skip
    parser.add_argument("--dtype", default=default,
                        help="auto, float32 or bfloat16 (default: auto: on a GPU the "
                             "checkpoint's torch_dtype, bfloat16 for a float32 checkpoint; "
                             "float32 on the CPU)")  # fmt: skip


def _add_model_flags(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    """--model (a directory or hub id), --revision; ``positional``: MODEL may also come first, as
    in ``vllm serve ORG/NAME``."""
    if positional:
        parser.add_argument("model_arg", nargs="?", metavar="MODEL", default=None, help=MODEL_HELP)
    parser.add_argument("--model", metavar="MODEL", default=None, help=MODEL_HELP)
    parser.add_argument("--revision", default=None,
                        help="hub id only: branch, tag or commit (default: main)")  # fmt: skip


def _model_arg(args: argparse.Namespace) -> str | None:
    given = getattr(args, "model_arg", None)
    if given is not None and args.model is not None and given != args.model:
        raise _UsageError(f"two models named: {given!r} and --model {args.model!r}")
    return given if given is not None else args.model


def _set_log_level(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")  # fmt: skip
    logging.getLogger("twotower_rt").setLevel(level.upper())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Run two-tower mask-diffusion language models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)  # fmt: skip

    gen = sub.add_parser("generate", help="generate tokens from prompts",
                         description="Generate from one prompt or a batch of prompts.")  # fmt: skip
    _add_model_flags(gen)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--prompt",
        action="append",
        metavar="TEXT",
        help="prompt text (repeat for a batch); needs the model's tokenizer.json",
    )
    src.add_argument("--input-ids", action="append", type=_token_ids, metavar="ID,ID,...",
                     help="prompt token ids (repeat for a batch)")  # fmt: skip
    gen.add_argument("--mode", choices=MODES, default=argparse.SUPPRESS,
                     help=f"decoding mode (default: {_default_mode()})")  # fmt: skip
    _add_param_flags(gen, help_prefix="")
    gen.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    gen.set_defaults(run=cmd_generate)

    quant = sub.add_parser("quantize", help="write an FP8 (e4m3) copy of a checkpoint")
    _add_model_flags(quant)
    quant.add_argument("--out", metavar="DIR", required=True, help="new directory to write")
    quant.add_argument(
        "--block", type=int, nargs=2, metavar=("ROWS", "COLS"), default=[1, 0],
        help="one scale per ROWS x COLS weights (COLS 0: whole rows); default 1 0, one per "
        "output channel; 128 128: DeepSeek-style blocks",
    )  # fmt: skip
    quant.add_argument("--json", action="store_true", help="print the report as JSON")
    quant.set_defaults(run=cmd_quantize)

    srv = sub.add_parser("serve", help="OpenAI-compatible completions server (HTTP)",
                         description="Serve /v1/completions, /v1/chat/completions (with a chat "
                                     "template), /v1/models, /health and /metrics over the "
                                     "engine's continuous batching.")  # fmt: skip
    _add_model_flags(srv, positional=True)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    key = srv.add_mutually_exclusive_group()
    key.add_argument("--api-key", default=None,
                     help=f"require 'Authorization: Bearer KEY' on /v1 and /metrics (visible in "
                          f"ps: prefer --api-key-file or ${API_KEY_ENV})")  # fmt: skip
    key.add_argument("--api-key-file", metavar="FILE", default=None,
                     help="read the API key from FILE (its first line)")  # fmt: skip
    srv.add_argument(
        "--max-connections",
        type=int,
        default=256,
        help="open connections at most; more are closed at once (default: 256)",
    )
    srv.add_argument("--served-model-name", default=None, help="the model id clients see")
    srv.add_argument(
        "--default-mode",
        choices=MODES,
        default="mask_diffusion",
        help="mode of requests that name none (default: mask_diffusion)",
    )
    srv.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="sequences waiting for a slot before requests get 429 (default: 256)",
    )
    srv.add_argument("--max-slots", type=int, default=None,
                     help="sequences in flight at once (default: what the memory budget holds; "
                          "8 on the CPU)")  # fmt: skip
    srv.add_argument(
        "--context",
        type=int,
        default=None,
        help="tokens per sequence, prompt + generated (default: 4096)",
    )
    srv.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="GPU: fraction of memory the cache pool may fill up to (default: 0.9)",
    )
    _add_device_flags(srv, default="auto")
    _add_run_flags(srv)
    srv.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                     help="logging of this package and uvicorn (default: info; debug adds the "
                          "access log)")  # fmt: skip
    srv.add_argument("--tp", type=int, default=1, metavar="N", help=TP_HELP)
    srv.add_argument("--place-towers", nargs=2, metavar=("CONTEXT", "DENOISER"), default=None,
                     help="tower placement: the context tower on device CONTEXT, the denoiser "
                          "on DENOISER (e.g. cuda:0 cuda:1)")  # fmt: skip
    srv.set_defaults(run=cmd_serve)

    _add_batch_parser(sub)

    env = sub.add_parser("env", help="report what this installation can run (CPU, GPU, kernels)")
    env.add_argument("--json", action="store_true", help="print the report as JSON")
    env.add_argument("--check", action="store_true",
                     help="exit 1 unless twotower_rt._C is there with every kernel (for CI and "
                          "installs)")  # fmt: skip
    env.set_defaults(run=cmd_env)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    load_kwargs = {k: getattr(args, k) for k in ("device", "dtype") if hasattr(args, k)}
    params = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingParams)
              if hasattr(args, f.name)}  # fmt: skip
    if hasattr(args, "mode"):
        params["mode"] = args.mode
    path = args.model if args.model is not None else default_model_path()

    start = time.perf_counter()
    model = _load(path, args, revision=args.revision, **load_kwargs)
    load_s = time.perf_counter() - start
    if args.prompt is not None:
        if model.tokenizer is None:
            raise ValueError(f"model {model.source} has no tokenizer.json, so --prompt cannot be "
                             "encoded; pass token ids with --input-ids 1,2,3")  # fmt: skip
        input_ids = [model.encode(text) for text in args.prompt]
    else:
        input_ids = args.input_ids

    start = time.perf_counter()
    out = model.generate(input_ids, **params)
    generate_s = time.perf_counter() - start
    n_tokens = sum(len(g) for g in out.generated)
    tokens_per_s = n_tokens / generate_s if generate_s > 0 else None
    texts = [model.decode(g) for g in out.generated] if model.tokenizer else None

    if args.json:
        mode = params.pop("mode", _default_mode())
        rows = []
        for i, seq in enumerate(out.sequences):
            row = {"sequence": seq, "prompt_length": out.prompt_lengths[i],
                   "generated": out.generated[i], "nfe": out.nfe[i],
                   "finish_reason": out.finish_reason[i]}  # fmt: skip
            if texts is not None:
                row["text"] = texts[i]
            if out.commits_per_step is not None:
                row["commits_per_step"] = out.commits_per_step[i]
            rows.append(row)
        report = {
            "model": model.source, "device": str(model.device),
            "dtype": _dtype_name(model), "mode": mode,
            "params": dataclasses.asdict(SamplingParams(**params)), "rows": rows,
            "timing": {"load_s": load_s, "generate_s": generate_s, "generated_tokens": n_tokens,
                       "tokens_per_s": tokens_per_s},
        }  # fmt: skip
        print(json.dumps(report))
    else:
        for i, generated in enumerate(out.generated):
            print(f"[{i}] nfe={out.nfe[i]} finish={out.finish_reason[i]}")
            print(texts[i] if texts is not None else ",".join(map(str, generated)))
        from .threads import kernel_stream

        rate = f"{tokens_per_s:.1f} tokens/s" if tokens_per_s is not None else "n/a tokens/s"
        stream = ", kernel stream" if model.device.type == "cpu" and kernel_stream() else ""
        where = f"{model.device}, {_dtype_name(model)}{stream}"
        print(f"{PROG}: load {load_s:.2f} s, generate {generate_s:.3f} s, {n_tokens} tokens, "
              f"{rate} ({where})", file=sys.stderr)  # fmt: skip
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .api import DEFAULT_MODEL_DIR
    from .hub import resolve_model_dir
    from .quantize import quantize_checkpoint

    src = resolve_model_dir(args.model if args.model is not None else DEFAULT_MODEL_DIR,
                            args.revision)  # fmt: skip
    report = quantize_checkpoint(src, args.out, tuple(args.block))
    if args.json:
        print(json.dumps(report))
    else:
        mib = 1024 * 1024
        print(f"{PROG}: wrote {args.out}: {report['tensors_quantized']} FP8 weights, "
              f"{report['bytes_before'] / mib:.1f} MiB -> {report['bytes_after'] / mib:.1f} MiB "
              f"({100 * report['saved_fraction']:.0f}% saved)")  # fmt: skip
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"twotower-rt serve needs starlette and uvicorn ({exc}): "
                         "pip install 'twotower-rt[serve]'") from None  # fmt: skip
    if args.max_queue < 1:
        raise ValueError(f"--max-queue must be >= 1, got {args.max_queue}")
    if args.max_connections < 1:
        raise ValueError(f"--max-connections must be >= 1, got {args.max_connections}")
    _set_log_level(args.log_level)
    path = _model_arg(args)
    if path is None:
        path = default_model_path()
    engine_args = dict(max_slots=args.max_slots, context=args.context,
                       gpu_memory_utilization=args.gpu_memory_utilization)  # fmt: skip
    served = args.served_model_name
    if served is None and path is not None and _is_hub_id(path):
        served = path  # clients name the model as vLLM's do: ORG/NAME
    serve_args = dict(host=args.host, port=args.port, api_key=_api_key(args),
                      max_queue=args.max_queue, model_name=served,
                      default_mode=args.default_mode, max_connections=args.max_connections,
                      log_level=args.log_level)  # fmt: skip
    if _tp_size(args) > 1:
        if args.place_towers is not None:
            raise ValueError("--place-towers and --tp do not combine yet")
        from .parallel.lockstep import launch, serve_rank

        path, device = _for_ranks(path, args.revision, args.device)
        launch(_tp_size(args), device, serve_rank, path, args.dtype, engine_args, serve_args)
        return 0
    model = _load(path, args, device=args.device, dtype=args.dtype, revision=args.revision)
    if args.place_towers is not None:
        from .parallel import place_towers

        place_towers(model, *args.place_towers)
    serve(model, **serve_args, **engine_args)
    return 0


def _api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else the first line of --api-key-file, else $TWOTOWER_RT_API_KEY, else None."""
    import os

    if args.api_key_file is not None:
        from .safejson import read_bytes

        try:
            lines = read_bytes(args.api_key_file, 4096).decode("utf-8").splitlines()
        except UnicodeDecodeError:
            raise ValueError(f"{args.api_key_file}: the API key file is not UTF-8") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise ValueError(f"{args.api_key_file}: the API key file is empty")
        return key
    return args.api_key or os.environ.get(API_KEY_ENV) or None


def _is_hub_id(path) -> bool:
    from .hub import is_hub_id

    return is_hub_id(path)


def _for_ranks(path, revision, device) -> tuple[str | None, str]:
    """Before spawning ranks: the hub snapshot fetched once (the ranks read its directory), and
    device "auto" made concrete."""
    from .hub import resolve_model_dir

    if path is not None:
        path = resolve_model_dir(path, revision)
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return path, device


def _tp_size(args: argparse.Namespace) -> int:
    import os

    if args.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {args.tp}")
    one_process = {"--matmul-precision": getattr(args, "matmul_precision", None) is not None,
                   "--kernel-stream": getattr(args, "kernel_stream", None) is True}  # fmt: skip
    for flag, value in one_process.items():
        if value and args.tp > 1:
            raise ValueError(f"{flag} applies to one process; it does not reach --tp's ranks "
                             "yet")  # fmt: skip
    world = int(os.environ.get("WORLD_SIZE", "1"))  # launched by torchrun: its ranks
    if world > 1 and args.tp not in (1, world):
        raise ValueError(f"--tp {args.tp} under torchrun with WORLD_SIZE={world}")
    return max(world, args.tp)


def _add_batch_parser(sub) -> None:
    batch = sub.add_parser(
        "batch", help="run a JSONL file of requests (resumable)",
        description="Run every request of IN.jsonl (one JSON object per line: id, prompt or "
        "input_ids, optional mode and parameters) and append one JSON line per completed "
        "request to OUT.jsonl. A re-run skips the ids already in OUT.jsonl.",
    )  # fmt: skip
    batch.add_argument("input", metavar="IN.jsonl", help="requests, one JSON object per line")
    batch.add_argument("output", metavar="OUT.jsonl", help="results, appended as they complete")
    _add_model_flags(batch)
    batch.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                       help="logging of this package (default: info)")  # fmt: skip
    batch.add_argument(
        "--mode",
        choices=MODES,
        default=argparse.SUPPRESS,
        help=f"mode of lines that name none (default: {_default_mode()})",
    )
    _add_param_flags(batch, help_prefix="default for every line: ")
    batch.add_argument(
        "--max-slots",
        type=int,
        default=None,
        help="sequences in flight at once (default: what the memory budget holds; 8 on the CPU)",
    )
    batch.add_argument(
        "--context",
        type=int,
        default=None,
        help="tokens per sequence, prompt + generated (default: 4096)",
    )
    batch.add_argument(
        "--max-in-flight",
        type=int,
        default=None,
        help="requests read ahead of completion (default: 4 per slot)",
    )
    batch.add_argument(
        "--errors",
        metavar="FILE",
        default=None,
        help="bad lines, one JSON object each (default: OUT.jsonl.errors.jsonl)",
    )
    batch.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    batch.add_argument("--tp", type=int, default=1, metavar="N", help=TP_HELP)
    batch.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="run on a Ray cluster (ADDRESS: auto, HOST:PORT or ray://...; none: "
                            "a local one) with engine replicas; IN may be a directory of JSONL "
                            "shards and OUT is a directory of result shards")  # fmt: skip
    batch.add_argument("--replicas", type=int, default=None,
                       help="--ray: engine replicas (default: the cluster's GPUs / --tp with "
                            "--device cuda, its CPUs otherwise)")  # fmt: skip
    batch.add_argument("--batch-size", type=int, default=None,
                       help="--ray: rows handed to a replica at a time (default: 64)")  # fmt: skip
    batch.set_defaults(run=cmd_batch)


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch import run_batch

    names = ["mode", "device", "dtype", *(f.name for f in dataclasses.fields(SamplingParams))]
    kwargs = {name: getattr(args, name) for name in names if hasattr(args, name)}
    _set_log_level(args.log_level)
    path = args.model if args.model is not None else default_model_path()
    if args.ray is not None:
        try:
            from .ray_batch import cmd_batch_ray
        except ModuleNotFoundError as exc:
            raise ValueError(f"batch --ray needs Ray Data ({exc}): pip install "
                             "'twotower-rt[ray]'") from None  # fmt: skip
        return cmd_batch_ray(args, path, kwargs)
    if args.replicas is not None or args.batch_size is not None:
        raise ValueError("--replicas and --batch-size go with --ray")
    if _tp_size(args) > 1:
        from .parallel.lockstep import batch_rank

        device, dtype = kwargs.pop("device", "auto"), kwargs.pop("dtype", "auto")
        path, device = _for_ranks(path, args.revision, device)
        engine_args = dict(max_slots=args.max_slots, context=args.context)
        batch_args = dict(input_path=args.input, output_path=args.output,
                          errors_path=args.errors, max_in_flight=args.max_in_flight,
                          progress=not args.no_progress, **kwargs)  # fmt: skip
        from .parallel.lockstep import launch

        launch(_tp_size(args), device, batch_rank, path, dtype, engine_args, batch_args)
        return 0
    device, dtype = kwargs.pop("device", "auto"), kwargs.pop("dtype", "auto")
    model = _load(path, args, device=device, dtype=dtype, revision=args.revision)
    try:
        summary = run_batch(args.input, args.output, model, errors_path=args.errors,
                            max_slots=args.max_slots, context=args.context,
                            max_in_flight=args.max_in_flight, progress=not args.no_progress,
                            **kwargs)  # fmt: skip
    except KeyboardInterrupt:
        print(f"{PROG}: batch interrupted; {args.output} keeps every completed line: run the same "
              "command again to resume", file=sys.stderr)  # fmt: skip
        return 130
    print(f"{PROG} batch: {summary.describe()}")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from . import env

    print(json.dumps(env.report()) if args.json else env.format_report())
    return env.check_exit_code(args.check)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: sys.argv[1:]) and return the exit code: 0 on success,
    2 on bad input (one line on stderr, no traceback)."""
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else 0
    except (_UsageError, ValueError, OSError) as e:
        message = " ".join(str(e).split())  # always one line
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
