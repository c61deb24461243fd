"""Neural-memory operators: a token-by-token reference and the chunked parallel form.

:func:`neural_memory` dispatches to the fastest implementation available for the inputs.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from torch import Tensor

from .chunked import neural_memory_chunked
from .mlp import MemoryMLPSpec, layer_shapes, memory_apply
from .naive import neural_memory_recurrent

IMPLS = ("auto", "torch", "naive")


def neural_memory(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    weights: Sequence[Tensor],
    momentum: Optional[Sequence[Tensor]] = None,
    spec: MemoryMLPSpec = MemoryMLPSpec(),
    chunk_size: int = 64,
    max_update_norm: Optional[float] = None,
    impl: str = "auto",
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """Update-and-retrieve over a sequence; see :mod:`titans_memory.ops.chunked` for the maths.

    ``impl``: ``"torch"`` (chunked PyTorch), ``"naive"`` (token-by-token reference) or ``"auto"``.
    """
    if impl == "naive":
        return neural_memory_recurrent(
            q, k, v, theta, eta, alpha, weights, momentum, spec, chunk_size, max_update_norm
        )
    if impl not in IMPLS:
        from ..errors import ConfigError

        raise ConfigError(f"unknown memory implementation {impl!r}; choose from {IMPLS}")
    return neural_memory_chunked(
        q, k, v, theta, eta, alpha, weights, momentum, spec, chunk_size, max_update_norm
    )


__all__ = [
    "MemoryMLPSpec",
    "layer_shapes",
    "memory_apply",
    "neural_memory",
    "neural_memory_chunked",
    "neural_memory_recurrent",
]
