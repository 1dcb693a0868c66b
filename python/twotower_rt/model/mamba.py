"""Mamba-2 mixer: in_proj -> depthwise causal conv + SiLU -> selective scan -> gated norm -> out.

One function serves every use: the context prefill (from zero state, rows of different lengths),
the one-token decode step, the block extension after a diffusion block, and the denoiser's
context-seeded block scan (which reads the context state and never writes it). The caller gets the
final states back and decides whether to keep them.

The scan is ``ops.ssm_scan``: the plain per-token fp32 recurrence (the reference semantics,
``selective_scan_ref``) on the CPU, a CUDA kernel that holds the state in registers on the GPU; a
seeded chunked scan on a block shorter than its chunk is a known source of garbage in other ports,
so the oracle stays this simple. ``selective_scan_chunked`` (SSD-style, parallel inside each
chunk) is the trainer's scan: a mixer uses it only when its ``scan_chunk`` is set (0, the default,
is the reference), and then also keeps its states at every chunk boundary in ``chunk_states``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _ext
from ..config import TwoTowerConfig
from ..ops.mamba_decode import mamba_decode_step
from ..ops.rmsnorm import rms_norm
from ..ops.ssm_scan import selective_scan_ref, ssm_scan
from . import cpu_fast
from .linear import make_linear

__all__ = ["MambaState", "Mamba2Mixer", "selective_scan_chunked", "selective_scan_ref"]


class MambaState:
    """Per-layer recurrent state of a batch: ``conv`` (B, conv_dim, K) holds the last K raw
    (pre-conv) xBC columns, oldest first, zero-padded on the left; ``ssm`` (B, H, P, N) fp32.

    With ``rows`` (B,), ``ssm`` is a pool (R, H, P, N) and sequence b's state is its row rows[b]:
    an engine's slot pool, which the scan kernel reads, and a context forward updates, in place
    (:meth:`gathered` gives the plain (B, ...) tensor)."""

    __slots__ = ("conv", "ssm", "rows")

    def __init__(self, conv: torch.Tensor, ssm: torch.Tensor, rows: torch.Tensor | None = None):
        self.conv = conv
        self.ssm = ssm
        self.rows = rows

    def gathered(self) -> torch.Tensor:
        """The (B, H, P, N) SSM states (a copy when they are rows of a pool)."""
        return self.ssm if self.rows is None else self.ssm.index_select(0, self.rows)

    @classmethod
    def zeros(cls, cfg: TwoTowerConfig, batch: int, dtype, device) -> MambaState:
        conv = torch.zeros(batch, cfg.mamba_conv_dim, cfg.conv_kernel, dtype=dtype, device=device)
        ssm = torch.zeros(
            batch, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size,
            dtype=torch.float32, device=device,
        )  # fmt: skip
        return cls(conv, ssm)

    def clone(self) -> MambaState:
        return MambaState(self.conv.clone(), self.gathered().clone())

    def index_select(self, rows: torch.Tensor) -> MambaState:
        return MambaState(self.conv.index_select(0, rows), self.gathered().index_select(0, rows))


def selective_scan_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    state: torch.Tensor,
    valid: torch.Tensor | None = None,
    chunk: int = 16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`selective_scan_ref`'s recurrence computed chunk by chunk (Mamba-2's SSD form): inside
    a chunk every output is a masked sum over earlier positions with decays exp(cum_t - cum_s);
    between chunks the state is carried sequentially. Differentiable; for training.

    Same arguments as :func:`selective_scan_ref` plus ``chunk``. The sequence is zero-padded to a
    multiple of ``chunk`` with dt = 0 (decay 1, no input), so a short or ragged tail changes
    nothing. Returns y (b, n, H, P) fp32, the final state, and ``chunk_states``
    (b, ceil(n / chunk), H, P, N): the state after each chunk (the last after token n)."""
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    if valid is not None:
        dt = dt.masked_fill(~valid[..., None], 0.0)
    b, n, H, P = x.shape
    N = B.shape[-1]
    pad = (-n) % chunk
    if pad:
        x, B, C = (F.pad(v, (0, 0, 0, 0, 0, pad)) for v in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    nc = (n + pad) // chunk
    x = x.reshape(b, nc, chunk, H, P)
    B = B.reshape(b, nc, chunk, H, N)
    C = C.reshape(b, nc, chunk, H, N)
    dt = dt.reshape(b, nc, chunk, H)
    cum = torch.cumsum(dt * A.float(), dim=2)  # (b, nc, L, H) log-decay from the chunk start
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    seg = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # (b, nc, t, s, H): cum_t - cum_s
    decay_ts = torch.exp(seg.masked_fill(~causal[:, :, None], float("-inf")))
    scores = torch.einsum("bcthn,bcshn->bctsh", C, B) * decay_ts
    dtx = dt[..., None] * x  # (b, nc, L, H, P)
    y = torch.einsum("bctsh,bcshp->bcthp", scores, dtx)
    # Each chunk's own contribution to the state at its end, from a zero start.
    to_end = torch.exp(cum[:, :, -1:, :] - cum)  # (b, nc, L, H)
    local = torch.einsum("bclhp,bclhn->bchpn", to_end[..., None] * dtx, B)
    chunk_decay = torch.exp(cum[:, :, -1, :])  # (b, nc, H)
    entering, after = [], []
    for c in range(nc):
        entering.append(state)
        state = state * chunk_decay[:, c, :, None, None] + local[:, c]
        after.append(state)
    entering = torch.stack(entering, dim=1)  # (b, nc, H, P, N)
    y = y + torch.einsum("bclhn,bchpn->bclhp", C * torch.exp(cum)[..., None], entering)
    y = y.reshape(b, nc * chunk, H, P)[:, :n]
    return (
        y + D.float()[:, None] * x.reshape(b, nc * chunk, H, P)[:, :n],
        state,
        torch.stack(after, dim=1),
    )


class Mamba2Mixer(nn.Module):
    tp = None  # tensor-parallel group (parallel/tp.py): out_proj's partial sum reduced
    # (global groups, this rank's group, channels per group) where a gated-norm group spans ranks
    tp_norm: tuple[int, int, int] | None = None

    def __init__(self, cfg: TwoTowerConfig):
        super().__init__()
        self.cfg = cfg
        self.in_proj = make_linear(cfg, cfg.hidden_size, cfg.mamba_in_proj_dim, cfg.use_bias)
        self.conv1d = nn.Conv1d(
            cfg.mamba_conv_dim, cfg.mamba_conv_dim, cfg.conv_kernel,
            groups=cfg.mamba_conv_dim, bias=cfg.use_conv_bias,
        )  # fmt: skip
        self.dt_bias = nn.Parameter(torch.empty(cfg.mamba_num_heads))
        self.A_log = nn.Parameter(torch.empty(cfg.mamba_num_heads))
        self.D = nn.Parameter(torch.empty(cfg.mamba_num_heads))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.empty(cfg.mamba_d_inner))
        self.out_proj = make_linear(cfg, cfg.mamba_d_inner, cfg.hidden_size, cfg.use_bias)
        # Trainer switch: > 0 runs selective_scan_chunked with this chunk and keeps, detached, the
        # state after every chunk in ``chunk_states`` (MambaState of (b, n_chunks, ...) tensors).
        self.scan_chunk = 0
        self.chunk_states: MambaState | None = None
        # Switch: the one-token step through ops.mamba_decode_step (the fused kernel on the GPU);
        # off by default until its GPU tests have run on a GPU (tests/test_mamba_decode.py).
        self.fused_decode = False
        # Switch: long runs (prefill, block extension) through ssm_scan's chunked scan with the
        # chunk ops.ssm_scan.plan_scan_chunk picks on the GPU; off by default until its GPU tests
        # have run on a GPU (tests/test_ssm_scan.py). The CPU path never chunks.
        self.chunked_prefill = False
        # Switch: a state given as rows of a slot pool (an engine batch) is read and written in
        # place by the kernel (ssm_scan(state_rows=)); off: gathered, scanned, scattered back (4x
        # the state bytes). Off by default until its GPU test has run (tests/test_ssm_scan.py).
        self.states_in_place = False

    def forward(
        self,
        h: torch.Tensor,
        state: MambaState,
        n_valid: torch.Tensor | None = None,
        keep_state: bool = True,
    ) -> tuple[torch.Tensor, MambaState | None]:
        """h (b, n, hidden); state: the layer's state before these tokens (not modified, except
        that a state given as rows of a pool is updated in place when ``keep_state``);
        n_valid (b,) or None: row r has n_valid[r] real tokens, then padding.
        Returns (out (b, n, hidden), state after each row's last real token, or None when not
        ``keep_state``: the denoiser reads its seed state and never needs another)."""
        if not self.scan_chunk and self.tp_norm is None and cpu_fast.applies(h):
            return cpu_fast.mamba_forward(self, h, state, n_valid, keep_state)
        cfg = self.cfg
        b, n, _ = h.shape
        H, P, N, G, K = (cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size,
                         cfg.n_groups, cfg.conv_kernel)  # fmt: skip
        zxbcdt = self.in_proj(h)
        _ext.stream_wait()  # PyTorch ops on a kernel's output from here on (cpu_fast's stream)
        if self.fused_decode and n == 1 and n_valid is None and keep_state and not self.scan_chunk:
            y, new_conv, new_ssm = mamba_decode_step(
                zxbcdt[:, 0], state.conv, self.conv1d.weight, self.conv1d.bias, self.dt_bias,
                self.A_log, self.D, state.gathered(), self.norm.weight, cfg.layer_norm_epsilon, G,
                cfg.time_step_limit,
            )  # fmt: skip
            return self.out_proj(y[:, None]), MambaState(new_conv, new_ssm)
        z, xBC, dt = torch.split(zxbcdt, [cfg.mamba_d_inner, cfg.mamba_conv_dim, H], dim=-1)
        valid = None
        if n_valid is not None:
            valid = torch.arange(n, device=h.device)[None, :] < n_valid[:, None]  # (b, n)
            # Padding must look like nothing to the conv of later blocks: zero raw inputs.
            xBC = xBC.masked_fill(~valid[..., None], 0.0)

        # Depthwise causal conv over [newest K-1 columns of the state ; new columns], in fp32.
        raw = xBC.transpose(1, 2)  # (b, conv_dim, n)
        window = torch.cat([state.conv[..., 1:].to(raw.dtype), raw], dim=-1)
        bias = self.conv1d.bias.float() if self.conv1d.bias is not None else None
        conv = F.conv1d(window.float(), self.conv1d.weight.float(), bias, groups=cfg.mamba_conv_dim)
        xBC = F.silu(conv).to(h.dtype).transpose(1, 2)  # (b, n, conv_dim)

        history = torch.cat([state.conv.to(raw.dtype), raw], dim=-1)  # (b, conv_dim, K + n)
        if not keep_state:
            new_conv = None
        elif n_valid is None:
            new_conv = history[..., n:]
        else:  # each row keeps the K columns that end at its last real token
            cols = n_valid[:, None] + torch.arange(K, device=h.device)[None, :]  # (b, K)
            new_conv = history.gather(2, cols[:, None, :].expand(b, cfg.mamba_conv_dim, K))

        x, Bm, Cm = torch.split(xBC, [cfg.mamba_d_inner, G * N, G * N], dim=-1)
        Bm, Cm = Bm.reshape(b, n, G, N), Cm.reshape(b, n, G, N)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        lo, hi = cfg.time_step_limit
        if lo > 0.0 or hi != float("inf"):
            dt = dt.clamp(lo, hi)
        A = -torch.exp(self.A_log.float())
        if self.scan_chunk:
            Bm = Bm.repeat_interleave(H // G, dim=2)
            Cm = Cm.repeat_interleave(H // G, dim=2)
            y, new_ssm, ssm_chunks = selective_scan_chunked(
                x.reshape(b, n, H, P),
                dt,
                A,
                Bm,
                Cm,
                self.D,
                state.gathered(),
                valid,
                self.scan_chunk,
            )
            ends = torch.arange(1, ssm_chunks.shape[1] + 1, device=h.device) * self.scan_chunk
            cols = ends.clamp(max=n)[:, None] + torch.arange(K, device=h.device)  # (nc, K)
            conv_chunks = history[:, :, cols].permute(0, 2, 1, 3)  # (b, nc, conv_dim, K)
            self.chunk_states = MambaState(conv_chunks.detach(), ssm_chunks.detach())
        else:
            in_place = state.rows is not None and self.states_in_place
            y, new_ssm = ssm_scan(
                x.reshape(b, n, H, P), dt, A, Bm, Cm, self.D,
                state.ssm if in_place else state.gathered(), n_valid, keep_state=keep_state,
                chunk=None if self.chunked_prefill else 0,
                state_rows=state.rows if in_place else None,
            )  # fmt: skip
            if in_place:  # the pool's rows now hold the new states
                new_ssm = state.ssm
        y = y.reshape(b, n, cfg.mamba_d_inner).to(h.dtype)
        if self.tp_norm is not None:
            y = self._norm_across_ranks(y, z)
        else:
            y = rms_norm(y, self.norm.weight, cfg.layer_norm_epsilon, gate=z,
                         group_size=cfg.mamba_d_inner // G)  # fmt: skip
        out = self.out_proj(y)
        if self.tp is not None:
            out = self.tp.all_reduce(out)
        if not keep_state:
            return out, None
        rows = state.rows if new_ssm is state.ssm else None
        return out, MambaState(new_conv, new_ssm, rows)

    def _norm_across_ranks(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The gated RMSNorm when this rank holds part of one norm group: the group's sum of
        squares all-reduced (a (groups, ...) tensor, this rank's part in its group's row)."""
        groups, mine, size = self.tp_norm
        g = y.float() * F.silu(z.float())
        sums = g.new_zeros((groups, *g.shape[:-1]))
        sums[mine] = g.square().sum(dim=-1)
        total = self.tp.all_reduce(sums)[mine]
        scale = torch.rsqrt(total / size + self.cfg.layer_norm_epsilon)
        return (g * scale[..., None] * self.norm.weight.float()).to(y.dtype)
