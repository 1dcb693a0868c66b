"""A dense projection on the CPU in one call: the op (``twotower_rt._cpu``, the kernel in
``csrc/cpu/linear_cpu.cpp``) and beside it its PyTorch reference.

The CPU fast path's projections (``model.linear.Linear`` and ``model.cpu_fast.qkv``) keep their
weights K-major, (in, out). At the 16 rows of a denoiser forward, register tiles of 4 rows x 64
outputs in 16-float vectors took 0.6-0.85x the time of MKL's sgemm on the default model's shapes
(a 2-core AVX-512 VM, one thread, weights hot); without AVX-512 the tiles are 4 rows x 16 outputs
in 8-float vectors (csrc/include/twotower_rt/cpu_common.h: wide_vectors), 1.2x MKL's time there
at 16 rows and faster at one (bench/cpu_vector_width.py on an AVX2 Zen 3 VM). MKL's small-M
kernels round a row differently with the number of rows in the call. The kernel computes each
output as one chain of fused multiply-adds over the inputs in order (from the bias, or from the
first product): it agrees with ``torch.mm`` to float32 rounding, not bitwise, and a row's result
never depends on the other rows.
"""

from __future__ import annotations

import torch

from .. import _ext

VECTOR = 16  # floats per vector of the kernel


def bf16_exact(*tensors: torch.Tensor) -> bool:
    """Whether every value of these float32 tensors is a bfloat16 value (a bf16 checkpoint loaded
    as float32, until something writes other values): then the kernels may keep them as
    bfloat16, half the bytes to stream, with the same arithmetic bit for bit."""
    return all(torch.equal(t.bfloat16().float(), t) for t in tensors)


def k_major(weight: torch.Tensor) -> torch.Tensor:
    """A Linear's weight (out, in) as the kernel takes it: (in, out) with each row padded with
    zeros to a multiple of 16 outputs, so that the last outputs also run as one vector; bfloat16
    where every value is one (:func:`bf16_exact`), else float32."""
    n, k = weight.shape
    padded = torch.zeros(k, -(-n // VECTOR) * VECTOR, dtype=torch.float32)
    padded[:, :n] = weight.detach().t()
    return padded.bfloat16() if bf16_exact(padded) else padded


def linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               out_features: int | None = None) -> torch.Tensor:  # fmt: skip
    """``x @ weight[:, :out_features] (+ bias)``: x (rows, in) float32 CPU with unit column
    stride, weight (in, >= out_features) float32 or bfloat16, contiguous (K-major, e.g.
    :func:`k_major`), bias (out_features,) or None -> (rows, out_features) float32. A bfloat16
    weight is widened exactly: the result is that of the same weight as float32, bitwise."""
    C = _ext.cpu_kernels()
    if C is None:
        raise RuntimeError(f"twotower_rt: CPU op 'linear' cannot run: {_ext.cpu_kernels_error()}")
    n = weight.shape[-1] if out_features is None else out_features
    f32 = torch.float32
    if not (  # one pass of cheap checks; details on failure
        x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[0]
        and 0 <= n <= weight.shape[1]
        and x.dtype == f32 and weight.dtype in (f32, torch.bfloat16) and x.is_cpu and weight.is_cpu
        and x.stride(1) == 1 and (x.stride(0) >= x.shape[1] or x.shape[0] <= 1)
        and weight.is_contiguous()
        and (bias is None or (bias.dtype == f32 and bias.is_cpu and bias.is_contiguous()
                              and bias.shape == (n,)))
    ):  # fmt: skip
        _explain(x, weight, bias, n)
    return run(C, x, weight, bias, n)


def run(C, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int,
        shape: tuple | None = None) -> torch.Tensor:  # fmt: skip
    """:func:`linear_cpu` without its checks, for callers that have made them (the model's
    projections, once per weight version): ``C`` the loaded ``twotower_rt._cpu``; the result
    made with ``shape`` (rows x n values; default (rows, n))."""
    rows, k = x.shape
    out = x.new_empty(shape or (rows, n))
    if rows and k and n:
        _ext.keep(x, out)  # (held while a kernel stream queues the call; the weights live on)
        C.linear(x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                 out.data_ptr(), rows, k, n, max(x.stride(0), k), weight.shape[1],
                 weight.dtype == torch.bfloat16)  # fmt: skip
    elif rows and n:  # no inputs: the bias alone
        out.view(rows, n).copy_(bias.expand(rows, n) if bias is not None else torch.zeros(rows, n))
    return out


def _explain(x, weight, bias, n: int) -> None:
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"linear: x must be (rows, in) and weight (in, out), got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")  # fmt: skip
    if not 0 <= n <= weight.shape[1]:
        raise ValueError(f"linear: out_features must be in [0, {weight.shape[1]}], got {n}")
    if x.shape[1] != weight.shape[0]:
        raise ValueError(f"linear: x has {x.shape[1]} inputs, weight {weight.shape[0]} "
                         f"(weight must be K-major: (in, out))")  # fmt: skip
    if weight.dtype not in (torch.float32, torch.bfloat16) or weight.device.type != "cpu":
        raise ValueError(f"linear: weight must be a float32 or bfloat16 CPU tensor, got "
                         f"{weight.dtype} on {weight.device}")  # fmt: skip
    for name, t in [("x", x)] + ([] if bias is None else [("bias", bias)]):
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"linear: {name} must be a float32 CPU tensor, got {t.dtype} on "
                             f"{t.device}")  # fmt: skip
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"linear: bias must be ({n},), got {tuple(bias.shape)}")
    if x.stride(1) != 1 or (x.stride(0) < x.shape[1] and x.shape[0] > 1):
        raise ValueError(
            f"linear: x must have unit column stride and rows that do not overlap, "
            f"got strides {tuple(x.stride())}"
        )
    raise ValueError("linear: weight and bias must be contiguous")


def linear_cpu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   out_features: int | None = None) -> torch.Tensor:  # fmt: skip
    """:func:`linear_cpu` in PyTorch: ``torch.mm`` (``torch.addmm`` with a bias)."""
    weight = weight[:, : weight.shape[1] if out_features is None else out_features].float()
    return torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)


# --- bfloat16 dot products ------------------------------------------------------------------------
# Where the user lets float32 matmuls run in bfloat16 (torch.set_float32_matmul_precision("medium"),
# PyTorch's own switch for this) and the CPU has AVX512_BF16, the CPU path's projections run
# through ``twotower_rt._cpu.linear_dot`` (csrc/cpu/linear_dot_cpu.cpp): x rounded to bfloat16,
# bfloat16 weights, float32 accumulation, 32 multiply-adds per instruction where the float32
# kernel's FMA does 16. Its numbers are its own (csrc/include/twotower_rt/linear_dot_cpu.h),
# reproduced exactly by :func:`linear_dot_ref`.


def dot_allowed() -> bool:
    """Whether the projections may take :func:`linear_dot_cpu` now: matmul precision "medium"
    and a CPU with AVX512_BF16 (the kernels built)."""
    if torch.get_float32_matmul_precision() != "medium":
        return False
    C = _ext.cpu_kernels()
    return C is not None and C.linear_dot_supported()


def k_pairs(weight: torch.Tensor) -> torch.Tensor:
    """A Linear's weight (out, in) as :func:`linear_dot_cpu` takes it: (ceil(in / 2), out padded
    to 16) int32 words, word [j, c] the bfloat16 bits of weight[c, 2j] (low half) and
    weight[c, 2j + 1] (high half); zero past ``in`` and ``out``. The weight rounded to bfloat16
    (exact for a bfloat16 checkpoint's weights)."""
    n, k = weight.shape
    padded = torch.zeros(k, -(-n // VECTOR) * VECTOR, dtype=torch.float32)
    padded[:, :n] = weight.detach().t()
    return pair_words(padded)


def linear_dot_cpu(x: torch.Tensor, w_pairs: torch.Tensor, bias: torch.Tensor | None = None, *,
                   out_features: int) -> torch.Tensor:  # fmt: skip
    """``x @ weight.T (+ bias)`` by bfloat16 dot products: x (rows, in) float32 CPU with unit
    column stride, w_pairs :func:`k_pairs` of the weight, bias (out_features,) float32 or None ->
    (rows, out_features) float32, bitwise :func:`linear_dot_ref`. Raises where the CPU has no
    AVX512_BF16 (``_cpu.linear_dot_supported()``)."""
    C = _ext.cpu_kernels()
    if C is None:
        raise RuntimeError(
            f"twotower_rt: CPU op 'linear_dot' cannot run: {_ext.cpu_kernels_error()}"
        )
    if not C.linear_dot_supported():
        raise RuntimeError("twotower_rt: CPU op 'linear_dot' needs AVX512_BF16 (this CPU lacks it)")
    f32 = torch.float32
    ok = (
        x.dim() == 2 and x.dtype == f32 and x.is_cpu and x.stride(1) == 1
        and (x.stride(0) >= x.shape[1] or x.shape[0] <= 1)
        and w_pairs.dim() == 2 and w_pairs.dtype == torch.int32 and w_pairs.is_cpu
        and w_pairs.is_contiguous() and w_pairs.shape[0] == (x.shape[1] + 1) // 2
        and 0 < out_features <= w_pairs.shape[1] and w_pairs.shape[1] % VECTOR == 0
        and (bias is None or (bias.dtype == f32 and bias.is_cpu and bias.is_contiguous()
                              and bias.shape == (out_features,)))
    )  # fmt: skip
    if not ok:
        raise ValueError(
            f"linear_dot: want x (rows, in) float32 CPU with unit column stride, w_pairs "
            f"(ceil(in / 2), out padded to 16) int32 contiguous (k_pairs), bias ({out_features},) "
            f"float32 or None; got x {tuple(x.shape)} {x.dtype} strides {tuple(x.stride())}, "
            f"w_pairs {tuple(w_pairs.shape)} {w_pairs.dtype}, bias "
            f"{None if bias is None else (tuple(bias.shape), bias.dtype)}"
        )
    return run_dot(C, x, w_pairs, bias, out_features)


def run_dot(C, x: torch.Tensor, w_pairs: torch.Tensor, bias: torch.Tensor | None, n: int,
            shape: tuple | None = None) -> torch.Tensor:  # fmt: skip
    """:func:`linear_dot_cpu` without its checks (as :func:`run`)."""
    rows, k = x.shape
    out = x.new_empty(shape or (rows, n))
    if rows:
        _ext.keep(x, out)
        C.linear_dot(x.data_ptr(), w_pairs.data_ptr(), 0 if bias is None else bias.data_ptr(),
                     out.data_ptr(), rows, k, n, max(x.stride(0), k), w_pairs.shape[1])  # fmt: skip
    return out


def linear_dot_ref(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """:func:`linear_dot_cpu`'s numbers in PyTorch: :func:`dot_chain_ref` of x and the weight
    (out, in), from the bias (or -0.0)."""
    return dot_chain_ref(x, weight.detach().t(), bias)


def dot_chain_ref(x: torch.Tensor, w: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The bfloat16 dot products' chain, step by step: x (rows, in) and the K-major w (in, out)
    rounded to bfloat16, then for each input pair j, acc = fma(x[2j+1], w[2j+1], acc) and then
    fma(x[2j], w[2j], acc), from the bias (or -0.0) -> (rows, out) float32. A product of two
    bfloat16 values is exact in float64, and so is its sum with a float32 acc of a similar
    magnitude, so rounding that sum to float32 is the fused multiply-add (exact for the values
    tests use; the kernel's flushing of subnormals is not modelled)."""
    xs, ws = x.bfloat16().double(), w.bfloat16().double()
    acc = (torch.full((x.shape[0], ws.shape[1]), -0.0) if bias is None
           else bias.float().expand(x.shape[0], -1).clone())  # fmt: skip
    k = x.shape[1]
    for j in range(0, k, 2):
        for i in (j + 1, j) if j + 1 < k else (j,):
            acc = (acc.double() + xs[:, i : i + 1] * ws[i]).float()
    return acc


def pair_words(w: torch.Tensor) -> torch.Tensor:
    """A K-major weight (..., in, out) as bfloat16 pairs over its inputs: (..., ceil(in / 2),
    out) int32 words, word [j, c] the bits of w[2j, c] (low half) and w[2j + 1, c] (high half),
    zero past ``in``; the weight rounded to bfloat16."""
    k = w.shape[-2]
    bits = w.detach().bfloat16().view(torch.int16).to(torch.int32) & 0xFFFF
    if k % 2:
        bits = torch.cat([bits, torch.zeros_like(bits[..., :1, :])], dim=-2)
    return (bits[..., 0::2, :] | (bits[..., 1::2, :] << 16)).contiguous()
