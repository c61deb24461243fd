"""The chunked memory update with a head's state split into tiles: the specification of a
multi-program kernel (see ``docs/kernels.md``).

Every tile owns a slice of the fast weights for the whole sequence and computes only from its
slice. The steps where tiles must exchange data are explicit: each one is a sum over tiles
(``_reduce``). A kernel that runs one program per tile needs exactly these reductions, and no
other communication, per chunk.

- depth 2 (``d -> H -> d``): tile ``j`` owns the hidden units ``cols_j``, that is
  ``W1[:, cols_j], S1[:, cols_j]`` and ``W2[cols_j, :], S2[cols_j, :]``. Reductions per chunk:
  the MLP output on the keys, the per-token gradient norms (only with the update clip), and the
  retrieval output.
- depth 1 (``d -> d``): tile ``j`` owns the output columns ``cols_j`` of ``W`` and ``S``.
  Token gradients and retrieval are column-local. The only reduction is the per-token gradient
  norm of the clip.

The result equals :func:`~titans_memory.ops.chunked.neural_memory_chunked`. Forward only; this
module is a reference for kernels and is not dispatched by :func:`~titans_memory.ops.neural_memory`.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..errors import ConfigError
from .chunked import chunk_coefficients
from .mlp import MemoryMLPSpec


def _reduce(parts: Sequence[Tensor]) -> Tensor:
    """The cross-tile sum: the one place where tiles exchange data."""
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def _clip(sq_norm: Tensor, max_update_norm: Optional[float]) -> Optional[Tensor]:
    if max_update_norm is None:
        return None
    return torch.clamp(max_update_norm / torch.sqrt(sq_norm + 1e-30), max=1.0)


def _split(n: int, n_tiles: int) -> List[slice]:
    if n_tiles < 1 or n % n_tiles:
        raise ConfigError(f"n_tiles={n_tiles} must divide the tiled dimension {n}")
    size = n // n_tiles
    return [slice(j * size, (j + 1) * size) for j in range(n_tiles)]


def _update(W: Tensor, S: Tensor, h: Tensor, delta: Tensor, coeffs, theta: Tensor) -> Tuple[Tensor, Tensor]:
    """State after the chunk for one tile's slice (``h^T delta`` are the slice's token gradients)."""
    beta, g, C, E, D = coeffs
    c_last = C[..., -1, :, None]
    m_last = (theta * D[..., -1, :])[..., None]
    h_t = h.transpose(-1, -2)
    W_new = beta[..., -1, None, None] * W + g[..., -1, None, None] * S - h_t @ (c_last * delta)
    S_new = E[..., -1, None, None] * S - h_t @ (m_last * delta)
    return W_new, S_new


def _retrieve(x: Tensor, W: Tensor, S: Tensor, h: Tensor, delta: Tensor, coeffs) -> Tensor:
    """``x W_t`` for every row ``t`` of the chunk, in dual form, for one tile's slice."""
    beta, g, C, _, _ = coeffs
    return beta[..., None] * (x @ W) + g[..., None] * (x @ S) - ((x @ h.transpose(-1, -2)) * C) @ delta


def _chunk_depth1(q, k, v, theta, eta, alpha, W, S, spec, max_update_norm, tiles):
    (W,), (S,) = W, S
    # tile-local: token gradients of the owned output columns
    deltas = []
    for cols in tiles:
        y = k @ W[..., cols]
        if spec.residual:
            y = y + k[..., cols]
        deltas.append(2.0 * (y - v[..., cols]))
    # reduction (clip only): |G_t|^2 = |k_t|^2 sum_j |delta_j,t|^2
    scale = _clip((k * k).sum(-1) * _reduce([(d * d).sum(-1) for d in deltas]), max_update_norm)
    if scale is not None:
        theta = theta * scale
    coeffs = chunk_coefficients(theta, eta, alpha)
    outs, W_new, S_new = [], [], []
    for cols, delta in zip(tiles, deltas):
        o = _retrieve(q, W[..., cols], S[..., cols], k, delta, coeffs)
        outs.append(o + q[..., cols] if spec.residual else o)
        w, s = _update(W[..., cols], S[..., cols], k, delta, coeffs, theta)
        W_new.append(w)
        S_new.append(s)
    # the output columns are disjoint: concatenation, not a reduction
    return torch.cat(outs, -1), [torch.cat(W_new, -1)], [torch.cat(S_new, -1)]


def _chunk_depth2(q, k, v, theta, eta, alpha, W, S, spec, max_update_norm, tiles):
    W1, W2 = W
    S1, S2 = S
    # phase 1, tile-local: hidden activations of the keys and partial MLP outputs
    z1 = [k @ W1[..., cols] for cols in tiles]
    h1 = [spec.act(z) for z in z1]
    y = _reduce([h @ W2[..., cols, :] for cols, h in zip(tiles, h1)])  # reduction 1
    # phase 2, per head: output-layer error
    delta2 = 2.0 * ((y + k if spec.residual else y) - v)
    # phase 3, tile-local: hidden-layer errors; reduction 2 (clip only): per-token gradient norms
    delta1 = [(delta2 @ W2[..., cols, :].transpose(-1, -2)) * spec.act_grad(z) for cols, z in zip(tiles, z1)]
    if max_update_norm is not None:
        sq = (k * k).sum(-1) * _reduce([(d * d).sum(-1) for d in delta1]) + (delta2 * delta2).sum(-1) * _reduce(
            [(h * h).sum(-1) for h in h1]
        )
        theta = theta * _clip(sq, max_update_norm)
    coeffs = chunk_coefficients(theta, eta, alpha)
    # phase 4, tile-local: retrieval through the owned hidden units; reduction 3: the output
    outs, W1n, S1n, W2n, S2n = [], [], [], [], []
    for cols, h, d1 in zip(tiles, h1, delta1):
        x1 = spec.act(_retrieve(q, W1[..., cols], S1[..., cols], k, d1, coeffs))
        outs.append(_retrieve(x1, W2[..., cols, :], S2[..., cols, :], h, delta2, coeffs))
        w, s = _update(W1[..., cols], S1[..., cols], k, d1, coeffs, theta)
        W1n.append(w)
        S1n.append(s)
        w, s = _update(W2[..., cols, :], S2[..., cols, :], h, delta2, coeffs, theta)
        W2n.append(w)
        S2n.append(s)
    o = _reduce(outs)
    if spec.residual:
        o = o + q
    return o, [torch.cat(W1n, -1), torch.cat(W2n, -2)], [torch.cat(S1n, -1), torch.cat(S2n, -2)]


def neural_memory_tiled(
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
    n_tiles: int = 4,
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """Same interface and result as :func:`~titans_memory.ops.chunked.neural_memory_chunked`
    (depth 1 or 2, ``spec.norm`` off), computed tile by tile: ``n_tiles`` must divide the
    hidden width (depth 2) or the head dimension (depth 1)."""
    if len(weights) not in (1, 2):
        raise ConfigError(f"the tiled form covers memory depth 1 and 2, not {len(weights)}")
    if spec.norm:
        raise ConfigError("the tiled form does not cover the memory output norm (spec.norm)")
    W = list(weights)
    S = [torch.zeros_like(w) for w in W] if momentum is None else list(momentum)
    tiles = _split(W[0].shape[-1], n_tiles)
    step = _chunk_depth1 if len(W) == 1 else _chunk_depth2
    outputs = []
    for start in range(0, q.shape[2], chunk_size):
        sl = slice(start, start + chunk_size)
        o, W, S = step(q[:, :, sl], k[:, :, sl], v[:, :, sl], theta[:, :, sl], eta[:, :, sl], alpha[:, :, sl],
                       W, S, spec, max_update_norm, tiles)
        outputs.append(o)
    if not outputs:
        return q.new_zeros(q.shape), W, S
    return torch.cat(outputs, dim=2), W, S
