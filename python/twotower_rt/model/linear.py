"""The model's projections, in full precision or with FP8 (e4m3) weights.

An FP8 checkpoint (``twotower-rt quantize``) stores each quantized ``X.weight`` as
float8_e4m3fn and beside it ``X.weight_scale`` (float32): the weight is
``weight.float() * scale`` with one scale per block of ``block = (rows, cols)`` weights (cols 0: a
whole row, i.e. one scale per output channel), the last blocks cut at the edges. Quantized:
every tower's Mamba in/out projections, the attention q/k/v/o projections and every MLP/expert
up/down projection, which hold nearly all the bytes. Not quantized: embeddings, heads, norms,
convolutions, the time conditioning, and the MoE router, whose float64 expert choice must not move.

The PyTorch path dequantizes a layer's weight to the activations' dtype at each call (the bytes at
rest halve; the compute is that of the unquantized model).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import _ext
from ..config import TwoTowerConfig
from . import cpu_fast

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


def scale_shape(out_features: int, in_features: int, block: tuple[int, int]) -> tuple[int, int]:
    rows = block[0] or out_features
    cols = block[1] or in_features
    return math.ceil(out_features / rows), math.ceil(in_features / cols)


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    rows = block[0] or shape[0]
    cols = block[1] or shape[1]
    full = scale.repeat_interleave(rows, 0).repeat_interleave(cols, 1)
    return full[: shape[0], : shape[1]]


def quantize_weight(
    weight: torch.Tensor, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> (float8_e4m3fn weight, float32 scales): each block's largest magnitude
    maps to 448; all-zero blocks get scale 1."""
    w = weight.float()
    out_f, in_f = w.shape
    rows, cols = block[0] or out_f, block[1] or in_f
    bo, bi = scale_shape(out_f, in_f, block)
    padded = F.pad(w.abs(), (0, bi * cols - in_f, 0, bo * rows - out_f))
    amax = padded.view(bo, rows, bi, cols).amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / _expand(scale, (out_f, in_f), block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_weight(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    return (q.float() * _expand(scale, tuple(q.shape), block)).to(dtype)


class Fp8Linear(nn.Module):
    """``nn.Linear`` with an FP8 weight and its scales (names as in the checkpoint)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, block: tuple[int, int]):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, block
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False
        )
        self.weight_scale = nn.Parameter(
            torch.empty(scale_shape(out_features, in_features, block), dtype=torch.float32),
            requires_grad=False,
        )
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _ext.stream_wait()  # PyTorch ops (cpu_fast's stream)
        weight = dequantize_weight(self.weight, self.weight_scale, self.block, x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fp8 block={self.block}"


# Weights up to this size get a K-major copy for the CPU fast path (the copy doubles their bytes).
FAST_LINEAR_MAX_BYTES = 256 << 20


class Linear(nn.Linear):
    """``nn.Linear`` with CPU fast paths: where the CPU kernels are built and the layer is
    float32, one call of ``ops.linear_cpu`` (register tiles; float32 rounding, each row alone);
    else a matmul by a cached K-major (in, out) copy of the weight, whose MKL kernels take 0.5-0.8x
    the time of F.linear's transposed one at the few rows a step has (bench/run.py cpu). For 16
    rows or more those are bitwise F.linear's; for fewer, MKL's small-M kernels of the two layouts
    round differently (as F.linear at 1 row already differs from F.linear at 16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (
            not cpu_fast.applies(x)
            or x.dtype != weight.dtype
            or weight.numel() * weight.element_size() > FAST_LINEAR_MAX_BYTES
        ):
            _ext.stream_wait()  # PyTorch ops (cpu_fast's stream)
            return F.linear(x, weight, self.bias)
        out = cpu_fast.project(self, x, (weight,), self.bias)
        if out is not None:
            return out
        _ext.stream_wait()
        k_major = cpu_fast.derived(self, (weight,), lambda w: w.t().contiguous())
        rows = x.reshape(-1, x.shape[-1])
        if self.bias is None:
            out = torch.mm(rows, k_major)
        else:
            out = torch.addmm(self.bias, rows, k_major)
        return out.view(*x.shape[:-1], out.shape[-1])


def make_linear(cfg: TwoTowerConfig, in_features: int, out_features: int, bias: bool) -> nn.Module:
    """A quantizable projection: Fp8Linear when the checkpoint is FP8, else :class:`Linear`."""
    if cfg.fp8_weight_block is not None:
        return Fp8Linear(in_features, out_features, bias, cfg.fp8_weight_block)
    return Linear(in_features, out_features, bias=bias)


def fixed_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """State-dict names whose dtype the checkpoint fixes (FP8 weights, float32 scales); every other
    tensor takes the dtype the model is loaded in."""
    fixed: dict[str, torch.dtype] = {}
    for name, module in model.named_modules():
        if isinstance(module, Fp8Linear):
            fixed[f"{name}.weight"] = FP8_DTYPE
            fixed[f"{name}.weight_scale"] = torch.float32
    return fixed
