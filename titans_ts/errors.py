"""Errors raised on bad forecasting input.

All derive from :class:`titans_memory.errors.DataError` (itself a ``ValueError``), so
``except DataError`` catches every one of them. Each message names the series and the problem,
and says how to repair it.
"""

from __future__ import annotations

from titans_memory.errors import ConfigError, DataError, NotFittedError

__all__ = [
    "ColumnError",
    "ConfigError",
    "DataError",
    "DuplicateTimestampsError",
    "FrequencyError",
    "IrregularTimestampsError",
    "MissingValuesError",
    "NonNumericError",
    "NotFittedError",
    "SeriesTooShortError",
]


class ColumnError(DataError, KeyError):
    """A required column is missing, or the frame's layout (long / wide) cannot be recognised."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class MissingValuesError(DataError):
    """A series has missing values (NaN / null) and ``nan_policy="error"``."""


class NonNumericError(DataError):
    """A target or covariate column holds values that are not numbers."""


class DuplicateTimestampsError(DataError):
    """A series has the same timestamp more than once."""


class IrregularTimestampsError(DataError):
    """A series' timestamps are not on a regular grid of the (given or inferred) frequency."""


class FrequencyError(DataError):
    """The frequency cannot be inferred, is unknown, or differs between series."""


class SeriesTooShortError(DataError):
    """A series is shorter than the model needs (``input_size + h``, plus ``val_size``)."""
