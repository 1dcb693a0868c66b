"""Ops: one function per kernel family, each with its plain-PyTorch ``*_ref`` beside it."""

from twotower_rt.ops.rmsnorm import rms_norm, rms_norm_backend, rms_norm_ref

# Op name -> backend(device, dtype) -> (backend, reason). twotower_rt.env reports each entry; a new
# kernel family adds its own.
OP_BACKENDS = {
    "rms_norm": rms_norm_backend,
}

__all__ = ["OP_BACKENDS", "rms_norm", "rms_norm_backend", "rms_norm_ref"]
