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
from .layers import FeedForward
from .memory import NeuralMemory
from .state import MemoryState, MixerState


class _Mixer(nn.Module):
    """Shared parts of the attention variants: the memory and the persistent tokens."""

    def __init__(self, cfg: TitansConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.memory = NeuralMemory(cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.memory)
        self.persistent = nn.Parameter(torch.randn(cfg.persistent_tokens, cfg.d_model) * 0.02)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.head_dim)

    def _prefix(self, x: Tensor) -> Tensor:
        return self.persistent.to(x.dtype)

    def _memory_with_prefix(self, x: Tensor, state: Optional[MixerState]):
        """``M([P || x])`` at the sequence start (persistent tokens read first), ``M(x)`` when the
        sequence continues from ``state``. Returns ``(m [B, T, D], memory state)``."""
        if state is not None:
            return self.memory(x, state.memory, return_state=True)
        p = self._prefix(x).unsqueeze(0).expand(x.shape[0], -1, -1)
        m, mem = self.memory(torch.cat([p, x], dim=1), return_state=True)
        return m[:, p.shape[1] :], mem

    def _window(self, state: Optional[MixerState], x: Tensor) -> Tuple[Tensor, Tensor]:
        """Sliding-window attention over ``x`` with the previous ``window - 1`` inputs (from
        ``state``) as context. Returns ``(out [B, T, D], the context for the next call)``."""
        context = state.context if state is not None else None
        seq = x if context is None else torch.cat([context, x], dim=1)
        n_ctx = seq.shape[1] - x.shape[1]
        offset = (state.position if state is not None else 0) - n_ctx
        out = self.attn.sliding_window(seq, self.cfg.window_size, self._prefix(x), offset)[:, n_ctx:]
        return out, seq[:, max(0, seq.shape[1] - (self.cfg.window_size - 1)) :]

    def _state(self, memory: MemoryState, context: Tensor, state: Optional[MixerState], x: Tensor) -> MixerState:
        return MixerState(memory, context, (state.position if state is not None else 0) + x.shape[1])


class LMMMixer(nn.Module):
    """Neural memory as the whole sequence mixer."""

    def __init__(self, cfg: TitansConfig) -> None:
        super().__init__()
        self.memory = NeuralMemory(cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.memory)

    def forward(self, x: Tensor, state: Optional[MemoryState] = None, return_state: bool = False):
        return self.memory(x, state, return_state)


class MACMixer(_Mixer):
    """Memory as context; segments of ``cfg.segment_size`` processed in order.

    State carry: segments are aligned on the global grid; when a call ends inside a segment, the
    state keeps the memory at that segment's start and the segment's inputs so far, which the next
    call replays (constant memory: at most one segment).
    """

    def forward(self, x: Tensor, state: Optional[MixerState] = None, return_state: bool = False):
        st = state.memory if state is not None else self.memory.initial_state(x.shape[0], x.device)
        r = 0
        if state is not None and state.context is not None:
            r = state.context.shape[1]
            x = torch.cat([state.context, x], dim=1)
        size = self.cfg.segment_size
        outs, seg_start, last = [], st, None
        for start in range(0, x.shape[1], size):
            seg = x[:, start : start + size]
            seg_start = st
            h, st = self.memory.retrieve(seg, st)
            y = self.attn.segment(seg, h, self._prefix(x))
            m, st = self.memory(y, st, return_state=True)
            outs.append(y * torch.sigmoid(m))
            last = seg
        out = torch.cat(outs, dim=1)[:, r:]
        if not return_state:
            return out
        if last is not None and last.shape[1] < size:
            return out, MixerState(memory=seg_start, context=last)
        return out, MixerState(memory=st, context=None)


class MAGMixer(_Mixer):
    """Memory as gate: sliding-window attention gated by the memory branch.

    State carry: the memory state and the last ``window - 1`` inputs (attention context).
    """

    def forward(self, x: Tensor, state: Optional[MixerState] = None, return_state: bool = False):
        m, mem = self._memory_with_prefix(x, state)
        a, context = self._window(state, x)
        out = a * torch.sigmoid(m)
        return (out, self._state(mem, context, state, x)) if return_state else out


class MALMixer(_Mixer):
    """Memory as layer: the memory, then sliding-window attention over its output.

    State carry: the memory state and the last ``window - 1`` memory outputs (attention context).
    """

    def forward(self, x: Tensor, state: Optional[MixerState] = None, return_state: bool = False):
        m, mem = self._memory_with_prefix(x, state)
        out, context = self._window(state, m)
        return (out, self._state(mem, context, state, x)) if return_state else out


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
