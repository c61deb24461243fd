"""Carried state of a neural memory, for processing a long sequence in pieces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import Tensor

from .errors import StateError


@dataclass
class MemoryState:
    """Everything a :class:`~titans_memory.memory.NeuralMemory` needs to continue a sequence.

    Chunk boundaries are global (every ``chunk_size`` tokens from the sequence start), so a
    sequence cut anywhere gives the same result as one call on the whole sequence. When the cut
    falls inside a chunk, the state holds the weights at that chunk's start (``weights``,
    ``momentum``) and the chunk's tokens seen so far (``pending``: keys, values and gates of at most
    ``chunk_size - 1`` tokens), which the next call replays. Memory use is constant in the length.

    Attributes:
        weights: per memory layer ``[B, H, d_in, d_out]``, fp32 (weights at the last chunk start).
        momentum: same shapes, the momentum S at the last chunk start.
        pending: ``{"k", "v": [B, H, r, d], "theta", "eta", "alpha": [B, H, r]}`` or empty.
        conv: causal-convolution caches ``[B, kernel - 1, channels]`` by stream name.
        position: tokens processed so far.
    """

    weights: List[Tensor]
    momentum: List[Tensor]
    pending: Dict[str, Tensor] = field(default_factory=dict)
    conv: Dict[str, Tensor] = field(default_factory=dict)
    position: int = 0

    @property
    def batch_size(self) -> int:
        return self.weights[0].shape[0]

    @property
    def n_pending(self) -> int:
        return self.pending["k"].shape[2] if self.pending else 0

    def detach(self) -> "MemoryState":
        """A copy cut from the autograd graph (truncated back-propagation through time)."""
        return MemoryState(
            weights=[w.detach() for w in self.weights],
            momentum=[s.detach() for s in self.momentum],
            pending={k: t.detach() for k, t in self.pending.items()},
            conv={k: t.detach() for k, t in self.conv.items()},
            position=self.position,
        )

    def to(self, device: torch.device | str) -> "MemoryState":
        move = lambda t: t.to(device)  # noqa: E731
        return MemoryState(
            weights=[move(w) for w in self.weights],
            momentum=[move(s) for s in self.momentum],
            pending={k: move(t) for k, t in self.pending.items()},
            conv={k: move(t) for k, t in self.conv.items()},
            position=self.position,
        )

    def check_batch(self, batch_size: int) -> None:
        if self.batch_size != batch_size:
            raise StateError(
                f"carried MemoryState has batch size {self.batch_size} but the input has {batch_size}"
            )


@dataclass
class MixerState:
    """State of a MAC / MAG / MAL mixer: its memory's state and the inputs it must see again.

    Attributes:
        memory: the :class:`MemoryState` (MAC: at the start of the current, unfinished segment).
        context: ``[B, n, D]`` or None. MAC: the unfinished segment's inputs so far; MAG / MAL:
            the last ``window - 1`` inputs of the sliding-window attention.
        position: tokens processed so far (rotary positions of MAG / MAL attention).
    """

    memory: MemoryState
    context: Optional[Tensor] = None
    position: int = 0

    def detach(self) -> "MixerState":
        context = None if self.context is None else self.context.detach()
        return MixerState(self.memory.detach(), context, self.position)


@dataclass
class BackboneState:
    """Per-layer memory states of a :class:`~titans_memory.backbone.TitansBackbone`."""

    layers: List[Optional[MemoryState | MixerState]]
    position: int = 0

    def detach(self) -> "BackboneState":
        return BackboneState([s.detach() if s is not None else None for s in self.layers], self.position)
