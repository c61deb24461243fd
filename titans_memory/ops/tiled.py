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

The result equals :func:`~titans_memory.ops.chunked.neural_memory_chunked`.

The backward (:func:`chunk_backward_depth2`, :func:`chunk_backward_depth1`, driven by
:func:`neural_memory_tiled_backward`) is written out by hand in the same tiled layout: each chunk
recomputes its tile-local forward from the chunk-start state, and every gradient that sums over
hidden units (depth 2) or output columns (depth 1) goes through ``_reduce``; the list of these
reductions is in the docstrings of the two chunk backwards. The only use of autograd is the
per-head backward of :func:`~titans_memory.ops.chunked.chunk_coefficients` (``c x c``, gates only).
Its result equals autograd through the chunked form.

This module is a reference for kernels and is not dispatched by
:func:`~titans_memory.ops.neural_memory`.
"""

from __future__ import annotations

import math
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


# ---------------------------------------------------------------------------------------------
# Backward of the depth-2 tiled form (specification of the multi-program backward kernel)
# ---------------------------------------------------------------------------------------------


def _act_grad2(spec: MemoryMLPSpec, z: Tensor) -> Tensor:
    """``act''(z)`` elementwise, written out (the tile tensors are never differentiated by autograd)."""
    if spec.activation == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    if spec.activation == "gelu":
        return torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi) * (2.0 - z * z)
    if spec.activation in ("relu", "identity"):
        return torch.zeros_like(z)
    raise ConfigError(f"no second derivative for activation {spec.activation!r}")


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Per-token dot product ``sum_e a[..., t, e] b[..., t, e]`` -> ``[..., c]``."""
    return (a * b).sum(-1)


def _coefficients_backward(theta_c: Tensor, eta: Tensor, alpha: Tensor, cotangents) -> Tuple[Tensor, Tensor, Tensor]:
    """Back-propagate cotangents ``(dbeta, dg, dC, dE, dD)`` of :func:`chunk_coefficients` to its
    gates ``(theta', eta, alpha)`` (all ``[B, H, c]``).

    This is the one place where autograd is used: the ``c x c`` coefficient computation is per
    head (it does not involve the tiled state), so the kernel runs it once per head after the
    reductions that form ``dC, dbeta, ...``. It differentiates the gates only, never a tile tensor.
    """
    with torch.enable_grad():
        gates = [t.detach().requires_grad_(True) for t in (theta_c, eta, alpha)]
        outs = chunk_coefficients(*gates)
        grads = torch.autograd.grad(outs, gates, grad_outputs=list(cotangents), allow_unused=True)
    return tuple(torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, gates))


def _gates_backward(theta_c, eta, alpha, D, dbeta, dg, dC, dcl, dml, dbl, dgl, del_):
    """Per head: gradients of ``(theta', eta, alpha)`` (``[B, H, c]``) from the reduced cotangents
    of the coefficients used inside the chunk (``dbeta, dg`` ``[B, H, c]``, ``dC`` ``[B, H, c, c]``)
    and of the last-row coefficients of the state update (``dcl = d C[-1]``, ``dml = d(theta' D[-1])``
    ``[B, H, c]``; ``dbl, dgl, del_ = d beta[-1], d g[-1], d E[-1]`` ``[B, H]``)."""
    dC = dC.clone()
    dC[..., -1, :] += dcl
    dbeta = dbeta.clone()
    dbeta[..., -1] += dbl
    dg = dg.clone()
    dg[..., -1] += dgl
    dE = torch.zeros_like(dbeta)
    dE[..., -1] += del_
    dD = torch.zeros_like(D)
    dD[..., -1, :] += dml * theta_c  # ml = theta' * D[-1]
    dtheta_c, deta, dalpha = _coefficients_backward(theta_c, eta, alpha, (dbeta, dg, dC, dE, dD))
    return dtheta_c + dml * D[..., -1, :], deta, dalpha


def _clip_backward(dtheta_c, theta, s, ratio, n2):
    """Through ``theta' = theta s``, ``s = min(1, ratio)``, ``ratio = m / sqrt(n^2)`` (all ``[B, H, c]``,
    per head): returns ``(dtheta, d n^2)``."""
    ds = dtheta_c * theta
    # where s is not clamped, ds/dn^2 = -ratio / (2 n^2); the mask matches torch.clamp's backward
    dn2 = torch.where(ratio <= 1.0, -ds * ratio / (2.0 * n2), torch.zeros_like(ds))
    return dtheta_c * s, dn2


def chunk_backward_depth2(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    W: Sequence[Tensor],
    S: Sequence[Tensor],
    spec: MemoryMLPSpec,
    max_update_norm: Optional[float],
    tiles: Sequence[slice],
    dO: Tensor,
    dW_next: Sequence[Tensor],
    dS_next: Sequence[Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, List[Tensor], List[Tensor]]:
    """Backward of one chunk of the depth-2 memory, tile by tile, cross-tile sums through ``_reduce``.

    Shapes: ``q, k, v, dO`` ``[B, H, c, d]``; ``theta, eta, alpha`` ``[B, H, c]``; chunk-start state
    ``W = [W1, W2]``, ``S = [S1, S2]`` with ``W1, S1`` ``[B, H, d, Hd]`` and ``W2, S2`` ``[B, H, Hd, d]``;
    ``dW_next, dS_next``: cotangents of the state after the chunk, same shapes; ``tiles``: slices of
    the hidden units (tile ``j`` owns ``W1[..., cols_j]``, ``S1[..., cols_j]``, ``W2[..., cols_j, :]``,
    ``S2[..., cols_j, :]`` and the matching slices of the adjoints).

    Returns ``(dq, dk, dv, dtheta, deta, dalpha, [dW1, dW2], [dS1, dS2])``: the gradients of the
    chunk's inputs and of its chunk-start state (the adjoint carried into the previous chunk).

    Notation (``_j``: tile ``j``'s slice of the hidden units; everything else is per head):
    ``z1 = k W1``, ``h1 = act(z1)``, ``y = h1 W2``, ``delta2 = 2 (y [+ k] - v)``,
    ``u = delta2 W2^T``, ``delta1 = u * act'(z1)``, clip ``theta' = theta s``, coefficients
    ``(beta, g, C, E, D)`` of ``(theta', eta, alpha)``, ``cl = C[-1]``, ``ml = theta' D[-1]``,
    ``bl, gl, el`` the last entries of ``beta, g, E``; ``QK = q k^T``, ``N1 = QK * C``,
    ``a1 = beta q W1 + g q S1 - N1 delta1``, ``x1 = act(a1)``, ``XH = x1 h1^T``, ``N2 = XH * C``,
    ``o = beta x1 W2 + g x1 S2 - N2 delta2 [+ q]``;
    ``W1' = bl W1 + gl S1 - k^T (cl delta1)``, ``S1' = el S1 - k^T (ml delta1)`` and the same for
    layer 2 with ``h1, delta2``.

    Cross-tile reductions (each a ``_reduce`` below, named R1..R8):

    - R1 ``y = sum_j h1_j W2_j`` (``c x d``; forward recompute);
    - R2 (clip only) ``sum_j |delta1_j|^2``, ``sum_j |h1_j|^2`` (``2 c``; forward recompute);
    - R3 ``XH = sum_j x1_j h1_j^T`` (``c x c``);
    - R4 ``dN1 = -sum_j da1_j delta1_j^T`` (``c x c``; can share one exchange with R3's buffer
      if R3 is deferred until ``da1`` is known);
    - R5 the gate cotangents: per token ``dbeta, dg, dcl, dml`` (``4 c``) and per head the
      scalars ``dbl, dgl, del`` (3), all sums over the hidden units;
    - R6 ``d delta2`` (``c x d``): the parts that reach ``delta2`` through ``W2_j`` and ``h1_j``;
    - R7 ``dq`` partials ``beta da1_j W1_j^T + g da1_j S1_j^T`` (``c x d``; final output, atomic);
    - R8 ``dk`` partials ``dz1_j W1_j^T - (cl delta1_j) dW1'_j^T - (ml delta1_j) dS1'_j^T``
      (``c x d``; final output, atomic).

    Between R5 and R6 the per-head coefficient backward runs (``_coefficients_backward``, the
    only use of autograd, on the ``c``-sized gates) and, with the clip, the per-token chain
    ``d theta' -> ds -> d n^2`` (explicit). ``d delta1_j`` needs ``d n^2``, and ``d delta2`` needs
    ``d delta1_j``, so the order R5 -> coefficient backward -> R6 is forced.
    """
    W1, W2 = W
    S1, S2 = S
    dW1n, dW2n = dW_next
    dS1n, dS2n = dS_next
    act, act_d = spec.act, spec.act_grad
    clip = max_update_norm is not None

    # ---- phase A, tile-local recompute of the forward from the chunk-start state --------------
    z1 = [k @ W1[..., cols] for cols in tiles]
    h1 = [act(z) for z in z1]
    y = _reduce([h @ W2[..., cols, :] for cols, h in zip(tiles, h1)])  # R1: MLP output on the keys
    delta2 = 2.0 * ((y + k if spec.residual else y) - v)  # per head
    u = [delta2 @ W2[..., cols, :].transpose(-1, -2) for cols in tiles]
    delta1 = [uj * act_d(z) for uj, z in zip(u, z1)]
    if clip:
        kk = _rowdot(k, k)  # per head
        dd2 = _rowdot(delta2, delta2)  # per head
        dd1 = _reduce([_rowdot(d, d) for d in delta1])  # R2a: |delta1|^2 per token
        hh = _reduce([_rowdot(h, h) for h in h1])  # R2b: |h1|^2 per token
        n2 = kk * dd1 + hh * dd2 + 1e-30
        ratio = max_update_norm / torch.sqrt(n2)
        s = torch.clamp(ratio, max=1.0)
        theta_c = theta * s
    else:
        theta_c = theta
    beta, g, C, E, D = chunk_coefficients(theta_c, eta, alpha)  # per head
    cl, ml = C[..., -1, :], theta_c * D[..., -1, :]
    bl, gl, el = beta[..., -1, None, None], g[..., -1, None, None], E[..., -1, None, None]
    QK = q @ k.transpose(-1, -2)  # per head
    N1 = QK * C
    a1 = [beta[..., None] * (q @ W1[..., cols]) + g[..., None] * (q @ S1[..., cols]) - N1 @ d1
          for cols, d1 in zip(tiles, delta1)]
    x1 = [act(a) for a in a1]
    XH = _reduce([x @ h.transpose(-1, -2) for x, h in zip(x1, h1)])  # R3: x1 h1^T
    N2 = XH * C

    # ---- phase B: output layer and layer-1 retrieval, tile-local, then the gate reductions -----
    dN2 = -dO @ delta2.transpose(-1, -2)  # per head: cotangent of N2
    dXH_C = dN2 * C  # cotangent of XH
    da1, dq_parts, dbeta_parts, dg_parts, dcl_parts, dml_parts, dscal_parts = [], [], [], [], [], [], []
    for j, cols in enumerate(tiles):
        W1j, S1j, W2j, S2j = W1[..., cols], S1[..., cols], W2[..., cols, :], S2[..., cols, :]
        dx1 = beta[..., None] * (dO @ W2j.transpose(-1, -2)) + g[..., None] * (dO @ S2j.transpose(-1, -2)) \
            + dXH_C @ h1[j]
        da = dx1 * act_d(a1[j])
        da1.append(da)
        qW1, qS1 = q @ W1j, q @ S1j
        dbeta_parts.append(_rowdot(dO, x1[j] @ W2j) + _rowdot(da, qW1))
        dg_parts.append(_rowdot(dO, x1[j] @ S2j) + _rowdot(da, qS1))
        # state update: W1' = ... - k^T (cl delta1), W2' = ... - h1^T (cl delta2); S' with ml
        dcl_parts.append(-_rowdot(k @ dW1n[..., cols], delta1[j]) - _rowdot(h1[j] @ dW2n[..., cols, :], delta2))
        dml_parts.append(-_rowdot(k @ dS1n[..., cols], delta1[j]) - _rowdot(h1[j] @ dS2n[..., cols, :], delta2))
        dscal_parts.append(torch.stack([
            (dW1n[..., cols] * W1j).sum((-1, -2)) + (dW2n[..., cols, :] * W2j).sum((-1, -2)),  # dbl
            (dW1n[..., cols] * S1j).sum((-1, -2)) + (dW2n[..., cols, :] * S2j).sum((-1, -2)),  # dgl
            (dS1n[..., cols] * S1j).sum((-1, -2)) + (dS2n[..., cols, :] * S2j).sum((-1, -2)),  # del
        ], -1))
        dq_parts.append(beta[..., None] * (da @ W1j.transpose(-1, -2)) + g[..., None] * (da @ S1j.transpose(-1, -2)))
    dN1 = -_reduce([da @ d1.transpose(-1, -2) for da, d1 in zip(da1, delta1)])  # R4: cotangent of N1
    # R5: the gate cotangents, per token (dbeta, dg, dcl, dml) and per head (dbl, dgl, del)
    dbeta = _reduce(dbeta_parts)
    dg = _reduce(dg_parts)
    dcl = _reduce(dcl_parts)
    dml = _reduce(dml_parts)
    dbl, dgl, del_ = _reduce(dscal_parts).unbind(-1)

    # ---- per head: coefficient backward (autograd on the c-sized gates only) and the clip -----
    dtheta_c, deta, dalpha = _gates_backward(theta_c, eta, alpha, D, dbeta, dg, dN1 * QK + dN2 * XH,
                                             dcl, dml, dbl, dgl, del_)
    if clip:
        dtheta, dn2 = _clip_backward(dtheta_c, theta, s, ratio, n2)
        d_dd1 = dn2 * kk  # cotangent of |delta1|^2 (applied per tile below)
        d_hh = dn2 * dd2  # cotangent of |h1|^2 (per tile below)
        d_kk = dn2 * dd1
        d_dd2 = dn2 * hh
    else:
        dtheta = dtheta_c

    # ---- phase C: hidden-layer errors per tile, then R6: d delta2 ------------------------------
    ddelta1, du, ddelta2_parts = [], [], []
    for j, cols in enumerate(tiles):
        dd = -N1.transpose(-1, -2) @ da1[j] - cl[..., None] * (k @ dW1n[..., cols]) \
            - ml[..., None] * (k @ dS1n[..., cols])
        if clip:
            dd = dd + 2.0 * d_dd1[..., None] * delta1[j]
        ddelta1.append(dd)
        du.append(dd * act_d(z1[j]))
        ddelta2_parts.append(du[j] @ W2[..., cols, :] - cl[..., None] * (h1[j] @ dW2n[..., cols, :])
                             - ml[..., None] * (h1[j] @ dS2n[..., cols, :]))
    ddelta2 = _reduce(ddelta2_parts) - N2.transpose(-1, -2) @ dO  # R6: d delta2
    if clip:
        ddelta2 = ddelta2 + 2.0 * d_dd2[..., None] * delta2
    dy = 2.0 * ddelta2
    dv = -dy
    dQK = dN1 * C
    dk_head = dQK.transpose(-1, -2) @ q
    if spec.residual:
        dk_head = dk_head + dy
    if clip:
        dk_head = dk_head + 2.0 * d_kk[..., None] * k

    # ---- phase D: key layer per tile; state adjoints; R7 dq, R8 dk ------------------------------
    dk_parts, dW1, dS1, dW2, dS2 = [], [], [], [], []
    for j, cols in enumerate(tiles):
        W1j, W2j = W1[..., cols], W2[..., cols, :]
        dW1nj, dS1nj, dW2nj, dS2nj = dW1n[..., cols], dS1n[..., cols], dW2n[..., cols, :], dS2n[..., cols, :]
        dh1 = dXH_C.transpose(-1, -2) @ x1[j] + dy @ W2j.transpose(-1, -2) \
            - (cl[..., None] * delta2) @ dW2nj.transpose(-1, -2) - (ml[..., None] * delta2) @ dS2nj.transpose(-1, -2)
        if clip:
            dh1 = dh1 + 2.0 * d_hh[..., None] * h1[j]
        dz1 = dh1 * act_d(z1[j]) + ddelta1[j] * u[j] * _act_grad2(spec, z1[j])
        dk_parts.append(dz1 @ W1j.transpose(-1, -2) - (cl[..., None] * delta1[j]) @ dW1nj.transpose(-1, -2)
                        - (ml[..., None] * delta1[j]) @ dS1nj.transpose(-1, -2))
        qt, kt = q.transpose(-1, -2), k.transpose(-1, -2)
        dW1.append(bl * dW1nj + qt @ (beta[..., None] * da1[j]) + kt @ dz1)
        dS1.append(gl * dW1nj + el * dS1nj + qt @ (g[..., None] * da1[j]))
        x1t = x1[j].transpose(-1, -2)
        dW2.append(bl * dW2nj + x1t @ (beta[..., None] * dO) + du[j].transpose(-1, -2) @ delta2
                   + h1[j].transpose(-1, -2) @ dy)
        dS2.append(gl * dW2nj + el * dS2nj + x1t @ (g[..., None] * dO))
    dq = _reduce(dq_parts) + dQK @ k  # R7: dq (final output: atomic add in a kernel)
    if spec.residual:
        dq = dq + dO
    dk = _reduce(dk_parts) + dk_head  # R8: dk (final output: atomic add in a kernel)
    return (dq, dk, dv, dtheta, deta, dalpha,
            [torch.cat(dW1, -1), torch.cat(dW2, -2)], [torch.cat(dS1, -1), torch.cat(dS2, -2)])


def chunk_backward_depth1(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    W: Sequence[Tensor],
    S: Sequence[Tensor],
    spec: MemoryMLPSpec,
    max_update_norm: Optional[float],
    tiles: Sequence[slice],
    dO: Tensor,
    dW_next: Sequence[Tensor],
    dS_next: Sequence[Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, List[Tensor], List[Tensor]]:
    """Backward of one chunk of the depth-1 (linear) memory, tile by tile.

    Same arguments and results as :func:`chunk_backward_depth2` with ``W = [W]``, ``S = [S]``
    (``[B, H, d, d]``); tile ``j`` owns the output columns ``cols_j`` of ``W, S`` and of their
    adjoints, and the columns ``cols_j`` of ``v, dO`` and of ``delta = 2 (k W [+ k] - v)``.
    Forward: ``o = beta q W + g q S - (QK * C) delta [+ q]``, ``W' = bl W + gl S - k^T (cl delta)``,
    ``S' = el S - k^T (ml delta)``.

    Cross-tile reductions: (clip only, forward recompute) ``sum_j |delta_j|^2`` (``c``);
    ``dN = -sum_j dO_j delta_j^T`` (``c x c``); the gate cotangents ``dbeta, dg, dcl, dml`` (``4 c``)
    and ``dbl, dgl, del`` (3); ``dq`` and ``dk`` (``c x d`` each, final outputs: atomic adds).
    ``dv`` and the residual parts of ``dq, dk`` are column-local (concatenations).
    """
    (W,), (S,) = W, S
    (dWn,), (dSn,) = dW_next, dS_next
    clip = max_update_norm is not None
    # ---- recompute, tile-local -----------------------------------------------------------------
    delta = []
    for cols in tiles:
        y = k @ W[..., cols]
        delta.append(2.0 * ((y + k[..., cols] if spec.residual else y) - v[..., cols]))
    if clip:
        kk = _rowdot(k, k)  # per head
        dd = _reduce([_rowdot(d, d) for d in delta])  # reduction: |delta|^2 per token
        n2 = kk * dd + 1e-30
        ratio = max_update_norm / torch.sqrt(n2)
        s = torch.clamp(ratio, max=1.0)
        theta_c = theta * s
    else:
        theta_c = theta
    beta, g, C, E, D = chunk_coefficients(theta_c, eta, alpha)  # per head
    cl, ml = C[..., -1, :], theta_c * D[..., -1, :]
    bl, gl, el = beta[..., -1, None, None], g[..., -1, None, None], E[..., -1, None, None]
    QK = q @ k.transpose(-1, -2)
    N = QK * C
    # ---- tile-local partials of the gate cotangents and of dN, dq --------------------------------
    dbeta_p, dg_p, dcl_p, dml_p, dscal_p, dN_p, dq_p = [], [], [], [], [], [], []
    for cols, d in zip(tiles, delta):
        Wj, Sj, dWj, dSj, dOj = W[..., cols], S[..., cols], dWn[..., cols], dSn[..., cols], dO[..., cols]
        dbeta_p.append(_rowdot(dOj, q @ Wj))
        dg_p.append(_rowdot(dOj, q @ Sj))
        dcl_p.append(-_rowdot(k @ dWj, d))
        dml_p.append(-_rowdot(k @ dSj, d))
        dscal_p.append(torch.stack([(dWj * Wj).sum((-1, -2)), (dWj * Sj).sum((-1, -2)), (dSj * Sj).sum((-1, -2))], -1))
        dN_p.append(dOj @ d.transpose(-1, -2))
        dq_p.append(beta[..., None] * (dOj @ Wj.transpose(-1, -2)) + g[..., None] * (dOj @ Sj.transpose(-1, -2)))
    dN = -_reduce(dN_p)  # reduction: cotangent of N = QK * C
    # reduction: the gate cotangents
    dbeta, dg, dcl, dml = _reduce(dbeta_p), _reduce(dg_p), _reduce(dcl_p), _reduce(dml_p)
    dbl, dgl, del_ = _reduce(dscal_p).unbind(-1)
    # ---- per head: coefficient backward and the clip ---------------------------------------------
    dtheta_c, deta, dalpha = _gates_backward(theta_c, eta, alpha, D, dbeta, dg, dN * QK, dcl, dml, dbl, dgl, del_)
    if clip:
        dtheta, dn2 = _clip_backward(dtheta_c, theta, s, ratio, n2)
    else:
        dtheta = dtheta_c
    # ---- tile-local: token errors, state adjoints, partials of dk -------------------------------
    dQK = dN * C
    dk_p, dres, dW, dS = [], [], [], []
    for cols, d in zip(tiles, delta):
        Wj, Sj, dWj, dSj, dOj = W[..., cols], S[..., cols], dWn[..., cols], dSn[..., cols], dO[..., cols]
        dd_j = -N.transpose(-1, -2) @ dOj - cl[..., None] * (k @ dWj) - ml[..., None] * (k @ dSj)
        if clip:
            dd_j = dd_j + 2.0 * (dn2 * kk)[..., None] * d
        dk_p.append(2.0 * dd_j @ Wj.transpose(-1, -2) - (cl[..., None] * d) @ dWj.transpose(-1, -2)
                    - (ml[..., None] * d) @ dSj.transpose(-1, -2))
        dres.append(2.0 * dd_j)  # cotangent of y_j = k W_j [+ k_j]: columns cols_j only
        dW.append(bl * dWj + q.transpose(-1, -2) @ (beta[..., None] * dOj) + k.transpose(-1, -2) @ (2.0 * dd_j))
        dS.append(gl * dWj + el * dSj + q.transpose(-1, -2) @ (g[..., None] * dOj))
    dy = torch.cat(dres, -1)  # disjoint columns: concatenation, not a reduction
    dq = _reduce(dq_p) + dQK @ k  # reduction: dq
    dk = _reduce(dk_p) + dQK.transpose(-1, -2) @ q  # reduction: dk
    if spec.residual:
        dq = dq + dO
        dk = dk + dy
    if clip:
        dk = dk + 2.0 * (dn2 * dd)[..., None] * k
    return dq, dk, -dy, dtheta, deta, dalpha, [torch.cat(dW, -1)], [torch.cat(dS, -1)]


def neural_memory_tiled_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    weights: Sequence[Tensor],
    momentum: Optional[Sequence[Tensor]],
    spec: MemoryMLPSpec,
    chunk_size: int,
    max_update_norm: Optional[float],
    n_tiles: int,
    d_out: Tensor,
    d_weights: Optional[Sequence[Tensor]] = None,
    d_momentum: Optional[Sequence[Tensor]] = None,
):
    """Gradients of :func:`neural_memory_tiled` (depth 1 or 2) by the hand-written tiled backward.

    Runs the forward chunk by chunk, keeping every chunk-start state (this is a reference: a
    kernel keeps a few checkpoints and recomputes, see ``ops/fused.py``), then walks the chunks
    in reverse with :func:`chunk_backward_depth2` (or ``_depth1``). The last partial chunk is a shorter chunk, as
    in the forward.

    Args: the inputs of :func:`neural_memory_tiled` (``momentum=None`` means zeros), then the
    cotangents of its outputs: ``d_out`` ``[B, H, T, d]`` and ``d_weights``, ``d_momentum`` (lists
    over layers, ``None`` for zeros).
    Returns ``(dq, dk, dv, dtheta, deta, dalpha, d_weights0, d_momentum0)``: the gradients of the
    inputs and of the initial weights and momentum (lists over layers).
    """
    if len(weights) not in (1, 2):
        raise ConfigError(f"the tiled backward covers memory depth 1 and 2, not {len(weights)}")
    if spec.norm:
        raise ConfigError("the tiled form does not cover the memory output norm (spec.norm)")
    W = list(weights)
    S = [torch.zeros_like(w) for w in W] if momentum is None else list(momentum)
    tiles = _split(W[0].shape[-1], n_tiles)
    T = q.shape[2]
    starts = list(range(0, T, chunk_size))
    if len(W) == 1:
        forward, backward = _chunk_depth1, chunk_backward_depth1
    else:
        forward, backward = _chunk_depth2, chunk_backward_depth2
    states = []
    with torch.no_grad():
        for start in starts:
            sl = slice(start, start + chunk_size)
            states.append((W, S))
            _, W, S = forward(q[:, :, sl], k[:, :, sl], v[:, :, sl], theta[:, :, sl], eta[:, :, sl],
                              alpha[:, :, sl], W, S, spec, max_update_norm, tiles)
    dW = [torch.zeros_like(w) for w in W] if d_weights is None else list(d_weights)
    dS = [torch.zeros_like(s) for s in S] if d_momentum is None else list(d_momentum)
    grads = [torch.zeros_like(t) for t in (q, k, v, theta, eta, alpha)]
    for start, (W0, S0) in zip(reversed(starts), reversed(states)):
        sl = slice(start, start + chunk_size)
        *g_chunk, dW, dS = backward(
            q[:, :, sl], k[:, :, sl], v[:, :, sl], theta[:, :, sl], eta[:, :, sl], alpha[:, :, sl],
            W0, S0, spec, max_update_norm, tiles, d_out[:, :, sl], dW, dS)
        for full, part in zip(grads, g_chunk):
            full[:, :, sl] = part
    return (*grads, dW, dS)
