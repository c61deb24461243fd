"""Standard train/val/test splits of the LTSF benchmarks (Time-Series-Library protocol).

ETTh: 12/4/4 months of 30 days (train rows 0:8640, val 8640:11520, test 11520:14400; later rows
are unused). ETTm: the same x4. Other sets ("custom"): 70/10/20 with ``train = int(0.7 n)``,
``test = int(0.2 n)``, ``val = n - train - test``. As in TSLib the val and test slices start
``input_size`` rows early, so their first window has a full look-back, and the scaler is fit on the
train rows only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from titans_memory.errors import ConfigError, DatasetError
from titans_ts.datasets import dataset_info

__all__ = ["Borders", "Scaler", "Split", "split", "split_borders"]

_ETT_UNITS = {"ett_hour": 1, "ett_minute": 4}  # rows per hour


@dataclass(frozen=True)
class Borders:
    """Row ranges ``(start, stop)`` of each split (TSLib ``border1s`` / ``border2s``)."""

    train: tuple[int, int]
    val: tuple[int, int]
    test: tuple[int, int]


def split_borders(name: str, n_rows: int, input_size: int = 0) -> Borders:
    """Returns the TSLib borders of dataset ``name`` with ``n_rows`` rows. With ``input_size=0``
    they are the rows whose targets belong to each split; otherwise val and test start
    ``input_size`` rows earlier (the look-back prefix)."""
    if int(input_size) != input_size or input_size < 0:
        raise ConfigError(f"input_size must be a non-negative integer, got {input_size!r}")
    info = dataset_info(name)
    kind = info["split"]
    if kind in _ETT_UNITS:
        month = 30 * 24 * _ETT_UNITS[kind]
        ends = (12 * month, 16 * month, 20 * month)
    elif kind == "custom":
        num_train, num_test = int(n_rows * 0.7), int(n_rows * 0.2)
        ends = (num_train, n_rows - num_test, n_rows)
    else:
        raise DatasetError(f"{info['name']}: unknown split kind {kind!r} in the manifest")
    if n_rows < ends[2] or not 0 < ends[0] < ends[1] < ends[2]:
        raise DatasetError(f"{info['name']}: {n_rows} rows are too few for the {kind} split "
                           f"(needs {ends[2]} rows, every split non-empty)")
    if input_size > ends[0]:
        raise ConfigError(f"{info['name']}: input_size {input_size} is longer than the train "
                          f"split ({ends[0]} rows)")
    return Borders((0, ends[0]), (ends[0] - input_size, ends[1]), (ends[1] - input_size, ends[2]))


@dataclass(frozen=True)
class Scaler:
    """Per-column z-scoring, ``(x - mean) / std`` (population std, as sklearn's
    StandardScaler; a zero std is replaced by 1)."""

    columns: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, frame: pd.DataFrame) -> "Scaler":
        """Returns a scaler fit on the numeric columns (all but ``date``) of ``frame``."""
        cols = tuple(c for c in frame.columns if c != "date")
        values = frame[list(cols)].to_numpy(np.float64)
        std = values.std(axis=0)
        return cls(cols, values.mean(axis=0), np.where(std > 0, std, 1.0))

    def _apply(self, x, fn):
        if isinstance(x, pd.DataFrame):
            out = x.copy()
            out[list(self.columns)] = fn(x[list(self.columns)].to_numpy(np.float64))
            return out
        return fn(np.asarray(x, dtype=np.float64))

    def transform(self, x):
        """Returns ``x`` z-scored: a copy of a DataFrame (``date`` kept), or an array
        ``(..., n_columns)``."""
        return self._apply(x, lambda v: (v - self.mean) / self.std)

    def inverse_transform(self, x):
        """Returns ``x`` mapped back to the original units (DataFrame copy or array)."""
        return self._apply(x, lambda v: v * self.std + self.mean)


@dataclass(frozen=True)
class Split:
    """The three slices of a dataset (val/test including the look-back prefix), their borders
    and the scaler fit on the train rows."""

    name: str
    input_size: int
    borders: Borders
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    scaler: Scaler

    def arrays(self, scaled: bool = True, dtype=np.float32) -> dict[str, np.ndarray]:
        """Returns ``{"train", "val", "test"}`` -> array ``(rows, n_columns)`` of the numeric
        columns, z-scored with the train scaler when ``scaled``."""
        out = {}
        for key in ("train", "val", "test"):
            frame = getattr(self, key)
            values = frame[list(self.scaler.columns)].to_numpy(np.float64)
            out[key] = (self.scaler.transform(values) if scaled else values).astype(dtype)
        return out


def split(df: pd.DataFrame, name: str, input_size: int) -> Split:
    """Returns the standard :class:`Split` of ``df`` (a frame from ``titans_ts.datasets.load``)
    for dataset ``name`` with look-back ``input_size``."""
    b = split_borders(name, len(df), input_size)
    train, val, test = (df.iloc[start:stop] for start, stop in (b.train, b.val, b.test))
    return Split(dataset_info(name)["name"], int(input_size), b, train, val, test,
                 Scaler.fit(train))
