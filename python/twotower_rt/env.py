"""What this installation can run: versions, the CUDA extension, the GPU, and each op's backend.

``report()`` returns a JSON-serialisable dict, ``format_report()`` the same as text.
``python -m twotower_rt.env [--json] [--check]`` prints either; ``--check`` exits 1 unless the
extension is there with every kernel (:data:`KERNELS`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any

import torch

from twotower_rt import _ext
from twotower_rt.threads import kernel_threads

# Every kernel of a full twotower_rt._C (its build_info()["ops"]); block_attention and the MoE
# grouped GEMMs are compiled only with the CUTLASS headers.
KERNELS = ("rms_norm", "mask_sampling", "sample_tokens", "all_reduce", "ssm_scan",
           "mamba_decode_step", "block_attention", "moe_grouped_gemm",
           "moe_grouped_gemm_fp8")  # fmt: skip


def missing_kernels(extension: dict[str, Any] | None = None) -> list[str]:
    """The kernels of :data:`KERNELS` that this build of the extension lacks (all of them when
    there is no extension)."""
    extension = _ext.extension_info() if extension is None else extension
    built = set(extension.get("ops", [])) if extension.get("available") else set()
    return [k for k in KERNELS if k not in built]


def check(extension: dict[str, Any] | None = None) -> str | None:
    """None when the extension is there with every kernel, else what is wrong (one line)."""
    extension = _ext.extension_info() if extension is None else extension
    if not extension.get("available"):
        return f"no CUDA extension: {extension.get('error')}"
    missing = missing_kernels(extension)
    if missing:
        return (f"twotower_rt._C lacks {', '.join(missing)} (built without CUTLASS "
                f"{extension.get('cutlass_version') or 'headers'})")  # fmt: skip
    return None


def _package_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("twotower-rt")
    except PackageNotFoundError:
        import twotower_rt

        return getattr(twotower_rt, "__version__", "unknown")


def _gpu_report() -> dict[str, Any]:
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            reason = f"this PyTorch ({torch.__version__}) is built without CUDA"
        else:
            reason = "PyTorch sees no CUDA device (no GPU, no driver, or CUDA_VISIBLE_DEVICES)"
        return {"available": False, "reason": reason, "devices": []}
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append(
            {
                "index": index,
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "sm": f"sm_{props.major}{props.minor}",
                "multiprocessors": props.multi_processor_count,
                "memory_gib": round(props.total_memory / 2**30, 1),
            }
        )
    return {
        "available": True,
        "reason": None,
        "current": torch.cuda.current_device(),
        "devices": devices,
    }


def _ops_report() -> dict[str, Any]:
    from twotower_rt.ops import OP_BACKENDS

    ops = {}
    for name, backend in OP_BACKENDS.items():
        entry = {}
        for device in ("cpu", "cuda"):
            chosen, reason = backend(device)
            entry[device] = {"backend": chosen, "reason": reason}
        ops[name] = entry
    return ops


def _vector_isa(flags: set[str]) -> str:
    if "avx512f" in flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    if "asimd" in flags:
        return "neon"
    return "other"


def cpu_report(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU that timings come from: its name, family / model / stepping, logical CPUs, its
    widest vector instruction set, the vector width the CPU kernels compute in (16 floats on an
    x86-64-v4 CPU, else 8), whether they can run bfloat16 dot products (AVX512_BF16) and torch's
    float32 matmul precision now ("medium" lets them: ``ops.linear_cpu.dot_allowed``), whether
    the kernels run on their stream (``threads.set_kernel_stream``). Every
    benchmark records it: the same code runs 2-4x apart on the x86 VMs this repository has run
    on, and the name alone ("AMD EPYC") does not tell them apart.
    ``cpuinfo``: the text of /proc/cpuinfo (read when None; absent off Linux)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    first: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if first:
                break  # the first processor's block is enough
            continue
        key, _, value = line.partition(":")
        first.setdefault(key.strip(), value.strip())
    flags = set((first.get("flags") or first.get("Features") or "").split())
    cpu = _ext.cpu_kernels_module()
    return {
        "name": first.get("model name") or platform.processor() or "unknown",
        "family_model_stepping": [first.get(k) for k in ("cpu family", "model", "stepping")],
        "logical_cpus": os.cpu_count(),
        "vector_isa": _vector_isa(flags) if flags else "unknown",
        "cpu_kernel_vector_floats": None if cpu is None else (16 if cpu.wide_vectors() else 8),
        "cpu_kernel_bf16_dot": None if cpu is None else bool(cpu.linear_dot_supported()),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cpu_kernel_stream": _ext.stream_enabled(),
    }


def format_cpu(cpu: dict[str, Any]) -> str:
    """One line: ``AMD EPYC (family 25 model 17), 2 CPUs, avx512, CPU kernels in 16-float
    vectors``."""
    fms = cpu["family_model_stepping"]
    where = f" (family {fms[0]} model {fms[1]})" if fms[0] is not None else ""
    width = cpu["cpu_kernel_vector_floats"]
    kernels = f", CPU kernels in {width}-float vectors" if width else ""
    if cpu.get("cpu_kernel_bf16_dot"):
        precision = cpu["float32_matmul_precision"]
        state = "on" if precision == "medium" else "off"
        kernels += f", bf16 dot products {state} (float32 matmul precision {precision})"
    if cpu.get("cpu_kernel_stream"):
        kernels += ", kernel stream on"
    return f"{cpu['name']}{where}, {cpu['logical_cpus']} CPUs, {cpu['vector_isa']}{kernels}"


def report() -> dict[str, Any]:
    """Versions, the extension's build (CUDA version, archs, build type), GPUs, op backends."""
    return {
        "twotower_rt": _package_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_report(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "cpu_kernel_threads": kernel_threads(),
        "commands_kernel_stream": _commands_kernel_stream(),
        "extension": _ext.extension_info(),
        "gpu": _gpu_report(),
        "ops": _ops_report(),
    }


def _commands_kernel_stream() -> str:
    """What generate / batch / serve do about the kernels' stream without flags, and why."""
    from .threads import resolve_kernel_stream

    try:
        on, why = resolve_kernel_stream()
    except ValueError as exc:
        return f"error: {exc}"
    return f"{'on' if on else 'off'} ({why})"


def _format_cuda_version(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}" if version else "none"


def format_report(info: dict[str, Any] | None = None) -> str:
    info = report() if info is None else info
    ext = info["extension"]
    lines = [
        f"twotower_rt {info['twotower_rt']}  (python {info['python']}, {info['platform']})",
        f"torch        {info['torch']}  (CUDA {info['torch_cuda'] or 'none'})",
    ]
    if "cpu" in info:  # reports written before the CPU was recorded lack it
        lines.append(f"cpu          {format_cpu(info['cpu'])}")
    if ext["available"]:
        archs = ", ".join(f"sm_{a}" for a in ext["archs"]) or "none"
        cutlass = ext["cutlass_version"] or "not used"
        lines.append(
            f"extension    twotower_rt._C built for {archs} with CUDA {ext['cuda_version']}, "
            f"{ext['build_type']}, CUTLASS {cutlass}; driver supports CUDA "
            f"{_format_cuda_version(ext['cuda_driver_version'])}"
        )
        missing = missing_kernels(ext)
        lines.append(f"kernels      {len(KERNELS) - len(missing)} of {len(KERNELS)} built"
                     + (f"; missing: {', '.join(missing)}" if missing else ""))  # fmt: skip
    else:
        lines.append(f"extension    unavailable: {ext['error']}")
    if ext.get("cpu_kernels"):
        lines.append(
            "cpu kernels  twotower_rt._cpu (fp32: the projections, attention, the Mamba mixer, "
            "the MoE layer, the norms, the greedy mask decision), "
            f"{info.get('cpu_kernel_threads', 1)} thread(s); torch "
            f"{info.get('torch_threads', '?')} thread(s)"
        )
        if "commands_kernel_stream" in info:
            lines.append(f"             generate / batch / serve: kernel stream "
                         f"{info['commands_kernel_stream']}")  # fmt: skip
    else:
        lines.append(f"cpu kernels  unavailable: {ext.get('cpu_kernels_error')}")
    gpu = info["gpu"]
    if gpu["available"]:
        for device in gpu["devices"]:
            lines.append(
                f"gpu {device['index']}        {device['name']}, {device['sm']}, "
                f"{device['multiprocessors']} SMs, {device['memory_gib']} GiB"
            )
    else:
        lines.append(f"gpu          none: {gpu['reason']}")
    lines.append("ops          (backend for CPU tensors | for CUDA tensors)")
    width = max(map(len, info["ops"]), default=0)
    for name, entry in info["ops"].items():
        for device in ("cpu", "cuda"):
            choice = entry[device]
            lines.append(f"  {name:<{width}} {device:<5} {choice['backend']:<6} {choice['reason']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twotower_rt.env", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print report() as JSON")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless twotower_rt._C is there with every kernel")  # fmt: skip
    args = parser.parse_args(argv)
    if args.json:
        json.dump(report(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_report())
    return check_exit_code(args.check)


def check_exit_code(wanted: bool) -> int:
    problem = check() if wanted else None
    if problem is not None:
        print(f"twotower-rt env --check: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
