"""A stack of Titans blocks: the sequence model every estimator in the library builds on."""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor, nn

from .blocks import TitansBlock
from .config import TitansConfig
from .errors import ShapeError, StateError
from .state import BackboneState


class TitansBackbone(nn.Module):
    """``n_layers`` Titans blocks of one variant and a final RMSNorm.

    ``forward(x)`` maps ``[B, T, D]`` to ``[B, T, D]`` causally: output ``t`` depends on inputs
    ``0..t`` only. For every variant a :class:`~titans_memory.state.BackboneState` can be
    carried across calls (streaming, or a long sequence processed in pieces in constant memory).
    """

    def __init__(self, config: TitansConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(TitansBlock(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model)

    def forward(
        self, x: Tensor, state: Optional[BackboneState] = None, return_state: bool = False
    ) -> Tensor | Tuple[Tensor, BackboneState]:
        """``x``: ``[B, T, D]``. Returns ``[B, T, D]`` (and the new state if ``return_state``)."""
        if x.dim() != 3 or x.shape[-1] != self.config.d_model:
            raise ShapeError(f"TitansBackbone expects [batch, time, {self.config.d_model}], got {tuple(x.shape)}")
        if not return_state:
            for layer in self.layers:
                x = layer(x)
            return self.norm(x)
        states = state.layers if state is not None else [None] * len(self.layers)
        if len(states) != len(self.layers):
            raise StateError(f"state has {len(states)} layers, the model {len(self.layers)}")
        new = []
        for layer, st in zip(self.layers, states):
            x, st = layer(x, st, return_state=True)
            new.append(st)
        position = (state.position if state is not None else 0) + x.shape[1]
        return self.norm(x), BackboneState(new, position)
