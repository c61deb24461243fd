"""Titans neural long-term memory (Behrouz, Zhong, Mirrokni, arXiv 2501.00663).

The backbone shared by :mod:`titans_ts` (forecasting) and :mod:`titans_genomics` (DNA):

- :class:`NeuralMemory`: the memory layer (LMM) with momentum, forgetting and a per-head MLP;
- :mod:`titans_memory.ops`: the token-by-token reference and the chunked parallel form;
- :class:`TitansBackbone` with the ``LMM``, ``MAC``, ``MAG`` and ``MAL`` blocks;
- :class:`TitansConfig` / :class:`MemoryConfig`: typed configuration.
"""

from .backbone import TitansBackbone
from .blocks import LMM, MAC, MAG, MAL, TitansBlock
from .config import MemoryConfig, TitansConfig
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DatasetError,
    NotFittedError,
    ShapeError,
    StateError,
    TitansError,
)
from .memory import NeuralMemory
from .state import BackboneState, MemoryState

__version__ = "0.1.0"

__all__ = [
    "LMM", "MAC", "MAG", "MAL", "BackboneState", "CheckpointError", "ConfigError", "DataError",
    "DatasetError", "MemoryConfig", "MemoryState", "NeuralMemory", "NotFittedError", "ShapeError",
    "StateError", "TitansBackbone", "TitansBlock", "TitansConfig", "TitansError",
]
