"""The CPU fast paths of the model's layers: the eager code's numbers in fewer and cheaper ops.

On the small models the CPU runs (the default model has hidden 192), a step costs what its op
launches cost, not what its arithmetic costs. Two kinds of fast path, both row by row (a sequence's
numbers never depend on its batch):

- the fused CPU kernels of ``twotower_rt._cpu`` (C++, built wherever a C++ compiler is), for fp32
  models: :func:`mamba_forward` runs a Mamba layer's whole middle, between in_proj and out_proj, as
  one call (``ops.mamba_cpu``), and :func:`moe_forward` a whole MoE layer, router included
  (``ops.moe_cpu``). They agree with the eager layers to float32 rounding, not bitwise (their exp
  and their summation orders are their own; tests/test_mamba_cpu.py, tests/test_moe_cpu.py);
- PyTorch forms that compute exactly what the eager layers compute, bitwise
  (tests/test_fastpath.py), where the kernels are not built (or are turned off with
  ``_ext.set_kernels_enabled(False)``) and for what they do not cover: in :func:`mamba_forward`,
  the derived constants (``-exp(A_log)``, the conv taps time-major, fp32 casts) made once per
  weight version, the depthwise conv as K fused multiply-adds over contiguous time-major slices
  (bitwise oneDNN's depthwise kernel), the scan straight to :func:`ops.ssm_scan.ssm_scan_ref`
  (whose fast form keeps the recurrence's numbers); :func:`router_forward`, the float64 router
  weights converted once; the norms called directly and q/k/v in one matmul.

They run when :mod:`twotower_rt.fastpath` is on, on CPU tensors, without autograd (the trainer
keeps the plain code); everything else (CUDA, TP's cross-rank norm, the trainer's chunked scan)
takes the layers' own code.
"""

from __future__ import annotations

import contextlib
import operator

import torch
import torch.nn.functional as F
from torch import nn

from .. import _ext, fastpath
from ..ops import linear_cpu, mamba_cpu
from ..ops.mamba_cpu import MambaWeights, mamba_chunk, mamba_weights
from ..ops.moe_cpu import dot_weights as moe_dot_weights
from ..ops.moe_cpu import moe_forward as moe_kernel
from ..ops.moe_cpu import moe_weights
from ..ops.rmsnorm import modulated_rms_norm_cpu, residual_add_cpu, rms_norm, rms_norm_cpu
from ..ops.ssm_scan import ssm_scan_ref


def applies(x: torch.Tensor) -> bool:
    """Whether a layer's CPU fast path may run on ``x``."""
    return fastpath.enabled() and x.device.type == "cpu" and not torch.is_grad_enabled()


def derived(module: nn.Module, params: tuple, make, key: str = "_cpu_derived"):
    """``make(*params)`` cached on ``module`` (under ``key``: a module can keep several) until one
    of ``params`` changes (another tensor, or an in-place write: its version counter moves;
    inference tensors have none, so an in-place write to one made inside
    ``torch.inference_mode`` goes unseen)."""
    cached = module.__dict__.get(key)
    if cached is not None:
        old, value, tracked, versions = cached
        if (len(old) == len(params) and all(map(operator.is_, old, params))
                and [p._version for p in tracked] == versions):  # fmt: skip
            return value
    value = make(*params)
    tracked = [p for p in params if p is not None and not p.is_inference()]
    module.__dict__[key] = (params, value, tracked, [p._version for p in tracked])
    return value


def project(module: nn.Module, x: torch.Tensor, weights: tuple, bias) -> torch.Tensor | None:
    """``x @ cat(weights).T (+ bias)`` through the CPU kernel ``ops.linear_cpu`` (its padded
    K-major weight made once per weight version and cached on ``module``), or None where the
    kernel does not apply (not built or turned off, or not all float32). Where float32 matmuls
    may run in bfloat16 (``torch.set_float32_matmul_precision("medium")``) and the CPU has
    AVX512_BF16, by bfloat16 dot products instead (``linear_cpu.linear_dot_cpu``: x rounded to
    bfloat16; its weight layout cached beside the other)."""
    C = _ext.cpu_kernels()
    if C is None or x.dtype != torch.float32 or weights[0].dtype != torch.float32:
        return None
    if bias is not None and bias.dtype != torch.float32:
        return None
    dot = linear_cpu.dot_allowed()
    if dot:
        layout, run = linear_cpu.k_pairs, linear_cpu.run_dot
    else:
        layout, run = linear_cpu.k_major, linear_cpu.run
    weight, n = derived(
        module, (*weights, bias),
        lambda *_: (layout(torch.cat(weights)), sum(w.shape[0] for w in weights)),
        key="_cpu_dot_weight" if dot else "_cpu_kernel_weight",
    )  # fmt: skip
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < shape[-1]):
        rows = rows.contiguous()
    return run(C, rows, weight, bias, n, (*shape[:-1], n))


def _mamba_constants(A_log, dt_bias, D, conv_weight, conv_bias):
    stacked = conv_weight.float()[:, 0].t().contiguous()  # (K, conv_dim), time-major
    bias = None if conv_bias is None else conv_bias.float()
    return -torch.exp(A_log.float()), dt_bias.float(), D.float(), stacked.unbind(0), bias, stacked


def conv_taps(window: torch.Tensor, taps, bias, n: int) -> torch.Tensor:
    """The depthwise causal conv over time-major windows: window (b, K - 1 + n, C) fp32, taps K x
    (C,), bias (C,) or None -> (b, n, C) fp32. Bias first, then each tap in order as one fused
    multiply-add: bitwise what F.conv1d's oneDNN depthwise kernel computes on the CPU."""
    out = window[:, :n] * taps[0] if bias is None else torch.addcmul(bias, window[:, :n], taps[0])
    for k in range(1, len(taps)):
        out = torch.addcmul(out, window[:, k : k + n], taps[k])
    return out


def _constants(mixer):
    return derived(
        mixer, (mixer.A_log, mixer.dt_bias, mixer.D, mixer.conv1d.weight, mixer.conv1d.bias),
        _mamba_constants,
    )  # fmt: skip


def _conv_and_dt(cfg, constants, conv_state, xBC, dt):
    """The mixer's steps between in_proj and the scan over n tokens (``constants``: the layer's
    :func:`_constants`): (history (b, K + n, conv_dim): the state's K raw columns then the new
    ones, time-major; silu(conv) (b, n, conv_dim) in xBC's dtype; dt (b, n, H) fp32, softplus'ed
    and clamped)."""
    _, dt_bias, _, taps, conv_bias, _ = constants
    n = xBC.shape[1]
    conv_state = conv_state if conv_state.dtype == xBC.dtype else conv_state.to(xBC.dtype)
    history = torch.cat([conv_state.transpose(1, 2), xBC], dim=1)
    fp32 = xBC.dtype == torch.float32
    window = history[:, 1:] if fp32 else history[:, 1:].float()
    out = F.silu(conv_taps(window, taps, conv_bias, n))
    if not fp32:
        out = out.to(xBC.dtype)
    dt = F.softplus((dt if fp32 else dt.float()) + dt_bias)
    lo, hi = cfg.time_step_limit
    if lo > 0.0 or hi != float("inf"):
        dt = dt.clamp(lo, hi)
    return history, out, dt


def _conv_state_at(history: torch.Tensor, ends: torch.Tensor, K: int) -> torch.Tensor:
    """The conv state after each row's first ``ends`` (b,) new tokens: the K raw columns of
    ``history`` (b, K + n, conv_dim) that end there, channel-major (b, conv_dim, K)."""
    b, _, conv_dim = history.shape
    rows = ends[:, None] + torch.arange(K)[None, :]  # (b, K)
    return history.gather(1, rows[:, :, None].expand(b, K, conv_dim)).transpose(1, 2)


def _kernel_weights(mixer) -> MambaWeights:
    """The layer's constants for the fused kernel, checked and cached per weight version."""
    cfg = mixer.cfg

    def make(A_log, dt_bias, D, conv_weight, conv_bias, norm_weight):
        A, dt_bias, D, _, bias, taps = _mamba_constants(A_log, dt_bias, D, conv_weight, conv_bias)
        return mamba_weights(
            taps, bias, dt_bias.contiguous(), A.contiguous(), D.contiguous(),
            norm_weight.float().contiguous(), heads=cfg.mamba_num_heads, groups=cfg.n_groups,
            eps=cfg.layer_norm_epsilon, time_step_limit=cfg.time_step_limit,
        )  # fmt: skip

    # Straight from the modules' parameter dicts: nn.Module attribute lookups would cost more
    # than the kernel on a one-token step.
    own, conv = mixer._parameters, mixer._modules["conv1d"]._parameters
    params = (own["A_log"], own["dt_bias"], own["D"], conv["weight"], conv["bias"],
              mixer._modules["norm"]._parameters["weight"])  # fmt: skip
    return derived(mixer._modules["norm"], params, make)


def _kernel_middle(mixer, zxbcdt, state, n_valid, with_output: bool):
    """The mixer's middle through the fused CPU kernel (``ops.mamba_cpu``): (gated normed y or
    None, new conv state, new SSM state)."""
    if n_valid is not None and n_valid.dtype != torch.int64:
        n_valid = n_valid.long()
    return mamba_chunk(
        zxbcdt.contiguous(),
        state.conv.contiguous(),
        state.gathered().contiguous(),
        _kernel_weights(mixer),
        n_valid,
        with_output,
    )


def _kernel_applies(mixer, x: torch.Tensor, state) -> bool:
    return (mamba_cpu.available(x) and state.conv.dtype == torch.float32
            and mixer.norm.weight.dtype == torch.float32)  # fmt: skip


def mamba_forward(mixer, h: torch.Tensor, state, n_valid, keep_state: bool):
    """:meth:`Mamba2Mixer.forward` on the CPU (same arguments and results): through the fused
    kernel where it is built (fp32; float32 rounding), else in PyTorch ops (bitwise)."""
    from .mamba import MambaState

    cfg = mixer.cfg
    b, n, _ = h.shape
    H, P, N, G = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, cfg.n_groups
    d_inner, conv_dim = cfg.mamba_d_inner, cfg.mamba_conv_dim
    zxbcdt = mixer.in_proj(h)
    if _kernel_applies(mixer, zxbcdt, state):
        y, new_conv, new_ssm = _kernel_middle(mixer, zxbcdt, state, n_valid, True)
        out = mixer.out_proj(y)
        if mixer.tp is not None:
            out = mixer.tp.all_reduce(out)
        return out, (MambaState(new_conv, new_ssm) if keep_state else None)
    _ext.stream_wait()  # PyTorch ops from here on (the kernels' stream)
    constants = _constants(mixer)
    A, _, D, taps, _, _ = constants
    z, xBC, dt = torch.split(zxbcdt, [d_inner, conv_dim, H], dim=-1)
    if n_valid is not None:
        valid = torch.arange(n)[None, :] < n_valid[:, None]  # (b, n)
        xBC = xBC.masked_fill(~valid[..., None], 0.0)  # padding: nothing for later convs
    history, xBC, dt = _conv_and_dt(cfg, constants, state.conv, xBC, dt)
    fp32 = h.dtype == torch.float32
    x, Bm, Cm = torch.split(xBC, [d_inner, G * N, G * N], dim=-1)
    if not fp32:
        x, Bm, Cm = x.float(), Bm.float(), Cm.float()
    x = x.reshape(b, n, H, P)
    y, new_ssm = ssm_scan_ref(x, dt, A, Bm.reshape(b, n, G, N), Cm.reshape(b, n, G, N), D,
                              state.gathered(), n_valid)  # fmt: skip
    y = y.reshape(b, n, d_inner)
    if not fp32:
        y = y.to(h.dtype)
    y = rms_norm(y, mixer.norm.weight, cfg.layer_norm_epsilon, gate=z, group_size=d_inner // G)
    out = mixer.out_proj(y)
    if mixer.tp is not None:
        out = mixer.tp.all_reduce(out)
    if not keep_state:
        return out, None
    if n_valid is None:
        new_conv = history[:, n:].transpose(1, 2)
    else:  # each row keeps the K columns that end at its last real token
        new_conv = _conv_state_at(history, n_valid, len(taps))
    return out, MambaState(new_conv, new_ssm)


def mamba_replay(mixer, before, zxbcdt: torch.Tensor, keep: torch.Tensor):
    """The verified mode's rollback of one Mamba layer on the CPU (``model.rollback._replay``):
    the state :func:`mamba_forward` leaves over the block whose in_proj output is ``zxbcdt`` (b,
    S, in_proj_dim) with ``n_valid = keep`` (b,), bitwise, from ``before``. With the kernel: its
    state-only call (the forward's own code), which stops at each row's kept run. Without: the
    conv and the elementwise maps run over the whole block as in the forward (a vectorised kernel
    rounds its last partial vector differently, so a shorter run would change bits); the
    recurrence runs only up to the longest kept run, as the fast scan does it (``state * decay``
    then ``+ input``, each rounded once), and nothing of the output (C, y, the gate, the norm) is
    computed."""
    from .mamba import MambaState

    cfg = mixer.cfg
    H, P, N, G = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, cfg.n_groups
    d_inner, conv_dim = cfg.mamba_d_inner, cfg.mamba_conv_dim
    if _kernel_applies(mixer, zxbcdt, before):
        _, conv, ssm = _kernel_middle(mixer, zxbcdt, before, keep, False)
        return MambaState(conv, ssm)
    constants = _constants(mixer)
    A, _, _, taps, _, _ = constants
    b, S, _ = zxbcdt.shape
    _, xBC, dt = torch.split(zxbcdt, [d_inner, conv_dim, H], dim=-1)
    history, xBC, dt = _conv_and_dt(cfg, constants, before.conv, xBC, dt)
    fp32 = zxbcdt.dtype == torch.float32
    dt = dt.masked_fill(~(torch.arange(S)[None, :] < keep[:, None])[..., None], 0.0)
    decay = torch.exp(dt * A)
    n = int(keep.max())  # past it every row carries its state unchanged: stop there
    x, Bm = xBC[:, :n, :d_inner], xBC[:, :n, d_inner : d_inner + G * N]
    if not fp32:
        x, Bm = x.float(), Bm.float()
    dtx = dt[:, :n, :, None] * x.reshape(b, n, H, P)
    Bh = Bm.reshape(b, n, G, N).repeat_interleave(H // G, dim=2)
    inputs = (dtx[..., None] * Bh[:, :, :, None, :]).transpose(0, 1)  # (n, b, H, P, N)
    decay = decay[:, :n].transpose(0, 1)[..., None, None]  # (n, b, H, 1, 1)
    state = before.ssm.clone() if n == 0 else before.ssm
    for i in range(n):
        state = state * decay[i]
        state.add_(inputs[i])
    return MambaState(_conv_state_at(history, keep, len(taps)), state)


def router_forward(router, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`Router.forward` with its float64 weight and bias converted once."""
    cfg = router.cfg
    weight, bias = derived(router, (router.weight, router.e_score_correction_bias),
                           lambda w, e: (w.double(), e.double()))  # fmt: skip
    scores = torch.sigmoid(F.linear(x.double(), weight))
    expert_ids = torch.topk(scores + bias, cfg.num_experts_per_tok, dim=-1).indices
    weights = scores.gather(1, expert_ids)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return expert_ids, (weights * cfg.routed_scaling_factor).float()


def _moe_params(moe) -> tuple:
    """The MoE's parameters in a fixed order, from the modules' dicts (nn.Module attribute
    lookups would cost more than the kernel on a one-token step): router weight and bias, then
    every expert's up and down weight, then the shared expert's (if any)."""
    gate = moe._modules["gate"]._parameters
    params = [gate["weight"], gate["e_score_correction_bias"]]
    experts = list(moe._modules["experts"]._modules.values())
    if "shared_experts" in moe._modules:
        experts.append(moe._modules["shared_experts"])
    for mlp in experts:
        for proj in ("up_proj", "down_proj"):
            linear = mlp._modules[proj]
            params += [linear._parameters["weight"], linear._parameters.get("bias")]
    return tuple(params)


def moe_forward(moe, h: torch.Tensor) -> torch.Tensor | None:
    """:meth:`MoE.forward` through the fused CPU kernel (``ops.moe_cpu``; float32 rounding), or
    None where the kernel does not serve this MoE: it takes fp32 activations, unbiased fp32
    experts (no FP8), no tensor parallelism, and experts small enough to copy K-major (as the fast
    Linear). Which MoEs it serves is decided with the weights, once per weight version. Where
    float32 matmuls may run in bfloat16 (``linear_cpu.dot_allowed``), the experts run by bfloat16
    dot products (``moe_cpu.dot_weights``) if their sizes are multiples of 16."""
    if moe.tp is not None or h.dtype != torch.float32 or _ext.cpu_kernels() is None:
        return None
    cfg = moe.cfg

    def make(router, bias, *rest):
        from .linear import FAST_LINEAR_MAX_BYTES

        weights, biases = rest[0::2], rest[1::2]
        n = cfg.n_routed_experts
        if any(b is not None for b in biases) or any(w.dtype != torch.float32 for w in weights):
            return None
        if 2 * n * weights[0].numel() * 4 > FAST_LINEAR_MAX_BYTES:
            return None
        up = torch.stack(weights[0 : 2 * n : 2])
        down = torch.stack(weights[1 : 2 * n : 2])
        shared = weights[2 * n :] or (None, None)
        return moe_weights(router, bias, up, down, *shared, top_k=cfg.num_experts_per_tok,
                           norm_topk_prob=cfg.norm_topk_prob,
                           routed_scaling_factor=cfg.routed_scaling_factor)  # fmt: skip

    params, weights = _moe_params(moe), None
    if linear_cpu.dot_allowed():  # the experts by bfloat16 dot products, where sizes allow
        weights = derived(moe, params, lambda *p: _dot_moe(make(*p)), key="_cpu_dot_weight")
    if weights is None:
        weights = derived(moe, params, make)
    if weights is None:
        return None
    shape = h.shape
    return moe_kernel(h.reshape(-1, shape[-1]).contiguous(), weights).reshape(shape)


def _dot_moe(weights):
    return None if weights is None else moe_dot_weights(weights)


def _tree_params(module: nn.Module) -> list:
    """``module.parameters()`` from the modules' dicts (the generator and nn.ParameterList's
    indexing cost tens of microseconds a step)."""
    params = [p for p in module._parameters.values() if p is not None]
    for child in module._modules.values():
        params += _tree_params(child)
    return params


def stacked_tables(lm) -> torch.Tensor:
    """The denoiser's per-layer ``scale_shift_tables`` as one (layers, 3, hidden) tensor."""
    tables = tuple(lm._modules["scale_shift_tables"]._parameters.values())
    return derived(lm, tables, lambda *t: torch.stack(t))


def modulation(lm, t: torch.Tensor) -> torch.Tensor:
    """The denoiser's per-layer modulation for t (b,): (layers, b, 3, hidden), ``stacked_tables +
    time_embedding(t)``. Without the CPU kernels: one time embedding of the batch (the eager
    path's numbers, bitwise). With them: t only takes the values k / S, so each value's
    modulation is made once per weight version, from a one-row time embedding, and looked up
    (a row's numbers then never depend on the other rows; a batched time embedding can differ
    from the one-row one by float32 rounding)."""
    tables = stacked_tables(lm)
    if _ext.cpu_kernels() is None:
        return tables[:, None] + lm.time_embedding(t)
    # Keyed on the stacked tables (a new tensor whenever a table changes) and the time
    # conditioning's own parameters, one table per kind of projection (the time embedding's
    # projections are bfloat16 dot products where linear_cpu.dot_allowed(): a value made under
    # one precision is not served under the other).
    modules = lm._modules
    params = (tables, *_tree_params(modules["t_embedder"]), *_tree_params(modules["t_block"]))
    key = "_cpu_modulation_dot" if linear_cpu.dot_allowed() else "_cpu_derived"
    by_value = derived(modules["t_block"], params, lambda *_: {}, key=key)
    rows = []
    for value in t.tolist():
        row = by_value.get(value)
        if row is None:
            if len(by_value) >= 4 * 64:  # t was not k / S for a small S: keep the cache small
                by_value.clear()
            one = torch.tensor([value], dtype=t.dtype)
            row = by_value[value] = tables + lm.time_embedding(one)[0]  # (layers, 3, hidden)
        rows.append(row)
    return torch.stack(rows, dim=1)


def tower_forward(tower, ids, cache, prefix_len, mamba_states, append, n_valid, modulation,
                  outputs=True, rows=None):  # fmt: skip
    """:meth:`Tower.forward` on the CPU (same arguments and results): the norms called directly,
    and the denoiser's ``1 + scale`` made once for every layer (``modulation`` as a (layers, b,
    3, hidden) tensor or a list of (b, 3, hidden)). The eager numbers, bitwise, except where the
    CPU kernels are built and the tower is fp32: then every norm is one kernel call
    (``ops.rmsnorm.rms_norm_cpu``, the denoiser's modulated ones ``modulated_rms_norm_cpu``) and
    each residual update one kernel call too (``x + gate * out`` as one fused multiply-add,
    float32 rounding). With the kernels' stream on (``_ext.cpu_stream``), the layers' kernel calls
    are queued on its thread while this one goes on to the next layer's Python; the result is
    waited for before it is returned (the same numbers)."""
    eps = tower.cfg.layer_norm_epsilon
    x = tower.embeddings(ids)
    if rows is not None and tower.last_mixer < 0:  # no layer mixes positions
        x = x.index_select(1, rows)
    fused = False
    kernels = _ext.cpu_kernels() is not None and x.dtype == torch.float32
    norm = rms_norm_cpu if kernels else rms_norm
    if modulation is not None:
        if not isinstance(modulation, torch.Tensor):
            modulation = torch.stack(modulation)
        fused = kernels and modulation.dtype == torch.float32
        if fused:  # (layers, b, hidden) each, contiguous, for the kernel
            shifts, scales = modulation[:, :, 0].contiguous(), 1 + modulation[:, :, 1]
            gates = modulation[:, :, 2, None]  # (layers, b, 1, hidden)
        else:
            shifts, scales, gates = modulation[:, :, :, None].unbind(2)  # (layers, b, 1, hidden)
            scales = 1 + scales
    stream = kernels and (fused or modulation is None) and _streamable(tower)
    ahead = STREAM_AHEAD if ids.numel() >= STREAM_BOUND_ROWS else None
    with _ext.cpu_stream(ahead) if stream else _NO_STREAM:
        new_states = {}
        for i, block in enumerate(tower.layers):
            kind = block.kind
            if modulation is None:
                h = norm(x, block.norm.weight, eps)
            elif fused:  # (the kernel refuses a norm weight that is not fp32)
                h = modulated_rms_norm_cpu(x, block.norm.weight, scales[i], shifts[i], eps,
                                           post=kind == "moe" or kind == "mlp")  # fmt: skip
            elif kind == "moe" or kind == "mlp":
                h = rms_norm(x, block.norm.weight, eps) * scales[i] + shifts[i]
            else:
                h = rms_norm(x * scales[i] + shifts[i], block.norm.weight, eps)
            mixed = tower.mix(i, block, h, x, cache, prefix_len, mamba_states, append, n_valid,
                              outputs, rows, new_states)  # fmt: skip
            if mixed is None:
                break
            out, x = mixed
            if modulation is None:
                x = residual_add_cpu(x, out, None) if kernels else x + out
            elif fused:
                x = residual_add_cpu(x, out, gates[i])
            else:
                x = x + gates[i] * out
        if not outputs:
            return None, new_states
        return norm(x, tower.norm_f.weight, eps), new_states


_NO_STREAM = contextlib.nullcontext()

# A forward of at least STREAM_BOUND_ROWS positions queues at most STREAM_AHEAD kernel calls
# ahead of the stream's worker (``_ext.cpu_stream``'s max_ahead). Measured on the 2-core VM
# (mask diffusion at gamma 0.8, the default model, alternating A/B): at batch 64 (1,024 rows) a
# bound of 4 ran 1.36x as fast as none and 8 1.27x; at batch 4 (64 rows) 4 ran 0.88x and 8 0.93x,
# at batch 1 (16 rows) 4 ran 0.92x: the Python is the slower side there, and a wait only costs.
STREAM_BOUND_ROWS = 256
STREAM_AHEAD = 4


def _streamable(tower) -> bool:
    """Whether ``tower``'s layers take the CPU kernels alone, so that their calls may be queued
    on the kernels' stream: no tensor parallelism (its all-reduce is a PyTorch op that would
    read a queued kernel's output), no Mamba layer on its PyTorch scans (a training chunk size,
    a tensor-parallel norm). (The PyTorch paths that remain possible wait for the stream first:
    ``_ext.stream_wait`` in Linear, MoE, the attention's and the Mamba mixer's PyTorch paths.)"""
    for block in tower.layers:
        mixer = block.mixer
        if getattr(mixer, "tp", None) is not None or getattr(mixer, "scan_chunk", 0):
            return False
        if getattr(mixer, "tp_norm", None) is not None:
            return False
    return True


def head_rows_apply(x: torch.Tensor) -> bool:
    """Whether :func:`head_rows` may run on hidden states like ``x`` (or on the head's weight,
    their dtype and device): the head goes through the CPU kernel, whose rows are computed alone
    (so a subset of rows gives those rows' bits)."""
    return applies(x) and _ext.cpu_kernels() is not None and x.dtype == torch.float32


def needed_positions(needed: torch.Tensor) -> torch.Tensor | None:
    """The block positions that some row of ``needed`` (b, S) needs, ascending (n',) int64, or
    None where that is all of them or none (then nothing is left out)."""
    cols = needed.any(dim=0).nonzero().squeeze(1)
    return None if cols.numel() in (0, needed.shape[1]) else cols


def head_rows(head: nn.Module, hidden: torch.Tensor, needed: torch.Tensor,
              cols: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The head's fp32 logits at the ``needed`` (b, S) positions, zeros elsewhere: the
    denoiser's logits where the decision reads them (its masked positions; an average denoising
    step has about half its block still masked). ``hidden`` (b, S, H), or with ``cols`` (n',)
    (:func:`needed_positions`) the hidden states at those positions alone, (b, n', H). Bitwise
    the full head's logits at those positions (:func:`head_rows_apply`)."""
    b, S = needed.shape
    H = hidden.shape[-1]
    sub = needed if cols is None else needed.index_select(1, cols)  # (b, n')
    flat = sub.reshape(-1)
    count = int(flat.sum())
    if count == needed.numel():
        return head(hidden)
    out = hidden.new_zeros(b * S, head.out_features)
    if count:
        rows = flat.nonzero().squeeze(1)
        logits = head(hidden.reshape(-1, H).index_select(0, rows))
        if cols is not None:  # row r's j-th kept position is block position cols[j]
            grid = torch.arange(b)[:, None] * S + cols[None, :]
            rows = grid.reshape(-1).index_select(0, rows)
        out.index_copy_(0, rows, logits)
    return out.view(b, S, -1)


def qkv(attention, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The q, k and v projections of ``h`` (b, n, hidden) as one projection by their weights
    side by side: through the CPU kernel where it applies, else one matmul by their K-major copy
    (made once per weight version); unbiased full-precision projections only."""
    projections = (attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight)
    sizes = [p.shape[0] for p in projections]
    out = project(attention, h, projections, None)
    if out is None:
        weight = derived(attention, projections, lambda *w: torch.cat(w).t().contiguous())
        out = torch.mm(h.reshape(-1, h.shape[-1]), weight).view(*h.shape[:-1], -1)
    return torch.split(out, sizes, dim=-1)
