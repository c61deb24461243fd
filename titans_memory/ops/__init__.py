"""Neural-memory operators: a token-by-token reference, the chunked parallel form, its
memory-light checkpointed variant and the fused Triton kernels.

:func:`neural_memory` dispatches to the fastest implementation available for the inputs:

============== =============================================================================
``impl``       implementation
============== =============================================================================
``"auto"``     on CUDA: ``"triton_tiled"`` where it covers the shapes (depth 2, head dim
               32-64, or 16-64 without gradients); otherwise ``"triton"`` for CUDA
               inputs it supports (depth 1-2, norm off, clipping on or off, fp32, chunk
               16/32/64, head_dim 16/32/64: see
               :func:`~titans_memory.ops.fused.triton_unsupported_reason`), else ``"torch"``;
               ``TITANS_MEMORY_TRITON=0`` in the environment turns the Triton choice off
``"triton"``   fused Triton kernels (:mod:`titans_memory.ops.fused`); a clear
               :class:`~titans_memory.errors.ConfigError` if Triton or the shape is unsupported
``"checkpointed"`` chunked PyTorch with segment checkpointing: same numbers as ``"torch"``,
               ``O(sqrt(T))`` saved state instead of ``O(T)`` (any configuration)
``"torch"``    chunked PyTorch (:mod:`titans_memory.ops.chunked`), autograd through the loop
``"naive"``    token-by-token reference (:mod:`titans_memory.ops.naive`), the specification
``"triton_tiled"`` the tiled Triton kernels (:mod:`titans_memory.ops.triton_tiled`), a head's
               hidden units over several programs (tiles of ``min(64, H / 2)`` units), on CUDA
               as persistent kernels with per-head
               barriers (:mod:`titans_memory.ops.triton_persistent_kernels`); depth 2 only;
               checked on an H200 and the fastest there (layer fwd+bwd at 8k 0.97 vs
               0.31 M tok/s, streaming 4.1 vs 1.6); chosen by ``"auto"``
============== =============================================================================

:mod:`titans_memory.ops.tiled` (not dispatched) is the chunked form with a head's state split over
tiles and the cross-tile reductions explicit: the specification of a multi-program kernel.
:mod:`titans_memory.ops.triton_tiled` (``impl="triton_tiled"``) runs it, forward and backward, as
Triton kernels with several programs per head.

The layer's input and output sides have their own fused kernels, used where the memory runs
Triton on CUDA: :mod:`titans_memory.ops.qkv_prep` (causal depthwise convolution, SiLU, l2 norm,
head layout) and :mod:`titans_memory.ops.output_gate` (RMSNorm, heads merged, gate).

``kernel_precision`` chooses the matmul operands of the Triton kernels (state and accumulation
stay fp32; the PyTorch paths follow PyTorch's own matmul settings): ``"tf32"`` (the default),
``"bf16"`` (everywhere), or ``"bf16-forward"``: bf16 in the forward passes (inference, the
training forward and the backward's recompute of it), tf32 in the backward's gradient walk. That
split is the fastest measured for the tiled kernels on an H200 (bf16 made their walk slower;
``benchmarks/RESULTS.md``); the fused kernels take one precision per call, so they train in tf32
with it and infer in bf16.
"""

from __future__ import annotations

import os

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..config import KERNEL_PRECISIONS, validate_segment_chunks
from .barrier_check import raise_pending_barrier_timeouts
from .checkpointed import neural_memory_checkpointed
from .chunked import neural_memory_chunked
from .fused import neural_memory_triton, triton_available, triton_unsupported_reason
from .mlp import MemoryMLPSpec, layer_shapes, memory_apply
from .naive import neural_memory_recurrent

IMPLS = ("auto", "triton", "checkpointed", "torch", "naive", "triton_tiled")

# Whether ``impl="auto"`` picks the Triton kernels on CUDA (for the shapes they support). On by
# default since their GPU check (``benchmarks/kernels.py --check``, H100, 2026-11-23) passed; CI
# verifies them under ``TRITON_INTERPRET=1``. ``TITANS_MEMORY_TRITON=0`` opts out.
TRITON_AUTO = os.environ.get("TITANS_MEMORY_TRITON", "1") != "0"


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _tiled_auto_ok(q, weights, spec, chunk_size, training: bool) -> bool:
    """Whether ``impl="auto"`` takes the persistent tiled kernels: CUDA, depth 2 and the head
    shapes their GPU check covered (``benchmarks/kernels_persistent.py``, H200): head dim 32-64 in
    training, 16-64 without gradients (at head dim 16 the training check's worst gradient error,
    1.9e-2, came too close to its 2e-2 bound). On the H200 they ran the W1 layer at 1.9x the fused
    kernels' speed in training and in streaming inference (``benchmarks/RESULTS.md``)."""
    lo = 32 if training else 16
    if not (TRITON_AUTO and q.is_cuda and len(weights) == 2 and lo <= q.shape[-1] <= 64) or not triton_available():
        return False
    from .triton_tiled import default_n_tiles, tiled_triton_unsupported_reason

    n_tiles = default_n_tiles(weights[0].shape[-1])
    return tiled_triton_unsupported_reason(q, weights, spec, chunk_size, n_tiles) is None


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
    kernel_precision: str = "tf32",
    segment_chunks: Optional[int] = None,
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """Update-and-retrieve over a sequence; see :mod:`titans_memory.ops.chunked` for the maths.

    ``impl``: ``"auto"``, ``"triton"``, ``"checkpointed"``, ``"torch"`` or ``"naive"`` (see the
    module docstring). All compute the same function; gradients flow to every tensor argument.
    ``kernel_precision``: matmul operands of the Triton kernels, one of ``KERNEL_PRECISIONS``
    (module docstring). ``segment_chunks``: chunks between the states a training call keeps
    for its backward (``"triton"``, ``"triton_tiled"``, ``"checkpointed"``; ``None``: their
    default ``ceil(sqrt(n_chunks))``; ``MemoryConfig.segment_chunks``). The others keep no
    segments and ignore it.
    """
    if kernel_precision not in KERNEL_PRECISIONS:
        from ..errors import ConfigError

        raise ConfigError(f"kernel_precision must be one of {KERNEL_PRECISIONS}, got {kernel_precision!r}")
    validate_segment_chunks(segment_chunks)
    wants_grad = _wants_grad(q, k, v, theta, eta, alpha, *weights, *(momentum or ()))
    # the operands of the forward passes, and of the backward's walk (tiled) / of a training call (fused)
    fwd_prec = "tf32" if kernel_precision == "tf32" else "bf16"
    bwd_prec = "bf16" if kernel_precision == "bf16" else "tf32"
    if impl == "auto" and _tiled_auto_ok(q, weights, spec, chunk_size, training=wants_grad):
        impl = "triton_tiled"
    if impl == "auto":
        impl = "torch"
        if (
            TRITON_AUTO
            and q.is_cuda
            and triton_unsupported_reason(q, weights, spec, chunk_size, max_update_norm) is None
            and triton_available()
        ):
            impl = "triton"
    if impl == "triton":
        return neural_memory_triton(
            q, k, v, theta, eta, alpha, weights, momentum, spec, chunk_size, max_update_norm,
            segment_chunks=segment_chunks, precision=bwd_prec if wants_grad else fwd_prec,
        )
    if impl == "triton_tiled":
        if not triton_available():
            from ..errors import ConfigError

            raise ConfigError('impl="triton_tiled" needs Triton and a CUDA device, or TRITON_INTERPRET=1 on the CPU')
        from .triton_tiled import default_n_tiles, neural_memory_tiled_triton, neural_memory_tiled_triton_train

        n_tiles = default_n_tiles(weights[0].shape[-1])
        if not wants_grad:
            return neural_memory_tiled_triton(
                q, k, v, theta, eta, alpha, weights, momentum, spec, chunk_size, max_update_norm, n_tiles=n_tiles,
                precision=fwd_prec)
        return neural_memory_tiled_triton_train(
            q, k, v, theta, eta, alpha, weights, momentum, spec, chunk_size, max_update_norm,
            n_tiles=n_tiles, segment_chunks=segment_chunks, precision=fwd_prec, bwd_precision=bwd_prec,
        )
    if impl == "checkpointed":
        return neural_memory_checkpointed(
            q, k, v, theta, eta, alpha, weights, momentum, spec, chunk_size, max_update_norm,
            segment_chunks=segment_chunks,
        )
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
    "KERNEL_PRECISIONS",
    "MemoryMLPSpec",
    "layer_shapes",
    "memory_apply",
    "neural_memory",
    "neural_memory_checkpointed",
    "neural_memory_chunked",
    "neural_memory_recurrent",
    "neural_memory_triton",
    "raise_pending_barrier_timeouts",
    "triton_available",
    "triton_unsupported_reason",
]
