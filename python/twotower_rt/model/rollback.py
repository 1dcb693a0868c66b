"""Rolling the context back after a pass over a block of which only a prefix is kept.

The verified mode feeds a whole drafted block to the context tower in one pass, then keeps only
the accepted prefix of each row. K/V roll back by length alone (positions past a row's length are
never read, and the next pass overwrites them). Mamba states cannot: they are replayed. The pass
records, per Mamba layer, the state before the block (a copy, as small as one state) and the
block's ``in_proj`` output (what the scan inputs and the raw conv columns are computed from);
:func:`roll_back` then runs each layer's conv over the block again and re-scans each row's kept
prefix from the state before it through ``ops.ssm_scan`` (``n_valid``: the state is carried
unchanged past the kept tokens; the CUDA kernel on the GPU). No per-position state is ever stored.

Per layer, the replay is bitwise the state the mixer itself leaves over the same block with
``n_valid = keep`` (same shapes, same ops; tests/test_verified.py). Over the whole tower it equals a
pass over the kept tokens alone up to float32 rounding: the kept tokens' hidden states are computed
along with the rejected ones (matmuls of another shape, MoE experts over other token groups).
On the CPU fast path (``cpu_fast.mamba_replay``) only the state is computed, and the recurrence
runs only up to the longest kept run (reading ``keep`` on the host is free there); elsewhere the
whole block is replayed with ``n_valid`` (on the GPU: no host synchronisation).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops.ssm_scan import ssm_scan
from . import cpu_fast
from .cache import ContextCache
from .mamba import Mamba2Mixer, MambaState
from .tower import TwoTowerLM


@dataclass
class BlockRecord:
    """What a recorded context pass keeps for its rollback: each row's length and, per Mamba
    layer, the state before the block and the block's in_proj output (b, S, in_proj_dim)."""

    lengths: torch.Tensor
    states: dict[int, MambaState]
    projected: dict[int, torch.Tensor]


@contextlib.contextmanager
def _recording(lm: TwoTowerLM, projected: dict[int, torch.Tensor]):
    """Keep every context-tower Mamba layer's in_proj output while the block passes (this
    thread's pass only: the hooks are on the model, which other threads may be running)."""
    handles = []
    owner = threading.get_ident()
    for i, block in enumerate(lm.context_tower.layers):
        if isinstance(block.mixer, Mamba2Mixer):

            def keep(module, args, out, i=i):
                if threading.get_ident() == owner:
                    projected[i] = out

            handles.append(block.mixer.in_proj.register_forward_hook(keep))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def recorded_context_forward(
    lm: TwoTowerLM, ids: torch.Tensor, cache: ContextCache
) -> tuple[torch.Tensor, BlockRecord]:
    """``lm.context_forward(ids, cache)`` (every row takes all n tokens) that also returns what
    :func:`roll_back` needs. Returns (normed hidden states (b, n, hidden), the record)."""
    states = {i: s.clone() for i, s in cache.mamba.items()}  # in-place pools update the originals
    record = BlockRecord(cache.lengths.clone(), states, {})
    with _recording(lm, record.projected):
        hidden = lm.context_forward(ids, cache)
    return hidden, record


def roll_back(lm: TwoTowerLM, cache: ContextCache, record: BlockRecord, keep: torch.Tensor) -> None:
    """Make ``cache`` (the batch the recorded pass extended) hold only the first ``keep`` (b,)
    tokens of the block: lengths, and every Mamba layer's conv and SSM state by replay."""
    cache.lengths = record.lengths + keep
    for i, before in record.states.items():
        mixer = lm.context_tower.layers[i].mixer
        cache.mamba[i] = _replay(mixer, before, record.projected[i], keep)


def _replay(mixer: Mamba2Mixer, before: MambaState, zxbcdt: torch.Tensor, keep) -> MambaState:
    """The layer's state after the first ``keep`` tokens of the block whose in_proj output is
    ``zxbcdt`` (b, S, in_proj_dim), from ``before``: Mamba2Mixer.forward's conv and scan, the
    states only."""
    if cpu_fast.applies(zxbcdt):  # the state only, up to the longest kept run
        return cpu_fast.mamba_replay(mixer, before, zxbcdt, keep)
    cfg = mixer.cfg
    b, n, _ = zxbcdt.shape
    H, P, N, G, K = (cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size,
                     cfg.n_groups, cfg.conv_kernel)  # fmt: skip
    _, xBC, dt = torch.split(zxbcdt, [cfg.mamba_d_inner, cfg.mamba_conv_dim, H], dim=-1)
    raw = xBC.transpose(1, 2)  # (b, conv_dim, n)
    history = torch.cat([before.conv.to(raw.dtype), raw], dim=-1)  # (b, conv_dim, K + n)
    cols = keep[:, None] + torch.arange(K, device=raw.device)[None, :]  # the K ending at keep
    conv_state = history.gather(2, cols[:, None, :].expand(b, cfg.mamba_conv_dim, K))
    bias = mixer.conv1d.bias.float() if mixer.conv1d.bias is not None else None
    window = history[..., 1:].float()
    conv = F.conv1d(window, mixer.conv1d.weight.float(), bias, groups=cfg.mamba_conv_dim)
    xBC = F.silu(conv).to(zxbcdt.dtype).transpose(1, 2)
    x, Bm, Cm = torch.split(xBC, [cfg.mamba_d_inner, G * N, G * N], dim=-1)
    dt = F.softplus(dt.float() + mixer.dt_bias.float())
    lo, hi = cfg.time_step_limit
    if lo > 0.0 or hi != float("inf"):
        dt = dt.clamp(lo, hi)
    A = -torch.exp(mixer.A_log.float())
    _, ssm = ssm_scan(
        x.reshape(b, n, H, P), dt, A, Bm.reshape(b, n, G, N), Cm.reshape(b, n, G, N), mixer.D,
        before.ssm, keep,
    )  # fmt: skip
    return MambaState(conv_state.to(before.conv.dtype), ssm)
