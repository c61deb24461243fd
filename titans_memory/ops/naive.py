"""Token-by-token reference of the neural-memory update: the specification.

This is the paper's recurrence (arXiv 2501.00663, Eqs. 9-14), written for clarity, not speed:

    G_t = grad_W || M_{W_a}(k_t) - v_t ||^2          (autograd; W_a = weights the gradient is taken at)
    S_t = eta_t * S_{t-1} - theta_t * G_t            (momentum / "surprise")
    W_t = (1 - alpha_t) * W_{t-1} + S_t              (forgetting)
    o_t = M_{W_t}(q_t)                               (retrieval, no update)

With ``chunk_size == 1`` the gradient is taken at the previous weights ``W_{t-1}``: the exact
recurrence. With ``chunk_size == b`` it is taken at the weights of the chunk's start (the weights
after the last token of the previous chunk): the paper's mini-batch form (section 3.2), which the
fast chunked implementation must reproduce.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .mlp import MemoryMLPSpec, memory_apply


def neural_memory_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    weights: Sequence[Tensor],
    momentum: Optional[Sequence[Tensor]] = None,
    spec: MemoryMLPSpec = MemoryMLPSpec(),
    chunk_size: int = 1,
    max_update_norm: Optional[float] = None,
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """Run the memory over a sequence one token at a time.

    Args:
        q, k, v: ``[B, H, T, d]`` queries, keys and values.
        theta, eta, alpha: ``[B, H, T]`` learning rate, momentum and forgetting gates.
        weights: initial memory weights, per layer ``[B, H, d_in, d_out]``.
        momentum: initial momentum (same shapes), zeros when ``None``.
        spec: the memory function (activation, residual, norm).
        chunk_size: tokens whose gradients are taken at the same (chunk-start) weights.
        max_update_norm: clip each token's gradient to this Frobenius norm (over all layers).
    Returns:
        ``(o, weights_T, momentum_T)``: outputs ``[B, H, T, d]`` and the final state.
    """
    W = list(weights)
    S = [torch.zeros_like(w) for w in W] if momentum is None else list(momentum)
    outputs = []
    anchor = W
    with torch.enable_grad():
        for t in range(q.shape[2]):
            if t % chunk_size == 0:
                anchor = [w if w.requires_grad else w.detach().requires_grad_() for w in W]
            k_t, v_t = k[:, :, t : t + 1], v[:, :, t : t + 1]
            # Heads and batch elements have independent weights, so the gradient of the summed
            # loss w.r.t. W[b, h] is the gradient of that (b, h) token's own loss.
            loss = (memory_apply(k_t, anchor, spec) - v_t).pow(2).sum()
            grads = torch.autograd.grad(loss, anchor, create_graph=torch.is_grad_enabled())
            step = theta[:, :, t]
            if max_update_norm is not None:
                norm = torch.sqrt(sum(g.pow(2).sum((-2, -1)) for g in grads) + 1e-30)
                step = step * torch.clamp(max_update_norm / norm, max=1.0)
            e = eta[:, :, t, None, None]
            a = alpha[:, :, t, None, None]
            s4 = step[..., None, None]
            S = [e * s - s4 * g for s, g in zip(S, grads)]
            W = [(1 - a) * w + s for w, s in zip(W, S)]
            outputs.append(memory_apply(q[:, :, t : t + 1], W, spec))
    return torch.cat(outputs, dim=2), W, S
