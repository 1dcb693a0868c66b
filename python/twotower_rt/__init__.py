"""twotower_rt: a runtime for two-tower mask-diffusion language models.

import twotower_rt
model = twotower_rt.load("path/to/checkpoint", device="cuda", dtype="bfloat16")
out = model.generate([[1, 2, 3]], mode="mask_diffusion", max_new_tokens=64)
out.sequences, out.nfe
"""

from .api import TwoTowerModel, load
from .checkpoint import CheckpointError
from .config import ConfigError, TwoTowerConfig
from .generate import MODES, GenerationOutput, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "GenerationOutput",
    "MODES",
    "SamplingParams",
    "TwoTowerConfig",
    "TwoTowerModel",
    "__version__",
    "load",
]
