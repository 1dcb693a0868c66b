"""The two-tower model in PyTorch: one implementation used by every mode and every device."""

from .cache import ContextCache
from .mamba import MambaState
from .tower import TwoTowerLM

__all__ = ["ContextCache", "MambaState", "TwoTowerLM"]
