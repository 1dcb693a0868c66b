"""Philox4x32-10 and the Gumbel noise of the samplers, in torch integer ops (any device).

The same function as ``csrc/include/twotower_rt/philox.cuh``, bit for bit, so that the CPU
reference and the CUDA kernels draw identical uniforms for the same seed and offset:

    key     = (seed & 0xffffffff, seed >> 32)                                one per sequence
    counter = (vocab index // 4, position, offset & 0xffffffff, offset >> 32)
    element v uses word v % 4;  u = ((word >> 9) * 2 + 1) * 2**-24 in (0, 1);  g = -log(-log(u))

No batch-row index enters, so a sequence's noise does not depend on its batch. Callers advance
``offset`` (per sequence, on the device) between draws; the kernels never advance anything, so a
CUDA graph replays fresh noise when the offset tensor it reads has been bumped.

32-bit words live in int64 tensors; the 32x32 -> 64-bit products of the rounds are split into
16-bit halves so that no intermediate leaves int64's range.
"""

from __future__ import annotations

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * m for a 32-bit words (int64 tensor) and a 32-bit constant."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    m_hi, m_lo = m >> 16, m & 0xFFFF
    mid = a_hi * m_lo + a_lo * m_hi  # < 2**33
    low = a_lo * m_lo + ((mid & 0xFFFF) << 16)  # < 2**33
    hi = a_hi * m_hi + (mid >> 16) + (low >> 32)
    return hi & _MASK32, low & _MASK32


def philox4x32_10(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10: counter (..., 4) and key (..., 2) int64 tensors of 32-bit words (they
    broadcast) -> (..., 4) int64 words."""
    c0, c1, c2, c3 = (counter[..., i] & _MASK32 for i in range(4))
    k0, k1 = key[..., 0] & _MASK32, key[..., 1] & _MASK32
    for round_ in range(10):
        if round_ > 0:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack(torch.broadcast_tensors(c0, c1, c2, c3), dim=-1)


def _split64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 -> its (low, high) 32-bit words as non-negative int64 (two's complement for < 0)."""
    x = x.to(torch.int64)
    return x & _MASK32, (x >> 32) & _MASK32


def uniform_ref(
    seed: torch.Tensor, offset: torch.Tensor, positions: int, vocab: int, quad_start: int = 0
) -> torch.Tensor:
    """u in (0, 1), float32, shape (B, positions, vocab), for per-row seed (B,) and offset (B,)
    int64 tensors; on their device. ``quad_start``: begin at vocabulary entry 4 * quad_start (a
    slice of the stream, for vocabulary-parallel samplers)."""
    device = seed.device
    quads = (vocab + 3) // 4
    seed_lo, seed_hi = _split64(seed)
    off_lo, off_hi = _split64(offset)
    B = seed.shape[0]
    counter = torch.stack(
        torch.broadcast_tensors(
            torch.arange(quad_start, quad_start + quads, device=device, dtype=torch.int64)[
                None, None, :
            ],  # fmt: skip
            torch.arange(positions, device=device, dtype=torch.int64)[None, :, None],
            off_lo[:, None, None],
            off_hi[:, None, None],
        ),
        dim=-1,
    )  # (B, positions, quads, 4)
    key = torch.stack([seed_lo, seed_hi], dim=-1)[:, None, None, :]
    words = philox4x32_10(counter, key).reshape(B, positions, quads * 4)[..., :vocab]
    # 2 * (word >> 9) + 1 < 2**24: exact in float32, and so is the scaling.
    return ((words >> 9) * 2 + 1).to(torch.float32) * 2.0**-24


def check_rng_args(op: str, seed, offset, batch: int) -> None:
    """The samplers' argument check at temperature > 0: ``seed`` and ``offset`` must be given as
    int64 (batch,) tensors. Raises ValueError naming ``op``."""
    for name, t in (("seed", seed), ("offset", offset)):
        if t is None:
            raise ValueError(f"{op}: {name} is required when temperature > 0")
        if t.shape != (batch,) or t.dtype != torch.int64:
            raise ValueError(
                f"{op}: {name} must be an int64 ({batch},) tensor, got {t.dtype} "
                f"of shape {tuple(t.shape)}"
            )


def gumbel_ref(
    seed: torch.Tensor, offset: torch.Tensor, positions: int, vocab: int, quad_start: int = 0
) -> torch.Tensor:
    """Standard Gumbel noise (B, positions, vocab), float32: -log(-log(u)), u from
    :func:`uniform_ref` (``quad_start`` likewise)."""
    return -torch.log(-torch.log(uniform_ref(seed, offset, positions, vocab, quad_start)))
