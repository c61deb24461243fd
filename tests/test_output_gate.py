"""The fused output RMSNorm + gate (titans_memory/ops/output_gate.py): the Triton kernels against
the PyTorch reference (on the GPU where there is one, else on the CPU through Triton's interpreter,
TRITON_INTERPRET=1 from conftest), and the dispatch and errors of :func:`output_norm_gate`."""

from __future__ import annotations

import pytest
import torch

from titans_memory.errors import ConfigError, ShapeError
from titans_memory.ops import output_gate as og
from titans_memory.ops.output_gate import block_t, output_norm_gate, output_norm_gate_reference

# max |a - b| / max |b| allowed: fp32 everywhere, or a bf16 gate (the reference rounds sigmoid(g)
# to bf16; the interpreter truncates the bf16 dg it stores)
TOL_FP32 = 1e-5
TOL_BF16 = 2e-2

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the kernels run
needs_triton = pytest.mark.skipif(not og.triton_available(), reason="Triton cannot run here")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _inputs(B, H, T, d, g_dtype=torch.float32, o=None, device=DEV):
    o = torch.randn(B, H, T, d, device=device) * 3.0 if o is None else o
    o = o.detach().requires_grad_(True)
    w = (1.0 + 0.5 * torch.randn(d, device=device)).requires_grad_(True)
    g = (2.0 * torch.randn(B, T, H * d, device=device)).to(g_dtype).requires_grad_(True)
    return o, w, g


def _run(impl, o, w, g, eps, out_dtype, dz):
    z = output_norm_gate(o, w, eps, g, out_dtype, impl=impl)
    grads = torch.autograd.grad(z, (o, w, g), dz)
    return (z,) + grads


@needs_triton
@pytest.mark.parametrize(
    "B,H,T,d,g_dtype,out_dtype,eps",
    [
        (2, 3, 37, 16, torch.float32, torch.float32, 1e-6),
        (1, 2, 150, 32, torch.float32, torch.float32, None),
        (2, 2, 100, 64, torch.float32, torch.float32, 1e-5),
        (1, 1, 45, 128, torch.float32, torch.float32, 1e-6),
        (1, 2, 70, 64, torch.bfloat16, torch.float32, 1e-6),
        (2, 1, 200, 16, torch.bfloat16, torch.float32, None),
        (1, 2, 33, 32, torch.bfloat16, torch.bfloat16, 1e-6),
    ],
)
def test_triton_matches_reference(B, H, T, d, g_dtype, out_dtype, eps):
    assert T % block_t(d) != 0  # a partial last tile is exercised
    o, w, g = _inputs(B, H, T, d, g_dtype)
    res_dtype = torch.promote_types(out_dtype, g_dtype)
    dz = torch.randn(B, T, H * d, device=DEV).to(res_dtype)
    got = _run("triton", o, w, g, eps, out_dtype, dz)
    want = _run("torch", o, w, g, eps, out_dtype, dz)
    tol = TOL_FP32 if g_dtype == torch.float32 and out_dtype == torch.float32 else TOL_BF16
    for name, a, b in zip(("z", "do", "dweight", "dg"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert _rel(a, b) <= tol, f"{name}: rel err {_rel(a, b):.2e} > {tol}"
    assert got[0].dtype == res_dtype
    assert type(got[0].grad_fn).__name__.startswith("_OutputNormGate")


@needs_triton
def test_non_contiguous_o_and_dz():
    B, H, T, d = 2, 3, 50, 32
    base = torch.randn(B, T, H, d, device=DEV) * 2.0
    o, w, g = _inputs(B, H, T, d, o=base.transpose(1, 2))
    assert not o.is_contiguous()
    z = output_norm_gate(o, w, 1e-6, g, torch.float32, impl="triton")
    (z * torch.arange(H * d, dtype=torch.float32, device=DEV)).sum().backward()  # dz: an expanded (stride-0) row
    got = (z.detach(), o.grad, w.grad, g.grad)
    o.grad = w.grad = g.grad = None
    zr = output_norm_gate_reference(o, w, 1e-6, g, torch.float32)
    (zr * torch.arange(H * d, dtype=torch.float32, device=DEV)).sum().backward()
    for name, a, b in zip(("z", "do", "dweight", "dg"), got, (zr.detach(), o.grad, w.grad, g.grad)):
        assert _rel(a, b) <= TOL_FP32, name


@needs_triton
@pytest.mark.parametrize("wanted", ["o", "g", "weight"])
def test_only_some_inputs_need_grad(wanted):
    B, H, T, d = 1, 2, 40, 16
    o, w, g = _inputs(B, H, T, d)
    args = {"o": o, "weight": w, "g": g}
    for name, t in args.items():
        t.requires_grad_(name == wanted)
    dz = torch.randn(B, T, H * d, device=DEV)
    output_norm_gate(o, w, 1e-6, g, torch.float32, impl="triton").backward(dz)
    got = args[wanted].grad
    assert got is not None
    assert all(t.grad is None for n, t in args.items() if n != wanted)
    args[wanted].grad = None
    output_norm_gate_reference(o, w, 1e-6, g, torch.float32).backward(dz)
    assert _rel(got, args[wanted].grad) <= TOL_FP32


@needs_triton
def test_no_weight_and_deterministic_dweight():
    B, H, T, d = 2, 2, 300, 16  # three tiles per (batch, head): dweight sums six partial rows
    o, w, g = _inputs(B, H, T, d)
    z = output_norm_gate(o, None, 1e-6, g, torch.float32, impl="triton")
    zr = output_norm_gate_reference(o, None, 1e-6, g, torch.float32)
    assert _rel(z, zr) <= TOL_FP32
    dz = torch.randn(B, T, H * d, device=DEV)
    dw = [torch.autograd.grad(output_norm_gate(o, w, 1e-6, g, torch.float32, impl="triton"), w, dz)[0]
          for _ in range(2)]
    assert torch.equal(dw[0], dw[1])
    dwr = torch.autograd.grad(output_norm_gate_reference(o, w, 1e-6, g, torch.float32), w, dz)[0]
    assert _rel(dw[0], dwr) <= TOL_FP32


@needs_triton
def test_empty_sequence():
    o, w, g = _inputs(2, 2, 0, 32)
    z = output_norm_gate(o, w, None, g, torch.float32, impl="triton")
    assert z.shape == (2, 0, 64)
    z.sum().backward()
    assert o.grad.shape == o.shape and g.grad.shape == g.shape
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_torch_impl_is_the_layer_composition_exactly():
    B, H, T, d = 2, 3, 21, 16
    norm = torch.nn.RMSNorm(d)  # eps None: finfo(fp32).eps
    with torch.no_grad():
        norm.weight.mul_(torch.rand(d) + 0.5)
    o = torch.randn(B, H, T, d)
    g = torch.randn(B, T, H * d)
    want = norm(o).transpose(1, 2).reshape(B, T, -1).to(torch.float32) * torch.sigmoid(g)
    for impl in ("torch", "auto"):
        got = output_norm_gate(o, norm.weight, norm.eps, g, torch.float32, impl=impl)
        assert torch.equal(got, want), impl
    # bf16 gate: the product promotes, as in the layer under autocast
    gb = g.to(torch.bfloat16)
    got = output_norm_gate(o, norm.weight, None, gb, torch.float32, impl="torch")
    assert got.dtype == torch.float32
    assert torch.equal(got, norm(o).transpose(1, 2).reshape(B, T, -1) * torch.sigmoid(gb))


def test_auto_on_cpu_uses_the_reference(monkeypatch):
    o, w, g = _inputs(1, 2, 20, 16, device="cpu")
    for interp in ("1", "0"):  # CPU tensors: never the kernels under "auto", interpreter or not
        monkeypatch.setenv("TRITON_INTERPRET", interp)
        z = output_norm_gate(o, w, 1e-6, g, torch.float32, impl="auto")
        assert type(z.grad_fn).__name__ == "MulBackward0"
        assert torch.equal(z, output_norm_gate_reference(o, w, 1e-6, g, torch.float32))


@pytest.mark.skipif(not (torch.cuda.is_available() and og.triton_available()), reason="needs a GPU")
def test_auto_on_cuda_uses_the_kernels_under_autocast():
    B, T, H, d = 2, 100, 4, 32
    x = torch.randn(B, T, H * d, device=DEV)
    gate = torch.nn.Linear(H * d, H * d, device=DEV)
    o, w, _ = _inputs(B, H, T, d)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        g = gate(x)
        z = output_norm_gate(o, w, 1e-6, g, x.dtype)
        zr = output_norm_gate_reference(o, w, 1e-6, g, x.dtype)
    assert g.dtype == torch.bfloat16 and z.dtype == zr.dtype == torch.float32
    assert type(z.grad_fn).__name__.startswith("_OutputNormGate")
    assert _rel(z, zr) <= TOL_BF16
    dz = torch.randn_like(z)
    got = torch.autograd.grad(z, (o, w, gate.weight), dz, retain_graph=True)  # gate(x) is shared
    want = torch.autograd.grad(zr, (o, w, gate.weight), dz)
    for name, a, b in zip(("do", "dweight", "dgate"), got, want):
        assert _rel(a, b) <= TOL_BF16, name


def test_auto_falls_back_for_uncovered_inputs():
    o, w, g = _inputs(1, 2, 10, 24)  # d not a power of two
    z = output_norm_gate(o, w, 1e-6, g, torch.float32)
    assert torch.equal(z, output_norm_gate_reference(o, w, 1e-6, g, torch.float32))
    o, w, g = (t.detach().double().requires_grad_(True) for t in _inputs(1, 2, 10, 16))
    z = output_norm_gate(o, w, 1e-6, g, torch.float64)
    assert z.dtype == torch.float64
    assert torch.equal(z, output_norm_gate_reference(o, w, 1e-6, g, torch.float64))
    assert og.triton_unsupported_reason(o, w, g, torch.float64) is not None


@needs_triton
def test_triton_rejects_uncovered_inputs():
    o, w, g = _inputs(1, 2, 10, 24)
    with pytest.raises(ShapeError, match="head dim 24"):
        output_norm_gate(o, w, 1e-6, g, torch.float32, impl="triton")
    o, w, g = _inputs(1, 2, 10, 256)
    with pytest.raises(ShapeError, match="head dim 256"):
        output_norm_gate(o, w, 1e-6, g, torch.float32, impl="triton")
    o, w, g = (t.detach().double() for t in _inputs(1, 2, 10, 16))
    with pytest.raises(ShapeError, match="float64"):
        output_norm_gate(o, w, 1e-6, g, torch.float64, impl="triton")


def test_bad_shapes_and_impl_raise():
    o, w, g = _inputs(2, 2, 10, 16)
    with pytest.raises(ShapeError, match=r"g must be \[B, T, H\*d\]"):
        output_norm_gate(o, w, 1e-6, g[:, :, :16], torch.float32)
    with pytest.raises(ShapeError, match="weight must be"):
        output_norm_gate(o, w[:8], 1e-6, g, torch.float32, impl="torch")
    with pytest.raises(ShapeError, match=r"o must be \[B, H, T, d\]"):
        output_norm_gate(o[0], w, 1e-6, g, torch.float32)
    with pytest.raises(ConfigError, match="unknown impl"):
        output_norm_gate(o, w, 1e-6, g, torch.float32, impl="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks CPU tensors without the interpreter")
def test_triton_without_cuda_or_interpreter_raises(monkeypatch):
    o, w, g = _inputs(1, 2, 10, 16, device="cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        output_norm_gate(o, w, 1e-6, g, torch.float32, impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(og, "_load_kernels", lambda: None)  # as if Triton were not importable
    with pytest.raises(ConfigError, match="importable Triton"):
        output_norm_gate(o, w, 1e-6, g, torch.float32, impl="triton")
