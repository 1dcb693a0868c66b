"""twotower_rt._C and the environment report, on any machine (GPU or not, extension built or not).

Set TWOTOWER_RT_EXPECT_EXTENSION=1 (.ci/run does when nvcc exists) to fail, not skip, when the
extension is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from twotower_rt import _ext, env

EXPECT_EXTENSION = os.environ.get("TWOTOWER_RT_EXPECT_EXTENSION") == "1"

needs_extension = pytest.mark.skipif(
    not _ext.extension_available(), reason=f"no extension: {_ext.extension_error()}"
)


def test_extension_present_when_expected():
    if EXPECT_EXTENSION:
        assert _ext.extension_available(), _ext.extension_error()
    info = _ext.extension_info()
    assert info["available"] == _ext.extension_available()
    if not info["available"]:
        assert "twotower_rt._C" in info["error"]


@needs_extension
def test_build_info():
    info = _ext.extension_info()
    assert info["archs"] == ["90a"]
    assert info["build_type"] == "Release" and info["ndebug"] is True
    assert info["cuda_version"].split(".")[0].isdigit()
    assert info["cudart_version"] >= 12000
    assert "rms_norm" in info["ops"]
    assert isinstance(info["cuda_driver_version"], int)


@needs_extension
def test_dtype_codes_are_stable():
    C = _ext.extension_module()
    assert (C.DTYPE_FLOAT32, C.DTYPE_BFLOAT16) == (0, 1)


@needs_extension
def test_launcher_validates_before_touching_the_gpu():
    C = _ext.extension_module()
    args = dict(
        out=256,
        x=256,
        gate=0,
        weight=256,
        rows=2,
        n=8,
        group_size=8,
        out_row_stride=8,
        x_row_stride=8,
        gate_row_stride=0,
        eps=1e-5,
        dtype=0,
        weight_dtype=0,
        device=0,
        stream=0,
    )
    for bad, match in [
        (dict(group_size=3), "group_size must be > 0 and divide n"),
        (dict(n=0), "row length n must be > 0"),
        (dict(dtype=7), "unknown dtype code 7"),
        (dict(weight_dtype=-1), "unknown weight dtype code"),
        (dict(out_row_stride=4), "output rows would overlap"),
        (dict(x=0), "must be non-null"),
        (dict(eps=float("nan")), "eps must be finite"),
        (dict(rows=2**31, group_size=1), "exceeds"),
    ]:
        with pytest.raises(ValueError, match=match):
            C.rms_norm(**{**args, **bad})


@needs_extension
def test_sample_tokens_split_plan():
    """The launcher's rule for splitting sampler rows over CTAs (host code, no GPU needed)."""
    C = _ext.extension_module()

    def size(batch, vocab=131072, splits=0, sms=132):
        return C.sample_tokens_split_size(batch=batch, vocab=vocab, splits=splits, sm_count=sms)

    assert size(1) == 2048 and 131072 // 2048 == 64  # 2 x 132 wanted, capped at 2048 per CTA
    assert size(8) == 131072 // 33 // 8 * 8 + 8  # ceil(264 / 8) = 33 slices, rounded up to 8
    assert size(66) == 32768 and size(67) == 0  # 4 slices; then the rows fill the SMs alone
    assert size(1, splits=1) == 0 and size(1, vocab=3000) == 1504  # never; 2 slices of 1504
    assert size(1, vocab=250, splits=3) == 88 and size(1, vocab=8, splits=3) == 0
    assert C.sample_tokens_workspace_bytes(batch=3, split_size=88) == 3 * (8 * 256 + 4) * 8
    assert C.sample_tokens_workspace_bytes(batch=3, split_size=0) == 0
    with pytest.raises(ValueError, match="sm_count"):
        size(1, sms=0)


@needs_extension
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_call_without_gpu_raises_runtime_error():
    C = _ext.extension_module()
    with pytest.raises(RuntimeError, match=r"twotower_rt\._C\.rms_norm: CUDA error .*cuda"):
        C.rms_norm(
            out=256,
            x=256,
            gate=0,
            weight=256,
            rows=2,
            n=8,
            group_size=8,
            out_row_stride=8,
            x_row_stride=8,
            gate_row_stride=0,
            eps=1e-5,
            dtype=0,
            weight_dtype=0,
            device=0,
            stream=0,
        )


def test_arch_runs_on():
    assert _ext.arch_runs_on("90a", (9, 0))
    assert not _ext.arch_runs_on("90a", (10, 0))
    assert not _ext.arch_runs_on("90a", (8, 9))
    assert _ext.arch_runs_on("80", (8, 6))
    assert not _ext.arch_runs_on("80", (9, 0))
    assert _ext.arch_runs_on("100a", (10, 0))


def test_a_build_without_an_op_says_so(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(_ext, "_C", SimpleNamespace(rms_norm=object()))
    monkeypatch.setattr(_ext, "built_archs", lambda: ["90a"])
    monkeypatch.setattr(_ext, "_device_capability", lambda index: (9, 0))
    device = torch.device("cuda", 0)
    assert _ext.cuda_unsupported_reason(device) is None
    assert _ext.cuda_unsupported_reason(device, "rms_norm") is None
    reason = _ext.cuda_unsupported_reason(device, "block_attention")
    assert "built without block_attention" in reason and "CUTLASS" in reason


def test_require_cuda_op_names_the_op_and_the_reason():
    with pytest.raises(RuntimeError, match=r"CUDA op 'rms_norm' cannot run: tensor is on cpu"):
        _ext.require_cuda_op("rms_norm", torch.zeros(2))


def test_report_is_json_and_complete():
    info = env.report()
    json.dumps(info)
    assert info["torch"] == torch.__version__
    assert info["extension"]["available"] == _ext.extension_available()
    assert info["gpu"]["available"] == torch.cuda.is_available()
    cpu = info["ops"]["rms_norm"]["cpu"]
    assert cpu["backend"] == "torch"
    cuda = info["ops"]["rms_norm"]["cuda"]
    assert cuda["backend"] in ("cuda", "torch", "none") and cuda["reason"]
    if not torch.cuda.is_available():
        assert cuda["backend"] == "none" and info["gpu"]["reason"]


def test_format_report_mentions_everything():
    text = env.format_report()
    for needle in ("torch", "extension", "gpu", "rms_norm"):
        assert needle in text
    if _ext.extension_available():
        assert "sm_90a" in text


def test_env_module_cli_json():
    result = subprocess.run(
        [sys.executable, "-m", "twotower_rt.env", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert json.loads(result.stdout)["ops"]["rms_norm"]["cpu"]["backend"] == "torch"


def test_kernels_can_be_turned_off_and_on():
    before = (_ext.extension_available(), _ext.extension_error())
    try:
        _ext.set_kernels_enabled(False)
        assert not _ext.extension_available()
        assert "turned off" in _ext.cuda_unsupported_reason(torch.device("cuda", 0))
    finally:
        _ext.set_kernels_enabled(True)
    assert (_ext.extension_available(), _ext.extension_error()) == before
