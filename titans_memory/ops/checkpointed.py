"""Memory-light chunked neural memory: segment checkpointing around the PyTorch chunk step.

Autograd through :func:`~titans_memory.ops.chunked.neural_memory_chunked` keeps every chunk's
intermediates (key activations, gradient factors, coefficient matrices, the weights and momentum
after each chunk) for the whole sequence: ``O(T / chunk x state)`` bytes, gigabytes at 8k tokens.

:class:`CheckpointedMemory` computes the same function and the same gradients with

- a forward pass that runs the chunk loop with no autograd graph and keeps the state (weights
  and momentum) only at segment boundaries, every ``K`` chunks;
- a backward pass that walks the segments in reverse, recomputes each segment's forward from its
  saved start state with :func:`~titans_memory.ops.chunked.chunk_step` under autograd, and
  back-propagates the output gradient of the segment plus the adjoint of its end state into
  q, k, v, the gates and the segment's start state (the adjoint carried to the previous segment).

Memory: ``ceil(n_chunks / K)`` saved states plus one segment's autograd graph (``K`` chunks);
``K = ceil(sqrt(n_chunks))`` by default, so both are ``O(sqrt(T))``. Compute: one extra forward.
Works for every memory configuration the chunked form supports (any depth, activation, norm,
residual, update clipping, dtype, device). Second-order gradients are not supported.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .chunked import chunk_step
from .mlp import MemoryMLPSpec


def default_segment_chunks(n_chunks: int) -> int:
    """Chunks per checkpoint segment: ``ceil(sqrt(n_chunks))`` (at least 1)."""
    return max(1, math.ceil(math.sqrt(max(n_chunks, 1))))


class CheckpointedMemory(torch.autograd.Function):
    """``(q, k, v, theta, eta, alpha, *W0, *S0) -> (o, *W_T, *S_T)`` with segment checkpointing."""

    @staticmethod
    def forward(ctx, spec, chunk_size, max_update_norm, seg_chunks, n_layers, q, k, v, theta, eta, alpha, *state):
        W = list(state[:n_layers])
        S = list(state[n_layers:])
        T = q.shape[2]
        n_chunks = -(-T // chunk_size)
        ckpts: List[Tuple[List[Tensor], List[Tensor]]] = []
        outputs = []
        with torch.no_grad():
            for c in range(n_chunks):
                if c % seg_chunks == 0:
                    ckpts.append(([w.detach() for w in W], [s.detach() for s in S]))
                sl = slice(c * chunk_size, (c + 1) * chunk_size)
                o, W, S = chunk_step(
                    q[:, :, sl], k[:, :, sl], v[:, :, sl],
                    theta[:, :, sl], eta[:, :, sl], alpha[:, :, sl],
                    W, S, spec, max_update_norm,
                )
                outputs.append(o)
        o = torch.cat(outputs, dim=2) if outputs else q.new_zeros(q.shape)
        ctx.spec, ctx.chunk_size, ctx.clip, ctx.seg_chunks, ctx.n_layers = spec, chunk_size, max_update_norm, seg_chunks, n_layers
        ctx.n_chunks = n_chunks
        ctx.n_ckpts = len(ckpts)
        flat = [t for ws, ss in ckpts for t in (*ws, *ss)]
        ctx.save_for_backward(q, k, v, theta, eta, alpha, *flat)
        W_out = [w.clone() if any(w is s for s in state) else w for w in W]
        S_out = [s.clone() if any(s is t for t in state) else s for s in S]
        return (o, *W_out, *S_out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_o, *d_state):
        saved = ctx.saved_tensors
        q, k, v, theta, eta, alpha = saved[:6]
        L, b = ctx.n_layers, ctx.chunk_size
        ckpts = [(list(saved[6 + 2 * L * i : 6 + 2 * L * i + L]), list(saved[6 + 2 * L * i + L : 6 + 2 * L * (i + 1)]))
                 for i in range(ctx.n_ckpts)]
        inputs = (q, k, v, theta, eta, alpha)
        grads = [torch.zeros_like(t) for t in inputs]
        dW = [torch.zeros_like(w) if g is None else g for w, g in zip(ckpts[0][0], d_state[:L])] if ckpts else []
        dS = [torch.zeros_like(s) if g is None else g for s, g in zip(ckpts[0][1], d_state[L:])] if ckpts else []
        if d_o is None:
            d_o = torch.zeros_like(q)
        T = q.shape[2]
        for seg in range(len(ckpts) - 1, -1, -1):
            c0 = seg * ctx.seg_chunks
            c1 = min(c0 + ctx.seg_chunks, ctx.n_chunks)
            t0, t1 = c0 * b, min(c1 * b, T)
            W0 = [w.detach().requires_grad_() for w in ckpts[seg][0]]
            S0 = [s.detach().requires_grad_() for s in ckpts[seg][1]]
            seg_in = [t[:, :, t0:t1].detach().requires_grad_() for t in inputs]
            with torch.enable_grad():
                W, S = list(W0), list(S0)
                outs = []
                for c in range(c0, c1):
                    sl = slice((c - c0) * b, (c - c0 + 1) * b)
                    o, W, S = chunk_step(*(t[:, :, sl] for t in seg_in), W, S, ctx.spec, ctx.clip)
                    outs.append(o)
                o_seg = torch.cat(outs, dim=2)
                roots = [o_seg, *W, *S]
                root_grads = [d_o[:, :, t0:t1], *dW, *dS]
                leaves = [*seg_in, *W0, *S0]
                g = torch.autograd.grad(roots, leaves, root_grads, allow_unused=True)
            for i in range(6):
                if g[i] is not None:
                    grads[i][:, :, t0:t1] = g[i]
            dW = [torch.zeros_like(w) if x is None else x for w, x in zip(W0, g[6 : 6 + L])]
            dS = [torch.zeros_like(s) if x is None else x for s, x in zip(S0, g[6 + L :])]
        return (None, None, None, None, None, *grads, *dW, *dS)


def neural_memory_checkpointed(
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
    segment_chunks: Optional[int] = None,
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """Same interface and result as :func:`~titans_memory.ops.chunked.neural_memory_chunked`,
    with segment checkpointing (see the module docstring). ``segment_chunks``: chunks per saved
    state (``K``); default ``ceil(sqrt(n_chunks))``.
    """
    W = list(weights)
    S = [torch.zeros_like(w) for w in W] if momentum is None else list(momentum)
    T = q.shape[2]
    if T == 0:
        return q.new_zeros(q.shape), W, S
    n_chunks = -(-T // chunk_size)
    K = segment_chunks or default_segment_chunks(n_chunks)
    L = len(W)
    out = CheckpointedMemory.apply(spec, chunk_size, max_update_norm, K, L, q, k, v, theta, eta, alpha, *W, *S)
    return out[0], list(out[1 : 1 + L]), list(out[1 + L :])
