"""bench/cpu_stream_bound.py on two prompts: each configuration runs with its settings (the
stream and the bound, the stream without it, two kernel threads in line), the ratios are read
from the medians, and the settings are put back."""

import sys
from pathlib import Path

import pytest

import twotower_rt
from twotower_rt import _ext
from twotower_rt.model import cpu_fast
from twotower_rt.threads import kernel_stream, kernel_threads
from twotower_rt.train import evaluate as ev

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import cpu_stream_bound  # noqa: E402

pytestmark = pytest.mark.skipif(_ext.cpu_kernels() is None, reason="no CPU kernels")


def test_a_small_run(monkeypatch):
    model = twotower_rt.load()
    seen = []
    run_mode = ev.run_mode

    def recording(*args, **kwargs):
        seen.append((kernel_stream(), kernel_threads(), cpu_fast.STREAM_BOUND_ROWS))
        return run_mode(*args, **kwargs)

    monkeypatch.setattr(ev, "run_mode", recording)
    before = kernel_stream(), kernel_threads(), cpu_fast.STREAM_BOUND_ROWS
    cell = cpu_stream_bound.measure(model, [[5, 9, 200, 31], [44, 12, 9, 7]], 2, 1, 16)
    assert (kernel_stream(), kernel_threads(), cpu_fast.STREAM_BOUND_ROWS) == before
    bound = cpu_fast.STREAM_BOUND_ROWS
    assert sorted(set(seen)) == sorted({(True, 1, bound), (True, 1, cpu_stream_bound.NO_BOUND),
                                        (False, 2, bound)})  # fmt: skip
    assert len(seen) == 3 * 2  # the warm-up and one round, one group each
    for name in ("stream, bound", "stream, no bound", "2 kernel threads"):
        c = cell[name]
        assert c["tok_s"] == pytest.approx(2 * 16 / c["wall_s"], rel=1e-2)
        assert len(c["rounds"]) == 1 and c["minor_faults"] >= 0 and c["system_s"] >= 0
    ratio = cell["stream, no bound"]["wall_s"] / cell["stream, bound"]["wall_s"]
    assert cell["bound_vs_no_bound"] == pytest.approx(ratio, rel=1e-2)
