"""ssm_scan: the grouped reference against the plain recurrence, argument checks and the wrapper's
plumbing on the CPU (a fake extension that reads the raw pointers), and the kernel against the
reference on a GPU: the decode step, the denoiser's seeded 16-token block (the case that broke a
chunked scan elsewhere), padding, large states, strided inputs sliced from xBC."""

import importlib

import pytest
import torch
from helpers import install_fake_extension, raw_view

from twotower_rt.ops import ssm_scan, ssm_scan_backend, ssm_scan_ref
from twotower_rt.ops.ssm_scan import selective_scan_ref


def make_inputs(b, n, H, P, G, N, *, device="cpu", dtype=torch.float32, seed=0, state_scale=1.0,
                from_xbc=False):  # fmt: skip
    """Inputs shaped as Mamba2Mixer makes them; with ``from_xbc`` x, B and C are views into one
    (b, n, H*P + 2*G*N) tensor, as the mixer's split of xBC leaves them."""
    g = torch.Generator(device=device).manual_seed(seed)
    if from_xbc:
        xbc = torch.randn(b, n, H * P + 2 * G * N, device=device, generator=g).to(dtype)
        x = xbc[..., : H * P].view(b, n, H, P)
        B = xbc[..., H * P : H * P + G * N].view(b, n, G, N)
        C = xbc[..., H * P + G * N :].view(b, n, G, N)
    else:
        x = torch.randn(b, n, H, P, device=device, generator=g).to(dtype)
        B, C = (torch.randn(b, n, G, N, device=device, generator=g).to(dtype) for _ in range(2))
    dt = torch.nn.functional.softplus(torch.randn(b, n, H, device=device, generator=g) - 1)
    A = -torch.exp(torch.rand(H, device=device, generator=g) * 2)
    D = torch.randn(H, device=device, generator=g)
    state = torch.randn(b, H, P, N, device=device, generator=g) * state_scale
    return x, dt, A, B, C, D, state


def test_grouped_reference_is_the_plain_recurrence():
    x, dt, A, B, C, D, state = make_inputs(2, 5, 6, 8, 3, 16)
    n_valid = torch.tensor([5, 2])
    y, final = ssm_scan_ref(x, dt, A, B, C, D, state, n_valid)
    valid = torch.arange(5)[None] < n_valid[:, None]
    y2, final2 = selective_scan_ref(
        x, dt, A, B.repeat_interleave(2, 2), C.repeat_interleave(2, 2), D, state, valid
    )
    assert torch.equal(y, y2) and torch.equal(final, final2)
    # Padding leaves the state alone: row 1's state is its state after 2 tokens.
    _, after2 = ssm_scan_ref(x[1:, :2], dt[1:, :2], A, B[1:, :2], C[1:, :2], D, state[1:])
    torch.testing.assert_close(final[1:], after2)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="variant"):
        ssm_scan(*make_inputs(1, 2, 4, 8, 2, 32), variant="fast")


def test_cpu_path_and_keep_state():
    x, dt, A, B, C, D, state = make_inputs(1, 3, 4, 8, 2, 32)
    y, final = ssm_scan(x, dt, A, B, C, D, state)
    y2, none = ssm_scan(x, dt, A, B, C, D, state, keep_state=False)
    assert none is None and torch.equal(y, y2) and final.shape == state.shape


@pytest.mark.parametrize(
    "change, message",
    [
        ({"x": torch.zeros(1, 3, 4)}, "expected x"),
        ({"B": torch.zeros(1, 3, 3, 32), "C": torch.zeros(1, 3, 3, 32)}, "does not fit"),
        ({"dt": torch.zeros(1, 3, 5)}, "dt must be"),
        ({"state": torch.zeros(1, 4, 8, 32, dtype=torch.float64)}, "state must be"),
        ({"n_valid": torch.tensor([1, 2])}, "n_valid must be"),
    ],
)
def test_bad_arguments(change, message):
    x, dt, A, B, C, D, state = make_inputs(1, 3, 4, 8, 2, 32)
    args = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, state=state, n_valid=None)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        ssm_scan(**args)


class FakeExtension:
    """Stands in for twotower_rt._C.ssm_scan on the CPU: reads the pointers and strides and
    computes with ssm_scan_ref."""

    def __init__(self):
        self.calls = []

    def ssm_scan(self, **a):
        self.calls.append(a)
        assert a["variant"] in (0, 1)
        b, n, H, G, P, N = (a[k] for k in ("batch", "n", "heads", "groups", "head_dim",
                                            "state_size"))  # fmt: skip
        dtype = {0: torch.float32, 1: torch.bfloat16}[a["dtype"]]
        x = raw_view(a["x"], (b, n, H, P), (*a["x_strides"], 1), dtype)
        dt = raw_view(a["dt"], (b, n, H), (*a["dt_strides"], 1), torch.float32)
        B = raw_view(a["B"], (b, n, G, N), (*a["b_strides"], 1), dtype)
        C = raw_view(a["C"], (b, n, G, N), (*a["c_strides"], 1), dtype)
        A = raw_view(a["A"], (H,), (1,), torch.float32)
        D = raw_view(a["D"], (H,), (1,), torch.float32)
        state = raw_view(a["state"], (b, H, P, N), (H * P * N, P * N, N, 1), torch.float32)
        n_valid = raw_view(a["n_valid"], (b,), (1,), torch.int64) if a["n_valid"] else None
        y, final = ssm_scan_ref(x, dt, A, B, C, D, state.clone(), n_valid)
        raw_view(a["y"], (b, n, H, P), (n * H * P, H * P, P, 1), torch.float32).copy_(y)
        if a["state_out"]:
            raw_view(a["state_out"], (b, H, P, N), (H * P * N, P * N, N, 1), torch.float32).copy_(
                final
            )


@pytest.fixture
def fake_extension(monkeypatch):
    return install_fake_extension(monkeypatch, FakeExtension(), "twotower_rt.ops.ssm_scan")


@pytest.mark.parametrize("keep_state", [True, False])
def test_wrapper_plumbing(fake_extension, keep_state):
    x, dt, A, B, C, D, state = make_inputs(2, 4, 4, 8, 2, 64, dtype=torch.bfloat16, from_xbc=True)
    n_valid = torch.tensor([4, 1])
    y, final = ssm_scan(x, dt, A, B, C, D, state, n_valid, keep_state=keep_state)
    y_ref, final_ref = ssm_scan_ref(x, dt, A, B, C, D, state, n_valid)
    assert torch.equal(y, y_ref)
    assert (final is None) != keep_state
    if keep_state:
        assert torch.equal(final, final_ref)
    call = fake_extension.calls[-1]
    row = 4 * 8 + 2 * 2 * 64
    assert call["x_strides"] == (4 * row, row, 8) and call["b_strides"] == (4 * row, row, 64)


# --- the CUDA kernel -----------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)


def _require_kernel(dtype):
    backend, reason = ssm_scan_backend("cuda", dtype)
    if backend != "cuda":
        pytest.skip(f"the CUDA kernel does not run here: {reason}")


GPU_CASES = [
    # b, n, H, P, G, N, n_valid
    (1, 1, 64, 64, 8, 128, None),  # the real model's decode step
    (3, 16, 64, 64, 8, 128, None),  # its denoiser block, seeded
    (2, 16, 6, 64, 2, 32, None),  # the default model's block
    (4, 37, 8, 16, 2, 16, [37, 1, 0, 20]),  # the golden tiny model, padded rows
    (2, 5, 6, 24, 3, 64, [5, 3]),  # P not a multiple of the CTA's rows
]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("b,n,H,P,G,N,lens", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["lanes", "rows"])
def test_kernel_matches_ref(b, n, H, P, G, N, lens, dtype, variant):
    _require_kernel(dtype)
    for from_xbc, state_scale in ((False, 1.0), (True, 1e4)):
        args = make_inputs(b, n, H, P, G, N, device="cuda", dtype=dtype, seed=b * n + N,
                           state_scale=state_scale, from_xbc=from_xbc)  # fmt: skip
        n_valid = torch.tensor(lens, device="cuda") if lens is not None else None
        state_before = args[-1].clone()
        y, final = ssm_scan(*args, n_valid, variant=variant)
        y_ref, final_ref = ssm_scan_ref(*args, n_valid)
        torch.cuda.synchronize()
        assert torch.equal(args[-1], state_before), "the input state was modified"
        scale = max(1.0, state_scale)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4 * scale)
        torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4 * scale)
        y2, none = ssm_scan(*args, n_valid, keep_state=False, variant=variant)
        assert none is None and torch.equal(y, y2)


@pytest.mark.gpu
@needs_gpu
def test_kernel_in_the_model_matches_the_torch_path(monkeypatch):
    """The default model on the GPU: denoiser logits after a prefill, with the kernel and with
    the PyTorch scan forced, agree to fp32 rounding."""
    _require_kernel(torch.float32)
    import twotower_rt
    from twotower_rt.generate import _prefill

    module = importlib.import_module("twotower_rt.ops.ssm_scan")
    lm = twotower_rt.load(device="cuda", dtype="float32").lm
    prompts = [[1, 5, 9, 33, 70], [1, 7]]

    def denoise():
        cache, _, _, _ = _prefill(lm, prompts, 48, keep_before=False)
        block = torch.full((2, 16), 3, device="cuda")
        t = torch.ones(2, device="cuda")
        return lm.denoiser_logits(block, cache, prefix_len=cache.lengths,
                                  mamba_states=cache.mamba, t=t)  # fmt: skip

    with torch.inference_mode():
        kernel = denoise()
        monkeypatch.setattr(module, "_kernel_unsupported_reason", lambda *a: "forced")
        torch_path = denoise()
    torch.testing.assert_close(kernel, torch_path, rtol=1e-4, atol=1e-4)
