"""The chunked parallel form against the token-by-token reference (the paper's recurrence).

Tolerances: fp64 throughout, absolute 1e-10 on values and 1e-8 on gradients.
"""

from __future__ import annotations

import pytest
import torch

from titans_memory.ops import MemoryMLPSpec, layer_shapes, neural_memory_chunked, neural_memory_recurrent
from titans_memory.ops.chunked import segsum
from titans_memory.ops.mlp import key_gradients, memory_apply

F64 = torch.float64
SPECS = [
    MemoryMLPSpec("silu", residual=True, norm=False),
    MemoryMLPSpec("gelu", residual=False, norm=True),
    MemoryMLPSpec("relu", residual=True, norm=True),
]


def make_inputs(B=2, H=3, T=11, d=6, depth=2, expansion=2, requires_grad=False, momentum=True):
    q, k, v = (torch.randn(B, H, T, d, dtype=F64) for _ in range(3))
    q = q / q.norm(dim=-1, keepdim=True)
    k = k / k.norm(dim=-1, keepdim=True)
    theta = torch.rand(B, H, T, dtype=F64) * 0.4
    eta = torch.rand(B, H, T, dtype=F64)
    alpha = torch.rand(B, H, T, dtype=F64) * 0.3
    W = [torch.randn(B, H, a, b, dtype=F64) / a**0.5 for a, b in layer_shapes(d, depth, expansion)]
    S = [0.1 * torch.randn_like(w) for w in W] if momentum else None
    tensors = [q, k, v, theta, eta, alpha, *W, *(S or [])]
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    return (q, k, v, theta, eta, alpha), W, S, tensors


def max_err(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.activation}-res{int(s.residual)}-norm{int(s.norm)}")
def test_chunk_size_one_equals_recurrence(depth, spec):
    args, W, S, _ = make_inputs(depth=depth)
    o1, W1, S1 = neural_memory_recurrent(*args, W, S, spec, chunk_size=1)
    o2, W2, S2 = neural_memory_chunked(*args, W, S, spec, chunk_size=1)
    assert max_err([o1, *W1, *S1], [o2, *W2, *S2]) < 1e-10


@pytest.mark.parametrize("chunk", [2, 4, 5, 16])
@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.parametrize("clip", [None, 0.3])
def test_chunked_equals_chunk_transcription(chunk, depth, clip):
    """Chunk > 1: the fast form equals the per-token transcription of the chunked equations
    (gradients at chunk-start weights, momentum and forgetting applied token by token)."""
    args, W, S, _ = make_inputs(T=13, depth=depth)
    o1, W1, S1 = neural_memory_recurrent(*args, W, S, SPECS[0], chunk_size=chunk, max_update_norm=clip)
    o2, W2, S2 = neural_memory_chunked(*args, W, S, SPECS[0], chunk_size=chunk, max_update_norm=clip)
    assert max_err([o1, *W1, *S1], [o2, *W2, *S2]) < 1e-10


def test_chunking_changes_the_result():
    """Guard against a vacuous equivalence: chunk 4 must differ from the exact recurrence."""
    args, W, S, _ = make_inputs(T=12)
    o1, _, _ = neural_memory_recurrent(*args, W, S, SPECS[0], chunk_size=1)
    o4, _, _ = neural_memory_chunked(*args, W, S, SPECS[0], chunk_size=4)
    assert (o1 - o4).abs().max().item() > 1e-6


def test_single_step_matches_hand_computed_update():
    """Linear memory, one token: W1 = (1-a) W0 + eta S0 - theta * 2 k^T (k W0 - v); o = q W1."""
    spec = MemoryMLPSpec("identity", residual=False, norm=False)
    args, W, S, _ = make_inputs(T=1, depth=1)
    q, k, v, theta, eta, alpha = args
    o, W1, S1 = neural_memory_chunked(*args, W, S, spec, chunk_size=8)
    grad = 2 * k.transpose(-1, -2) @ (k @ W[0] - v)
    S_exp = eta[..., None] * S[0] - theta[..., None] * grad
    W_exp = (1 - alpha[..., None]) * W[0] + S_exp
    assert torch.allclose(S1[0], S_exp, atol=1e-12)
    assert torch.allclose(W1[0], W_exp, atol=1e-12)
    assert torch.allclose(o, q @ W_exp, atol=1e-12)


@pytest.mark.parametrize("spec", SPECS[:2], ids=["silu-res", "gelu-norm"])
def test_key_gradients_match_autograd(spec):
    _, W, _, _ = make_inputs(depth=3)
    k = torch.randn(2, 3, 5, 6, dtype=F64)
    v = torch.randn(2, 3, 5, 6, dtype=F64)
    hs, deltas = key_gradients(k, v, W, spec)
    for i in range(5):
        Wg = [w.clone().requires_grad_() for w in W]
        loss = (memory_apply(k[:, :, i : i + 1], Wg, spec) - v[:, :, i : i + 1]).pow(2).sum()
        grads = torch.autograd.grad(loss, Wg)
        for layer, g in enumerate(grads):
            outer = hs[layer][:, :, i, :, None] * deltas[layer][:, :, i, None, :]
            assert torch.allclose(g, outer, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 3])
def test_outer_gradients_match_autograd_through_reference(chunk):
    """Gradients w.r.t. q, k, v, gates, initial weights and momentum agree with autograd through
    the recurrent reference (second-order terms through the inner gradient included)."""
    args, W, S, leaves = make_inputs(T=7, depth=2, requires_grad=True)
    probe = torch.randn(2, 3, 7, 6, dtype=F64)

    def objective(fn):
        o, Wt, St = fn(*args, W, S, SPECS[0], chunk_size=chunk, max_update_norm=0.8)
        return (o * probe).sum() + sum((w * w).sum() for w in Wt) + sum(s.sum() for s in St)

    g_ref = torch.autograd.grad(objective(neural_memory_recurrent), leaves)
    g_fast = torch.autograd.grad(objective(neural_memory_chunked), leaves)
    for a, b in zip(g_ref, g_fast):
        assert torch.isfinite(a).all()
        assert (a - b).abs().max().item() < 1e-8 * max(1.0, a.abs().max().item())


def test_segsum_is_exact_and_causal():
    x = torch.randn(2, 6, dtype=F64)
    s = segsum(x)
    for t in range(6):
        for j in range(6):
            if j <= t:
                assert torch.allclose(s[:, t, j], x[:, j + 1 : t + 1].sum(-1))
            else:
                assert torch.isinf(s[:, t, j]).all()


def test_extreme_gates_stay_finite():
    args, W, S, _ = make_inputs(T=16)
    q, k, v, theta, eta, alpha = args
    eta = torch.zeros_like(eta)  # no momentum at all
    alpha = torch.ones_like(alpha) * (1 - 1e-12)  # forget (almost) everything
    o, W1, S1 = neural_memory_chunked(q, k, v, theta, eta, alpha, W, S, SPECS[0], chunk_size=8)
    o_ref, W_ref, _ = neural_memory_recurrent(q, k, v, theta, eta, alpha, W, S, SPECS[0], chunk_size=8)
    assert torch.isfinite(o).all()
    assert max_err([o, *W1], [o_ref, *W_ref]) < 1e-9
