"""``twotower-rt env --check``: exit 1 unless twotower_rt._C is there with every kernel (CI runs it
on the wheel it builds), and the report's kernel line. The extension's build info is faked here."""

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
