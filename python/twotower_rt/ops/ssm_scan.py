"""Mamba-2's selective scan over a few tokens from a given state: the op, and beside it the plain
fp32 recurrence (``selective_scan_ref``) that is its CPU path and oracle.

The model runs it for the one-token decode step (n = 1, the new state kept), the denoiser's
context-seeded block scan (n = 16, the context state read once and never written) and the prefill /
block extension (n up to the prompt's length, from the context's state). The CUDA kernel is
``csrc/include/twotower_rt/ssm_scan.cuh``; it keeps the whole state in registers across the tokens.

A long run of few sequences leaves most of the GPU idle for thousands of sequential steps, so the
prefill can take the *chunked* scan (``chunk``): the run is cut into chunks of ``chunk`` tokens and
scanned in three passes, (1) every chunk from a zero state, in parallel, keeping only its final
state; (2) the state entering each chunk, entering[c + 1] = decay[c] * entering[c] + local[c] with
decay[c] = exp(A * the chunk's summed dt), from the given initial state; (3) every chunk again from
its entering state, in parallel, for y. The recurrence inside a chunk is the reference's; only the
grouping of the decays differs (a product of per-token exps vs one exp of the sum), so it agrees
with :func:`selective_scan_ref` to fp32 rounding, for every chunk length including one longer than
the run (the case that broke a seeded chunked scan in another port).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from twotower_rt import _ext, fastpath

KERNEL_DTYPES = (torch.float32, torch.bfloat16)
KERNEL_STATE_SIZES = (16, 32, 64, 128)
VARIANTS = {"lanes": 0, "rows": 1}
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
MIN_CHUNK = 64  # shorter chunks spend more on the two extra passes than they win in parallelism


def selective_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    state: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 Mamba-2 recurrence, token by token.

    x (b, n, H, P); dt (b, n, H) already softplus'ed; A, D (H,); B, C (b, n, H, N) (already
    expanded from groups to heads); state (b, H, P, N) fp32, not modified; valid (b, n) bool or
    None: at an invalid position the state is carried through unchanged.
    Returns y (b, n, H, P) fp32 and the final state.
    """
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    if valid is not None:
        dt = dt.masked_fill(~valid[..., None], 0.0)
    decay = torch.exp(dt * A.float())  # (b, n, H)
    dtx = dt[..., None] * x  # (b, n, H, P)
    ys = []
    for i in range(x.shape[1]):
        state = state * decay[:, i, :, None, None] + dtx[:, i, :, :, None] * B[:, i, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, i]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape)
    return y + D.float()[:, None] * x, state


# selective_scan_fast keeps every state of a run at once while that is at most this many bytes;
# past it (large batches) the per-op overhead it saves is small and the reference's loop, which
# reuses one state in cache, is faster.
FAST_SCAN_MAX_BYTES = 8 << 20


def selective_scan_fast(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    state: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`selective_scan_ref` bitwise, in two ops per token instead of five: the inputs
    ``dt * x (outer) B`` of every token in one op, then per token ``state * decay`` written into a
    buffer of all states and ``+ input`` in place (each rounded once, as in the reference: no
    fused multiply-add), then every token's ``state . C`` in one batched product of the reference's
    per-token shapes. Same arguments and results; for runs whose states fit
    :data:`FAST_SCAN_MAX_BYTES` (the CPU path's denoiser blocks, decode steps and commits)."""
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    if valid is not None:
        dt = dt.masked_fill(~valid[..., None], 0.0)
    b, n, H, P = x.shape
    decay = torch.exp(dt * A.float()).transpose(0, 1)[..., None, None]  # (n, b, H, 1, 1)
    dtx = dt[..., None] * x  # (b, n, H, P)
    inputs = (dtx[..., None] * B[:, :, :, None, :]).transpose(0, 1)  # (n, b, H, P, N)
    states = torch.empty((n, b, H, P, B.shape[-1]), dtype=torch.float32, device=x.device)
    for i in range(n):
        state = torch.mul(state, decay[i], out=states[i])
        state.add_(inputs[i])
    if n == 1:  # the reference's own product: einsum takes another path for a size-1 t
        y = torch.einsum("bhpn,bhn->bhp", state, C[:, 0])[:, None]
    else:
        y = torch.einsum("tbhpn,tbhn->tbhp", states, C.transpose(0, 1)).transpose(0, 1)
    return y + D.float()[:, None] * x, state


def ssm_scan_ref(x, dt, A, B, C, D, state, n_valid=None):
    """:func:`ssm_scan`'s arguments (B, C per group) through :func:`selective_scan_ref` (or, with
    the CPU fast paths on and a short enough run, :func:`selective_scan_fast`: the same bits)."""
    heads, groups = x.shape[2], B.shape[2]
    B = B.repeat_interleave(heads // groups, dim=2)
    C = C.repeat_interleave(heads // groups, dim=2)
    valid = None
    if n_valid is not None:
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < n_valid[:, None]
    scan = selective_scan_ref
    if fastpath.enabled() and 4 * state.numel() * x.shape[1] <= FAST_SCAN_MAX_BYTES:
        scan = selective_scan_fast
    return scan(x, dt, A, B, C, D, state, valid)


def ssm_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    state: torch.Tensor,
    n_valid: torch.Tensor | None = None,
    *,
    keep_state: bool = True,
    variant: str = "lanes",
    chunk: int | None = 0,
    state_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The selective scan of n tokens from ``state``.

    Shapes:
        x:     (b, n, H, P)   float32 or bfloat16 (any strides with a unit P stride)
        dt:    (b, n, H)      fp32, already softplus'ed (and clamped)
        A, D:  (H,)           A = -exp(A_log)
        B, C:  (b, n, G, N)   x's dtype; G divides H (head h reads group h // (H / G))
        state: (b, H, P, N)   fp32, not modified
        n_valid: (b,) int64 or None: tokens at or after n_valid[b] leave the state unchanged
        keep_state: False skips writing the final state (the denoiser's block scan): returns None.
        variant: the kernel's layout: "lanes" (a warp's lanes over a state row; measured) or
            "rows" (a thread per row slice, tokens staged in shared memory, for runs of several
            tokens; not yet run on a GPU). The PyTorch path ignores it.
        returns (y (b, n, H, P) fp32, final state (b, H, P, N) fp32 or None).

    CUDA tensors run the twotower_rt._C kernel when N is 16/32/64/128 and x, B, C share a kernel
    dtype; everything else runs :func:`ssm_scan_ref`.
    """
    _check_args(x, dt, A, B, C, D, state, n_valid, state_rows)
    if variant not in VARIANTS:
        raise ValueError(f"ssm_scan: variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0):
        raise ValueError(f"ssm_scan: chunk must be an int >= 0 or None, got {chunk!r}")
    reason = _kernel_unsupported_reason(x, B, C, state)
    if chunk is None:
        chunk = 0 if reason is not None else _planned_chunk(x, B, variant)
    n = x.shape[1]
    if state_rows is not None:
        if reason is None and not (chunk and chunk < n) and state.is_contiguous():
            code = VARIANTS[variant]
            y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
            _launch(x, dt, A, B, C, D, state, n_valid, y, state if keep_state else None, 0, code,
                    state_rows=state_rows.to(torch.int64).contiguous())  # fmt: skip
            return y, None
        y, final = ssm_scan(x, dt, A, B, C, D, state.index_select(0, state_rows), n_valid,
                            keep_state=keep_state, variant=variant, chunk=chunk)  # fmt: skip
        if keep_state:
            state.index_copy_(0, state_rows, final)
        return y, None
    if reason is not None:
        if chunk and chunk < n:
            return _chunked_scan(x, dt, A, B, C, D, state, n_valid, keep_state, chunk,
                                 _scan_chunks_ref, _combine_chunks_ref)  # fmt: skip
        y, final = ssm_scan_ref(x, dt, A, B, C, D, state, n_valid)
        return y, final if keep_state else None
    code = VARIANTS[variant]
    if chunk and chunk < n:
        scan = functools.partial(_scan_chunks_cuda, variant=code)
        return _chunked_scan(x, dt, A, B, C, D, state, n_valid, keep_state, chunk, scan,
                             _combine_chunks_cuda)  # fmt: skip
    return _ssm_scan_cuda(x, dt, A, B, C, D, state, n_valid, keep_state, code)


def plan_scan_chunk(
    batch: int,
    n: int,
    heads: int,
    head_dim: int,
    state_size: int,
    sm_count: int,
    *,
    variant: str = "lanes",
    max_state_bytes: int = 1 << 30,
) -> int:
    """The chunk length for the kernel's chunked scan of ``n`` tokens, or 0 (scan in one piece).

    The plain scan runs batch x heads x row tiles CTAs for n sequential steps; chunking multiplies
    them by the number of chunks at the price of two more passes. Chunk only when the plain scan
    fills less than a wave of ~8 resident CTAs per SM, into as many chunks as fill one, each at
    least MIN_CHUNK tokens, the chunk states ((batch, chunks, heads, P, N) fp32) within
    ``max_state_bytes``."""
    rows = 64 if variant == "rows" else 16 * max(1, 32 // state_size)
    ctas = batch * heads * math.ceil(head_dim / rows)
    want = 8 * sm_count
    if ctas == 0 or ctas >= want or n < 2 * MIN_CHUNK:
        return 0
    state_bytes = batch * heads * head_dim * state_size * 4
    chunks = min(math.ceil(want / ctas), n // MIN_CHUNK, max_state_bytes // max(1, state_bytes))
    return math.ceil(n / chunks) if chunks >= 2 else 0


def _planned_chunk(x, B, variant) -> int:
    b, n, H, P = x.shape
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return plan_scan_chunk(b, n, H, P, B.shape[3], sms, variant=variant)


def _chunked_scan(x, dt, A, B, C, D, state, n_valid, keep_state, chunk, scan, combine):
    """The three passes of the chunked scan (module docstring) with ``scan`` (per-chunk runs) and
    ``combine`` (the entering states) from the kernel or the references."""
    b, n, H, _ = x.shape
    chunks = math.ceil(n / chunk)
    _, states = scan(x, dt, A, B, C, D, None, n_valid, chunk, False)  # (b * chunks, H, P, N)
    dt = dt.float()
    if n_valid is not None:
        dt = dt.masked_fill(torch.arange(n, device=x.device)[None, :, None]
                            >= n_valid[:, None, None], 0.0)  # fmt: skip
    summed = F.pad(dt, (0, 0, 0, chunks * chunk - n)).view(b, chunks, chunk, H).sum(2)
    decay = torch.exp(summed * A.float()).contiguous()  # (b, chunks, H)
    final = combine(states, decay, state, keep_state)
    y, _ = scan(x, dt, A, B, C, D, states, n_valid, chunk, True)
    return y, final


def _scan_chunks_ref(x, dt, A, B, C, D, states, n_valid, chunk, want_y):
    """The reference recurrence on every chunk of ``chunk`` tokens as its own run (the kernel's
    ``chunk`` semantics): states (b * chunks, H, P, N) to start from, or None (zero). Returns
    (y (b, n, H, P) or None, each chunk's final state (b * chunks, H, P, N))."""
    b, n, H, P = x.shape
    N = B.shape[3]
    chunks = math.ceil(n / chunk)
    pad = chunks * chunk - n

    def runs(t):  # (b, n, ...) -> (b * chunks, chunk, ...), zero-padded
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(b * chunks, chunk, *t.shape[2:])

    lengths = n_valid if n_valid is not None else torch.full((b,), n, device=x.device)
    starts = torch.arange(chunks, device=x.device) * chunk
    valid = (lengths[:, None] - starts[None, :]).clamp(0, chunk).reshape(-1)
    if states is None:
        states = torch.zeros(b * chunks, H, P, N, dtype=torch.float32, device=x.device)
    y, final = ssm_scan_ref(runs(x), runs(dt), A, runs(B), runs(C), D, states, valid)
    y = y.reshape(b, chunks * chunk, H, P)[:, :n] if want_y else None
    return y, final


def _combine_chunks_ref(states, decay, initial, keep_state):
    """entering[c] replaces local[c] in ``states`` (b * chunks, H, P, N) in place; returns the
    final state (b, H, P, N), or None without ``keep_state``."""
    b, chunks = decay.shape[:2]
    view = states.view(b, chunks, *states.shape[1:])
    running = initial.float().clone()
    for c in range(chunks):
        local = view[:, c].clone()
        view[:, c] = running
        running = running * decay[:, c, :, None, None] + local
    return running if keep_state else None


def ssm_scan_backend(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16
) -> tuple[str, str]:
    """``(backend, reason)``: "cuda" (the kernel), "torch" (ssm_scan_ref) or "none"."""
    backend, reason = _ext.op_backend(
        device, dtype, ref="ssm_scan_ref", kernel_dtypes=KERNEL_DTYPES, what="x, B, C",
        op="ssm_scan",
    )  # fmt: skip
    if backend == "cuda":
        reason += f", state size {'/'.join(map(str, KERNEL_STATE_SIZES))}"
    return backend, reason


def _check_args(x, dt, A, B, C, D, state, n_valid, state_rows=None) -> None:
    if x.dim() != 4 or B.dim() != 4 or B.shape != C.shape:
        raise ValueError(f"ssm_scan: expected x (b, n, H, P) and B, C (b, n, G, N), got "
                         f"{tuple(x.shape)}, {tuple(B.shape)}, {tuple(C.shape)}")  # fmt: skip
    b, n, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    if B.shape[:2] != (b, n) or G == 0 or H % G:
        raise ValueError(f"ssm_scan: B {tuple(B.shape)} does not fit x {tuple(x.shape)} (same b, "
                         "n; groups dividing heads)")  # fmt: skip
    if dt.shape != (b, n, H) or A.shape != (H,) or D.shape != (H,):
        raise ValueError(f"ssm_scan: dt must be {(b, n, H)} and A, D ({H},), got "
                         f"{tuple(dt.shape)}, {tuple(A.shape)}, {tuple(D.shape)}")  # fmt: skip
    rows = b if state_rows is None else state.shape[0]
    if state.shape != (rows, H, P, N) or state.dtype != torch.float32:
        raise ValueError(f"ssm_scan: state must be {(rows, H, P, N)} float32, got "
                         f"{tuple(state.shape)} {state.dtype}")  # fmt: skip
    if state_rows is not None and (state_rows.shape != (b,) or state_rows.dtype != torch.int64):
        raise ValueError(f"ssm_scan: state_rows must be int64 ({b},), got {state_rows.dtype} "
                         f"{tuple(state_rows.shape)}")  # fmt: skip
    if n_valid is not None and n_valid.shape != (b,):
        raise ValueError(f"ssm_scan: n_valid must be ({b},), got {tuple(n_valid.shape)}")
    for t in (dt, A, B, C, D, state, n_valid, state_rows):
        if t is not None and t.device != x.device:
            raise ValueError("ssm_scan: all tensors must be on x's device")


def _kernel_unsupported_reason(x, B, C, state) -> str | None:
    reason = _ext.cuda_unsupported_reason(x.device, "ssm_scan")
    if reason is not None:
        return reason
    if x.dtype not in KERNEL_DTYPES or B.dtype != x.dtype or C.dtype != x.dtype:
        return f"dtypes x={x.dtype}, B={B.dtype}, C={C.dtype}; the kernel takes float32, bfloat16"
    if B.shape[3] not in KERNEL_STATE_SIZES:
        return f"state size {B.shape[3]}; the kernel takes {KERNEL_STATE_SIZES}"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, B, C, state)):
        return "the kernel has no backward; autograd needs the PyTorch path"
    if x.shape[0] > 65535 or x.shape[2] > 65535:
        return "batch or heads over 65535"
    return None


def _vector_ready(t: torch.Tensor, per_lane: int) -> torch.Tensor:
    """t itself when its last dim is unit-stride and the kernel's vector loads of ``per_lane``
    elements are aligned; else a fresh contiguous copy."""
    align = min(16, t.element_size() * per_lane)
    ok = (
        t.stride(-1) == 1
        and t.data_ptr() % align == 0
        and all(t.stride(i) % per_lane == 0 for i in range(t.dim() - 1))
    )
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def _ssm_scan_cuda(x, dt, A, B, C, D, state, n_valid, keep_state, variant):
    state = state.contiguous()
    y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    final = torch.empty_like(state) if keep_state else None
    _launch(x, dt, A, B, C, D, state, n_valid, y, final, 0, variant)
    return y, final


def _scan_chunks_cuda(x, dt, A, B, C, D, states, n_valid, chunk, want_y, variant):
    """:func:`_scan_chunks_ref` by the kernel."""
    b, n, H, P = x.shape
    chunks = math.ceil(n / chunk)
    y = torch.empty(x.shape, dtype=torch.float32, device=x.device) if want_y else None
    final = None
    if not want_y:  # the first pass: the chunk-local states are its only output
        final = torch.empty(b * chunks, H, P, B.shape[3], dtype=torch.float32, device=x.device)
    _launch(x, dt, A, B, C, D, states, n_valid, y, final, chunk, variant)
    return y, final


def _combine_chunks_cuda(states, decay, initial, keep_state):
    """:func:`_combine_chunks_ref` by the kernel (twotower_rt._C.ssm_chunk_combine)."""
    C_ext = _ext.require_cuda_op("ssm_scan", states)
    b, chunks, H = decay.shape
    initial = initial.contiguous()
    if initial.data_ptr() % 16:
        initial = initial.clone()
    final = torch.empty_like(initial) if keep_state else None
    C_ext.ssm_chunk_combine(
        states=states.data_ptr(),
        decay=decay.data_ptr(),
        initial=initial.data_ptr(),
        final_state=final.data_ptr() if final is not None else 0,
        batch=b,
        chunks=chunks,
        heads=H,
        head_elems=states.shape[2] * states.shape[3],
        device=_device_index(states),
        stream=torch.cuda.current_stream(states.device).cuda_stream,
    )
    return final


def _device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _launch(x, dt, A, B, C, D, state, n_valid, y, state_out, chunk, variant, state_rows=None):
    """One ssm_scan kernel launch: state (runs, H, P, N) or None (zero), y (b, n, H, P) fp32 or
    None, state_out (runs, H, P, N) or None, with runs = b * ceil(n / chunk) (b for chunk 0);
    with state_rows (b,) (chunk 0), state and state_out are pools read and written at those rows
    (state is then used as it is: contiguous, the caller's own tensor)."""
    C_ext = _ext.require_cuda_op("ssm_scan", x)
    b, n, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    per_lane = max(1, N // 32)
    x = x if x.stride(3) == 1 else x.contiguous()
    B, C = _vector_ready(B, per_lane), _vector_ready(C, per_lane)
    dt = dt.float()
    dt = dt if dt.stride(2) == 1 else dt.contiguous()
    A, D = A.float().contiguous(), D.float().contiguous()
    if (
        state_rows is None
        and state is not None
        and (not state.is_contiguous() or state.data_ptr() % 16)
    ):
        state = state.clone(memory_format=torch.contiguous_format)
    lens = n_valid.to(torch.int64).contiguous() if n_valid is not None else None
    C_ext.ssm_scan(
        x=x.data_ptr(),
        x_strides=(x.stride(0), x.stride(1), x.stride(2)),
        dt=dt.data_ptr(),
        dt_strides=(dt.stride(0), dt.stride(1)),
        A=A.data_ptr(),
        D=D.data_ptr(),
        B=B.data_ptr(),
        b_strides=(B.stride(0), B.stride(1), B.stride(2)),
        C=C.data_ptr(),
        c_strides=(C.stride(0), C.stride(1), C.stride(2)),
        n_valid=lens.data_ptr() if lens is not None else 0,
        state=state.data_ptr() if state is not None else 0,
        state_out=state_out.data_ptr() if state_out is not None else 0,
        state_rows=state_rows.data_ptr() if state_rows is not None else 0,
        y=y.data_ptr() if y is not None else 0,
        batch=b,
        n=n,
        heads=H,
        groups=G,
        head_dim=P,
        state_size=N,
        chunk=chunk,
        dtype=_DTYPE_CODES[x.dtype],
        variant=variant,
        device=_device_index(x),
        stream=torch.cuda.current_stream(x.device).cuda_stream,
    )
