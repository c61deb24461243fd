"""Chunked parallel form of the neural-memory update (paper section 3.2), in PyTorch.

Inside a chunk of ``c`` tokens starting at weights ``W0`` and momentum ``S0`` every gradient is
taken at ``W0``; token ``i``'s gradient w.r.t. layer ``l`` is the outer product
``G_i = h_i^T delta_i`` (see :func:`~titans_memory.ops.mlp.key_gradients`). Unrolling

    S_t = eta_t S_{t-1} - theta_t G_t,     W_t = (1 - alpha_t) W_{t-1} + S_t

over the chunk gives, with ``beta_t = prod_{j<=t} (1 - alpha_j)`` and ``E_t = prod_{j<=t} eta_j``
(products from the chunk start),

    W_t = beta_t W0 + g_t S0 - sum_{i<=t} C[t, i] G_i
    S_t = E_t S0 - sum_{i<=t} theta_i (E_t / E_i) G_i
    C[t, i] = theta_i sum_{j=i..t} (beta_t / beta_j) (E_j / E_i),   g_t = sum_{j<=t} (beta_t / beta_j) E_j

so ``C = (A @ D) * theta`` with ``A[t, j] = beta_t / beta_j`` and ``D[j, i] = E_j / E_i``, both built
from segment sums of log-gates (stable, no division). Retrieval never materialises ``W_t``: for a
layer input row ``x_t``,

    x_t W_t = beta_t x_t W0 + g_t x_t S0 - sum_i C[t, i] (x_t . h_i) delta_i

which is ``diag(beta) X W0 + diag(g) X S0 - ((X H^T) * C) Delta``: masked query-key products, as in
linear attention (the TTT "dual form"), applied layer by layer through the MLP.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .mlp import MemoryMLPSpec, clip_scale, key_gradients, post_forward

_TINY = 1e-20


def segsum(x: Tensor) -> Tensor:
    """``out[..., t, j] = sum_{m=j+1..t} x[..., m]`` for ``j <= t`` and ``-inf`` above the diagonal.

    Built by a masked cumulative sum (no differences of prefix sums), so it is exact for long
    chunks and very negative log-gates. ``x``: ``[..., c]`` -> ``[..., c, c]``.
    """
    c = x.shape[-1]
    rep = x[..., :, None].expand(*x.shape, c)
    strict = torch.tril(torch.ones(c, c, dtype=torch.bool, device=x.device), diagonal=-1)
    out = torch.cumsum(rep.masked_fill(~strict, 0.0), dim=-2)
    causal = torch.tril(torch.ones(c, c, dtype=torch.bool, device=x.device))
    return out.masked_fill(~causal, float("-inf"))


def chunk_coefficients(theta: Tensor, eta: Tensor, alpha: Tensor) -> Tuple[Tensor, ...]:
    """Decay and mixing coefficients of one chunk. Gates ``[..., c]``.

    Returns ``(beta, g, C, E, D)`` with ``beta, g, E``: ``[..., c]``; ``C, D``: ``[..., c, c]``.
    """
    log_keep = torch.log(torch.clamp(1.0 - alpha, min=_TINY))
    log_eta = torch.log(torch.clamp(eta, min=_TINY))
    A = torch.exp(segsum(log_keep))
    D = torch.exp(segsum(log_eta))
    beta = torch.exp(torch.cumsum(log_keep, -1))
    E = torch.exp(torch.cumsum(log_eta, -1))
    C = (A @ D) * theta[..., None, :]
    g = (A @ E[..., None])[..., 0]
    return beta, g, C, E, D


def chunk_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    W0: Sequence[Tensor],
    S0: Sequence[Tensor],
    spec: MemoryMLPSpec,
    max_update_norm: Optional[float] = None,
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """One chunk: retrieval outputs ``[B, H, c, d]`` and the state after the chunk's last token."""
    hs, deltas = key_gradients(k, v, W0, spec)
    if max_update_norm is not None:
        theta = theta * clip_scale(hs, deltas, max_update_norm)
    beta, g, C, E, D = chunk_coefficients(theta, eta, alpha)

    x = q
    n_layers = len(W0)
    for layer in range(n_layers):
        h, delta = hs[layer], deltas[layer]
        z = (
            beta[..., None] * (x @ W0[layer])
            + g[..., None] * (x @ S0[layer])
            - ((x @ h.transpose(-1, -2)) * C) @ delta
        )
        x = spec.act(z) if layer < n_layers - 1 else z
    out = post_forward(x, q, spec)[0]

    c_last = C[..., -1, :, None]  # [B, H, c, 1]: C[last, i]
    m_last = (theta * D[..., -1, :])[..., None]  # theta_i E_last / E_i
    b_last = beta[..., -1, None, None]
    g_last = g[..., -1, None, None]
    e_last = E[..., -1, None, None]
    W_new, S_new = [], []
    for layer in range(n_layers):
        h_t = hs[layer].transpose(-1, -2)
        W_new.append(b_last * W0[layer] + g_last * S0[layer] - h_t @ (c_last * deltas[layer]))
        S_new.append(e_last * S0[layer] - h_t @ (m_last * deltas[layer]))
    return out, W_new, S_new


def neural_memory_chunked(
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
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """Chunked parallel neural memory; same interface and result as
    :func:`~titans_memory.ops.naive.neural_memory_recurrent` with the same ``chunk_size``.

    Chunks start at position 0 of this call; a last partial chunk is processed as a shorter chunk,
    so the returned state is the state after the last token.

    Shapes: ``q, k, v`` ``[B, H, T, d]``; gates ``[B, H, T]``; weights/momentum per layer
    ``[B, H, d_in, d_out]``. Returns ``(o [B, H, T, d], weights_T, momentum_T)``.
    """
    W = list(weights)
    S = [torch.zeros_like(w) for w in W] if momentum is None else list(momentum)
    outputs = []
    for start in range(0, q.shape[2], chunk_size):
        sl = slice(start, start + chunk_size)
        o, W, S = chunk_step(
            q[:, :, sl], k[:, :, sl], v[:, :, sl],
            theta[:, :, sl], eta[:, :, sl], alpha[:, :, sl],
            W, S, spec, max_update_norm,
        )
        outputs.append(o)
    if not outputs:
        return q.new_zeros(q.shape), W, S
    return torch.cat(outputs, dim=2), W, S
