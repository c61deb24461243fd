"""The per-head memory MLP: forward pass and its explicit (closed-form) backward pass.

Shapes: weights are a list of ``L`` tensors ``W[l]`` of shape ``[..., d_in_l, d_out_l]`` (leading
dims are batch and head); inputs ``x`` are ``[..., n, d]`` row vectors, so layer ``l`` computes
``z_l = h_{l-1} @ W[l]`` and ``h_l = act(z_l)`` (no activation after the last layer).

The memory output is ``M(x) = post(MLP(x))`` with ``post`` an optional parameter-free layer norm
followed by an optional residual ``+ x``. The associative loss of one token is
``||M(k) - v||^2`` and its gradient w.r.t. ``W[l]`` is the outer product ``h_{l-1}^T delta_l``;
``key_gradients`` returns the factors ``h_{l-1}`` and ``delta_l`` for every token at once, which
is all the chunked form needs (no per-token autograd).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

NORM_EPS = 1e-5


def _identity(z: Tensor) -> Tensor:
    return z


def _identity_grad(z: Tensor) -> Tensor:
    return torch.ones_like(z)


def _silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _gelu(z: Tensor) -> Tensor:
    return F.gelu(z)


def _gelu_grad(z: Tensor) -> Tensor:
    cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return cdf + z * pdf


def _relu_grad(z: Tensor) -> Tensor:
    return (z > 0).to(z.dtype)


ACTIVATIONS: dict = {
    "silu": (F.silu, _silu_grad),
    "gelu": (_gelu, _gelu_grad),
    "relu": (F.relu, _relu_grad),
    "identity": (_identity, _identity_grad),
}


@dataclass(frozen=True)
class MemoryMLPSpec:
    """Static description of the memory function (everything except its weights)."""

    activation: str = "silu"
    residual: bool = True
    norm: bool = False

    @property
    def act(self) -> Callable[[Tensor], Tensor]:
        return ACTIVATIONS[self.activation][0]

    @property
    def act_grad(self) -> Callable[[Tensor], Tensor]:
        return ACTIVATIONS[self.activation][1]


def layer_shapes(head_dim: int, depth: int, expansion: int) -> List[Tuple[int, int]]:
    """``(d_in, d_out)`` of each memory layer: ``d -> E d -> ... -> E d -> d`` (depth 1: ``d -> d``)."""
    if depth == 1:
        return [(head_dim, head_dim)]
    hidden = head_dim * expansion
    dims = [head_dim] + [hidden] * (depth - 1) + [head_dim]
    return list(zip(dims[:-1], dims[1:]))


def _layer_norm(y: Tensor) -> Tuple[Tensor, Tensor]:
    mu = y.mean(-1, keepdim=True)
    yc = y - mu
    rstd = torch.rsqrt((yc * yc).mean(-1, keepdim=True) + NORM_EPS)
    return yc * rstd, rstd


def post_forward(y: Tensor, x: Tensor, spec: MemoryMLPSpec) -> Tuple[Tensor, Tensor | None]:
    """Apply the optional norm and residual to the MLP output ``y``; returns (out, rstd)."""
    rstd = None
    if spec.norm:
        y, rstd = _layer_norm(y)
    if spec.residual:
        y = y + x
    return y, rstd


def post_backward(d_out: Tensor, out_normed: Tensor, rstd: Tensor | None, spec: MemoryMLPSpec) -> Tensor:
    """Gradient w.r.t. the raw MLP output given the gradient ``d_out`` of the memory output.

    ``out_normed`` is the normalised MLP output (before the residual) when ``spec.norm``.
    """
    if not spec.norm:
        return d_out
    mean_d = d_out.mean(-1, keepdim=True)
    mean_dy = (d_out * out_normed).mean(-1, keepdim=True)
    return (d_out - mean_d - out_normed * mean_dy) * rstd


def mlp_forward(x: Tensor, weights: Sequence[Tensor], spec: MemoryMLPSpec) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """Run the memory MLP on ``x`` ``[..., n, d]``.

    Returns ``(y, hs, zs)``: the MLP output ``y`` (before ``post``), the input ``hs[l]`` of every
    layer and the pre-activation ``zs[l]`` of every hidden layer (``len(zs) == L - 1``).
    """
    hs, zs = [x], []
    h = x
    for layer, w in enumerate(weights):
        z = h @ w
        if layer < len(weights) - 1:
            zs.append(z)
            h = spec.act(z)
            hs.append(h)
        else:
            h = z
    return h, hs, zs


def memory_apply(x: Tensor, weights: Sequence[Tensor], spec: MemoryMLPSpec) -> Tensor:
    """``M(x)``: the memory's output for inputs ``x`` ``[..., n, d]`` (retrieval, no update)."""
    y, _, _ = mlp_forward(x, weights, spec)
    return post_forward(y, x, spec)[0]


def key_gradients(
    k: Tensor, v: Tensor, weights: Sequence[Tensor], spec: MemoryMLPSpec
) -> Tuple[List[Tensor], List[Tensor]]:
    """Factors of the per-token gradients of ``||M(k_i) - v_i||^2`` at ``weights``.

    Args:
        k, v: ``[..., n, d]`` keys and values.
        weights: per-layer weights ``[..., d_in, d_out]``.
    Returns:
        ``(hs, deltas)``, lists over layers of ``[..., n, d_in_l]`` and ``[..., n, d_out_l]``:
        the gradient of token ``i``'s loss w.r.t. ``W[l]`` is ``hs[l][i]^T deltas[l][i]``.
    """
    y, hs, zs = mlp_forward(k, weights, spec)
    rstd = None
    if spec.norm:
        y, rstd = _layer_norm(y)
    y_post = y + k if spec.residual else y
    d_out = 2.0 * (y_post - v)
    delta = post_backward(d_out, y, rstd, spec)
    deltas = [delta]
    for layer in range(len(weights) - 1, 0, -1):
        delta = (delta @ weights[layer].transpose(-1, -2)) * spec.act_grad(zs[layer - 1])
        deltas.append(delta)
    deltas.reverse()
    return hs, deltas


def clip_scale(hs: Sequence[Tensor], deltas: Sequence[Tensor], max_norm: float) -> Tensor:
    """Per-token factor ``min(1, max_norm / ||G_i||_F)`` with ``G_i`` the token's full gradient.

    The Frobenius norm of an outer product ``h^T delta`` is ``||h|| ||delta||``, so no gradient is
    materialised. Returns ``[..., n]``.
    """
    sq = sum((h * h).sum(-1) * (d * d).sum(-1) for h, d in zip(hs, deltas))
    norm = torch.sqrt(sq + 1e-30)
    return torch.clamp(max_norm / norm, max=1.0)
