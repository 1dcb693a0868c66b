"""A tower (embeddings, the hybrid layer stack, norm_f), the time conditioning, and the two-tower
model that owns both towers and their heads. Parameter names are the checkpoint's."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import _ext
from ..config import TIME_FREQ_DIM, TIME_MAX_PERIOD, TwoTowerConfig
from ..ops.rmsnorm import rms_norm
from . import cpu_fast
from .attention import Attention
from .cache import ContextCache
from .linear import Linear
from .mamba import Mamba2Mixer, MambaState
from .moe import DenseMLP, MoE


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


_MIXERS = {"mamba": Mamba2Mixer, "attention": Attention, "moe": MoE, "mlp": DenseMLP}


class Block(nn.Module):
    def __init__(self, cfg: TwoTowerConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mixer = _MIXERS[kind](cfg)


class Tower(nn.Module):
    def __init__(self, cfg: TwoTowerConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, kind) for kind in cfg.layer_kinds)
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        # The last layer that mixes positions (and writes the cache): the layers after it work
        # position by position, so only the positions read at the end need them.
        mixers = [i for i, kind in enumerate(cfg.layer_kinds) if kind in ("mamba", "attention")]
        self.last_mixer = mixers[-1] if mixers else -1

    def forward(
        self,
        ids: torch.Tensor,
        cache: ContextCache,
        *,
        prefix_len: torch.Tensor,
        mamba_states: dict[int, MambaState],
        append: bool,
        n_valid: torch.Tensor | None = None,
        modulation: list[torch.Tensor] | None = None,
        outputs: bool = True,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, dict[int, MambaState]]:
        """Run the stack over ids (b, n).

        Attention layers read ``cache``'s K/V up to ``prefix_len`` (and append to it when
        ``append``); Mamba layers start from ``mamba_states`` (not modified). ``modulation``
        holds per layer the denoiser's (b, 3, hidden) (shift, scale, gate); None for no time
        conditioning. Returns the normed hidden states (b, n, hidden)
        and each Mamba layer's state after the tokens.

        Work nobody reads is skipped, and what is computed is computed as without the skip, bit
        for bit: ``outputs=False`` (with ``append``) returns None for the hidden states and stops
        once the cache is written (the last mixing layer: an attention layer only writes its K/V;
        no position-wise layer after it, no norm_f); ``rows`` (n',) int returns the hidden states
        at those positions alone, (b, n', hidden), the layers after the last mixing layer run on
        them alone."""
        if not outputs and not append:
            raise ValueError("Tower.forward: outputs=False leaves nothing to do without append")
        if cpu_fast.applies(ids):
            return cpu_fast.tower_forward(self, ids, cache, prefix_len, mamba_states, append,
                                          n_valid, modulation, outputs, rows)  # fmt: skip
        x = self.embeddings(ids)
        if rows is not None and self.last_mixer < 0:  # no layer mixes positions
            x = x.index_select(1, rows)
        new_states: dict[int, MambaState] = {}
        for i, block in enumerate(self.layers):
            if modulation is None:
                h = block.norm(x)
            else:
                shift, scale, gate = modulation[i][:, :, None].unbind(1)  # each (b, 1, hidden)
                if block.kind in ("mamba", "attention"):
                    h = block.norm(x * (1 + scale) + shift)
                else:
                    h = block.norm(x) * (1 + scale) + shift
            mixed = self.mix(i, block, h, x, cache, prefix_len, mamba_states, append, n_valid,
                             outputs, rows, new_states)  # fmt: skip
            if mixed is None:
                break
            out, x = mixed
            x = x + (out if modulation is None else gate * out)
        if not outputs:
            return None, new_states
        return self.norm_f(x), new_states

    def mix(self, i, block, h, x, cache, prefix_len, mamba_states, append, n_valid, outputs, rows,
            new_states):  # fmt: skip
        """Layer i's mixer (``block``'s, passed in: indexing the ModuleList costs microseconds a
        layer) on its normed input ``h``, with :meth:`forward`'s arguments (both its paths call
        this): (its output, the residual stream ``x``), both at ``rows`` alone after the last
        mixing layer; or None where the pass ends at this layer (``outputs=False``: the cache is
        written; the last attention layer writes only its K/V). A Mamba layer's new state goes
        into ``new_states``."""
        last = i == self.last_mixer
        if block.kind == "mamba":
            out, new_state = block.mixer(h, mamba_states[i], n_valid, keep_state=append)
            if new_state is not None:
                new_states[i] = new_state
        elif block.kind == "attention":
            k, v = cache.keys[i], cache.values[i]
            if last and not outputs:
                block.mixer.append_kv(h, k, v, prefix_len, cache.slots)
                return None
            out = block.mixer(h, k, v, prefix_len, append, cache.slots, cache.max_length,
                              rows=rows if last else None)  # fmt: skip
        else:
            out = block.mixer(h)
        if last and not outputs:
            return None
        if last and rows is not None:
            _ext.stream_wait()  # the PyTorch ops below read kernel outputs
            x = x.index_select(1, rows)
            if block.kind == "mamba":
                out = out.index_select(1, rows)
        return out, x


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(TIME_FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )

    @staticmethod
    def sinusoid(t: torch.Tensor) -> torch.Tensor:
        """t (b,) in [0, 1] (already in the model dtype) -> (b, 256) fp32 [cos | sin] features
        of t * 1000. The product is taken in t's dtype: in bf16 it rounds as the released model
        rounds it (0.9375 -> 936)."""
        half = TIME_FREQ_DIM // 2
        freqs = torch.exp(
            -math.log(TIME_MAX_PERIOD)
            * torch.arange(half, dtype=torch.float32, device=t.device)
            / half
        )
        args = (t * 1000).float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self.mlp[0].weight.dtype
        return self.mlp(self.sinusoid(t.to(dtype)).to(dtype))


class TwoTowerLM(nn.Module):
    """Both towers, both heads and the time conditioning, named as in the checkpoint."""

    def __init__(self, cfg: TwoTowerConfig):
        super().__init__()
        self.cfg = cfg
        self.context_tower = Tower(cfg)
        self.context_lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.denoiser_tower = Tower(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size))
        self.scale_shift_tables = nn.ParameterList(
            nn.Parameter(torch.empty(3, cfg.hidden_size)) for _ in range(cfg.num_layers)
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        """The denoiser's device (with tower placement the context tower may be elsewhere)."""
        return self.lm_head.weight.device

    @property
    def context_device(self) -> torch.device:
        return self.context_lm_head.weight.device

    # Tower placement (parallel/placement.py): the context tower on context_device, the denoiser on
    # device; a cache then carries a mirror on the denoiser's device, which the denoiser reads.
    placed = False

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """t (b,) masked fraction per sequence -> (b, 3, hidden) [shift, scale, gate]."""
        return self.t_block(self.t_embedder(t)).view(t.shape[0], 3, self.cfg.hidden_size)

    # The three forwards every mode is built from ---------------------------------------------
    def context_forward(
        self,
        ids: torch.Tensor,
        cache: ContextCache,
        n_valid: torch.Tensor | None = None,
        *,
        hidden: bool = True,
    ) -> torch.Tensor | None:
        """Feed ids (b, n) to the context tower: extends the cache (K/V, Mamba states, lengths)
        by each row's n_valid (default n) tokens. Returns the normed last hidden states
        (b, n, hidden); the caller applies ``context_lm_head`` where it needs logits. With
        ``hidden=False`` (a prefill chunk, a block commit: only the cache is wanted) it returns
        None and skips the work after the cache is written (``Tower.forward``'s ``outputs``)."""
        if self.placed:
            ids = ids.to(self.context_device)
            n_valid = None if n_valid is None else n_valid.to(self.context_device)
        ragged = n_valid  # None: every row takes all n tokens, with no check on the device
        if n_valid is None:
            n_valid = torch.full_like(cache.lengths, ids.shape[1])
        elif bool((n_valid == ids.shape[1]).all()):
            ragged = None
        out, states = self.context_tower(
            ids,
            cache,
            prefix_len=cache.lengths,
            mamba_states=cache.mamba,
            append=True,
            n_valid=ragged,
            outputs=hidden,
        )
        cache.mamba.update(states)
        cache.lengths = cache.lengths + n_valid
        if cache.max_length is not None:
            cache.max_length += ids.shape[1]
        return out

    # Tensor parallelism (parallel/tp.py): the heads are vocabulary-parallel, this rank holding
    # entries [vocab_start, vocab_start + V / world); with gather_logits the logits methods
    # all-gather the whole vocabulary, else they return this rank's slice (the engine's samplers
    # then work on the slices: parallel/sampling.py).
    tp = None
    vocab_start = 0
    gather_logits = True

    def _head(self, hidden: torch.Tensor, head: nn.Linear) -> torch.Tensor:
        logits = head(hidden).float().to(self.device)  # placed: to the samplers
        if self.tp is None or not self.gather_logits:
            return logits
        return self.tp.all_gather_last(logits)

    def context_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._head(hidden, self.context_lm_head)

    def denoiser_logits(
        self,
        ids: torch.Tensor,
        cache: ContextCache,
        *,
        prefix_len: torch.Tensor,
        mamba_states: dict[int, MambaState],
        t: torch.Tensor | None,
        needed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoiser over a block ids (b, S), attending to the context K/V [0, prefix_len) and
        scanning from ``mamba_states``; nothing is written. t (b,) the masked fraction per row,
        or None for no time conditioning (mock-AR). needed (b, S) bool or None: the positions
        whose logits the caller reads (the masked ones); where the CPU kernels run the head, it
        runs on those rows alone and the others come back as zeros, and the layers after the
        last one that mixes positions run only on the positions some row needs
        (``Tower.forward``'s ``rows``). Returns fp32 logits (b, S, vocab)."""
        if self.placed and cache.mirror is not None:  # the copy on the denoiser's device
            if mamba_states is cache.mamba:
                mamba_states = cache.mirror.mamba
            cache = cache.mirror
            dev = self.device
            ids, prefix_len = ids.to(dev), prefix_len.to(dev)
            t = None if t is None else t.to(dev)
        modulation = None
        if t is not None:
            if cpu_fast.applies(t):  # one tensor for every layer: (layers, b, 3, hidden)
                modulation = cpu_fast.modulation(self, t)
            else:
                t_emb = self.time_embedding(t)
                modulation = [table + t_emb for table in self.scale_shift_tables]
        # (FP8 projections are matmuls whose rounding may depend on their row count: a row's
        # logits would then depend on which positions the other rows need)
        by_rows = (needed is not None and self.tp is None and self.cfg.fp8_weight_block is None
                   and cpu_fast.head_rows_apply(self.lm_head.weight))  # fmt: skip
        cols = cpu_fast.needed_positions(needed) if by_rows else None
        hidden, _ = self.denoiser_tower(
            ids,
            cache,
            prefix_len=prefix_len,
            mamba_states=mamba_states,
            append=False,
            modulation=modulation,
            rows=cols,
        )
        if by_rows:
            return cpu_fast.head_rows(self.lm_head, hidden, needed, cols)
        return self._head(hidden, self.lm_head)
