"""Fused Triton kernels and the checkpointed PyTorch path against the chunked reference.

The Triton kernels run on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set here
before the kernels are imported) unless a CUDA device is present, in which case they run on it.

Every comparison draws fresh random inputs and checks the outputs, the final state AND the
gradients w.r.t. q, k, v, theta, eta, alpha, the initial weights and the initial momentum, by
``||x - ref|| / ||ref||`` per tensor against an fp64 reference (``neural_memory_chunked`` under
autograd). Bounds:

- fp32 matmuls (``precision="ieee"``; ``"tf32"`` too under the interpreter, which multiplies in
  fp32): 1e-4 (measured ~1e-6).
- tf32 tensor cores (CUDA only): 1e-2.
- bf16 operands, fp32 accumulation: 3e-2 (measured ~1e-2 over 4 chunks).
- checkpointed PyTorch path (fp64, same arithmetic as the reference): 1e-12 absolute.
"""

from __future__ import annotations

import os

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined

triton = pytest.importorskip("triton", reason="Triton is not importable here")

from titans_memory import ops as memops  # noqa: E402
from titans_memory.config import MemoryConfig  # noqa: E402
from titans_memory.errors import ConfigError  # noqa: E402
from titans_memory.memory import NeuralMemory  # noqa: E402
from titans_memory.ops import (  # noqa: E402
    MemoryMLPSpec,
    layer_shapes,
    neural_memory,
    neural_memory_checkpointed,
    neural_memory_chunked,
    neural_memory_triton,
)
from titans_memory.ops import fused  # noqa: E402

DEV = "cuda" if ON_CUDA else "cpu"
F64 = torch.float64
TOL = {"ieee": 1e-4, "tf32": 1e-2 if ON_CUDA else 1e-4, "bf16": 3e-2}
NAMES = ["q", "k", "v", "theta", "eta", "alpha"]

if not ON_CUDA and fused._load_kernels() is not None and not fused._kernels._EMU_BF16:
    # the kernel module was imported earlier in this process without the interpreter: redefine
    import importlib

    fused._kernels = importlib.reload(fused._kernels)


def make_inputs(B=1, H=2, T=40, d=16, depth=2, expansion=2, momentum=True, expand_batch=False, theta_max=0.05):
    """Fresh random inputs in fp64: unit q, k, v; gates in ranges where the inner optimisation is
    stable (``theta_max`` 0.05: a chunk of 16 sums 16 gradients at one point). Larger ``theta_max``
    makes the memory diverge, which amplifies rounding: only the fp32 stress test uses it."""
    q, k, v = (torch.randn(B, H, T, d, dtype=F64) for _ in range(3))
    q = q / q.norm(dim=-1, keepdim=True)
    k = k / k.norm(dim=-1, keepdim=True)
    v = v / v.norm(dim=-1, keepdim=True)
    theta = torch.rand(B, H, T, dtype=F64) * theta_max
    eta = 0.5 + 0.5 * torch.rand(B, H, T, dtype=F64)
    alpha = torch.rand(B, H, T, dtype=F64) * 0.1
    if expand_batch:  # the layer's initial state: per-head weights broadcast over the batch
        W = [(torch.randn(1, H, a, b, dtype=F64) / a**0.5).expand(B, -1, -1, -1) for a, b in layer_shapes(d, depth, expansion)]
    else:
        W = [torch.randn(B, H, a, b, dtype=F64) / a**0.5 for a, b in layer_shapes(d, depth, expansion)]
    S = [0.1 * torch.randn_like(w) for w in W] if momentum else None
    return [q, k, v, theta, eta, alpha], W, S


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def compare(fn, args, W, S, spec, chunk, tol, final_grads=True, clip=None, **kw):
    """Run ``fn`` (fp32 on DEV) and the fp64 reference; assert outputs and all grads within tol."""
    depth = len(W)
    leaves_ref = [t.clone().requires_grad_() for t in args + W + (S or [])]
    lr = leaves_ref
    o, Wt, St = neural_memory_chunked(*lr[:6], lr[6 : 6 + depth], lr[6 + depth :] or None, spec, chunk_size=chunk, max_update_norm=clip)
    roots = [o, *Wt, *St] if final_grads else [o]
    cot = [torch.randn_like(r) for r in roots]
    g_ref = torch.autograd.grad(roots, leaves_ref, cot)

    leaves = [t.detach().float().to(DEV).requires_grad_() for t in args + W + (S or [])]
    o2, Wt2, St2 = fn(*leaves[:6], leaves[6 : 6 + depth], leaves[6 + depth :] or None, spec, chunk_size=chunk, max_update_norm=clip, **kw)
    roots2 = [o2, *Wt2, *St2] if final_grads else [o2]
    g = torch.autograd.grad(roots2, leaves, [c.float().to(DEV) for c in cot])

    names = ["o"] + [f"W_T[{i}]" for i in range(depth)] + [f"S_T[{i}]" for i in range(depth)]
    errs = {n: rel(a.cpu(), b) for n, a, b in zip(names, [o2, *Wt2, *St2], [o, *Wt, *St])}
    gnames = [f"d{n}" for n in NAMES] + [f"dW0[{i}]" for i in range(depth)] + ([f"dS0[{i}]" for i in range(depth)] if S else [])
    errs.update({n: rel(a.cpu(), b) for n, a, b in zip(gnames, g, g_ref)})
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"
    return errs


# ---------------------------------------------------------------------------------------------
# tf32 operand rounding (on the GPU the tensor cores would otherwise truncate fp32 operands)
import triton.language as tl  # noqa: E402

_round_tf32 = fused._kernels._round_tf32


@triton.jit
def _round_tf32_kernel(x_ptr, y_ptr, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(y_ptr + o, _round_tf32(tl.load(x_ptr + o)))


def _nearest_tf32(x: torch.Tensor) -> torch.Tensor:
    """Independent reference: 11 significant bits, ties away from zero, from frexp in fp64."""
    m, e = torch.frexp(x.double())
    r = torch.sign(m) * torch.floor(m.abs() * 2048.0 + 0.5) / 2048.0
    return torch.ldexp(r, e).float()


@pytest.mark.interpret
def test_round_tf32_is_nearest_with_ties_away_from_zero():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1024, generator=g) * torch.exp2(torch.randint(-40, 40, (1024,), generator=g).float())
    # exact ties (the dropped 13 bits are 1000...0b) and values just below / above them
    ties = (torch.randint(1 << 10, 1 << 11, (64,), generator=g).float() + 0.5) * 2.0 ** -5
    x[:64] = ties
    x[64:128] = -ties
    x[128:192] = torch.nextafter(ties, torch.zeros(()))
    x[192:256] = torch.nextafter(ties, torch.full((), 1e9))
    y = torch.empty_like(x)
    _round_tf32_kernel[(1,)](x.to(DEV), y_ap := y.to(DEV), N=1024)
    got = y_ap.cpu()
    ref = _nearest_tf32(x)
    assert torch.equal(got, ref), (x[got != ref][:4], got[got != ref][:4], ref[got != ref][:4])
    assert (got.view(torch.int32) & 0x1FFF).eq(0).all()  # 10 stored mantissa bits
    assert not torch.equal(got, x)  # it rounds something
    assert torch.equal(got[:64].abs(), got[64:128].abs()) and (got[:64] > ties).all()


# ---------------------------------------------------------------------------------------------
# Triton kernels
SPECS = [
    MemoryMLPSpec("silu", residual=True),
    MemoryMLPSpec("relu", residual=False),
    MemoryMLPSpec("gelu", residual=True),
    MemoryMLPSpec("identity", residual=False),
]


@pytest.mark.interpret
@pytest.mark.parametrize("clip", [None, 3.0], ids=["noclip", "clip3"])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.activation}-res{int(s.residual)}")
def test_triton_matches_reference(depth, spec, clip):
    """3 chunks of 16 (last one partial: 8 tokens), 2 segments, 2 hidden tiles (depth 2).
    ``clip=3.0`` sits inside the range of per-token gradient norms here (~2-4.5): some tokens are
    clipped, some not."""
    args, W, S = make_inputs(T=40, depth=depth)
    compare(neural_memory_triton, args, W, S, spec, 16, TOL["ieee"], clip=clip, segment_chunks=2, precision="ieee", block_f=16)


@pytest.mark.interpret
@pytest.mark.parametrize("T,K", [(16, None), (7, 1), (64, 1), (64, 3), (50, None)])
def test_triton_segments_and_partial_chunks(T, K):
    """One full chunk; a single partial chunk; 4 chunks with K=1 and K=3; a partial last chunk."""
    args, W, S = make_inputs(B=2, H=1, T=T)
    compare(neural_memory_triton, args, W, S, SPECS[0], 16, TOL["ieee"], clip=2.5, segment_chunks=K, precision="ieee")


@pytest.mark.interpret
def test_triton_fp32_stress_diverging_memory():
    """Large steps (theta up to 0.3, |v| = 3): the memory diverges (weights grow 50-400x over 3
    chunks) and the kernels still follow the fp64 reference at fp32 precision."""
    args, W, S = make_inputs(B=1, H=2, T=48, theta_max=0.3)
    args[2] = args[2] * 3.0
    compare(neural_memory_triton, args, W, S, SPECS[0], 16, 1e-3, precision="ieee", block_f=16)


@pytest.mark.interpret
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_triton_precisions(precision):
    args, W, S = make_inputs(B=1, H=2, T=64, d=16, expansion=2)
    compare(neural_memory_triton, args, W, S, SPECS[0], 16, TOL[precision], clip=1.0, precision=precision)


@pytest.mark.interpret
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_fused_backward_launches_truncated_tf32_and_the_forward_rounded(precision, monkeypatch):
    """The fused kernels' forward and recompute take ``precision``; their backward kernel takes
    ``"tf32-trunc"`` for ``"tf32"`` (``fused.backward_prec``), other precisions unchanged."""
    seen = {"fwd": set(), "bwd": set()}
    for key, name in (("fwd", "_fwd2_kernel"), ("bwd", "_bwd2_kernel")):
        real = getattr(fused._kernels, name)

        class Recording:
            def __getitem__(self, grid, real=real, key=key):
                def launch(*a, **kw):
                    seen[key].add(kw["PREC"])
                    return real[grid](*a, **kw)

                return launch

        monkeypatch.setattr(fused._kernels, name, Recording())
    args, W, S = make_inputs(B=1, H=1, T=40, d=16, expansion=2)
    x = [t.float().requires_grad_() for t in (*args, *W, *S)]
    o = neural_memory_triton(*x[:6], x[6:8], x[8:], SPECS[0], 16, 1.0, precision=precision)[0]
    torch.autograd.grad(o.sum(), x)
    assert seen == {"fwd": {precision}, "bwd": {"tf32-trunc" if precision == "tf32" else precision}}


@pytest.mark.interpret
def test_triton_wider_head_and_chunk32():
    """head_dim 32, hidden 64 (one 64-wide tile), chunk 32."""
    args, W, S = make_inputs(B=1, H=1, T=70, d=32, expansion=2)
    compare(neural_memory_triton, args, W, S, SPECS[0], 32, TOL["ieee"], precision="ieee")


@pytest.mark.interpret
def test_triton_expanded_weights_and_no_momentum():
    """Broadcast (stride-0) initial weights, zero initial momentum; only the output is used."""
    args, W, _ = make_inputs(B=2, H=2, T=33, expand_batch=True, momentum=False)
    compare(neural_memory_triton, args, W, None, SPECS[0], 16, TOL["ieee"], final_grads=False, precision="ieee")


@pytest.mark.interpret
def test_triton_inference_path_matches_training_path():
    args, W, S = make_inputs(B=1, H=2, T=45)
    x = [t.float().to(DEV) for t in args + W + S]
    with torch.no_grad():
        o1, W1, S1 = neural_memory_triton(*x[:6], x[6:8], x[8:], chunk_size=16)
    xg = [t.clone().requires_grad_() for t in x]
    o2, W2, S2 = neural_memory_triton(*xg[:6], xg[6:8], xg[8:], chunk_size=16)
    for a, b in zip([o1, *W1, *S1], [o2, *W2, *S2]):
        assert torch.equal(a, b.detach())


@pytest.mark.interpret
def test_layer_triton_matches_torch_with_state_carry():
    """The NeuralMemory layer: impl='triton' vs 'torch', output and every parameter gradient,
    over two calls that carry the state with a cut inside a chunk (pending tokens)."""
    cfg = MemoryConfig(depth=2, expansion=2, chunk_size=16)
    torch.manual_seed(7)
    ref = NeuralMemory(32, 2, 16, cfg, impl="torch").to(DEV)
    tri = NeuralMemory(32, 2, 16, cfg, impl="triton").to(DEV)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 41, 32, device=DEV)
    outs = {}
    for name, layer in (("torch", ref), ("triton", tri)):
        y1, st = layer(x[:, :23], return_state=True)
        y2 = layer(x[:, 23:], state=st)
        y = torch.cat([y1, y2], 1)
        (y * torch.linspace(-1, 1, y.numel(), device=DEV).view_as(y)).sum().backward()
        outs[name] = (y.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()})
    assert rel(outs["triton"][0].cpu(), outs["torch"][0].cpu()) < TOL["tf32"]
    for n, g in outs["torch"][1].items():
        assert rel(outs["triton"][1][n].cpu(), g.cpu()) < 10 * TOL["tf32"], n


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd keeps for the backward of ``fn()``."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.interpret
def test_triton_saves_only_segment_checkpoints():
    """The memory model: the fused path keeps the inputs, ceil(n/K) states and ||delta1||^2 per
    token, nothing per chunk (the checkpointed PyTorch path likewise, without the norms); autograd
    through the chunked PyTorch loop keeps several times more (~11x here, 32 chunks)."""
    B, H, T, d, E, c = 1, 2, 512, 16, 2, 16
    args, W, S = make_inputs(B=B, H=H, T=T, d=d, expansion=E)
    leaves = [t.float().to(DEV).requires_grad_() for t in args + W + S]
    inputs = sum(t.untyped_storage().nbytes() for t in leaves[:6])
    n_chunks = T // c
    K = 6  # the default ceil(sqrt(32))
    state = B * H * 4 * d * (E * d) * 4
    b1 = B * H * T * 4
    run = lambda f: f(*leaves[:6], leaves[6:8], leaves[8:], chunk_size=c, max_update_norm=1.0)  # noqa: E731
    fused_bytes = _saved_bytes(lambda: run(neural_memory_triton))
    assert fused_bytes == inputs + -(-n_chunks // K) * state + b1
    torch_bytes = _saved_bytes(lambda: run(neural_memory_chunked))
    assert torch_bytes > 5 * fused_bytes
    # the checkpointed PyTorch path: inputs, the initial state (an input) and ceil(n/K) - 1 states
    ck_bytes = _saved_bytes(lambda: run(neural_memory_checkpointed))
    assert ck_bytes == inputs + state + (-(-n_chunks // K) - 1) * state


# ---------------------------------------------------------------------------------------------
# dispatch
def test_auto_dispatch_on_cpu_uses_torch_path():
    args, W, S = make_inputs(T=20)
    x = [t.float() for t in args + W + S]
    o1, _, _ = neural_memory(*x[:6], x[6:8], x[8:], chunk_size=16, impl="auto")
    o2, _, _ = neural_memory_chunked(*x[:6], x[6:8], x[8:], chunk_size=16)
    assert torch.equal(o1, o2)


def test_triton_rejects_unsupported_configs():
    args, W, S = make_inputs(T=20, depth=3)
    x = [t.float().to(DEV) for t in args + W + S]
    with pytest.raises(ConfigError, match="depth 3"):
        neural_memory(*x[:6], x[6:9], x[9:], chunk_size=16, impl="triton")
    args, W, S = make_inputs(T=20)
    x = [t.float().to(DEV) for t in args + W + S]
    with pytest.raises(ConfigError, match="norm"):
        neural_memory(*x[:6], x[6:8], x[8:], MemoryMLPSpec(norm=True), chunk_size=16, impl="triton")
    with pytest.raises(ConfigError, match="activation"):
        neural_memory(*x[:6], x[6:8], x[8:], MemoryMLPSpec(activation="tanh"), chunk_size=16, impl="triton")
    with pytest.raises(ConfigError, match="chunk_size"):
        neural_memory(*x[:6], x[6:8], x[8:], chunk_size=8, impl="triton")
    with pytest.raises(ConfigError, match="unknown memory implementation"):
        neural_memory(*x[:6], x[6:8], x[8:], chunk_size=16, impl="cuda")


def test_triton_unsupported_reason_lists_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args, W, _ = make_inputs(T=4)
    reason = memops.triton_unsupported_reason(args[0].float(), W, MemoryMLPSpec(), 16, None)
    assert reason is not None and "cpu" in reason


# ---------------------------------------------------------------------------------------------
# checkpointed PyTorch path (no Triton involved): exact against autograd through the loop
CK_SPECS = [MemoryMLPSpec("silu", True, False), MemoryMLPSpec("gelu", False, True)]


@pytest.fixture
def one_thread():
    """Tiny fp64 ops: intra-op threads only add overhead."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("K", [1, 2, 3, None])
@pytest.mark.parametrize("clip", [None, 0.3])
def test_checkpointed_matches_autograd(depth, K, clip, one_thread):
    """T=37 with chunk 8: 5 chunks, the last partial (5 tokens)."""
    args, W, S = make_inputs(B=2, H=2, T=37, d=6, depth=depth)
    spec = CK_SPECS[depth % 2]
    leaves = [t.clone().requires_grad_() for t in args + W + S]
    outs = []
    for fn, kw in ((neural_memory_chunked, {}), (neural_memory_checkpointed, {"segment_chunks": K})):
        o, Wt, St = fn(*leaves[:6], leaves[6 : 6 + depth], leaves[6 + depth :], spec, 8, clip, **kw)
        roots = [o, *Wt, *St]
        torch.manual_seed(3)
        cot = [torch.randn_like(r) for r in roots]
        outs.append((roots, torch.autograd.grad(roots, leaves, cot)))
    (r1, g1), (r2, g2) = outs
    for a, b in zip(r1 + list(g1), r2 + list(g2)):
        assert (a - b).abs().max().item() < 1e-12


def test_checkpointed_through_dispatch_and_layer():
    cfg = MemoryConfig(depth=2, expansion=2, chunk_size=8)
    torch.manual_seed(5)
    a = NeuralMemory(16, 2, 8, cfg, impl="torch")
    b = NeuralMemory(16, 2, 8, cfg, impl="checkpointed")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 29, 16)
    for layer in (a, b):
        layer(x).pow(2).sum().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), n
