"""The tiled form (a head's state split over tiles, explicit cross-tile reductions: the spec of a
multi-program kernel) against the chunked form, fp64, fresh random inputs. Bound: 1e-10 relative
to the largest entry of each reference tensor (the two differ only in the order of floating-point
sums).

The hand-written tiled backward against ``torch.autograd.grad`` through the chunked form: bound
1e-9 on ``||got - ref|| / ||ref||`` for every input gradient (measured: about 1e-15)."""

import pytest
import torch

from titans_memory.errors import ConfigError
from titans_memory.ops import neural_memory_chunked
from titans_memory.ops.mlp import MemoryMLPSpec, clip_scale, key_gradients
from titans_memory.ops.tiled import neural_memory_tiled, neural_memory_tiled_backward

from test_memory_ops import make_inputs, max_err

TOL = 1e-10


@pytest.mark.parametrize("depth,n_tiles", [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (2, 4), (2, 8)])
@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("spec", [MemoryMLPSpec("silu", True), MemoryMLPSpec("gelu", False), MemoryMLPSpec("relu", True)],
                         ids=lambda s: f"{s.activation}-res{int(s.residual)}")
def test_tiled_equals_chunked(depth, n_tiles, clip, spec):
    torch.manual_seed(1000 * depth + 10 * n_tiles + (clip is not None))
    # T = 21 with chunk 8: two full chunks and a partial last one
    gates, W, S, _ = make_inputs(B=2, H=2, T=21, d=8, depth=depth, expansion=4)
    ref = neural_memory_chunked(*gates, W, S, spec, 8, clip)
    got = neural_memory_tiled(*gates, W, S, spec, 8, clip, n_tiles=n_tiles)
    for a, b in zip([got[0], *got[1], *got[2]], [ref[0], *ref[1], *ref[2]]):
        assert a.shape == b.shape
        assert max_err([a], [b]) < TOL * max(1.0, b.abs().max().item())


def test_tiled_clip_is_active_in_the_test():
    """The clip bound used above really changes the result (else its reduction is untested)."""
    torch.manual_seed(0)
    gates, W, S, _ = make_inputs(B=1, H=2, T=16, d=8, depth=2, expansion=4)
    a = neural_memory_chunked(*gates, W, S, MemoryMLPSpec(), 8, None)[0]
    b = neural_memory_chunked(*gates, W, S, MemoryMLPSpec(), 8, 0.05)[0]
    assert (a - b).abs().max() > 1e-3


def test_tiled_rejects_what_it_does_not_cover():
    gates, W, S, _ = make_inputs(B=1, H=1, T=4, d=8, depth=2, expansion=4)
    with pytest.raises(ConfigError, match="divide"):
        neural_memory_tiled(*gates, W, S, MemoryMLPSpec(), 4, None, n_tiles=3)
    with pytest.raises(ConfigError, match="norm"):
        neural_memory_tiled(*gates, W, S, MemoryMLPSpec(norm=True), 4, None)
    gates, W, S, _ = make_inputs(B=1, H=1, T=4, d=8, depth=3, expansion=2)
    with pytest.raises(ConfigError, match="depth"):
        neural_memory_tiled(*gates, W, S, MemoryMLPSpec(), 4, None)


# ---- the hand-written tiled backward against autograd through the chunked form ----

BACKWARD_TOL = 1e-9  # relative, ||got - ref|| / ||ref|| per gradient


def _clip_fraction(gates, W, spec, clip, chunk=8):
    """Fraction of the first chunk's tokens whose update the clip scales down."""
    _, k, v = gates[:3]
    hs, deltas = key_gradients(k[:, :, :chunk], v[:, :, :chunk], W, spec)
    return (clip_scale(hs, deltas, clip) < 1).double().mean().item()


@pytest.mark.parametrize("depth,n_tiles", [(1, 1), (1, 4), (2, 1), (2, 2), (2, 4)])
@pytest.mark.parametrize("clip", [None, 0.05, 6.0], ids=["noclip", "clip-all", "clip-some"])
@pytest.mark.parametrize("spec", [MemoryMLPSpec("silu", True), MemoryMLPSpec("gelu", False)],
                         ids=lambda s: f"{s.activation}-res{int(s.residual)}")
def test_tiled_backward_equals_autograd_of_chunked(depth, n_tiles, clip, spec):
    torch.manual_seed(1000 * depth + 100 * n_tiles + (0 if clip is None else int(clip * 100)) + len(spec.activation))
    # T = 21 with chunk 8: two full chunks and a partial last one
    gates, W, S, leaves = make_inputs(B=2, H=2, T=21, d=8, depth=depth, expansion=4, requires_grad=True)
    if clip == 0.05:  # the clip scales every token: the d theta' -> d n^2 chain is exercised
        assert _clip_fraction(gates, W, spec, clip) == 1.0
    elif clip is not None:  # some tokens clipped, some not: the clamp's mask is exercised
        assert 0.1 < _clip_fraction(gates, W, spec, clip) < 0.9
    o, W_T, S_T = neural_memory_chunked(*gates, W, S, spec, 8, clip)
    outs = [o, *W_T, *S_T]
    cot = [torch.randn_like(t) for t in outs]
    ref = torch.autograd.grad(outs, leaves, cot)
    dq, dk, dv, dth, deta, dal, dW0, dS0 = neural_memory_tiled_backward(
        *[t.detach() for t in gates], [w.detach() for w in W], [m.detach() for m in S], spec, 8, clip, n_tiles,
        cot[0], cot[1:1 + depth], cot[1 + depth:])
    names = ["q", "k", "v", "theta", "eta", "alpha"] + [f"W{i}" for i in range(depth)] + [f"S{i}" for i in range(depth)]
    for name, a, b in zip(names, [dq, dk, dv, dth, deta, dal, *dW0, *dS0], ref, strict=True):
        assert a.shape == b.shape, name
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < BACKWARD_TOL, f"d{name}: relative error {rel:.2e}"


def test_tiled_backward_without_momentum_and_state_cotangents():
    """``momentum=None`` (zeros) and no cotangents of the final state (``None``: zeros)."""
    torch.manual_seed(5)
    spec = MemoryMLPSpec("silu", True)
    gates, W, _, _ = make_inputs(B=1, H=2, T=13, d=8, depth=2, expansion=2, momentum=False)
    leaves = [*[t.clone().requires_grad_(True) for t in gates], *[w.clone().requires_grad_(True) for w in W]]
    o = neural_memory_chunked(*leaves[:6], leaves[6:], None, spec, 4, None)[0]
    d_out = torch.randn_like(o)
    ref = torch.autograd.grad(o, leaves, d_out)
    got = neural_memory_tiled_backward(*gates, W, None, spec, 4, None, 2, d_out)
    for a, b in zip([*got[:6], *got[6]], ref):
        assert ((a - b).norm() / b.norm()).item() < BACKWARD_TOL
    assert all(s.shape == w.shape for s, w in zip(got[7], W))


def test_tiled_backward_rejects_what_it_does_not_cover():
    gates, W, S, _ = make_inputs(B=1, H=1, T=4, d=8, depth=3, expansion=2)
    with pytest.raises(ConfigError, match="depth"):
        neural_memory_tiled_backward(*gates, W, S, MemoryMLPSpec(), 4, None, 1, torch.zeros_like(gates[0]))
    gates, W, S, _ = make_inputs(B=1, H=1, T=4, d=8, depth=2, expansion=4)
    with pytest.raises(ConfigError, match="norm"):
        neural_memory_tiled_backward(*gates, W, S, MemoryMLPSpec(norm=True), 4, None, 1, torch.zeros_like(gates[0]))
