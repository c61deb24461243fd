"""Exception types shared by every part of the library.

Every error the library raises on bad input derives from :class:`TitansError`, so callers can
catch the library's own failures without catching unrelated bugs. Each subclass also derives
from the built-in exception a Python user would expect (``ValueError``, ``KeyError``...).
"""

from __future__ import annotations


class TitansError(Exception):
    """Base class of every error raised by titans_memory, titans_ts and titans_genomics."""


class ConfigError(TitansError, ValueError):
    """A configuration value is out of range or inconsistent with another one."""


class ShapeError(TitansError, ValueError):
    """A tensor or array has the wrong shape, dtype or length."""


class StateError(TitansError, ValueError):
    """A carried :class:`~titans_memory.state.MemoryState` does not fit the input or the model."""


class NotFittedError(TitansError, AttributeError):
    """A method needing a fitted estimator was called before ``fit``."""


class DataError(TitansError, ValueError):
    """Input data are malformed (missing values, bad timestamps, unknown symbols, ...)."""


class DatasetError(TitansError, OSError):
    """A dataset cannot be found, downloaded, or fails its checksum / shape validation."""


class CheckpointError(TitansError, OSError):
    """A saved model or training checkpoint is missing, corrupt, or of an incompatible version."""


class BarrierTimeout(TitansError, RuntimeError):
    """A head barrier of the persistent GPU kernels gave up waiting (the programs of a head were
    not all resident at once): the results of that call are wrong. With ``check=True`` they were
    not returned; with the default ``check="async"`` they were returned as NaN and this is raised
    at the next call (:mod:`titans_memory.ops.barrier_check`). Run it again, or with
    ``persistent=False`` (one launch per phase, no barriers)."""
