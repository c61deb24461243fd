"""The fused q/k/v stream kernels (``titans_memory.ops.qkv_prep``) against their PyTorch
specification, under ``TRITON_INTERPRET=1`` on the CPU (on a GPU where there is one)."""

from __future__ import annotations

import pytest
import torch

from titans_memory.errors import ConfigError, ShapeError
from titans_memory.ops.qkv_prep import qkv_prep, qkv_prep_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5  # fp32 inputs, relative to the largest entry


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def _inputs(B, T, H, d, K, with_cache, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = H * d
    p = torch.randn(B, T, 3 * C, generator=g).to(DEV, dtype)
    convs = None
    if K > 1:
        convs = [(torch.randn(C, 1, K, generator=g).to(DEV) * 0.5, torch.randn(C, generator=g).to(DEV) * 0.1)
                 for _ in range(3)]
    caches = [torch.randn(B, K - 1, C, generator=g).to(DEV, dtype) if with_cache and K > 1 else None
              for _ in range(3)]
    return p, convs, caches


def _run(impl, p, convs, caches, H, cots):
    p = p.clone().requires_grad_()
    cv = None if convs is None else [(w.clone().requires_grad_(), b.clone().requires_grad_()) for w, b in convs]
    outs, new = qkv_prep(p, cv, caches, H, impl=impl)
    loss = sum((o * c).sum() for o, c in zip(outs, cots) if c is not None)
    loss.backward()
    grads = [p.grad] + ([] if cv is None else [t.grad for pair in cv for t in pair])
    return outs, new, grads


@pytest.mark.parametrize("B,T,H,d,K,with_cache", [
    (2, 70, 2, 16, 4, False),   # T not a multiple of the block, two blocks
    (1, 33, 3, 32, 4, True),    # carried cache
    (2, 5, 2, 16, 4, True),     # T shorter than... the cache still reaches into the block
    (1, 40, 2, 16, 1, False),   # no convolution
    (1, 20, 1, 64, 2, True),
])
def test_triton_matches_reference(B, T, H, d, K, with_cache):
    p, convs, caches = _inputs(B, T, H, d, K, with_cache, seed=T + d)
    g = torch.Generator().manual_seed(7)
    cots = [torch.randn(B, H, T, d, generator=g).to(DEV) for _ in range(3)]
    ref_o, ref_new, ref_g = _run("torch", p, convs, caches, H, cots)
    tri_o, tri_new, tri_g = _run("triton", p, convs, caches, H, cots)
    for a, b in zip(tri_o, ref_o):
        assert a.shape == b.shape and a.is_contiguous()
        assert _rel(a, b) < TOL
    for a, b in zip(tri_g, ref_g):
        assert _rel(a, b) < TOL, (a.shape, _rel(a, b))
    for a, b in zip(tri_new, ref_new):
        if K == 1:
            assert a is None and b is None
        else:
            assert torch.equal(a, b)


def test_unused_stream_and_half_inputs():
    """A stream with no gradient gives zero gradient columns; bf16 projections (autocast) within bf16 rounding."""
    B, T, H, d, K = 1, 50, 2, 16, 4
    p, convs, caches = _inputs(B, T, H, d, K, True)
    g = torch.Generator().manual_seed(3)
    cots = [torch.randn(B, H, T, d, generator=g).to(DEV), None, torch.randn(B, H, T, d, generator=g).to(DEV)]
    ref_o, _, ref_g = _run("torch", p, convs, caches, H, cots)
    tri_o, _, tri_g = _run("triton", p, convs, caches, H, cots)
    for a, b in zip(tri_g, ref_g):
        if b is None:  # the unused stream's conv parameters: no gradient there, zeros here
            assert a.abs().max().item() == 0.0
        else:
            assert _rel(a, b) < TOL
    C = H * d
    assert tri_g[0][..., C : 2 * C].abs().max().item() == 0.0
    ph = p.to(torch.bfloat16)
    hb = [c.to(torch.bfloat16) for c in caches]
    tri_h, _ = qkv_prep(ph, convs, hb, H, impl="triton")
    ref_h, _ = qkv_prep(ph.float(), convs, [c.float() for c in hb], H, impl="torch")
    for a, b in zip(tri_h, ref_h):
        assert a.dtype == torch.float32 and _rel(a, b) < TOL


def test_fresh_random_inputs_differ_from_reference_when_wrong():
    """The comparison is sensitive: a perturbed conv weight is detected."""
    B, T, H, d, K = 1, 30, 1, 16, 4
    p, convs, caches = _inputs(B, T, H, d, K, False, seed=11)
    ref, _ = qkv_prep(p, convs, caches, H, impl="torch")
    bad = [(w * 1.001, b) for w, b in convs]
    tri, _ = qkv_prep(p, bad, caches, H, impl="triton")
    assert max(_rel(a, b) for a, b in zip(tri, ref)) > TOL


def test_errors():
    p = torch.randn(1, 8, 3 * 2 * 16)
    with pytest.raises(ShapeError):
        qkv_prep(p[..., :-1], None, [None] * 3, 2)
    with pytest.raises(ShapeError):
        qkv_prep(p, None, [None] * 2, 2)
    with pytest.raises(ConfigError):
        qkv_prep(p, None, [None] * 3, 2, impl="cuda")
    with pytest.raises(ConfigError, match="head_dim 12"):
        qkv_prep(torch.randn(1, 8, 3 * 12), None, [None] * 3, 1, impl="triton")
    # auto falls back to PyTorch where the kernels do not apply (fp64 output)
    outs, _ = qkv_prep(p.double(), None, [None] * 3, 2, out_dtype=torch.float64)
    ref, _ = qkv_prep_reference(p.double(), None, [None] * 3, 2, out_dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(outs, ref))
