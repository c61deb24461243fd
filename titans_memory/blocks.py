"""The four Titans variants as residual blocks (paper section 4).

Every block is pre-norm: ``x = x + mixer(norm(x))`` then ``x = x + ffn(norm(x))``; the variants
differ in the mixer:

- ``LMM``: the neural memory alone.
- ``MAC`` (memory as context, Eqs. 21-25): per segment ``S``: ``h = M*_{t-1}(q_S)`` (read without
  update), ``y = Attn([P || h || S])``, update the memory with ``y`` and read it,
  ``o = y * sigmoid(M*_t(y))``.
- ``MAG`` (memory as gate): ``o = SWA*([P || x]) * sigmoid(M([P || x]))``.
- ``MAL`` (memory as layer): ``o = SWA(M([P || x]))``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .attention import Attention
from .config import TitansConfig
from .errors import StateError
from .layers import FeedForward
from .memory import NeuralMemory
from .state import MemoryState


class _Mixer(nn.Module):
    supports_state = False

    def __init__(self, cfg: TitansConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.memory = NeuralMemory(cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.memory)
        self.persistent = nn.Parameter(torch.randn(cfg.persistent_tokens, cfg.d_model) * 0.02)

    @staticmethod
    def _refuse_state(state, return_state: bool) -> None:
        if state is not None or return_state:
            raise StateError("state carry is implemented for the 'lmm' variant only")

    def _prepend(self, x: Tensor) -> Tensor:
        return torch.cat([self.persistent.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1), x], dim=1)


class LMMMixer(nn.Module):
    """Neural memory as the whole sequence mixer."""

    supports_state = True

    def __init__(self, cfg: TitansConfig) -> None:
        super().__init__()
        self.memory = NeuralMemory(cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.memory)

    def forward(self, x: Tensor, state: Optional[MemoryState] = None, return_state: bool = False):
        return self.memory(x, state, return_state)


class MACMixer(_Mixer):
    """Memory as context; segments of ``cfg.segment_size`` processed in order."""

    def __init__(self, cfg: TitansConfig) -> None:
        super().__init__(cfg)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.head_dim)

    def forward(self, x: Tensor, state: Optional[MemoryState] = None, return_state: bool = False):
        self._refuse_state(state, return_state)
        st = self.memory.initial_state(x.shape[0], x.device)
        outs = []
        for start in range(0, x.shape[1], self.cfg.segment_size):
            seg = x[:, start : start + self.cfg.segment_size]
            h, st = self.memory.retrieve(seg, st)
            y = self.attn.segment(seg, h, self.persistent.to(x.dtype))
            m, st = self.memory(y, st, return_state=True)
            outs.append(y * torch.sigmoid(m))
        return torch.cat(outs, dim=1)


class MAGMixer(_Mixer):
    """Memory as gate: sliding-window attention gated by the memory branch."""

    def __init__(self, cfg: TitansConfig) -> None:
        super().__init__(cfg)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.head_dim)

    def forward(self, x: Tensor, state: Optional[MemoryState] = None, return_state: bool = False):
        self._refuse_state(state, return_state)
        n_p = self.persistent.shape[0]
        m = self.memory(self._prepend(x))[:, n_p:]
        a = self.attn.sliding_window(x, self.cfg.window_size, self.persistent.to(x.dtype))
        return a * torch.sigmoid(m)


class MALMixer(_Mixer):
    """Memory as layer: the memory, then sliding-window attention over its output."""

    def __init__(self, cfg: TitansConfig) -> None:
        super().__init__(cfg)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.head_dim)

    def forward(self, x: Tensor, state: Optional[MemoryState] = None, return_state: bool = False):
        self._refuse_state(state, return_state)
        n_p = self.persistent.shape[0]
        m = self.memory(self._prepend(x))[:, n_p:]
        return self.attn.sliding_window(m, self.cfg.window_size, self.persistent.to(x.dtype))


MIXERS = {"lmm": LMMMixer, "mac": MACMixer, "mag": MAGMixer, "mal": MALMixer}


class TitansBlock(nn.Module):
    """One pre-norm residual block of the configured variant. Input and output ``[B, T, D]``."""

    def __init__(self, cfg: TitansConfig) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model)
        self.mixer = MIXERS[cfg.variant](cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.ffn = None
        if cfg.ffn_mult:
            self.norm2 = nn.RMSNorm(cfg.d_model)
            self.ffn = FeedForward(cfg.d_model, cfg.ffn_mult, cfg.dropout)

    @property
    def supports_state(self) -> bool:
        return self.mixer.supports_state

    def forward(
        self, x: Tensor, state: Optional[MemoryState] = None, return_state: bool = False
    ) -> Tensor | Tuple[Tensor, MemoryState]:
        out = self.mixer(self.norm1(x), state, return_state)
        h, new_state = out if return_state else (out, None)
        x = x + self.drop(h)
        if self.ffn is not None:
            x = x + self.ffn(self.norm2(x))
        return (x, new_state) if return_state else x


# Readable aliases: the block of each variant.
def LMM(cfg: TitansConfig) -> TitansBlock:  # noqa: N802
    """A block with the memory alone."""
    return TitansBlock(_with_variant(cfg, "lmm"))


def MAC(cfg: TitansConfig) -> TitansBlock:  # noqa: N802
    """A memory-as-context block."""
    return TitansBlock(_with_variant(cfg, "mac"))


def MAG(cfg: TitansConfig) -> TitansBlock:  # noqa: N802
    """A memory-as-gate block."""
    return TitansBlock(_with_variant(cfg, "mag"))


def MAL(cfg: TitansConfig) -> TitansBlock:  # noqa: N802
    """A memory-as-layer block."""
    return TitansBlock(_with_variant(cfg, "mal"))


def _with_variant(cfg: TitansConfig, variant: str) -> TitansConfig:
    from dataclasses import replace

    return replace(cfg, variant=variant)
