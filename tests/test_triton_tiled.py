"""The forward-only Triton kernels of the tiled form (launch-per-phase driver,
:mod:`titans_memory.ops.triton_tiled`) against the chunked PyTorch form.

Fresh random fp32 inputs; the reference is :func:`neural_memory_chunked` run in fp64 on the same
inputs. Bound: relative error ``||x - ref|| / ||ref|| < 1e-4`` (Frobenius norms) for the output,
both final weights and both final momenta. Shapes: head dim 16, hidden 64 (tile width 64, 32, 16
for 1, 2, 4 tiles), chunk 16, T = 40 (two full chunks and a partial one). Under ``TRITON_INTERPRET=1``
(set by ``conftest.py`` without a GPU) the kernels run on the CPU.

The training path (:func:`neural_memory_tiled_triton_train`) is checked the same way: the gradients
of all inputs (q, k, v, the three gates, both weights, both momenta) from random cotangents of the
output and of the final state, against ``torch.autograd.grad`` through the chunked form in fp64,
``||g - ref|| / ||ref|| < 1e-4`` per tensor. The walk's matmul-free coefficient backward
(``_coeffs_bwd_last``) is also checked alone against the general ``_coeffs_bwd`` (1e-5 relative).
"""

import pytest
import torch
import triton
import triton.language as tl

from titans_memory.errors import ConfigError
from titans_memory.ops import layer_shapes, neural_memory_chunked
from titans_memory.ops.mlp import MemoryMLPSpec
from titans_memory.ops.triton_kernels import _coeffs, _coeffs_bwd, _coeffs_bwd_last, _last_coeffs, _last_row_vectors
from titans_memory.ops.triton_tiled import neural_memory_tiled_triton, neural_memory_tiled_triton_train

REL_TOL = 1e-4
D, EXPANSION, CHUNK, T = 16, 4, 16, 40


def make_inputs(B=2, H=2, T=T, d=D, depth=2, expansion=EXPANSION):
    f32 = torch.float32
    q, k, v = (torch.randn(B, H, T, d, dtype=f32) for _ in range(3))
    q = q / q.norm(dim=-1, keepdim=True)
    k = k / k.norm(dim=-1, keepdim=True)
    theta = torch.rand(B, H, T, dtype=f32) * 0.4
    eta = torch.rand(B, H, T, dtype=f32)
    alpha = torch.rand(B, H, T, dtype=f32) * 0.3
    W = [torch.randn(B, H, a, b, dtype=f32) / a**0.5 for a, b in layer_shapes(d, depth, expansion)]
    S = [0.1 * torch.randn_like(w) for w in W]
    return (q, k, v, theta, eta, alpha), W, S


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("n_tiles", [1, 2, 4])
@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("spec", [MemoryMLPSpec("silu", True), MemoryMLPSpec("gelu", False)],
                         ids=lambda s: f"{s.activation}-res{int(s.residual)}")
def test_tiled_triton_equals_chunked(n_tiles, clip, spec):
    torch.manual_seed(100 * n_tiles + 10 * (clip is not None) + spec.residual)
    B = 1 if n_tiles == 2 else 2
    gates, W, S = make_inputs(B=B)
    for t in (*gates, *W, *S):  # the driver must not build a graph (or fail) on such inputs
        t.requires_grad_(True)
    # both matmul precisions (the interpreter computes either in fp32)
    precision = "ieee" if n_tiles == 2 else "tf32"
    got = neural_memory_tiled_triton(*gates, W, S, spec, CHUNK, clip, n_tiles=n_tiles, precision=precision)
    d64 = lambda ts: [t.detach().double() for t in ts]
    ref = neural_memory_chunked(*d64(gates), d64(W), d64(S), spec, CHUNK, clip)
    if clip is not None:  # the clip must be active, else its reduction is untested
        free = neural_memory_chunked(*d64(gates), d64(W), d64(S), spec, CHUNK, None)[0]
        assert rel_err(free, ref[0]) > 1e-2
    names = ["o", "W1", "W2", "S1", "S2"]
    for name, a, b in zip(names, [got[0], *got[1], *got[2]], [ref[0], *ref[1], *ref[2]]):
        assert a.shape == b.shape and a.dtype == torch.float32, name
        assert not a.requires_grad, name
        err = rel_err(a, b)
        assert err < REL_TOL, f"{name}: relative error {err:.2e}"
    for a, b in zip(W + S, d64(W) + d64(S)):  # the given state is left untouched
        assert torch.equal(a.detach().double(), b)


def test_tiled_triton_rejects_what_it_does_not_cover():
    gates, W, S = make_inputs(B=1, H=1, T=4)
    spec = MemoryMLPSpec()
    with pytest.raises(ConfigError, match="precision"):
        neural_memory_tiled_triton(*gates, W, S, spec, CHUNK, None, n_tiles=2, precision="fp8")
    with pytest.raises(ConfigError, match="divide"):
        neural_memory_tiled_triton(*gates, W, S, spec, CHUNK, None, n_tiles=3)
    with pytest.raises(ConfigError, match="tile width"):
        neural_memory_tiled_triton(*gates, W, S, spec, CHUNK, None, n_tiles=8)  # width 8
    with pytest.raises(ConfigError, match="chunk_size"):
        neural_memory_tiled_triton(*gates, W, S, spec, 24, None, n_tiles=2)
    with pytest.raises(ConfigError, match="norm"):
        neural_memory_tiled_triton(*gates, W, S, MemoryMLPSpec(norm=True), CHUNK, None, n_tiles=2)
    with pytest.raises(ConfigError, match="activation"):
        neural_memory_tiled_triton(*gates, W, S, MemoryMLPSpec("tanh"), CHUNK, None, n_tiles=2)
    g8, W8, S8 = make_inputs(B=1, H=1, T=4, d=8)
    with pytest.raises(ConfigError, match="head_dim"):
        neural_memory_tiled_triton(*g8, W8, S8, spec, CHUNK, None, n_tiles=1)
    g1, W1, S1 = make_inputs(B=1, H=1, T=4, depth=1)
    with pytest.raises(ConfigError, match="depth"):
        neural_memory_tiled_triton(*g1, W1, S1, spec, CHUNK, None, n_tiles=1)
    g3, W3, S3 = make_inputs(B=1, H=1, T=4, depth=3)
    with pytest.raises(ConfigError, match="depth"):
        neural_memory_tiled_triton(*g3, W3, S3, spec, CHUNK, None, n_tiles=1)


@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("spec", [MemoryMLPSpec("silu", True), MemoryMLPSpec("gelu", False)],
                         ids=lambda s: f"{s.activation}-res{int(s.residual)}")
def test_persistent_forward_equals_chunked(clip, spec):
    """The persistent forward kernel (one launch, state in registers, head barriers) with one tile
    per head: the interpreter runs programs one after another, so more tiles would wait forever;
    several tiles run through the same phases in the launch-per-phase tests above and on the GPU
    (``benchmarks/kernels_persistent.py``)."""
    torch.manual_seed(300 + 10 * (clip is not None) + spec.residual)
    gates, W, S = make_inputs(B=2)
    got = neural_memory_tiled_triton(*gates, W, S, spec, CHUNK, clip, n_tiles=1, persistent=True, check=True)
    d64 = lambda ts: [t.detach().double() for t in ts]
    ref = neural_memory_chunked(*d64(gates), d64(W), d64(S), spec, CHUNK, clip)
    for name, a, b in zip(["o", "W1", "W2", "S1", "S2"], [got[0], *got[1], *got[2]], [ref[0], *ref[1], *ref[2]]):
        err = rel_err(a, b)
        assert err < REL_TOL, f"{name}: relative error {err:.2e}"


BF16_TOL = 3e-2  # bf16 operands, fp32 state and accumulation (the interpreter rounds operands to bf16)


@pytest.mark.parametrize("persistent,n_tiles,stash", [(False, 2, False), (True, 1, False), (False, 2, True)])
def test_tiled_bf16_operands_within_the_bf16_bound(persistent, n_tiles, stash):
    """``precision="bf16"``: forward (inference) and every gradient of the training path against
    the fp64 chunked form, relative error below 3e-2 (as ``tests/test_kernels.py``); with the
    stash and ``persistent=False`` the backward is the segment walk (what CUDA runs in bf16)."""
    torch.manual_seed(600 + n_tiles)
    gates, W, S = make_inputs(B=1)
    spec = MemoryMLPSpec("silu", True)
    d64 = lambda ts: [t.detach().double() for t in ts]
    ref = neural_memory_chunked(*d64(gates), d64(W), d64(S), spec, CHUNK, 0.05)
    got = neural_memory_tiled_triton(*gates, W, S, spec, CHUNK, 0.05, n_tiles=n_tiles, precision="bf16",
                                     persistent=persistent)
    assert max(rel_err(a, b) for a, b in zip([got[0], *got[1], *got[2]], [ref[0], *ref[1], *ref[2]])) < BF16_TOL
    leaves = [t.clone().requires_grad_(True) for t in (*gates, *W, *S)]
    o = neural_memory_tiled_triton_train(*leaves[:6], leaves[6:8], leaves[8:], spec, CHUNK, 0.05, n_tiles=n_tiles,
                                         precision="bf16", persistent=persistent, stash=stash)[0]
    cot = torch.randn_like(o)
    grads = torch.autograd.grad((o * cot).sum(), leaves)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    ro = neural_memory_chunked(*ref_leaves[:6], ref_leaves[6:8], ref_leaves[8:], spec, CHUNK, 0.05)[0]
    ref_g = torch.autograd.grad((ro * cot.double()).sum(), ref_leaves)
    errs = [rel_err(a, b) for a, b in zip(grads, ref_g)]
    assert max(errs) < BF16_TOL, errs
    assert max(errs) > 1e-6  # the operands really were rounded (else this tests fp32 again)


def test_bf16_forward_with_a_tf32_walk():
    """``precision="bf16", bwd_precision="tf32"``: the forward (and the recompute) as with bf16
    throughout (bitwise the same output), the walk's gradients different from the all-bf16 ones
    and within the bf16 bound of the fp64 chunked form (segment walk, 2 tiles)."""
    torch.manual_seed(611)
    gates, W, S = make_inputs(B=1)
    spec = MemoryMLPSpec("silu", True)
    runs = {}
    cot = None
    for walk in ("bf16", "tf32"):
        leaves = [t.clone().requires_grad_(True) for t in (*gates, *W, *S)]
        o = neural_memory_tiled_triton_train(*leaves[:6], leaves[6:8], leaves[8:], spec, CHUNK, 0.05, n_tiles=2,
                                             precision="bf16", bwd_precision=walk, persistent=False, stash=True)[0]
        cot = torch.randn_like(o) if cot is None else cot
        runs[walk] = (o.detach(), torch.autograd.grad((o * cot).sum(), leaves))
    assert torch.equal(runs["bf16"][0], runs["tf32"][0])
    assert not all(torch.equal(a, b) for a, b in zip(runs["bf16"][1], runs["tf32"][1]))
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (*gates, *W, *S)]
    ro = neural_memory_chunked(*ref_leaves[:6], ref_leaves[6:8], ref_leaves[8:], spec, CHUNK, 0.05)[0]
    ref_g = torch.autograd.grad((ro * cot.double()).sum(), ref_leaves)
    errs = [rel_err(a, b) for a, b in zip(runs["tf32"][1], ref_g)]
    assert max(errs) < BF16_TOL, errs


def test_barrier_failures_raise():
    """A persistent launch counts the head barriers that gave up; the drivers turn a non-zero
    count into BarrierTimeout (a TitansError) instead of returning its numbers."""
    from titans_memory.errors import BarrierTimeout, TitansError
    from titans_memory.ops.barrier_check import check_barriers

    check_barriers(torch.zeros(1, dtype=torch.int32))
    with pytest.raises(BarrierTimeout, match="2 head barrier"):
        check_barriers(torch.tensor([2], dtype=torch.int32))
    assert issubclass(BarrierTimeout, TitansError)


def test_persistent_refuses_several_tiles_under_the_interpreter():
    gates, W, S = make_inputs(B=1, H=1, T=4)
    with pytest.raises(ConfigError, match="interpreter"):
        neural_memory_tiled_triton(*gates, W, S, MemoryMLPSpec(), CHUNK, None, n_tiles=2, persistent=True)


def test_backward_graph_needs_cuda():
    # the CUDA-graph backward (the default on CUDA) replays the same _backward_body the tests
    # below run eagerly; without CUDA it is refused rather than silently run another way
    gates, W, S = make_inputs(B=1, H=1, T=4)
    with pytest.raises(ConfigError, match="CUDA"):
        neural_memory_tiled_triton_train(*gates, W, S, MemoryMLPSpec(), CHUNK, None, n_tiles=1, bwd_graph=True)


def test_train_rejects_a_malformed_num_warps():
    gates, W, S = make_inputs(B=1)
    with pytest.raises(ConfigError, match="num_warps"):
        neural_memory_tiled_triton_train(*gates, W, S, MemoryMLPSpec(), CHUNK, None, n_tiles=2, num_warps=(4,))


def test_backward_graph_cache_captures_at_second_sighting_and_evicts(monkeypatch):
    # the cache policy of the CUDA-graph backward, with the capture replaced by a stub (no CUDA
    # here): eager at a configuration's first backward, captured at its second, replayed after,
    # at most GRAPH_CACHE_SIZE kept (least recently used out; an evicted configuration runs
    # eagerly from then on)
    import titans_memory.ops.triton_tiled as tt

    built = []

    class StubGraph:
        def __init__(self, cfg, *args):
            built.append(cfg.T)

        def __call__(self, *args):
            return "replayed"

    monkeypatch.setattr(tt, "_BackwardGraph", StubGraph)
    tt.clear_backward_graphs()
    x = torch.zeros(2, 1, 4)

    def call(T):
        cfg = tt._TrainCfg(2, T, 4, 8, MemoryMLPSpec(), 16, 1, None, None, bwd_graph=True)
        return tt._graphed_backward(cfg, (x.expand(2, T, 4),) * 3, None, None, None, None)

    assert call(32) is None and built == []            # first sighting: eager
    assert call(32) == "replayed" and built == [32]     # second: captured and replayed
    assert call(32) == "replayed" and built == [32]     # then replayed from the cache
    call(48), call(48), call(64), call(64)              # two more shapes: 32 is evicted (size 2)
    assert built == [32, 48, 64] and len(tt._GRAPHS) == tt.GRAPH_CACHE_SIZE
    assert call(32) is None and built == [32, 48, 64]   # evicted before: eager from then on
    assert call(64) == "replayed" and built == [32, 48, 64]
    tt.clear_backward_graphs()
    assert not tt._GRAPHS and not tt._SEEN and not tt._EVICTED
    assert call(32) is None and call(32) == "replayed" and built == [32, 48, 64, 32]

    class FailingCapture:
        def __init__(self, *args):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(tt, "_BackwardGraph", FailingCapture)
    assert call(96) is None
    with pytest.warns(RuntimeWarning, match="capture"):
        assert call(96) is None                           # capture failed: eager, with a warning
    assert call(96) is None and (2, 96, 4) in [k[1] for k in tt._EVICTED]  # and no retry
    tt.clear_backward_graphs()


TRAIN_CASES = [(n, clip, MemoryMLPSpec("silu", True), False, False) for n in (1, 2, 4) for clip in (None, 0.05)]
TRAIN_CASES.append((2, 0.05, MemoryMLPSpec("gelu", False), False, False))
# the persistent kernels (forward, segment recompute, backward walk with barriers), one tile
TRAIN_CASES += [(1, clip, MemoryMLPSpec("silu", True), True, False) for clip in (None, 0.05)]
TRAIN_CASES.append((1, 0.05, MemoryMLPSpec("gelu", False), True, False))
# the backward reading z1, u, delta2 back from phase 2's stash instead of recomputing them
TRAIN_CASES += [(4, 0.05, MemoryMLPSpec("silu", True), False, True), (2, None, MemoryMLPSpec("gelu", False), False, True),
                (1, None, MemoryMLPSpec("silu", True), True, True), (1, 0.05, MemoryMLPSpec("silu", True), True, True)]


@pytest.mark.parametrize("n_tiles,clip,spec,persistent,stash", TRAIN_CASES,
                         ids=[f"{s.activation}-res{int(s.residual)}-x{n}-clip{c}{'-persistent' * p}{'-stash' * st}"
                              for n, c, s, p, st in TRAIN_CASES])
def test_tiled_triton_train_gradients_equal_chunked(n_tiles, clip, spec, persistent, stash):
    torch.manual_seed(1000 + 100 * n_tiles + 10 * (clip is not None) + spec.residual + 5 * persistent + 3 * stash)
    B = 1 if n_tiles == 2 else 2  # 3 chunks, segments of 2 (checkpoint recompute) and 1
    gates, W, S = make_inputs(B=B)
    inputs = [*gates, *W, *S]
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    o, W_T, S_T = neural_memory_tiled_triton_train(*leaves[:6], leaves[6:8], leaves[8:], spec, CHUNK, clip,
                                                   n_tiles=n_tiles, persistent=persistent, check=persistent,
                                                   stash=stash)
    outs = [o, *W_T, *S_T]
    cots = [torch.randn_like(t) for t in outs]
    grads = torch.autograd.grad(sum((t * c).sum() for t, c in zip(outs, cots)), leaves)

    ref_leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    ro, rW, rS = neural_memory_chunked(*ref_leaves[:6], ref_leaves[6:8], ref_leaves[8:], spec, CHUNK, clip)
    ref_outs = [ro, *rW, *rS]
    ref_grads = torch.autograd.grad(sum((t * c.double()).sum() for t, c in zip(ref_outs, cots)), ref_leaves)
    if clip is not None:  # the clip must be active, else its backward is untested
        with torch.no_grad():
            free = neural_memory_chunked(*ref_leaves[:6], ref_leaves[6:8], ref_leaves[8:], spec, CHUNK, None)[0]
        assert rel_err(free, ro.detach()) > 1e-2
    for name, a, b in zip(["o", "W1_T", "W2_T", "S1_T", "S2_T"], outs, ref_outs):
        err = rel_err(a.detach(), b.detach())
        assert err < REL_TOL, f"{name}: relative error {err:.2e}"
    names = ["dq", "dk", "dv", "dtheta", "deta", "dalpha", "dW1", "dW2", "dS1", "dS2"]
    for name, a, b in zip(names, grads, ref_grads):
        assert a.shape == b.shape and a.dtype == torch.float32, name
        err = rel_err(a, b)
        assert err < REL_TOL, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("hoist_coeffs, hoist_free, walk_launches, clip",
                         [(False, False, 3, 0.05), (True, False, 3, 0.05), (True, True, 3, 0.05),
                          (True, True, 2, 0.05), (True, True, 2, None)])
def test_segment_walk_over_longer_segments_with_a_partial_last_chunk(monkeypatch, hoist_coeffs, hoist_free,
                                                                      walk_launches, clip):
    """The segment walk (launch per phase with the stash: the CUDA-graph backward's walk) with
    segments of 4 and 2 chunks, the last one partial, so that every per-chunk scratch slot is
    used and the adjoint-free phases of several chunks run in one launch; gradients vs fp64
    autograd, bound REL_TOL. Also checks that this path is the one taken, and with
    ``hoist_coeffs`` that the adjoint-free part of the coefficient backward runs once per segment
    (grid ``(1, BH, nc)``) and the walk's phase 4 is the hoisted one (``hoist_free``: the walk
    reads the stashed adjoint-free terms, the ``FREE`` launches); ``walk_launches=2`` that the walk
    is phases 2 and 5 alone (phase 4's work ahead in 2 and at the start of 5, ``AHEAD``), with the
    clip on and off."""
    import titans_memory.ops.triton_tiled as tt

    launches = []
    real = tt._bwd_segment_kernel

    class Counting:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append((grid, kw["PHASE"]))
                assert kw["FREE"] == hoist_free
                assert kw["AHEAD"] == (walk_launches == 2)
                return real[grid](*args, **kw)

            return launch

    monkeypatch.setattr(tt, "_bwd_segment_kernel", Counting())
    torch.manual_seed(404)
    T_long = 5 * CHUNK + 9
    gates, W, S = make_inputs(B=1, T=T_long)
    spec = MemoryMLPSpec("silu", True)
    leaves = [t.clone().requires_grad_(True) for t in (*gates, *W, *S)]
    o, W_T, S_T = neural_memory_tiled_triton_train(*leaves[:6], leaves[6:8], leaves[8:], spec, CHUNK, clip,
                                                   n_tiles=2, segment_chunks=4, stash=True,
                                                   hoist_coeffs=hoist_coeffs, hoist_free=hoist_free,
                                                   walk_launches=walk_launches)
    outs = [o, *W_T, *S_T]
    cots = [torch.randn_like(t) for t in outs]
    grads = torch.autograd.grad(sum((t * c).sum() for t, c in zip(outs, cots)), leaves)
    # per segment: 3 launches over its chunks (grid (2, 2, nc)), 1 more hoisted, and 3 per chunk
    pre = [g for g, ph in launches if ph in (tt.SEG_KEYS, tt.SEG_NORMS, tt.SEG_RETRIEVAL)]
    assert sorted(g for g in pre) == [(2, 2, 2)] * 3 + [(2, 2, 4)] * 3
    hoisted = [g for g, ph in launches if ph == tt.SEG_COEFFS_PRE]
    assert sorted(hoisted) == ([(1, 2, 2), (1, 2, 4)] if hoist_coeffs else [])
    walk = [ph for g, ph in launches if len(g) == 2]
    coeffs = tt.SEG_COEFFS_WALK if hoist_coeffs else tt.SEG_COEFFS
    assert walk == ([tt.SEG_GATES, tt.SEG_STATE] if walk_launches == 2 else [tt.SEG_GATES, coeffs, tt.SEG_STATE]) * 6
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    ro, rW, rS = neural_memory_chunked(*ref_leaves[:6], ref_leaves[6:8], ref_leaves[8:], spec, CHUNK, clip)
    ref = torch.autograd.grad(sum((t * c.double()).sum() for t, c in zip([ro, *rW, *rS], cots)), ref_leaves)
    for i, (a, b) in enumerate(zip(grads, ref)):
        assert rel_err(a, b) < REL_TOL, f"input {i}: relative error {rel_err(a, b):.2e}"


def test_segment_phase_knobs_reach_only_the_phases_over_all_chunks(monkeypatch):
    """``SEGMENT_PHASE_WARPS`` / ``SEGMENT_PHASE_PREC`` (``ops/triton_tiled.py``) set the warps and
    operands of the segment walk's launches over a segment's chunks (phases 1, 2a, 3 and the hoisted
    coefficient backward) and of no serial launch; gradients vs fp64 autograd, bound REL_TOL."""
    import titans_memory.ops.triton_tiled as tt

    monkeypatch.setattr(tt, "SEGMENT_PHASE_WARPS", 4)
    monkeypatch.setattr(tt, "SEGMENT_PHASE_PREC", "ieee")
    launches = []
    real = tt._bwd_segment_kernel

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append((kw["PHASE"], kw["num_warps"], kw["PREC"]))
                return real[grid](*args, **kw)

            return launch

    monkeypatch.setattr(tt, "_bwd_segment_kernel", Recording())
    torch.manual_seed(405)
    gates, W, S = make_inputs(B=1, T=3 * CHUNK + 5)
    spec = MemoryMLPSpec("silu", True)
    leaves = [t.clone().requires_grad_(True) for t in (*gates, *W, *S)]
    o = neural_memory_tiled_triton_train(*leaves[:6], leaves[6:8], leaves[8:], spec, CHUNK, 0.05, n_tiles=2,
                                         segment_chunks=2, stash=True, num_warps=(8, 8))[0]
    cot = torch.randn_like(o)
    grads = torch.autograd.grad((o * cot).sum(), leaves)
    parallel = (tt.SEG_KEYS, tt.SEG_NORMS, tt.SEG_RETRIEVAL, tt.SEG_COEFFS_PRE)
    assert {(w, p) for ph, w, p in launches if ph in parallel} == {(4, "ieee")}
    assert {(w, p) for ph, w, p in launches if ph not in parallel} == {(8, tt.backward_prec(tt.PREC))}
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    ro = neural_memory_chunked(*ref_leaves[:6], ref_leaves[6:8], ref_leaves[8:], spec, CHUNK, 0.05)[0]
    ref = torch.autograd.grad((ro * cot.double()).sum(), ref_leaves)
    for i, (a, b) in enumerate(zip(grads, ref)):
        assert rel_err(a, b) < REL_TOL, f"input {i}: relative error {rel_err(a, b):.2e}"


def test_backward_phases_multiply_tf32_unrounded_and_the_forward_rounded(monkeypatch):
    """tf32: the forward and the recompute round the operands (``"tf32"``), the backward's phases
    take them as the tensor cores read them (``"tf32-trunc"``); other precisions pass unchanged."""
    import titans_memory.ops.triton_tiled as tt

    assert tt.PREC == "tf32"
    assert tt.backward_prec("tf32") == "tf32-trunc"
    assert [tt.backward_prec(p) for p in ("ieee", "bf16")] == ["ieee", "bf16"]
    seen = {"walk": set(), "backward": set()}
    real_bwd, real_fwd = tt._bwd_segment_kernel, tt._update_kernel

    def recording(real, key):
        class Recording:
            def __getitem__(self, grid):
                def launch(*args, **kw):
                    seen[key].add(kw["PREC"])
                    return real[grid](*args, **kw)

                return launch

        return Recording()

    monkeypatch.setattr(tt, "_bwd_segment_kernel", recording(real_bwd, "backward"))
    monkeypatch.setattr(tt, "_update_kernel", recording(real_fwd, "walk"))  # the forward and the recompute
    torch.manual_seed(406)
    gates, W, S = make_inputs(B=1, T=2 * CHUNK + 3)
    leaves = [t.clone().requires_grad_(True) for t in (*gates, *W, *S)]
    o = neural_memory_tiled_triton_train(*leaves[:6], leaves[6:8], leaves[8:], MemoryMLPSpec("silu", True), CHUNK,
                                         0.05, n_tiles=2, segment_chunks=2, stash=True)[0]
    torch.autograd.grad(o.sum(), leaves)
    assert seen == {"walk": {"tf32"}, "backward": {"tf32-trunc"}}


def test_backward_with_other_tiles_than_the_forward():
    """``bwd_tiles``: the recompute and the backward walk in 4 tiles after a 1-tile forward (the
    checkpoints are whole states, so the tilings are independent); gradients vs fp64 autograd."""
    torch.manual_seed(77)
    gates, W, S = make_inputs(B=1)
    spec = MemoryMLPSpec("silu", True)
    leaves = [t.clone().requires_grad_(True) for t in (*gates, *W, *S)]
    o, W_T, S_T = neural_memory_tiled_triton_train(*leaves[:6], leaves[6:8], leaves[8:], spec, CHUNK, 0.05,
                                                   n_tiles=1, bwd_tiles=4)
    cot = torch.randn_like(o)
    grads = torch.autograd.grad((o * cot).sum(), leaves)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    ro = neural_memory_chunked(*ref_leaves[:6], ref_leaves[6:8], ref_leaves[8:], spec, CHUNK, 0.05)[0]
    ref = torch.autograd.grad((ro * cot.double()).sum(), ref_leaves)
    for i, (a, b) in enumerate(zip(grads, ref)):
        assert rel_err(a, b) < REL_TOL, f"input {i}: relative error {rel_err(a, b):.2e}"
    with pytest.raises(ConfigError, match="bwd_tiles"):
        neural_memory_tiled_triton_train(*leaves[:6], leaves[6:8], leaves[8:], spec, CHUNK, None, n_tiles=1,
                                         bwd_tiles=3)


def test_layer_with_impl_triton_tiled_matches_torch_with_state_carry():
    """NeuralMemory(impl="triton_tiled") (2 tiles of 32 hidden units by default) vs impl="torch":
    output and every parameter gradient, over two calls that carry the state with a cut inside a
    chunk. Bound 1e-4 relative (both fp32)."""
    from titans_memory.config import MemoryConfig
    from titans_memory.memory import NeuralMemory
    from titans_memory.ops.triton_tiled import default_n_tiles

    assert default_n_tiles(64) == 2 and default_n_tiles(256) == 4
    cfg = MemoryConfig(depth=2, expansion=4, chunk_size=16)
    torch.manual_seed(11)
    ref = NeuralMemory(32, 2, 16, cfg, impl="torch")
    til = NeuralMemory(32, 2, 16, cfg, impl="triton_tiled")
    til.load_state_dict(ref.state_dict())
    x = torch.randn(2, 41, 32)
    outs = {}
    for name, layer in (("torch", ref), ("tiled", til)):
        y1, st = layer(x[:, :23], return_state=True)
        y2 = layer(x[:, 23:], state=st)
        y = torch.cat([y1, y2], 1)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs[name] = (y.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()})
    assert rel_err(outs["tiled"][0], outs["torch"][0].double()) < REL_TOL
    for n, g in outs["torch"][1].items():
        assert rel_err(outs["tiled"][1][n], g.double()) < REL_TOL, n


@triton.jit
def _coeffs_bwd_kernel(th_ptr, et_ptr, al_ptr, dC_ptr, vec_ptr, sc_ptr, out_ptr, valid, BC: tl.constexpr):
    """Test kernel: ``_coeffs_bwd`` with only the last-row cotangents, ``_coeffs_bwd_last`` (from
    ``_last_row_vectors``), the whole ``_coeffs_bwd`` and its hoisted part (last-row cotangents
    zero), 3 rows each; then ``cl, g, ml`` and ``bl + gl + el`` of ``_coeffs`` and of
    ``_last_row_vectors`` with ``_last_coeffs``."""
    rc = tl.arange(0, BC)
    occ = rc[:, None] * BC + rc[None, :]
    th = tl.load(th_ptr + rc)
    et = tl.load(et_ptr + rc)
    al = tl.load(al_ptr + rc)
    dC = tl.load(dC_ptr + occ)
    dbeta = tl.load(vec_ptr + rc)
    dg = tl.load(vec_ptr + BC + rc)
    dcl = tl.load(vec_ptr + 2 * BC + rc)
    dml = tl.load(vec_ptr + 3 * BC + rc)
    dbl = tl.load(sc_ptr)
    dgl = tl.load(sc_ptr + 1)
    d_el = tl.load(sc_ptr + 2)
    A, Dm, Pm, C, beta, E, g, cl, ml, bl, gl, el = _coeffs(th, et, al, valid, BC)
    et_next = tl.load(et_ptr + rc + 1, mask=rc + 1 < valid, other=1.0)
    pL, dL, aL, beta2, g2, E2, bl2, gl2, el2 = _last_row_vectors(et, et_next, al, valid, BC)
    cl2, ml2 = _last_coeffs(th, valid, pL, dL, BC)
    zero = th * 0.0
    z0 = tl.sum(zero, axis=0)
    outs = (_coeffs_bwd(dC * 0.0, zero, zero, dcl, dml, dbl, dgl, d_el, th, et, al, valid, A, Dm, Pm, beta, E, BC)
            + _coeffs_bwd_last(dcl, dml, dbl, dgl, d_el, th, et, al, valid, aL, dL, pL, beta2, E2, BC)
            + _coeffs_bwd(dC, dbeta, dg, dcl, dml, dbl, dgl, d_el, th, et, al, valid, A, Dm, Pm, beta, E, BC)
            + _coeffs_bwd(dC, dbeta, dg, zero, zero, z0, z0, z0, th, et, al, valid, A, Dm, Pm, beta, E, BC)
            + (cl, cl2, g, g2, ml, ml2, zero + bl + gl + el, zero + bl2 + gl2 + el2))
    for i in tl.static_range(20):
        tl.store(out_ptr + i * BC + rc, outs[i])


@pytest.mark.parametrize("valid", [CHUNK, CHUNK - 5])
def test_last_row_coefficient_backward_equals_the_general_one(valid):
    """``_coeffs_bwd_last`` (the walk's coefficient backward after the hoisted part, no matmul)
    against ``_coeffs_bwd`` given the same last-row cotangents and zero ``dC, dbeta, dg``, and the
    linearity the hoisting rests on: the general backward of all cotangents equals the sum of its
    hoisted part (last-row cotangents zero) and ``_coeffs_bwd_last``. Fresh random fp32 gates and
    cotangents, a full and a partial chunk; bound 1e-5 relative (the interpreter computes in fp32).
    Also the last-row coefficients from ``_last_row_vectors`` and ``_last_coeffs`` (what the
    serial loops read, no ``c x c`` work) against ``_coeffs``."""
    torch.manual_seed(31 + valid)
    BC = CHUNK
    th, et, al = torch.rand(BC) * 0.4, torch.rand(BC) * 0.9 + 0.05, torch.rand(BC) * 0.3
    dC, vec, sc = torch.randn(BC, BC), torch.randn(4, BC), torch.randn(3)
    out = torch.zeros(20, BC)
    _coeffs_bwd_kernel[(1,)](th, et, al, dC, vec, sc, out, valid, BC=BC)
    general_last, last, whole, hoisted = out[0:3], out[3:6], out[6:9], out[9:12]
    rows = slice(0, valid)
    for name, a, b in (("last row", last, general_last), ("hoisted + last row", hoisted + last, whole),
                       ("the last-row coefficients from the vectors", out[13:20:2], out[12:20:2])):
        err = ((a[:, rows] - b[:, rows]).norm() / b[:, rows].norm()).item()
        assert err < 1e-5, f"{name}: relative error {err:.2e}"
    assert last[:, rows].abs().sum() > 0  # the last-row part is not trivially zero


@pytest.mark.parametrize("kernel_precision, fwd, walk", [("tf32", "tf32", "tf32"), ("bf16", "bf16", "bf16"),
                                                         ("bf16-forward", "bf16", "tf32")])
def test_kernel_precision_reaches_the_tiled_kernels(monkeypatch, kernel_precision, fwd, walk):
    """``neural_memory(kernel_precision=...)`` (``MemoryConfig.kernel_precision``) passes the
    operand precisions of the forward and the backward's walk to the tiled drivers (recorded by
    wrappers around the real drivers, which then run), and refuses an unknown one."""
    import titans_memory.ops.triton_tiled as tt
    from titans_memory.ops import neural_memory

    seen = {}
    for name in ("neural_memory_tiled_triton", "neural_memory_tiled_triton_train"):
        real = getattr(tt, name)

        def wrapper(*args, _real=real, _name=name, **kw):
            seen[_name] = (kw.get("precision"), kw.get("bwd_precision"))
            return _real(*args, **kw)

        monkeypatch.setattr(tt, name, wrapper)
    torch.manual_seed(5)
    gates, W, S = make_inputs(B=1, T=CHUNK)
    spec = MemoryMLPSpec("silu", True)
    with torch.no_grad():
        neural_memory(*gates, W, S, spec, CHUNK, 0.05, impl="triton_tiled", kernel_precision=kernel_precision)
    leaves = [t.clone().requires_grad_(True) for t in gates]
    o = neural_memory(*leaves, W, S, spec, CHUNK, 0.05, impl="triton_tiled", kernel_precision=kernel_precision)[0]
    o.sum().backward()
    assert seen == {"neural_memory_tiled_triton": (fwd, None), "neural_memory_tiled_triton_train": (fwd, walk)}
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
    with pytest.raises(ConfigError, match="kernel_precision"):
        neural_memory(*gates, W, S, spec, CHUNK, 0.05, impl="triton_tiled", kernel_precision="fp16")


@pytest.mark.parametrize("impl, module, name", [("triton_tiled", "titans_memory.ops.triton_tiled",
                                                 "neural_memory_tiled_triton_train"),
                                                ("triton", "titans_memory.ops", "neural_memory_triton")])
def test_segment_chunks_reaches_the_kernels_and_leaves_the_gradients(monkeypatch, impl, module, name):
    """``neural_memory(segment_chunks=...)`` (``MemoryConfig.segment_chunks``) reaches the training
    drivers of the tiled and the fused kernels (recorded by a wrapper around the real driver),
    and the gradients with one segment over the 3 chunks (nothing recomputed) or segments of one
    chunk equal the default's (2 chunks per segment) to 1e-6 relative; a bad value is refused."""
    import importlib

    import titans_memory.ops as ops

    module = importlib.import_module(module)
    seen = []
    real = getattr(module, name)

    def wrapper(*args, **kw):
        seen.append(kw.get("segment_chunks"))
        return real(*args, **kw)

    monkeypatch.setattr(module, name, wrapper)
    torch.manual_seed(6)
    xs, W, S = make_inputs(B=1, H=2)
    spec = MemoryMLPSpec("silu", True)
    grads = []
    for K in (None, 3, 1):
        leaves = [t.clone().requires_grad_(True) for t in (*xs, *W, *S)]
        o, Wt, St = ops.neural_memory(*leaves[:6], leaves[6:8], leaves[8:], spec, CHUNK, 0.05, impl=impl,
                                      segment_chunks=K)
        loss = o.pow(2).sum() + sum((t * t).sum() for t in (*Wt, *St))
        grads.append(torch.autograd.grad(loss, leaves))
        assert seen == [K], seen
        seen.clear()
    for other in grads[1:]:
        for a, b in zip(other, grads[0]):
            assert rel_err(a, b) < 1e-6
    with pytest.raises(ConfigError, match="segment_chunks"):
        ops.neural_memory(*xs, W, S, spec, CHUNK, 0.05, impl=impl, segment_chunks=0)


@pytest.mark.parametrize("retrieval_tiles", [1, 2, 4])
def test_split_forward_equals_chunked_with_any_retrieval_tiling(retrieval_tiles):
    """The split forward (``_forward_segments``: the persistent walk without outputs, stashing
    every chunk-start state, delta2 and the clipped theta; then each segment's retrieval for all
    of its chunks at once) with segments of 2 chunks, the last one partial, the walk in one tile
    (the interpreter's limit) and the retrieval in 1-4 tiles: output, final state and the
    segment-start checkpoints against the chunked form in fp64 (REL_TOL)."""
    import titans_memory.ops.triton_tiled as tt

    torch.manual_seed(500 + retrieval_tiles)
    T_long = 4 * CHUNK + 7  # chunks 0-4: segments [0, 1], [2, 3], [4]
    gates, W, S = make_inputs(B=1, T=T_long)
    spec, clip = MemoryMLPSpec("silu", True), 0.05
    B, H, _, d = gates[0].shape
    xs = [t.reshape(B * H, T_long, d).contiguous() for t in gates[:3]]
    gs = [t.reshape(B * H, T_long).contiguous() for t in gates[3:]]
    state = [t.reshape(B * H, *t.shape[2:]).clone() for t in (W[0], S[0], W[1], S[1])]
    ck = [torch.empty(3, *t.shape) for t in state]
    out = torch.empty_like(xs[0])
    err = torch.zeros(1, dtype=torch.int32)
    last = tt._forward_segments(xs, gs, state, state, out, 0, 5, spec, clip, 1, CHUNK, err, 2, ck=ck,
                                retrieval_tiles=retrieval_tiles)
    assert int(err) == 0 and [t.shape[0] for t in last] == [2] * 4
    d64 = lambda ts: [t.detach().double() for t in ts]
    ro, rW, rS = neural_memory_chunked(*d64(gates), d64(W), d64(S), spec, CHUNK, clip)
    got = [out, state[0], state[2], state[1], state[3]]
    for name, a, b in zip(["o", "W1", "W2", "S1", "S2"], got, [ro, *rW, *rS]):
        assert rel_err(a.reshape(b.shape), b) < REL_TOL, name
    for s in (1, 2):  # the checkpoint of segment s: the state after chunks 0 .. 2 s - 1
        t = 2 * s * CHUNK
        _, pW, pS = neural_memory_chunked(*[g[:, :, :t] for g in d64(gates)], d64(W), d64(S), spec, CHUNK, clip)
        for c, ref in zip(ck, (pW[0], pS[0], pW[1], pS[1])):
            assert rel_err(c[s].reshape(ref.shape), ref) < REL_TOL
    # the last segment's stashed start state (chunk 4) is the checkpoint of segment 2
    assert all(torch.equal(a[0], c[2]) for a, c in zip(last, ck))


@pytest.mark.parametrize("split_forward", [True, False])
def test_persistent_forward_and_segment_walk_with_the_kept_last_segment(monkeypatch, split_forward):
    """The GPU's training combination under the interpreter: the persistent (split) forward, its
    last segment's chunk-start states kept for the backward (whose recompute of that segment is
    skipped), and the segment walk launched per phase (the CUDA-graph backward's body, run
    eagerly here: the graph itself needs CUDA). Segments of 3, 3 and 2 chunks, the last one
    partial; gradients vs fp64 autograd through the chunked form (REL_TOL)."""
    import titans_memory.ops.triton_tiled as tt

    init = tt._TrainCfg.__init__

    def with_graph_walk(self, *a, **kw):
        init(self, *a, **kw)
        self.bwd_graph = True  # the graph's walk (per phase); _graphed_backward below runs it eagerly

    monkeypatch.setattr(tt._TrainCfg, "__init__", with_graph_walk)
    monkeypatch.setattr(tt, "_graphed_backward", lambda *a, **kw: None)
    recomputed = []
    real = tt._recompute_starts
    monkeypatch.setattr(tt, "_recompute_starts", lambda cfg, xs, g, ck, st, c0, nc, err, **kw: (
        recomputed.append(c0), real(cfg, xs, g, ck, st, c0, nc, err, **kw)))
    torch.manual_seed(606 + split_forward)
    T_long = 7 * CHUNK + 5
    gates, W, S = make_inputs(B=1, T=T_long)
    spec, clip = MemoryMLPSpec("silu", True), 0.05
    leaves = [t.clone().requires_grad_(True) for t in (*gates, *W, *S)]
    o, W_T, S_T = neural_memory_tiled_triton_train(*leaves[:6], leaves[6:8], leaves[8:], spec, CHUNK, clip,
                                                   n_tiles=1, segment_chunks=3, persistent=True, stash=True,
                                                   split_forward=split_forward)
    outs = [o, *W_T, *S_T]
    cots = [torch.randn_like(t) for t in outs]
    grads = torch.autograd.grad(sum((t * c).sum() for t, c in zip(outs, cots)), leaves)
    assert recomputed == ([3, 0] if split_forward else [6, 3, 0])
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    ro, rW, rS = neural_memory_chunked(*ref_leaves[:6], ref_leaves[6:8], ref_leaves[8:], spec, CHUNK, clip)
    for name, a, b in zip(["o", "W1_T", "W2_T", "S1_T", "S2_T"], outs, [ro, *rW, *rS]):
        assert rel_err(a.detach(), b.detach()) < REL_TOL, name
    ref = torch.autograd.grad(sum((t * c.double()).sum() for t, c in zip([ro, *rW, *rS], cots)), ref_leaves)
    for i, (a, b) in enumerate(zip(grads, ref)):
        assert rel_err(a, b) < REL_TOL, f"input {i}: relative error {rel_err(a, b):.2e}"


def test_inference_splits_only_several_chunks(monkeypatch):
    """The inference driver runs the split forward for several chunks and the walk that retrieves
    as it goes for a single one (token-by-token streaming: one launch instead of three); both
    equal the chunked form (REL_TOL)."""
    import titans_memory.ops.triton_tiled as tt

    calls = []
    real = tt._forward_segments
    monkeypatch.setattr(tt, "_forward_segments", lambda *a, **kw: (calls.append(a[6]), real(*a, **kw))[1])
    spec = MemoryMLPSpec("silu", True)
    for T_in, split in ((CHUNK - 3, False), (2 * CHUNK + 1, True)):
        torch.manual_seed(700 + T_in)
        gates, W, S = make_inputs(B=1, T=T_in)
        calls.clear()
        got = neural_memory_tiled_triton(*gates, W, S, spec, CHUNK, 0.05, n_tiles=1, persistent=True)
        assert bool(calls) == split
        d64 = lambda ts: [t.detach().double() for t in ts]
        ref = neural_memory_chunked(*d64(gates), d64(W), d64(S), spec, CHUNK, 0.05)
        for a, b in zip([got[0], *got[1], *got[2]], [ref[0], *ref[1], *ref[2]]):
            assert rel_err(a, b) < REL_TOL


def _assert_grads_equal_chunked(x, result, spec, clip):
    """The gradients of all inputs ``x`` (q, k, v, gates, W, S) of a training call's ``result``
    ``(o, W_T, S_T)`` from random cotangents, against autograd through the chunked form in fp64;
    with a clip, that it is active on these inputs (else its backward would go untested)."""
    o, Wt, St = result
    if clip is not None:
        d64 = [t.detach().double() for t in x]
        with torch.no_grad():
            free = neural_memory_chunked(*d64[:6], d64[6:8], d64[8:], spec, CHUNK, None)[0]
            ref = neural_memory_chunked(*d64[:6], d64[6:8], d64[8:], spec, CHUNK, clip)[0]
        assert rel_err(free, ref) > 1e-2
    co = torch.randn_like(o)
    cw = [torch.randn_like(t) for t in (*Wt, *St)]
    g = torch.autograd.grad([o, *Wt, *St], x, [co, *cw])
    xr = [t.detach().double().requires_grad_(True) for t in x]
    o2, W2, S2 = neural_memory_chunked(*xr[:6], xr[6:8], xr[8:], spec, CHUNK, clip)
    gr = torch.autograd.grad([o2, *W2, *S2], xr, [co.double(), *[c.double() for c in cw]])
    for i, (a, b) in enumerate(zip(g, gr)):
        assert rel_err(a, b) < REL_TOL, f"grad {i}"


# every code path once: the three variants together, the merged increments alone (the one that
# changes the matmuls), and the SYNC override
@pytest.mark.parametrize("code", [dict(MERGE=True), dict(LATE_SAVE=True, PREFETCH=True, MERGE=True),
                                  dict(SYNC=False)],
                         ids=lambda c: "+".join(k.lower() for k in c))
@pytest.mark.parametrize("clip", [None, 0.05])
def test_walk_code_variants_equal_chunked(monkeypatch, code, clip):
    """The persistent walk's code variants (``WALK_CODE``: the chunk-start state stored after the
    chunk's barriers, the next chunk's inputs loaded during this chunk's update, the weight and
    momentum increments of a layer in one matmul; and the override of ``SYNC``, which with one tile
    needs no barrier) in the split forward with segments of 2 chunks
    (checkpoints, stashed chunk-start states, output and final state) and in training (the
    recompute), against the chunked form in fp64 (REL_TOL), one tile (the interpreter's limit)."""
    import titans_memory.ops.triton_tiled as tt

    monkeypatch.setattr(tt, "WALK_CODE", code)
    torch.manual_seed(700 + len(code) + 10 * (clip is not None))
    T_long = 4 * CHUNK + 7
    gates, W, S = make_inputs(B=1, T=T_long)
    spec = MemoryMLPSpec("silu", True)
    d64 = lambda ts: [t.detach().double() for t in ts]
    ro, rW, rS = neural_memory_chunked(*d64(gates), d64(W), d64(S), spec, CHUNK, clip)
    got = neural_memory_tiled_triton(*gates, W, S, spec, CHUNK, clip, n_tiles=1, persistent=True, check=True)
    for name, a, b in zip(["o", "W1", "W2", "S1", "S2"], [got[0], *got[1], *got[2]], [ro, *rW, *rS]):
        assert rel_err(a, b) < REL_TOL, name
    x = [t.clone().requires_grad_(True) for t in (*gates, *W, *S)]
    o, Wt, St = neural_memory_tiled_triton_train(*x[:6], x[6:8], x[8:], spec, CHUNK, clip, n_tiles=1,
                                                 persistent=True, segment_chunks=2, check=True)
    _assert_grads_equal_chunked(x, (o, Wt, St), spec, clip)


@pytest.mark.parametrize("n_tiles,clip", [(1, 0.05), (2, None), (2, 0.05)])
def test_segment_walk_with_merged_state_phase_equals_chunked(monkeypatch, n_tiles, clip):
    """Phase 5 of the segment walk with its matmuls merged over a concatenated contraction axis
    (``STATE_MERGE``), launched per phase with 1 and 2 tiles (stacked operands loaded across two
    state tensors and across q / k, a last partial chunk masked): all gradients against autograd
    through the chunked form in fp64 (REL_TOL)."""
    import titans_memory.ops.triton_tiled as tt

    monkeypatch.setattr(tt, "STATE_MERGE", True)
    torch.manual_seed(800 + n_tiles + 10 * (clip is not None))
    gates, W, S = make_inputs(B=1, T=3 * CHUNK + 5)
    spec = MemoryMLPSpec("silu", True)
    x = [t.clone().requires_grad_(True) for t in (*gates, *W, *S)]
    o, Wt, St = neural_memory_tiled_triton_train(*x[:6], x[6:8], x[8:], spec, CHUNK, clip, n_tiles=n_tiles,
                                                 persistent=False, stash=True, segment_chunks=2)
    _assert_grads_equal_chunked(x, (o, Wt, St), spec, clip)
