"""ssm_scan: the grouped reference against the plain recurrence, argument checks and the wrapper's
plumbing on the CPU (a fake extension that reads the raw pointers), and the kernel against the
reference on a GPU: the decode step, the denoiser's seeded 16-token block (the case that broke a
chunked scan elsewhere), padding, large states, strided inputs sliced from xBC."""

import functools
import importlib

import pytest
import torch
from helpers import install_fake_extension, raw_view

from twotower_rt.ops import ssm_scan, ssm_scan_backend, ssm_scan_ref
from twotower_rt.ops.ssm_scan import (
    MIN_CHUNK,
    _chunked_scan,
    _combine_chunks_ref,
    _scan_chunks_ref,
    plan_scan_chunk,
    selective_scan_ref,
)


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
    """Stands in for twotower_rt._C.ssm_scan / ssm_chunk_combine on the CPU: reads the pointers
    and strides and computes with the references."""

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
        n_valid = raw_view(a["n_valid"], (b,), (1,), torch.int64) if a["n_valid"] else None
        chunk = a["chunk"] if 0 < a["chunk"] < n else max(n, 1)
        runs = b * -(-n // chunk) if n else b
        rows = raw_view(a["state_rows"], (b,), (1,), torch.int64) if a["state_rows"] else None
        if rows is not None:  # the states are rows of a pool, read and written there
            assert runs == b, "state_rows takes the scan in one piece"
            runs = int(rows.max()) + 1
        shape, strides = (runs, H, P, N), (H * P * N, P * N, N, 1)
        state = raw_view(a["state"], shape, strides, torch.float32).clone() if a["state"] else None
        if rows is not None:
            pool, state = state, state[rows]
        if n == 0:
            y, final = torch.zeros(b, 0, H, P), state
        else:
            y, final = _scan_chunks_ref(x, dt, A, B, C, D, state, n_valid, chunk, True)
        if a["y"]:
            raw_view(a["y"], (b, n, H, P), (n * H * P, H * P, P, 1), torch.float32).copy_(y)
        if rows is not None and a["state_out"]:
            final = pool.index_copy(0, rows, final)
        if a["state_out"]:
            raw_view(a["state_out"], shape, strides, torch.float32).copy_(final)

    def ssm_chunk_combine(self, **a):
        self.calls.append(a)
        b, chunks, H, E = a["batch"], a["chunks"], a["heads"], a["head_elems"]
        states = raw_view(a["states"], (b * chunks, H, E), (H * E, E, 1), torch.float32)
        decay = raw_view(a["decay"], (b, chunks, H), (chunks * H, H, 1), torch.float32)
        initial = raw_view(a["initial"], (b, H, E, 1), (H * E, E, 1, 1), torch.float32)
        final = _combine_chunks_ref(states[..., None], decay, initial, True)
        if a["final_state"]:
            raw_view(a["final_state"], (b, H, E, 1), (H * E, E, 1, 1), torch.float32).copy_(final)


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


@pytest.mark.parametrize("keep_state", [True, False])
def test_wrapper_plumbing_chunked(fake_extension, keep_state):
    """The kernel path of the chunked scan: three launches, their chunk arguments, null state in
    the first and null y in it, and the result is the plain recurrence's."""
    x, dt, A, B, C, D, state = make_inputs(2, 23, 4, 8, 2, 32, from_xbc=True)
    n_valid = torch.tensor([23, 9])
    y, final = ssm_scan(x, dt, A, B, C, D, state, n_valid, keep_state=keep_state, chunk=5)
    y_ref, final_ref = ssm_scan_ref(x, dt, A, B, C, D, state, n_valid)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert (final is None) != keep_state
    if keep_state:
        torch.testing.assert_close(final, final_ref, rtol=1e-5, atol=1e-5)
    first, combine, last = fake_extension.calls
    assert first["chunk"] == 5 and first["state"] == 0 and first["y"] == 0 and first["state_out"]
    assert combine["chunks"] == 5 and combine["head_elems"] == 8 * 32
    assert (combine["final_state"] != 0) == keep_state
    assert last["chunk"] == 5 and last["state"] and last["y"] and last["state_out"] == 0


@pytest.mark.parametrize("keep_state", [True, False])
@pytest.mark.parametrize("kernel", [False, True])
def test_state_rows_of_a_pool(monkeypatch, keep_state, kernel):
    """States given as rows of a pool: read there, and with keep_state overwritten there by the
    final states (other rows untouched); the PyTorch path and the kernel path (a fake extension
    reading the raw pointers) agree with the plain call on gathered states."""
    if kernel:
        install_fake_extension(monkeypatch, FakeExtension(), "twotower_rt.ops.ssm_scan")
    x, dt, A, B, C, D, state = make_inputs(3, 5, 4, 8, 2, 32, seed=9)
    pool = torch.randn(6, 4, 8, 32)
    rows = torch.tensor([4, 0, 2])
    pool[rows] = state
    before = pool.clone()
    n_valid = torch.tensor([5, 2, 0])
    y, none = ssm_scan(x, dt, A, B, C, D, pool, n_valid, keep_state=keep_state, state_rows=rows)
    y_ref, final_ref = ssm_scan_ref(x, dt, A, B, C, D, state, n_valid)
    assert none is None
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    untouched = torch.tensor([1, 3, 5])
    assert torch.equal(pool[untouched], before[untouched])
    torch.testing.assert_close(pool[rows], final_ref if keep_state else state, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="state_rows must be int64"):
        ssm_scan(x, dt, A, B, C, D, pool, state_rows=rows.int())


# --- the chunked scan on the CPU -----------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 4, 7, 16, 40])
@pytest.mark.parametrize("lens", [None, [40, 13, 0]])
def test_chunked_scan_is_the_recurrence(chunk, lens):
    """Every chunk length, including ones that do not divide n and, for the padded rows, chunks
    that end before the row's last valid token or lie wholly after it; states of large values."""
    x, dt, A, B, C, D, state = make_inputs(3, 40, 4, 8, 2, 16, seed=chunk, state_scale=1e3)
    n_valid = torch.tensor(lens) if lens is not None else None
    y, final = ssm_scan(x, dt, A, B, C, D, state, n_valid, chunk=chunk)
    y_ref, final_ref = ssm_scan_ref(x, dt, A, B, C, D, state, n_valid)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(final, final_ref, rtol=1e-5, atol=1e-2)
    if lens is not None:  # a row with no valid token keeps its state exactly
        torch.testing.assert_close(final[2], state[2], rtol=1e-6, atol=0)


@pytest.mark.parametrize("n, chunk", [(16, 64), (67, 64), (1, 64)])
def test_seeded_chunked_scan_on_a_run_shorter_than_its_chunk(n, chunk):
    """The trap of another port: a chunked scan seeded with an initial state, on a run (or a last
    chunk) shorter than the chunk. The three passes are forced even where the wrapper would scan
    in one piece."""
    x, dt, A, B, C, D, state = make_inputs(2, n, 6, 16, 3, 32, seed=n)
    y, final = _chunked_scan(x, dt, A, B, C, D, state, None, True, chunk, _scan_chunks_ref,
                             _combine_chunks_ref)  # fmt: skip
    y_ref, final_ref = ssm_scan_ref(x, dt, A, B, C, D, state)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, final_ref, rtol=1e-5, atol=1e-5)


def test_chunk_argument_is_checked():
    args = make_inputs(1, 3, 4, 8, 2, 32)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="chunk"):
            ssm_scan(*args, chunk=bad)
    assert torch.equal(ssm_scan(*args, chunk=None)[0], ssm_scan(*args)[0])  # the CPU: unchunked


def test_plan_scan_chunk():
    real = dict(heads=64, head_dim=64, state_size=128, sm_count=132)
    # One 8k prompt: 256 CTAs of the plain scan fill a fraction of 132 SMs x 8 -> 5 chunks.
    chunk = plan_scan_chunk(1, 8192, **real)
    assert chunk == 8192 // 5 + 1 and chunk >= MIN_CHUNK
    assert plan_scan_chunk(64, 8192, **real) == 0  # a big batch fills the GPU already
    assert plan_scan_chunk(1, 100, **real) == 0  # too short for two chunks of MIN_CHUNK
    assert plan_scan_chunk(1, 200, **real) == 67  # capped by MIN_CHUNK: 3 chunks of >= 64 tokens
    # The chunk states' memory caps the count: 2 MB per chunk state, 4 MB allowed -> 2 chunks.
    assert plan_scan_chunk(1, 8192, **real, max_state_bytes=4 << 20) == 4096
    assert plan_scan_chunk(1, 8192, **real, max_state_bytes=3 << 20) == 0
    # The "rows" variant has 64-row CTAs: 4x fewer of them, so more chunks.
    assert plan_scan_chunk(1, 8192, **real, variant="rows") < chunk


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


CHUNKED_CASES = [
    # b, n, H, P, G, N, n_valid, chunk
    (1, 1000, 64, 64, 8, 128, None, None),  # one long prompt at the real shapes, planned chunk
    (2, 300, 64, 64, 8, 128, [300, 77], 64),  # ragged rows
    (3, 67, 8, 16, 2, 16, [67, 0, 3], 64),  # a last chunk of 3 tokens; a row with none valid
    (2, 129, 6, 24, 3, 64, None, 1),  # one token per chunk; P not a multiple of the CTA's rows
]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("b,n,H,P,G,N,lens,chunk", CHUNKED_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["lanes", "rows"])
def test_chunked_kernel_matches_ref(b, n, H, P, G, N, lens, chunk, dtype, variant):
    _require_kernel(dtype)
    for from_xbc, state_scale in ((False, 1.0), (True, 1e4)):
        args = make_inputs(b, n, H, P, G, N, device="cuda", dtype=dtype, seed=n + N,
                           state_scale=state_scale, from_xbc=from_xbc)  # fmt: skip
        n_valid = torch.tensor(lens, device="cuda") if lens is not None else None
        if chunk is None:
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            assert 0 < plan_scan_chunk(b, n, H, P, N, sms, variant=variant) < n
        state_before = args[-1].clone()
        y, final = ssm_scan(*args, n_valid, variant=variant, chunk=chunk)
        y_ref, final_ref = ssm_scan_ref(*args, n_valid)
        torch.cuda.synchronize()
        assert torch.equal(args[-1], state_before), "the input state was modified"
        scale = max(1.0, state_scale)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4 * scale)
        torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4 * scale)
        y2, none = ssm_scan(*args, n_valid, keep_state=False, variant=variant, chunk=chunk)
        assert none is None
        torch.testing.assert_close(y2, y, rtol=0, atol=0)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("n", [1, 16, 67])
def test_chunked_kernel_seeded_run_shorter_than_its_chunk(n):
    """The three kernel passes forced on a run or last chunk shorter than the chunk (64)."""
    from twotower_rt.ops.ssm_scan import _combine_chunks_cuda, _scan_chunks_cuda

    _require_kernel(torch.bfloat16)
    args = make_inputs(2, n, 64, 64, 8, 128, device="cuda", dtype=torch.bfloat16, seed=n)

    scan = functools.partial(_scan_chunks_cuda, variant=0)
    y, final = _chunked_scan(*args, None, True, 64, scan, _combine_chunks_cuda)
    y_ref, final_ref = ssm_scan_ref(*args)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@needs_gpu
def test_chunk_combine_kernel_matches_ref():
    from twotower_rt.ops.ssm_scan import _combine_chunks_cuda

    _require_kernel(torch.float32)
    b, chunks, H, P, N = 3, 7, 6, 24, 32
    g = torch.Generator(device="cuda").manual_seed(5)
    states = torch.randn(b * chunks, H, P, N, device="cuda", generator=g)
    decay = torch.rand(b, chunks, H, device="cuda", generator=g)
    initial = torch.randn(b, H, P, N, device="cuda", generator=g) * 100
    expected = states.clone()
    final_ref = _combine_chunks_ref(expected, decay, initial, True)
    final = _combine_chunks_cuda(states, decay, initial, True)
    torch.testing.assert_close(states, expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(final, final_ref, rtol=1e-6, atol=1e-5)


@pytest.mark.gpu
@needs_gpu
def test_chunked_prefill_in_the_model_matches_the_plain_scan():
    """The default model's prefill of a 300-token prompt with Mamba2Mixer.chunked_prefill on (the
    planner cuts it into chunks) and off: the same context states and denoiser logits."""
    _require_kernel(torch.float32)
    import twotower_rt
    from twotower_rt.generate import _prefill
    from twotower_rt.model.mamba import Mamba2Mixer

    lm = twotower_rt.load(device="cuda", dtype="float32").lm
    mixers = [m for m in lm.modules() if isinstance(m, Mamba2Mixer)]
    prompt = torch.randint(4, 200, (300,), generator=torch.Generator().manual_seed(0)).tolist()

    def prefill(chunked):
        for m in mixers:
            m.chunked_prefill = chunked
        cache, _, _, _ = _prefill(lm, [prompt, prompt[:150]], 320, keep_before=False)
        return [cache.mamba[k].ssm for k in sorted(cache.mamba)]

    with torch.inference_mode():
        plain, chunked = prefill(False), prefill(True)
    for a, b in zip(plain, chunked, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("variant", ["lanes", "rows"])
def test_kernel_state_rows_in_place(variant):
    """The kernel reading and writing the states of a slot pool in place at the given rows."""
    _require_kernel(torch.bfloat16)
    x, dt, A, B, C, D, state = make_inputs(3, 16, 64, 64, 8, 128, device="cuda",
                                           dtype=torch.bfloat16, seed=3)  # fmt: skip
    pool = torch.randn(5, 64, 64, 128, device="cuda")
    rows = torch.tensor([3, 0, 4], device="cuda")
    pool[rows] = state
    before = pool.clone()
    y_ref, final_ref = ssm_scan_ref(x, dt, A, B, C, D, state)
    y, _ = ssm_scan(x, dt, A, B, C, D, pool, keep_state=False, state_rows=rows, variant=variant)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(pool, before)
    y, _ = ssm_scan(x, dt, A, B, C, D, pool, state_rows=rows, variant=variant)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pool[rows], final_ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(pool[[1, 2]], before[[1, 2]])
