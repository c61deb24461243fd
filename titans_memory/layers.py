"""Small building blocks: causal depthwise convolution, feed-forward sublayer."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops.qkv_prep import causal_depthwise_conv


class CausalDepthwiseConv1d(nn.Module):
    """Depthwise 1-D convolution that only looks back: output ``t`` sees inputs ``t-K+1 .. t``.

    Padding is on the left only (zeros, or the cached last ``K - 1`` inputs of the previous
    piece of the sequence), so no future token leaks in.
    """

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.normal_(self.weight, std=0.02)
        with torch.no_grad():
            self.weight[:, 0, -1] += 1.0  # start close to the identity

    def forward(self, x: Tensor, cache: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``x``: ``[B, T, C]``; ``cache``: ``[B, K-1, C]`` or None. Returns ``(y [B, T, C], new_cache)``."""
        return causal_depthwise_conv(x, self.weight, self.bias, cache)


class FeedForward(nn.Module):
    """SwiGLU feed-forward sublayer ``W_3 (silu(W_1 x) * W_2 x)``."""

    def __init__(self, d_model: int, mult: int, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = d_model * mult
        self.w12 = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w3 = nn.Linear(hidden, d_model, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.drop(self.w3(F.silu(a) * b))
