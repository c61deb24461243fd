"""Fused Triton implementation of the chunked neural memory, forward and backward.

Supported (``impl="triton"``; ``impl="auto"`` picks it on CUDA for these and falls back to the
chunked PyTorch path otherwise, see :func:`triton_unsupported_reason`):

- memory depth 1 (linear) or 2 (MLP ``d -> E d -> d``); depth 3-4 fall back (``"auto"``) or can
  use the memory-light PyTorch path ``impl="checkpointed"``;
- activations ``silu``, ``gelu``, ``relu``, ``identity``; residual on or off; ``norm=False``;
- per-token update clipping (``max_update_norm``) on or off;
- fp32 inputs/state (the :class:`~titans_memory.memory.NeuralMemory` layer runs the memory in
  fp32 even under bf16 autocast); ``chunk_size`` in {16, 32, 64}; ``head_dim`` in {16, 32, 64}
  (128 needs more than the 227 KB of shared memory per block of an H100 with tf32 operands);
  hidden width ``E d`` a multiple of 16 (and of 64 when >= 64);
- CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (the CI tests).

Design (the memory model):

- forward: one program per (batch, head) walks all chunks in order with no autograd graph; the
  running state ``(W, S)`` alternates between two fp32 buffers, and the state at the start of
  every ``K``-th chunk is copied to a checkpoint buffer (``ceil(n_chunks / K)`` states). Nothing
  per chunk (weights, gradients, coefficients) is written to GPU memory except the outputs.
- backward: the segments of ``K`` chunks are walked in reverse. For each, one launch recomputes
  the chunk-start states of the segment from its checkpoint (key forward + state update only, no
  retrieval), then one launch walks the segment's chunks in reverse, recomputing each chunk's
  forward quantities from its start state and back-propagating into q, k, v, the gates and the
  adjoint of the chunk-start state (carried in two ping-pong buffers).
- saved for the backward: the inputs, ``ceil(n/K)`` states (``state = B H x 4 d E d x 4`` bytes,
  8 MiB for B=4, H=8, d=64, E=4) and, with clipping, ``||delta1||^2`` per token (4 bytes). The
  backward adds ``K + 1`` states (one segment), 2 adjoint states and a small per-(batch, head)
  scratch (``3 c E d + 8 c^2 + 2 c d`` floats). ``K = ceil(sqrt(n_chunks))`` by default, so the
  state memory is ``O(sqrt(T))``; nothing of size ``n_chunks x state`` ever exists.
  ``tests/test_kernels.py::test_triton_saves_only_segment_checkpoints`` checks the saved bytes.
- compute (matmul count per chunk and head at W1 shapes, 64x64x64 each): forward ~67, segment
  recompute ~41 (no retrieval), backward ~190 (four passes over the hidden tiles, each recomputing
  the key forward of its tile): ~300 in all, ~2.4 MFLOP per token and head.
- inside a program, everything per chunk stays in registers, shared memory or a small scratch
  that the program re-reads (``delta2``, ``C``, ``(q k^T) * C`` ...), so the register and shared
  memory footprint stays within one H100 block (see ``benchmarks/kernels.py --aot``).

Backward of one chunk (depth 2; ``dO`` and the adjoints ``dW1', dS1', dW2', dS2'`` of the state
after the chunk given; ``N1 = (q k^T) * C``, ``N2 = (x1 h1^T) * C``):

    dbeta = rowsum(dO * x1 W2) + rowsum(da1 * q W1),   dg likewise with S1, S2
    dN2 = -dO delta2^T;  dx1 = beta dO W2^T + g dO S2^T + (dN2 * C) h1;  da1 = dx1 * act'(a1)
    d delta2 = -N2^T dO - cl * (h1 dW2') - ml * (h1 dS2') + (d delta1 * act'(z1)) W2
    d delta1 = -N1^T da1 - cl * (k dW1') - ml * (k dS1')
    dh1 = (dN2 * C)^T x1 + 2 d delta2 W2^T - (cl delta2) dW2'^T - (ml delta2) dS2'^T
    dz1 = dh1 * act'(z1) + d delta1 * (delta2 W2^T) * act''(z1)
    dq = dO [res] + beta da1 W1^T + g da1 S1^T + (dN1 * C) k,     dN1 = -da1 delta1^T
    dk = (dN1 * C)^T q + dz1 W1^T + 2 d delta2 [res] - (cl delta1) dW1'^T - (ml delta1) dS1'^T
    dv = -2 d delta2
    dW1 = bl dW1' + q^T (beta da1) + k^T dz1,          dS1 = gl dW1' + el dS1' + q^T (g da1)
    dW2 = bl dW2' + x1^T (beta dO) + (d delta1 act'(z1))^T delta2 + h1^T (2 d delta2)
    dS2 = gl dW2' + el dS2' + x1^T (g dO)
    dC = dN1 * (q k^T) + dN2 * (x1 h1^T) (+ d cl on the last row), then through
    C = (A @ D) * theta, g = A @ E, beta, E, cl, ml, bl, gl, el to the log-gates and the gates.

With update clipping the chunk runs on ``theta' = theta s``, ``s = min(1, m / n)``,
``n^2 = ||k||^2 ||delta1||^2 + ||h1||^2 ||delta2||^2`` per token: ``d theta = d theta' s`` and,
where ``s < 1``, ``d n^2 = -d theta' theta m / (2 n^3)`` adds ``2 d n^2 ||k||^2 delta1`` to
``d delta1``, ``2 d n^2 ||delta1||^2 k`` to ``dk``, ``2 d n^2 ||delta2||^2 h1`` to ``dh1`` and
``2 d n^2 ||h1||^2 delta2`` to ``d delta2``. ``d theta'`` is known only after the coefficient
backward, so the kernel runs that between its passes 2 and 3 and adds one short pass (2b) for the
part of ``d delta1`` that reaches ``d delta2`` through ``W2``.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .checkpointed import default_segment_chunks
from .mlp import MemoryMLPSpec

TRITON_ACTIVATIONS = ("silu", "gelu", "relu", "identity")
TRITON_CHUNKS = (16, 32, 64)
TRITON_HEAD_DIMS = (16, 32, 64)
PRECISIONS = ("ieee", "tf32", "bf16")


def backward_prec(precision: str) -> str:
    """The ``PREC`` of the backward kernels' launches: ``"tf32"`` there multiplies the operands as the
    tensor cores read them (truncated, ``"tf32-trunc"`` of ``triton_kernels._mm``), while the forward,
    the recompute and the retrieval round them. Measured at W1 with the tiled kernels (H200,
    RESULTS.md, eighth session): rounding in the backward too made the layer's training step 10-11 %
    slower at 8k (the operator's fwd+bwd 12-13 % at 8k and 32k, under 1 % at 2k); with the truncating backward the
    gradients' worst error was 3.3e-3 (4.4e-4 all rounded, 2.5e-3 all truncated) from 2k to 32k."""
    return "tf32-trunc" if precision == "tf32" else precision

_kernels = None
_import_error: Optional[BaseException] = None

#: Compiler report of the last launch of each kernel variant (GPU only): registers per thread,
#: spilled registers, shared memory bytes. Filled by :func:`_note`; read by the benchmark.
KERNEL_STATS: dict = {}


def _note(name: str, handle) -> None:
    try:
        KERNEL_STATS[name] = dict(
            n_regs=handle.n_regs, n_spills=handle.n_spills, shared=handle.metadata.shared,
            num_warps=handle.metadata.num_warps,
        )
    except AttributeError:  # the interpreter returns no compiled kernel
        pass


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load_kernels():
    """Import the Triton kernels on first use (Triton is optional on non-Linux hosts)."""
    global _kernels, _import_error
    if _kernels is None and _import_error is None:
        try:
            from . import triton_kernels

            _kernels = triton_kernels
        except Exception as exc:  # ImportError, or a Triton without a usable backend
            _import_error = exc
    return _kernels


def triton_available() -> bool:
    """Triton importable and able to run here (a CUDA device, or the interpreter)."""
    if not (torch.cuda.is_available() or interpret_mode()):
        return False
    return _load_kernels() is not None


def triton_unsupported_reason(
    q: Tensor, weights: Sequence[Tensor], spec: MemoryMLPSpec, chunk_size: int, max_update_norm: Optional[float]
) -> Optional[str]:
    """``None`` if the Triton kernels handle these inputs, else why not (a sentence)."""
    if not (q.is_cuda or (interpret_mode() and q.device.type == "cpu")):
        return f"tensors on {q.device} (needs CUDA, or CPU with TRITON_INTERPRET=1)"
    if len(weights) not in (1, 2):
        return f"memory depth {len(weights)} (kernels cover depth 1 and 2)"
    if spec.norm:
        return "norm=True (kernels cover norm=False)"
    if spec.activation not in TRITON_ACTIVATIONS:
        return f"activation {spec.activation!r}"
    if chunk_size not in TRITON_CHUNKS:
        return f"chunk_size {chunk_size} (kernels cover {TRITON_CHUNKS})"
    d = q.shape[-1]
    if d not in TRITON_HEAD_DIMS:
        return f"head_dim {d} (kernels cover {TRITON_HEAD_DIMS})"
    if len(weights) == 2:
        hid = weights[0].shape[-1]
        if hid % 16 or (hid >= 64 and hid % 64):
            return f"hidden width {hid} (needs a multiple of 16, and of 64 when >= 64)"
    if q.dtype != torch.float32:
        return f"dtype {q.dtype} (kernels run fp32 inputs and state)"
    return None


# ---------------------------------------------------------------------------------------------
class _Cfg:
    """Static launch configuration of one call."""

    def __init__(self, B, H, T, d, hid, depth, spec, chunk, K, prec, block_f, num_warps, clip):
        self.B, self.H, self.T, self.d, self.hid, self.depth = B, H, T, d, hid, depth
        self.BH = B * H
        self.chunk = chunk
        self.n_chunks = -(-T // chunk)
        self.K = K
        self.n_seg = -(-self.n_chunks // K)
        self.act = spec.activation
        self.res = bool(spec.residual)
        self.prec = prec
        self.clip = float(clip) if clip is not None else 1.0
        self.CLIP = clip is not None
        self.BF = block_f or min(64, hid)
        self.PS = 4 * d * hid if depth == 2 else 2 * d * d
        big = chunk * max(d, self.BF) >= 64 * 64
        self.num_warps = num_warps or (8 if big else 4)
        k = _load_kernels()
        self.fwd = k._fwd2_kernel if depth == 2 else k._fwd1_kernel
        self.bwd = k._bwd2_kernel if depth == 2 else k._bwd1_kernel

    def fwd_scratch(self, dev) -> Tensor:
        """Per-program scratch of the forward kernels (``delta2``, ``C``, ``(q k^T) * C``)."""
        n = self.chunk * self.d + 2 * self.chunk * self.chunk if self.depth == 2 else 1
        return torch.empty(self.BH, n, device=dev, dtype=torch.float32)

    def consts(self):
        return dict(BC=self.chunk, D=self.d, F=self.hid, BF=self.BF, ACT=self.act, RES=self.res, PREC=self.prec, CLIP=self.CLIP)


def _run_forward(cfg: _Cfg, q, k, v, th, et, al, state0, out: bool, save: bool):
    """Whole-sequence forward; returns ``(o or None, final state, checkpoints or None, b1 or None)``.

    ``b1`` (when saving for the backward with clipping, depth 2): ``||delta1||^2`` per token.
    """
    BH, PS = cfg.BH, cfg.PS
    work = torch.empty(BH, 2, PS, device=q.device, dtype=torch.float32)
    work[:, 1] = state0
    o = torch.empty_like(q) if out else q  # q is a dummy pointer when OUT is off
    ck = torch.empty(BH, cfg.n_seg, PS, device=q.device, dtype=torch.float32) if save else work
    store_b1 = save and cfg.CLIP and cfg.depth == 2
    b1 = torch.empty_like(th) if store_b1 else th
    scr = cfg.fwd_scratch(q.device)
    h = cfg.fwd[(BH,)](
        q, k, v, th, et, al, o, work, ck, b1, scr,
        cfg.T, 0, cfg.n_chunks, work.stride(0), ck.stride(0), cfg.K, cfg.clip, scr.stride(0),
        OUT=out, SAVE=save, LINEAR=False, STORE_B1=store_b1, num_warps=cfg.num_warps, num_stages=1, **cfg.consts(),
    )
    _note(f"fwd{cfg.depth}" + ("" if save else "_nograd"), h)
    final = work[:, (cfg.n_chunks - 1) % 2].clone()
    return (o if out else None), final, (ck if save else None), (b1 if store_b1 else None)


class FusedMemory(torch.autograd.Function):
    """``(q, k, v, theta, eta, alpha, state0 [BH, PS]) -> (o, state_T)`` on flat ``[BH, T, d]``."""

    @staticmethod
    def forward(ctx, cfg, q, k, v, th, et, al, state0):
        o, final, ck, b1 = _run_forward(cfg, q, k, v, th, et, al, state0, out=True, save=True)
        ctx.cfg = cfg
        ctx.save_for_backward(q, k, v, th, et, al, ck, th if b1 is None else b1)
        return o, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_o, g_final):
        with _device_of(ctx.saved_tensors[0]):
            return FusedMemory._backward(ctx, g_o, g_final)

    @staticmethod
    def _backward(ctx, g_o, g_final):
        cfg = ctx.cfg
        q, k, v, th, et, al, ck, b1 = ctx.saved_tensors
        BH, PS, K = cfg.BH, cfg.PS, cfg.K
        dev = q.device
        g_o = torch.zeros_like(q) if g_o is None else g_o.contiguous()
        adj = torch.zeros(BH, 2, PS, device=dev, dtype=torch.float32)
        if g_final is not None:
            adj[:, 0] = g_final
        phase = 0
        seg = torch.empty(BH, K + 1, PS, device=dev, dtype=torch.float32)
        if cfg.depth == 2:
            scr_n = 3 * cfg.chunk * cfg.hid + 8 * cfg.chunk * cfg.chunk + 2 * cfg.chunk * cfg.d
        else:
            scr_n = 6 * cfg.chunk * cfg.chunk + 2 * cfg.chunk * cfg.d
        scr = torch.empty(BH, scr_n, device=dev, dtype=torch.float32)
        fscr = cfg.fwd_scratch(dev)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dth, det, dal = torch.empty_like(th), torch.empty_like(et), torch.empty_like(al)
        consts = cfg.consts()
        for s in range(cfg.n_seg - 1, -1, -1):
            c0 = s * K
            nc = min(K, cfg.n_chunks - c0)
            seg[:, 0] = ck[:, s]
            if nc > 1:  # chunk-start states of the segment (the last chunk's end state is not needed)
                h = cfg.fwd[(BH,)](
                    q, k, v, th, et, al, q, seg, seg, b1, fscr,
                    cfg.T, c0, nc - 1, seg.stride(0), seg.stride(0), 1, cfg.clip, fscr.stride(0),
                    OUT=False, SAVE=False, LINEAR=True, STORE_B1=False,
                    num_warps=cfg.num_warps, num_stages=1, **consts,
                )
                _note(f"fwd{cfg.depth}_recompute", h)
            h = cfg.bwd[(BH,)](
                q, k, v, th, et, al, g_o, dq, dk, dv, dth, det, dal,
                seg, adj, scr, b1,
                cfg.T, c0, nc, seg.stride(0), adj.stride(0), scr.stride(0), phase, cfg.clip,
                num_warps=cfg.num_warps, num_stages=1, **dict(consts, PREC=backward_prec(cfg.prec)),
            )
            _note(f"bwd{cfg.depth}", h)
            phase = (phase + nc) % 2
        return None, dq, dk, dv, dth, det, dal, adj[:, phase].clone()


def _device_of(t: Tensor):
    """Launch on the tensors' GPU, not on the current one."""
    import contextlib

    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _pack(tensors: Sequence[Tensor], BH: int) -> Tensor:
    return torch.cat([t.reshape(BH, -1) for t in tensors], dim=1)


def _unpack(flat: Tensor, like: Sequence[Tensor]) -> List[Tensor]:
    out, off = [], 0
    for t in like:
        n = t.shape[-2] * t.shape[-1]
        out.append(flat[:, off : off + n].reshape(t.shape))
        off += n
    return out


def neural_memory_triton(
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
    segment_chunks: Optional[int] = None,
    precision: str = "tf32",
    block_f: Optional[int] = None,
    num_warps: Optional[int] = None,
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """Triton implementation; same interface and result as
    :func:`~titans_memory.ops.chunked.neural_memory_chunked` (to matmul precision).

    Extra knobs: ``segment_chunks`` (chunks between saved states, default ``ceil(sqrt(n))``),
    ``precision`` (``"tf32"`` default, ``"bf16"`` or ``"ieee"``), ``block_f`` (hidden tile,
    default ``min(64, E d)``), ``num_warps``. Raises :class:`~titans_memory.errors.ConfigError` when
    Triton is unavailable or the configuration is unsupported (:func:`triton_unsupported_reason`).
    """
    from ..errors import ConfigError

    if _load_kernels() is None:
        raise ConfigError(f"impl='triton' needs an importable Triton ({_import_error!r}); use impl='torch' or 'auto'")
    W = list(weights)
    reason = triton_unsupported_reason(q, W, spec, chunk_size, max_update_norm)
    if reason is not None:
        raise ConfigError(f"impl='triton' does not support this call: {reason}; use impl='auto' or 'torch'")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    S = [torch.zeros_like(w) for w in W] if momentum is None else list(momentum)
    B, H, T, d = q.shape
    if T == 0:
        return q.new_zeros(q.shape), W, S
    hid = W[0].shape[-1] if len(W) == 2 else d
    n_chunks = -(-T // chunk_size)
    K = segment_chunks or default_segment_chunks(n_chunks)
    cfg = _Cfg(B, H, T, d, hid, len(W), spec, chunk_size, K, precision, block_f, num_warps, max_update_norm)
    if hid % cfg.BF:
        raise ConfigError(f"block_f={cfg.BF} must divide the hidden width {hid}")
    BH = B * H
    flat = [t.reshape(BH, T, d).contiguous().float() for t in (q, k, v)]
    gates = [t.reshape(BH, T).contiguous().float() for t in (theta, eta, alpha)]
    order = [W[0], S[0], W[1], S[1]] if len(W) == 2 else [W[0], S[0]]
    state0 = _pack([t.float() for t in order], BH)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, theta, eta, alpha, *W, *S)
    )
    with _device_of(q):
        if needs_grad:
            o, final = FusedMemory.apply(cfg, *flat, *gates, state0)
        else:
            o, final, _, _ = _run_forward(cfg, *flat, *gates, state0.detach(), out=True, save=False)
    parts = _unpack(final, order)
    if len(W) == 2:
        W_T, S_T = [parts[0], parts[2]], [parts[1], parts[3]]
    else:
        W_T, S_T = [parts[0]], [parts[1]]
    return o.view(B, H, T, d), W_T, S_T
