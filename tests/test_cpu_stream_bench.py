"""bench/cpu_stream.py on a few prompts: every configuration timed, the summary's ratios read
from the timings, and the kernels' settings put back."""

import sys
from pathlib import Path

import pytest

import twotower_rt
from twotower_rt import _ext
from twotower_rt.threads import kernel_stream, kernel_threads
from twotower_rt.train import evaluate as ev

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import cpu_stream  # noqa: E402

pytestmark = pytest.mark.skipif(_ext.cpu_kernels() is None, reason="no CPU kernels")


def test_summary_of_a_small_run():
    model = twotower_rt.load()
    stream, threads = kernel_stream(), kernel_threads()
    prompts = [[5, 9, 200, 31], [44, 12, 9, 7]]
    speeds = ev.measure_speed(model, prompts, 16, 1, cpu_stream.CONFIGS, cpu_stream.MODES, (1,))
    assert kernel_stream() == stream and kernel_threads() == threads
    cell = cpu_stream.summary(speeds)["batch_1"]
    one, stream_cell = cell["1 kernel thread"], cell[ev.config_name(ev.STREAM)]
    assert one["md_vs_ar"] == pytest.approx(one["md_tok_s"] / one["ar_tok_s"], rel=1e-2)
    assert stream_cell["tokens_per_forward"] == one["tokens_per_forward"]  # the same tokens
    gain = cell["ar_stream_vs_1_kernel_thread"]
    assert gain == pytest.approx(stream_cell["ar_tok_s"] / one["ar_tok_s"], rel=1e-2)
    assert set(cell) >= {"2 kernel threads", "mask_diffusion@0.8_stream_vs_2_kernel_threads"}
