"""The tiled form (a head's state split over tiles, explicit cross-tile reductions: the spec of a
multi-program kernel) against the chunked form, fp64, fresh random inputs. Bound: 1e-10 relative
to the largest entry of each reference tensor (the two differ only in the order of floating-point
sums)."""

import pytest
import torch

from titans_memory.errors import ConfigError
from titans_memory.ops import neural_memory_chunked
from titans_memory.ops.mlp import MemoryMLPSpec
from titans_memory.ops.tiled import neural_memory_tiled

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
