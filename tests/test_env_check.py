"""``twotower-rt env --check``: exit 1 unless twotower_rt._C is there with every kernel (CI runs it
on the wheel it builds), and the report's kernel line. The extension's build info is faked here."""

import torch

from twotower_rt import _ext, env
from twotower_rt.cli import main

FULL = {"available": True, "error": None, "ops": list(env.KERNELS), "archs": ["90a"],
        "cuda_version": "13.0", "build_type": "Release", "cutlass_version": "4.2.0",
        "cuda_driver_version": 0}  # fmt: skip


def test_check_passes_only_with_every_kernel():
    assert env.check(FULL) is None and env.missing_kernels(FULL) == []
    partial = {**FULL, "ops": [k for k in env.KERNELS if "moe" not in k and "attention" not in k],
               "cutlass_version": ""}  # fmt: skip
    assert env.missing_kernels(partial) == ["block_attention", "moe_grouped_gemm",
                                            "moe_grouped_gemm_fp8"]  # fmt: skip
    assert "lacks block_attention, moe_grouped_gemm" in env.check(partial)
    absent = {"available": False, "error": "twotower_rt._C is not built"}
    assert env.missing_kernels(absent) == list(env.KERNELS)
    assert "no CUDA extension: twotower_rt._C is not built" in env.check(absent)


def test_cli_exit_code_and_report(monkeypatch, capsys):
    monkeypatch.setattr(_ext, "extension_info", lambda: FULL)
    monkeypatch.setattr(env, "_ops_report", lambda: {})
    assert main(["env", "--check"]) == 0
    assert "kernels      9 of 9 built" in capsys.readouterr().out
    monkeypatch.setattr(_ext, "extension_info", lambda: {**FULL, "ops": ["rms_norm"]})
    assert main(["env", "--check"]) == 1
    out, err = capsys.readouterr()
    assert "1 of 9 built; missing: mask_sampling" in out
    assert err.startswith("twotower-rt env --check: twotower_rt._C lacks mask_sampling")
    assert main(["env"]) == 0  # without --check: a report, never a failure


ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_bf16

processor\t: 1
cpu family\t: 23
model\t\t: 49
model name\t: other
flags\t\t: fpu sse2
"""


def test_cpu_report_reads_the_first_processor_and_its_vector_isa():
    cpu = env.cpu_report(ZEN4)
    assert cpu["name"] == "AMD EPYC"
    assert cpu["family_model_stepping"] == ["25", "17", "1"]
    assert cpu["vector_isa"] == "avx512"
    zen3 = ZEN4.replace(" avx512f avx512bw avx512_bf16", "")
    assert env.cpu_report(zen3)["vector_isa"] == "avx2"
    assert env.cpu_report(zen3.replace(" fma", ""))["vector_isa"] == "other"  # AVX2 without FMA
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm\nCPU part\t: 0xd40\n"
    assert env.cpu_report(arm)["vector_isa"] == "neon"
    nothing = env.cpu_report("")
    assert nothing["vector_isa"] == "unknown" and nothing["family_model_stepping"] == [None] * 3
    line = env.format_cpu(cpu)
    assert line.startswith("AMD EPYC (family 25 model 17), ") and ", avx512" in line


def test_cpu_report_gives_the_width_the_kernels_use():
    cpu = _ext.cpu_kernels_module()
    width = env.cpu_report(ZEN4)["cpu_kernel_vector_floats"]
    if cpu is None:
        assert width is None
        return
    wide = cpu.wide_vectors()
    try:
        cpu.set_wide_vectors(0)
        assert env.cpu_report(ZEN4)["cpu_kernel_vector_floats"] == 8
        cpu.set_wide_vectors(1)
        assert env.cpu_report(ZEN4)["cpu_kernel_vector_floats"] == 16
    finally:
        cpu.set_wide_vectors(-1)
    assert width == (16 if wide else 8)


def test_cpu_report_gives_the_bf16_dot_products_and_the_precision():
    """Whether the kernels can run bfloat16 dot products, and whether torch's float32 matmul
    precision lets them now: both in every benchmark's record, and on `env`'s CPU line."""
    cpu = _ext.cpu_kernels_module()
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        report = env.cpu_report(ZEN4)
    finally:
        torch.set_float32_matmul_precision(before)
    assert report["float32_matmul_precision"] == "medium"
    assert env.cpu_report(ZEN4)["float32_matmul_precision"] == before
    dot = report["cpu_kernel_bf16_dot"]
    assert dot == (None if cpu is None else bool(cpu.linear_dot_supported()))
    line = env.format_cpu(report)
    assert ("bf16 dot products on (float32 matmul precision medium)" in line) == bool(dot)
    report["float32_matmul_precision"] = "highest"
    assert ("bf16 dot products off" in env.format_cpu(report)) == bool(dot)
