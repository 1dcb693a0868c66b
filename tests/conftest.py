import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("TWOTOWER_RT_GOLDEN", REPO.parent / "shared" / "golden" / "tiny-a"))


def _golden_dir() -> Path:
    if not (GOLDEN / "config.json").is_file():
        if os.environ.get("TWOTOWER_RT_REQUIRE_GOLDEN"):
            pytest.fail(f"golden data not found at {GOLDEN} (TWOTOWER_RT_REQUIRE_GOLDEN is set)")
        pytest.skip(f"golden data not found at {GOLDEN}; set TWOTOWER_RT_GOLDEN")
    return GOLDEN


def load_cases(name: str) -> list[dict]:
    path = GOLDEN / name
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return _golden_dir()


@pytest.fixture(scope="session")
def golden_model(golden_dir):
    import twotower_rt

    return twotower_rt.load(golden_dir)


@pytest.fixture(scope="session")
def golden_tensors(golden_dir):
    from safetensors.torch import load_file

    return load_file(str(golden_dir / "tensors.safetensors"))


@pytest.fixture(scope="session")
def builtin_model():
    """The seeded random built-in model (vocab 512): fast, meaningless text."""
    from twotower_rt.api import load_builtin_model

    return load_builtin_model()


@pytest.fixture(scope="session")
def default_model():
    """The trained default model shipped in the package: what load() and the CLI use by default."""
    import twotower_rt

    return twotower_rt.load()


@pytest.fixture(autouse=True)
def _restore_cpu_settings():
    """Every test leaves torch's threads, the CPU kernels' threads and their stream as it found
    them: the command line's defaults (``--kernel-stream`` auto on a 2-CPU machine) set them for
    the process, and a test that runs it in-process must not change the next test's setting."""
    import torch

    from twotower_rt.threads import (
        kernel_stream,
        kernel_threads,
        set_kernel_stream,
        set_kernel_threads,
    )

    before = torch.get_num_threads(), kernel_threads(), kernel_stream()
    yield
    if (torch.get_num_threads(), kernel_threads(), kernel_stream()) != before:
        torch.set_num_threads(before[0])
        set_kernel_threads(before[1])
        set_kernel_stream(before[2])
