"""twotower_rt: a runtime for two-tower mask-diffusion language models.

import twotower_rt
model = twotower_rt.load("path/to/checkpoint")      # or a hub id "org/name"; GPU and dtype "auto"
out = model.generate(["Once upon a time"], mode="mask_diffusion", max_new_tokens=64)
out.texts, out.sequences, out.nfe                   # token ids in ([[1, 2, 3]]) work too
engine = twotower_rt.Engine(model, max_slots=64)    # requests at any time, continuous batching
"""

from .api import TwoTowerModel, load
from .checkpoint import CheckpointError
from .config import ConfigError, TwoTowerConfig
from .engine import Engine
from .generate import GenerationOutput
from .hub import ModelNotFoundError
from .params import MODES, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Engine",
    "GenerationOutput",
    "MODES",
    "ModelNotFoundError",
    "SamplingParams",
    "TwoTowerConfig",
    "TwoTowerModel",
    "__version__",
    "load",
]
