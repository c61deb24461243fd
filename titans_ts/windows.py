"""Training / validation windows over a panel, as a map-style dataset plus a gathering collate.

The scaled series are stored once in a flat tensor ``data`` ``[N, S, F]``: with aligned series
(identical timestamps) one block of ``S`` series, otherwise the series one after the other with
``S = 1``. A window is identified by its absolute start row; the dataset yields start rows and
:class:`WindowCollate` gathers a whole batch with one indexing operation, so loading costs
nothing next to the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["Group", "WindowStore", "WindowDataset", "WindowCollate"]


@dataclass
class Group:
    """Rows ``[offset, offset + length)`` of the flat store hold the series ``series``."""

    series: List[int]
    offset: int
    length: int


class WindowStore:
    """The flat tensor of scaled series and the groups in it.

    Args:
        values: per group, ``float [T_g, S, F]``.
        observed: per group, ``bool [T_g, S]`` (False = missing target), or None.
        series: per group, the indices of its series.
    """

    def __init__(self, values: Sequence[np.ndarray], series: Sequence[List[int]], observed: Optional[Sequence[np.ndarray]] = None) -> None:
        self.groups: List[Group] = []
        offset = 0
        for v, s in zip(values, series):
            self.groups.append(Group(list(s), offset, len(v)))
            offset += len(v)
        self.data = torch.from_numpy(np.ascontiguousarray(np.concatenate(values, axis=0), dtype=np.float32))
        self.observed = None
        if observed is not None:
            self.observed = torch.from_numpy(np.ascontiguousarray(np.concatenate(observed, axis=0)))

    def starts(self, window: int, first: Sequence[int], last: Sequence[int], step: int = 1) -> np.ndarray:
        """Absolute start rows: per group, local starts ``first[g], first[g] + step, ... <= last[g]``."""
        out = [g.offset + np.arange(a, b + 1, step, dtype=np.int64) for g, a, b in zip(self.groups, first, last) if b >= a]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class WindowDataset(Dataset):
    """Map-style dataset of window start rows (see :class:`WindowCollate`)."""

    def __init__(self, starts: np.ndarray) -> None:
        self.starts = np.asarray(starts, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> int:
        return int(self.starts[i])


class WindowCollate:
    """Gathers a batch of windows of ``input_size + h`` rows from the store.

    Returns ``{"x": [B, L, S, F], "y": [B, H, S]}`` plus ``"mask"`` ``[B, H, S]`` when the store
    has missing targets.
    """

    def __init__(self, store: WindowStore, input_size: int, h: int) -> None:
        self.store, self.input_size, self.h = store, int(input_size), int(h)

    def __call__(self, starts: List[int]) -> dict:
        s = torch.as_tensor(starts, dtype=torch.long)
        idx = s[:, None] + torch.arange(self.input_size + self.h)
        w = self.store.data[idx]
        batch = {"x": w[:, : self.input_size], "y": w[:, self.input_size :, :, 0]}
        if self.store.observed is not None:
            batch["mask"] = self.store.observed[idx[:, self.input_size :]]
        return batch


def gather_inputs(data: Tensor, ends: np.ndarray, input_size: int) -> Tensor:
    """Input windows ``[n, L, S, F]`` ending (exclusive) at the absolute rows ``ends``."""
    e = torch.as_tensor(np.asarray(ends, dtype=np.int64))
    idx = e[:, None] - input_size + torch.arange(input_size)
    return data[idx]
