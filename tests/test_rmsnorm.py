"""rms_norm / rms_norm_ref: the reference against float64 on the CPU, argument checks, and, on a
GPU, the CUDA kernel against the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import install_fake_extension, raw_view

from twotower_rt.ops import rms_norm, rms_norm_backend, rms_norm_ref
from twotower_rt.ops import rmsnorm as rmsnorm_module

EPS = 1e-5

# (rows, N, group_size): the model's shapes (hidden 2688; Mamba gated norm 4096 in groups of 512)
# and awkward ones (1/19/99/989 rows, N not a power of two, odd N, odd groups).
SHAPES = [
    (1, 2688, None),
    (19, 99, None),
    (99, 4096, 512),
    (989, 96, 24),
    (19, 520, 520),
    (99, 15, 5),
]


def make_inputs(rows, n, dtype, *, gated, weight_dtype=None, device="cpu", seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(rows, n, generator=gen) * 2 + 0.5).to(dtype)
    weight = (1 + 0.5 * torch.randn(n, generator=gen)).to(weight_dtype or dtype)
    gate = (torch.randn(rows, n, generator=gen) * 3).to(dtype) if gated else None
    to = lambda t: t.to(device) if t is not None else None  # noqa: E731
    return to(x), to(weight), to(gate)


def rms_norm_float64(x, weight, eps, *, gate=None, group_size=None) -> torch.Tensor:
    """Independent of rms_norm_ref: numpy, float64, silu written out."""
    h = x.cpu().to(torch.float64).numpy()
    if gate is not None:
        g = gate.cpu().to(torch.float64).numpy()
        h = h * (g / (1.0 + np.exp(-g)))
    n = h.shape[-1]
    size = group_size or n
    grouped = h.reshape(*h.shape[:-1], n // size, size)
    grouped = grouped / np.sqrt(np.mean(grouped * grouped, axis=-1, keepdims=True) + eps)
    w = weight.cpu().to(torch.float64).numpy()
    return torch.from_numpy(grouped.reshape(h.shape) * w)


# --- the reference, on the CPU -------------------------------------------------------------------


@pytest.mark.parametrize("rows,n,group_size", SHAPES)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ref_matches_float64(rows, n, group_size, gated, dtype):
    x, weight, gate = make_inputs(rows, n, dtype, gated=gated)
    ref = rms_norm_ref(x, weight, EPS, gate=gate, group_size=group_size)
    expected = rms_norm_float64(x, weight, EPS, gate=gate, group_size=group_size)
    assert ref.dtype == dtype and ref.shape == x.shape
    # fp32 math throughout; bf16 adds one rounding of the output (half an ulp, 2**-9 relative).
    rtol, atol = (2e-5, 2e-5) if dtype == torch.float32 else (2**-8, 1e-5)
    torch.testing.assert_close(ref.to(torch.float64), expected, rtol=rtol, atol=atol)


def test_ref_group_size_none_and_zero_mean_whole_row():
    x, weight, _ = make_inputs(7, 40, torch.float32, gated=False)
    whole = rms_norm_ref(x, weight, EPS)
    assert torch.equal(whole, rms_norm_ref(x, weight, EPS, group_size=40))
    assert torch.equal(whole, rms_norm_ref(x, weight, EPS, group_size=0))
    grouped = rms_norm_ref(x, weight, EPS, group_size=8)
    assert not torch.allclose(whole, grouped)


def test_ref_groups_are_independent():
    # Scaling one group of the input must leave every other group's output unchanged.
    x, weight, gate = make_inputs(3, 64, torch.float32, gated=True)
    before = rms_norm_ref(x, weight, EPS, gate=gate, group_size=16)
    x2 = x.clone()
    x2[:, 16:32] *= 10
    after = rms_norm_ref(x2, weight, EPS, gate=gate, group_size=16)
    torch.testing.assert_close(after[:, 16:32], before[:, 16:32], rtol=1e-5, atol=1e-6)
    assert torch.equal(after[:, :16], before[:, :16])
    assert torch.equal(after[:, 32:], before[:, 32:])


# --- rms_norm on the CPU: same result as the reference, argument checks -------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cpu_is_the_reference(dtype):
    x, weight, gate = make_inputs(19, 4096, dtype, gated=True)
    out = rms_norm(x, weight, EPS, gate=gate, group_size=512)
    assert torch.equal(out, rms_norm_ref(x, weight, EPS, gate=gate, group_size=512))


def test_cpu_out_is_written_and_returned():
    x, weight, _ = make_inputs(5, 99, torch.bfloat16, gated=False)
    out = torch.full_like(x, float("nan"))
    result = rms_norm(x, weight, EPS, out=out)
    assert result is out
    assert torch.equal(out, rms_norm_ref(x, weight, EPS))


@pytest.mark.parametrize("shape", [(2688,), (2, 3, 2688), (0, 2688), (4, 0, 16)])
def test_cpu_leading_dims(shape):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen)
    weight = torch.randn(shape[-1], generator=gen)
    out = rms_norm(x, weight, EPS)
    assert out.shape == x.shape
    assert torch.equal(out, rms_norm_ref(x, weight, EPS))


def test_cpu_noncontiguous_inputs():
    gen = torch.Generator().manual_seed(2)
    wide = torch.randn(19, 130, generator=gen)
    x = wide[:, 3:99]  # strided rows, offset start
    gate = torch.randn(130, 19, generator=gen).t()[:, 3:99]  # column stride 19
    weight = torch.randn(96, generator=gen)
    out = rms_norm(x, weight, EPS, gate=gate, group_size=32)
    expected = rms_norm_ref(x.contiguous(), weight, EPS, gate=gate.contiguous(), group_size=32)
    torch.testing.assert_close(out, expected)  # equal up to the reduction order of the layout
    xt = torch.randn(96, 7, generator=gen).t()  # last dim not contiguous
    torch.testing.assert_close(
        rms_norm(xt, weight, EPS), rms_norm_ref(xt.contiguous(), weight, EPS)
    )


def _bad_calls():
    x = torch.randn(4, 12)
    w = torch.randn(12)
    return [
        ("weight must have shape", lambda: rms_norm(x, torch.randn(11), EPS)),
        ("weight must have shape", lambda: rms_norm(x, torch.randn(1, 12), EPS)),
        ("gate must have", lambda: rms_norm(x, w, EPS, gate=torch.randn(4, 11))),
        ("group_size must be", lambda: rms_norm(x, w, EPS, group_size=5)),
        ("group_size must be", lambda: rms_norm(x, w, EPS, group_size=-4)),
        ("out must match", lambda: rms_norm(x, w, EPS, out=torch.empty(4, 11))),
        (
            "out must match",
            lambda: rms_norm(x, w, EPS, out=torch.empty(4, 12, dtype=torch.float64)),
        ),
        ("0-dim", lambda: rms_norm(torch.tensor(1.0), w, EPS)),
        ("must be > 0", lambda: rms_norm(torch.randn(4, 0), torch.randn(0), EPS)),
        ("floating-point", lambda: rms_norm(torch.ones(4, 12, dtype=torch.int64), w, EPS)),
        ("weight is on", lambda: rms_norm(x, torch.empty(12, device="meta"), EPS)),
        ("gate is on", lambda: rms_norm(x, w, EPS, gate=torch.empty(4, 12, device="meta"))),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_argument_errors(index):
    message, call = _bad_calls()[index]
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_backend_for_cpu_is_torch():
    assert rms_norm_backend("cpu")[0] == "torch"
    assert rms_norm_backend(torch.device("cpu"), torch.float16)[0] == "torch"


def test_backend_for_cuda_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    backend, reason = rms_norm_backend("cuda")
    assert backend == "none" and "no CUDA device" in reason


def test_row_helpers():
    wide = torch.zeros(6, 20)
    rows = rmsnorm_module._as_rows(wide[:, :12], 12)
    assert rows.data_ptr() == wide.data_ptr() and rows.stride() == (20, 1)  # a view
    three_d = torch.zeros(2, 3, 8)[:, ::2]  # leading dims that do not collapse: copied
    assert rmsnorm_module._as_rows(three_d, 8).shape == (4, 8)
    assert rmsnorm_module._rows_view(wide[:, :12], 12) is not None
    assert rmsnorm_module._rows_view(three_d, 8) is None
    assert rmsnorm_module._rows_view(torch.zeros(1, 8).expand(4, 8), 8) is None
    assert rmsnorm_module._rows_view(torch.zeros(8, 4).t(), 8) is None


class FakeExtension:
    """Stands in for twotower_rt._C on the CPU: reads the raw pointers and strides it is given, and
    computes with rms_norm_ref, so the wrapper's pointer/stride/dtype plumbing is checked here."""

    DTYPE_FLOAT32, DTYPE_BFLOAT16 = 0, 1
    DTYPES = {0: torch.float32, 1: torch.bfloat16}

    def __init__(self):
        self.calls = []

    @staticmethod
    def _rows(ptr, rows, n, row_stride, dtype):
        return raw_view(ptr, (rows, n), (row_stride, 1), dtype)

    def rms_norm(
        self,
        *,
        out,
        x,
        gate,
        weight,
        rows,
        n,
        group_size,
        out_row_stride,
        x_row_stride,
        gate_row_stride,
        eps,
        dtype,
        weight_dtype,
        device,
        stream,
    ):
        self.calls.append(dict(rows=rows, n=n, group_size=group_size, x_row_stride=x_row_stride))
        t = self.DTYPES[dtype]
        xs = self._rows(x, rows, n, x_row_stride, t)
        gs = self._rows(gate, rows, n, gate_row_stride, t) if gate else None
        w = self._rows(weight, 1, n, n, self.DTYPES[weight_dtype])[0]
        result = rms_norm_ref(xs, w, eps, gate=gs, group_size=group_size)
        self._rows(out, rows, n, out_row_stride, t).copy_(result)


@pytest.fixture
def fake_extension(monkeypatch):
    return install_fake_extension(monkeypatch, FakeExtension())


def test_cuda_wrapper_plumbing(fake_extension):
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(2, 9, 4096 + 8, generator=gen).to(torch.bfloat16)
    x = wide[..., 8:]  # rows of stride 4104 that collapse to one row stride: a view
    gate = torch.randn(4096, 18, generator=gen).to(torch.bfloat16).t().reshape(2, 9, 4096)
    weight = torch.randn(4096, generator=gen)  # fp32 weight with bf16 x
    out = rmsnorm_module._rms_norm_cuda(x, weight, EPS, gate, 512, None)
    assert torch.equal(out, rms_norm_ref(x, weight, EPS, gate=gate, group_size=512))
    assert fake_extension.calls[-1] == dict(rows=18, n=4096, group_size=512, x_row_stride=4104)

    # An out whose rows do not collapse to one stride is written through a temporary.
    out_wide = torch.full((2, 18, 4096), float("nan"), dtype=torch.bfloat16)
    out = out_wide[:, ::2]
    result = rmsnorm_module._rms_norm_cuda(x, weight, EPS, None, 4096, out)
    assert result is out
    assert torch.equal(out, rms_norm_ref(x, weight, EPS))
    assert torch.isnan(out_wide[:, 1::2]).all()

    # Last dimension not contiguous: copied; zero rows: no call.
    xt = torch.randn(99, 5, generator=gen).t()
    w99 = torch.randn(99, generator=gen)
    assert torch.equal(
        rmsnorm_module._rms_norm_cuda(xt, w99, EPS, None, 99, None),
        rms_norm_ref(xt.contiguous(), w99, EPS),
    )
    calls = len(fake_extension.calls)
    empty = rmsnorm_module._rms_norm_cuda(torch.empty(0, 99), w99, EPS, None, 99, None)
    assert empty.shape == (0, 99) and len(fake_extension.calls) == calls


# --- the CUDA kernel ----------------------------------------------------------------------------

needs_kernel = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)


def _require_kernel(dtype=torch.bfloat16):
    backend, reason = rms_norm_backend("cuda", dtype)
    if backend != "cuda":
        pytest.skip(f"the CUDA kernel does not run here: {reason}")


def check_against_ref(out, x, weight, gate, group_size):
    """max|out - ref32| <= 2 * max|ref_lowprec - ref32| + atol, with ref32 on fp32 upcasts."""
    f32 = lambda t: t.float() if t is not None else None  # noqa: E731
    ref32 = rms_norm_ref(f32(x), f32(weight), EPS, gate=f32(gate), group_size=group_size)
    lowprec = rms_norm_ref(x, weight, EPS, gate=gate, group_size=group_size)
    assert torch.isfinite(out).all(), "unwritten (poisoned) or non-finite outputs"
    err = (out.float() - ref32).abs().max().item()
    lowprec_err = (lowprec.float() - ref32).abs().max().item()
    atol = 1e-5 * max(1.0, ref32.abs().max().item())
    assert err <= 2 * lowprec_err + atol, (err, lowprec_err, atol)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("rows,n,group_size", SHAPES + [(16, 2688, None), (1024, 4096, 512)])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize(
    "dtype,weight_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
    ],
)
def test_kernel_matches_ref(rows, n, group_size, gated, dtype, weight_dtype):
    _require_kernel(dtype)
    x, weight, gate = make_inputs(
        rows, n, dtype, gated=gated, weight_dtype=weight_dtype, device="cuda", seed=rows + n
    )
    out = torch.full_like(x, float("nan"))
    result = rms_norm(x, weight, EPS, gate=gate, group_size=group_size, out=out)
    assert result is out
    check_against_ref(out, x, weight, gate, group_size)
    # out=None allocates.
    check_against_ref(
        rms_norm(x, weight, EPS, gate=gate, group_size=group_size), x, weight, gate, group_size
    )


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pad", [8, 3])  # 8 keeps 16-byte rows for bf16, 3 forces scalar accesses
def test_kernel_noncontiguous_rows(dtype, pad):
    _require_kernel(dtype)
    rows, n, group = 99, 4096, 512
    gen = torch.Generator(device="cuda").manual_seed(pad)
    x_wide = torch.randn(rows, n + pad, device="cuda", generator=gen).to(dtype)
    gate_wide = torch.randn(rows, n + 2 * pad, device="cuda", generator=gen).to(dtype)
    out_wide = torch.full((rows, n + pad), float("nan"), device="cuda", dtype=dtype)
    weight = torch.randn(n, device="cuda", generator=gen).to(dtype)
    x, gate, out = x_wide[:, :n], gate_wide[:, pad : pad + n], out_wide[:, :n]
    rms_norm(x, weight, EPS, gate=gate, group_size=group, out=out)
    check_against_ref(out, x, weight, gate, group)
    assert torch.isnan(out_wide[:, n:]).all(), "wrote outside the rows"


@pytest.mark.gpu
@needs_kernel
def test_kernel_unaligned_and_3d():
    _require_kernel()
    n = 2688
    buf = torch.randn(2 * 19 * n + 1, device="cuda").to(torch.bfloat16)
    x = buf[1 : 1 + 2 * 19 * n].view(2, 19, n)  # 2-byte offset: no 16-byte accesses
    weight = torch.randn(n, device="cuda").to(torch.bfloat16)
    out = torch.full_like(x, float("nan"))
    rms_norm(x, weight, EPS, out=out)
    check_against_ref(out, x, weight, None, None)


@pytest.mark.gpu
@needs_kernel
def test_kernel_in_place_zero_rows_and_determinism():
    _require_kernel()
    x, weight, gate = make_inputs(64, 4096, torch.bfloat16, gated=True, device="cuda")
    expected = rms_norm(x, weight, EPS, gate=gate, group_size=512)
    assert torch.equal(expected, rms_norm(x, weight, EPS, gate=gate, group_size=512))
    y = x.clone()
    assert rms_norm(y, weight, EPS, gate=gate, group_size=512, out=y) is y
    assert torch.equal(y, expected)
    empty = torch.empty(0, 4096, device="cuda", dtype=torch.bfloat16)
    assert rms_norm(empty, weight, EPS).shape == (0, 4096)


@pytest.mark.gpu
@needs_kernel
def test_kernel_side_stream_and_cuda_graph():
    _require_kernel()
    x, weight, _ = make_inputs(16, 2688, torch.bfloat16, gated=False, device="cuda")
    expected = rms_norm_ref(x, weight, EPS)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = rms_norm(x, weight, EPS)
    torch.cuda.current_stream().wait_stream(stream)
    check_against_ref(out, x, weight, None, None)

    static_out = torch.full_like(x, float("nan"))
    rms_norm(x, weight, EPS, out=static_out)  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rms_norm(x, weight, EPS, out=static_out)
    static_out.fill_(float("nan"))
    x.copy_(torch.randn_like(x))  # new values (RMSNorm is scale invariant: not x * 2)
    graph.replay()
    torch.cuda.synchronize()
    check_against_ref(static_out, x, weight, None, None)
    assert not torch.equal(static_out, expected)


@pytest.mark.gpu
@needs_kernel
def test_unsupported_cuda_dtype_falls_back_to_ref():
    x, weight, gate = make_inputs(19, 99, torch.float16, gated=True, device="cuda")
    assert rms_norm_backend("cuda", torch.float16)[0] == "torch"
    out = rms_norm(x, weight, EPS, gate=gate)
    assert torch.equal(out, rms_norm_ref(x, weight, EPS, gate=gate))
