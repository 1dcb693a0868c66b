"""Tower placement: the context tower on one device, the denoiser on another (the published
2 x H100 setup).

:func:`place_towers` moves the context tower and its head to ``context_device`` and the denoiser,
its head and the time conditioning to ``denoiser_device``. An :class:`~twotower_rt.engine.Engine`
over the placed model keeps the cache pool on the context tower's device and a mirror of it on the
denoiser's: every context forward (prefill chunks, AR / mock-AR tokens, committed blocks) hands
the rows it wrote (their new K/V positions, Mamba states and lengths) to the mirror, device to
device, and the denoiser reads only the mirror. The engine launches both devices' work without
waiting between them, so the denoiser steps of some sequences overlap the context passes of
others. bench/projection.py projects what it gains over one GPU and against TP = 2 (on this model
little: a block's denoiser forwards outweigh its one context pass).
"""

from __future__ import annotations

import torch


def place_towers(model, context_device, denoiser_device):
    """Place ``model`` (a TwoTowerModel or TwoTowerLM) across two devices, in place; returns it."""
    lm = model.lm if hasattr(model, "lm") else model
    if getattr(lm, "tp", None) is not None:
        raise ValueError("tower placement and tensor parallelism do not combine yet")
    ctx, dn = torch.device(context_device), torch.device(denoiser_device)
    lm.context_tower.to(ctx)
    lm.context_lm_head.to(ctx)
    for module in (lm.denoiser_tower, lm.lm_head, lm.t_embedder, lm.t_block):
        module.to(dn)
    lm.scale_shift_tables.to(dn)
    lm.placed = True
    return model
