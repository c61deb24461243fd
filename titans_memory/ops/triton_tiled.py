"""Drivers of the tiled Triton kernels (:mod:`titans_memory.ops.triton_tiled_kernels`, where the
launches and their phases are described): :func:`neural_memory_tiled_triton` (inference) and
:func:`neural_memory_tiled_triton_train` (an autograd function), both depth 2, grid
``(B * heads, n_tiles)``, one launch per phase per chunk. The specification is
:mod:`titans_memory.ops.tiled`; the plan is ``docs/kernels.md``. Opt-in as
``impl="triton_tiled"``; verified under ``TRITON_INTERPRET=1``, not yet run on a GPU.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError
from .fused import TRITON_ACTIVATIONS, _device_of, interpret_mode
from .mlp import MemoryMLPSpec
from .triton_tiled_kernels import (
    PREC,
    PRECISIONS,
    _bwd_coeffs_kernel,
    _bwd_keys_kernel,
    _bwd_norms_kernel,
    _bwd_retrieval_kernel,
    _bwd_rows_kernel,
    _bwd_state_kernel,
    _keys_kernel,
    _norms_kernel,
    _output_kernel,
    _update_kernel,
)


# ---------------------------------------------------------------------------------------------
def default_n_tiles(hidden: int) -> int:
    """Tiles of ``min(64, hidden / 2)`` hidden units (4 at W1's hidden width 256), at least 1."""
    return max(1, hidden // max(1, min(64, hidden // 2)))


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _pow2_16(n: int) -> bool:
    return n >= 16 and (n & (n - 1)) == 0


def tiled_triton_unsupported_reason(
    q: Tensor, weights: Sequence[Tensor], spec: MemoryMLPSpec, chunk_size: int, n_tiles: int
) -> Optional[str]:
    """``None`` if :func:`neural_memory_tiled_triton` covers these inputs, else why not."""
    if not (q.is_cuda or (interpret_mode() and q.device.type == "cpu")):
        return f"tensors on {q.device} (needs CUDA, or CPU with TRITON_INTERPRET=1)"
    if len(weights) != 2:
        return f"memory depth {len(weights)} (this kernel covers depth 2 only)"
    if spec.norm:
        return "the memory output norm (spec.norm=True)"
    if spec.activation not in TRITON_ACTIVATIONS:
        return f"activation {spec.activation!r} (covers {TRITON_ACTIVATIONS})"
    d = q.shape[-1]
    hid = weights[0].shape[-1]
    if not isinstance(n_tiles, int) or n_tiles < 1 or hid % n_tiles:
        return f"n_tiles={n_tiles}: it must divide the hidden width {hid}"
    if not _pow2_16(d):
        return f"head_dim {d} (needs a power of two >= 16)"
    if not _pow2_16(hid // n_tiles):
        return f"tile width {hid // n_tiles} = hidden {hid} / n_tiles {n_tiles} (needs a power of two >= 16)"
    if not _pow2_16(chunk_size):
        return f"chunk_size {chunk_size} (needs a power of two >= 16)"
    return None


def _validated(q, weights, momentum, spec, chunk_size, n_tiles, precision, who: str):
    """The state lists ``(W, S)`` (zero momentum if ``None``) after checking coverage, precision
    and shapes; a ConfigError / ShapeError naming ``who`` otherwise."""
    W = list(weights)
    reason = tiled_triton_unsupported_reason(q, W, spec, chunk_size, n_tiles)
    if reason is not None:
        raise ConfigError(f"{who} does not cover {reason}")
    _check_precision(precision)
    S = [torch.zeros_like(w) for w in W] if momentum is None else list(momentum)
    B, H, _, d = q.shape
    hid = W[0].shape[-1]
    expect = [(B, H, d, hid), (B, H, hid, d)]
    for name, group in (("weights", W), ("momentum", S)):
        if len(group) != 2 or any(tuple(t.shape) != e for t, e in zip(group, expect)):
            raise ShapeError(f"{who}: {name} must be shaped {expect}, got {[tuple(t.shape) for t in group]}")
    return W, S


def _forward_chunks(xs, gates, state, out, c_begin, c_end, spec, max_update_norm, NT, BC,
                    with_output=True, on_chunk_start=None, prec=PREC):
    """Run chunks ``c_begin .. c_end - 1`` of the launch-per-phase forward, updating ``state``
    (``(w1, s1, w2, s2)``, fp32 ``[BH, d, F]`` / ``[BH, F, d]``) in place.

    ``xs = (q, k, v)`` ``[BH, T, d]``, ``gates`` ``[BH, T]`` (fp32, contiguous); ``out`` ``[BH, T, d]``
    receives the outputs of these chunks when ``with_output`` (else it is not written).
    ``on_chunk_start(n)`` is called when ``state`` holds the state at the start of chunk ``n``
    (before that chunk's update launch): the training driver copies checkpoints there.
    """
    qf, kf, vf = xs
    w1, s1, w2, s2 = state
    BH, T, d = qf.shape
    hid = w1.shape[-1]
    BF = hid // NT
    f32 = torch.float32
    dev = qf.device
    p_scr = torch.empty(BH, 2, NT, BC, d, device=dev, dtype=f32)
    z_scr = torch.empty(BH, NT, BC, BF, device=dev, dtype=f32)
    n_scr = torch.empty(BH, NT, 2, BC, device=dev, dtype=f32) if max_update_norm is not None else p_scr
    o_scr = torch.empty(BH, 2, NT, BC, d, device=dev, dtype=f32)
    clip = float(max_update_norm) if max_update_norm is not None else 1.0
    CLIP = max_update_norm is not None
    sizes = dict(BC=BC, D=d, F=hid, BF=BF)
    launch = dict(num_warps=4, num_stages=1)
    grid = (BH, NT)
    t_first = c_begin * BC
    _keys_kernel[grid](kf, w1, w2, z_scr, p_scr, T, t_first, c_begin % 2, NT, ACT=spec.activation, PREC=prec,
                       **sizes, **launch)
    for n in range(c_begin, c_end):
        t0, slot = n * BC, n % 2
        if on_chunk_start is not None:
            on_chunk_start(n)
        if CLIP:
            _norms_kernel[grid](kf, vf, w2, z_scr, p_scr, n_scr, T, t0, slot, NT,
                                ACT=spec.activation, RES=bool(spec.residual), PREC=prec, **sizes, **launch)
        _update_kernel[grid](
            qf, kf, vf, *gates, w1, s1, w2, s2, z_scr, p_scr, n_scr, o_scr, out, T, t0, slot, NT, clip,
            ACT=spec.activation, RES=bool(spec.residual), CLIP=CLIP, NEXT=n + 1 < c_end,
            PREV=with_output and n > c_begin, PREC=prec, **sizes, **launch,
        )
    if with_output and c_end > c_begin:
        _output_kernel[(BH,)](qf, o_scr, out, T, (c_end - 1) * BC, (c_end - 1) % 2, NT,
                              BC=BC, D=d, RES=bool(spec.residual), **launch)


@torch.no_grad()
def neural_memory_tiled_triton(
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
    n_tiles: int = 4,
    precision: str = PREC,
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """Same interface and result (to fp32 rounding) as
    :func:`~titans_memory.ops.tiled.neural_memory_tiled`, forward only, depth 2.

    Shapes: ``q, k, v`` ``[B, H, T, d]``; gates ``[B, H, T]``; ``weights = [W1 [B, H, d, E d],
    W2 [B, H, E d, d]]``, ``momentum`` likewise (zeros if ``None``). Returns ``(o [B, H, T, d],
    [W1_T, W2_T], [S1_T, S2_T])``. The given tensors are not modified. Raises
    :class:`~titans_memory.errors.ConfigError` for what it does not cover
    (:func:`tiled_triton_unsupported_reason`).
    """
    W, S = _validated(q, weights, momentum, spec, chunk_size, n_tiles, precision, "neural_memory_tiled_triton")
    B, H, T, d = q.shape
    BH = B * H
    if T == 0:
        return q.new_zeros(q.shape), [w.clone() for w in W], [s.clone() for s in S]

    f32 = torch.float32
    xs = [t.detach().reshape(BH, T, d).to(f32).contiguous() for t in (q, k, v)]
    gates = [t.detach().reshape(BH, T).to(f32).contiguous() for t in (theta, eta, alpha)]
    # private fp32 copies of the state, updated in place tile by tile
    w1, w2 = (t.detach().reshape(BH, *t.shape[2:]).to(f32).clone().contiguous() for t in W)
    s1, s2 = (t.detach().reshape(BH, *t.shape[2:]).to(f32).clone().contiguous() for t in S)

    NT, BC = n_tiles, chunk_size
    out = torch.empty(BH, T, xs[0].shape[-1], device=q.device, dtype=f32)
    with _device_of(q):
        _forward_chunks(xs, gates, (w1, s1, w2, s2), out, 0, -(-T // BC), spec, max_update_norm, NT, BC,
                        prec=precision)

    o = out.reshape(B, H, T, d).to(q.dtype)
    W_T = [w1.reshape(W[0].shape).to(W[0].dtype), w2.reshape(W[1].shape).to(W[1].dtype)]
    S_T = [s1.reshape(S[0].shape).to(S[0].dtype), s2.reshape(S[1].shape).to(S[1].dtype)]
    return o, W_T, S_T


# ---------------------------------------------------------------------------------------------
# training path: forward with checkpoints, backward launch per phase, autograd wiring
class _TrainCfg:
    """Static configuration of one training call (flat shapes, tiling, segments)."""

    def __init__(self, BH, T, d, hid, spec, chunk, n_tiles, max_update_norm, segment_chunks, prec=PREC):
        self.BH, self.T, self.d, self.hid = BH, T, d, hid
        self.prec = prec
        self.spec = spec
        self.BC, self.NT, self.BF = chunk, n_tiles, hid // n_tiles
        self.n_chunks = -(-T // chunk)
        self.K = segment_chunks or max(1, math.ceil(math.sqrt(self.n_chunks)))
        self.n_seg = -(-self.n_chunks // self.K)
        self.max_update_norm = max_update_norm
        self.CLIP = max_update_norm is not None
        self.clip = float(max_update_norm) if self.CLIP else 1.0


def _backward_launches(cfg: _TrainCfg, xs, gates, go, state, adj, scr, grads, n: int, prev: bool):
    """The backward of chunk ``n`` (4 launches, 5 with the clip) from its chunk-start ``state``
    (``(w1, s1, w2, s2)``); ``adj`` (same layout) holds the adjoint of the state after the chunk
    and is overwritten with the adjoint of the chunk-start state. ``prev``: write the ``dq, dk``
    rows of chunk ``n + 1`` in the first launch."""
    qf, kf, vf = xs
    w1, s1, w2, s2 = state
    aw1, as1, aw2, as2 = adj
    dq, dk, dv, dth, det, dal = grads
    t0, NT, T = n * cfg.BC, cfg.NT, cfg.T
    act, res, prec = cfg.spec.activation, bool(cfg.spec.residual), cfg.prec
    sizes = dict(BC=cfg.BC, D=cfg.d, F=cfg.hid, BF=cfg.BF)
    launch = dict(num_warps=4, num_stages=1)
    grid = (cfg.BH, NT)
    _bwd_keys_kernel[grid](kf, w1, w2, scr["P"], scr["DQ"], scr["DK"], dq, dk, T, t0, NT,
                           ACT=act, PREV=prev, PREC=prec, **sizes, **launch)
    if cfg.CLIP:
        _bwd_norms_kernel[grid](kf, vf, w1, w2, scr["P"], scr["N"], T, t0, NT,
                                ACT=act, RES=res, PREC=prec, **sizes, **launch)
    flags = dict(ACT=act, RES=res, CLIP=cfg.CLIP, PREC=prec)
    _bwd_retrieval_kernel[grid](qf, kf, vf, *gates, go, w1, s1, w2, s2, aw1, as1, aw2, as2,
                                scr["P"], scr["N"], scr["XH"], scr["DN1"], scr["GT"], scr["GS"], scr["DQ"],
                                scr["X1"], scr["DA1"], T, t0, NT, cfg.clip, **flags, **sizes, **launch)
    _bwd_coeffs_kernel[grid](qf, kf, vf, *gates, go, w1, w2, aw1, as1, aw2, as2,
                             scr["P"], scr["N"], scr["XH"], scr["DN1"], scr["GT"], scr["GS"], scr["DQ"],
                             scr["DA1"], scr["DDL1"], scr["DD2"], scr["HD"], dth, det, dal,
                             T, t0, NT, cfg.clip, **flags, **sizes, **launch)
    _bwd_state_kernel[grid](qf, kf, vf, *gates, go, dv, w1, w2, aw1, as1, aw2, as2,
                            scr["P"], scr["N"], scr["XH"], scr["DN1"], scr["DD2"], scr["HD"], scr["DK"],
                            scr["X1"], scr["DA1"], scr["DDL1"], T, t0, NT, cfg.clip, **flags, **sizes, **launch)


def _backward_scratch(cfg: _TrainCfg, dev) -> dict:
    BH, NT, BC, BF, d = cfg.BH, cfg.NT, cfg.BC, cfg.BF, cfg.d
    f32 = torch.float32
    shapes = dict(P=(BH, NT, BC, d), N=(BH, NT, 2, BC), XH=(BH, NT, BC, BC), DN1=(BH, NT, BC, BC),
                  GT=(BH, NT, 4, BC), GS=(BH, NT, 4), DD2=(BH, NT, BC, d), DQ=(BH, NT + 1, BC, d),
                  DK=(BH, NT + 1, BC, d), X1=(BH, NT, BC, BF), DA1=(BH, NT, BC, BF), DDL1=(BH, NT, BC, BF),
                  HD=(BH, BC))
    return {name: torch.zeros(shape, device=dev, dtype=f32) for name, shape in shapes.items()}


class TiledTritonMemory(torch.autograd.Function):
    """``(q, k, v [BH, T, d], theta, eta, alpha [BH, T], W1, S1 [BH, d, F], W2, S2 [BH, F, d])
    -> (o [BH, T, d], W1_T, S1_T, W2_T, S2_T)``, all fp32 contiguous.

    Forward: the launch-per-phase forward (:func:`_forward_chunks`), copying the state at the start
    of every ``K``-th chunk into ``ceil(n_chunks / K)`` checkpoints (``K = cfg.K``, default
    ``ceil(sqrt(n_chunks))``). Backward: segments of ``K`` chunks in reverse; per segment the
    forward (without outputs) recomputes the ``K`` chunk-start states from the checkpoint, then
    the segment's chunks are walked in reverse, each by :func:`_backward_launches`.
    """

    @staticmethod
    def forward(ctx, cfg, q, k, v, th, et, al, w1, s1, w2, s2):
        state = [t.detach().clone() for t in (w1, s1, w2, s2)]
        ck = [torch.empty(cfg.n_seg, *t.shape, device=t.device, dtype=t.dtype) for t in state]

        def save(n):
            if n % cfg.K == 0:
                for c, t in zip(ck, state):
                    c[n // cfg.K].copy_(t)

        xs = [t.detach() for t in (q, k, v)]
        gates = [t.detach() for t in (th, et, al)]
        out = torch.empty_like(xs[0])
        with _device_of(q):
            _forward_chunks(xs, gates, state, out, 0, cfg.n_chunks, cfg.spec, cfg.max_update_norm, cfg.NT,
                            cfg.BC, on_chunk_start=save, prec=cfg.prec)
        ctx.cfg = cfg
        ctx.save_for_backward(*xs, *gates, *ck)
        return (out, *state)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_o, g_w1, g_s1, g_w2, g_s2):
        cfg = ctx.cfg
        qf, kf, vf, th, et, al, *ck = ctx.saved_tensors
        xs, gates = (qf, kf, vf), (th, et, al)
        go = torch.zeros_like(qf) if g_o is None else g_o.float().contiguous()
        adj = [torch.zeros_like(c[0]) if g is None else g.float().contiguous().clone()
               for g, c in zip((g_w1, g_s1, g_w2, g_s2), ck)]
        grads = [torch.empty_like(t) for t in (qf, kf, vf, th, et, al)]
        with _device_of(qf):
            scr = _backward_scratch(cfg, qf.device)
            first = True
            for s in range(cfg.n_seg - 1, -1, -1):
                c0 = s * cfg.K
                nc = min(cfg.K, cfg.n_chunks - c0)
                cur = [c[s].clone() for c in ck]
                starts = []
                if nc > 1:  # chunk-start states of the segment, recomputed from its checkpoint
                    _forward_chunks(xs, gates, cur, qf, c0, c0 + nc - 1, cfg.spec, cfg.max_update_norm, cfg.NT,
                                    cfg.BC, with_output=False, prec=cfg.prec,
                                    on_chunk_start=lambda n: starts.append([t.clone() for t in cur]))
                starts.append(cur)
                for n in range(c0 + nc - 1, c0 - 1, -1):
                    _backward_launches(cfg, xs, gates, go, starts[n - c0], adj, scr, grads, n, prev=not first)
                    first = False
            _bwd_rows_kernel[(cfg.BH,)](scr["DQ"], scr["DK"], grads[0], grads[1], cfg.T, 0, cfg.NT,
                                        BC=cfg.BC, D=cfg.d, num_warps=4, num_stages=1)
        return (None, *grads, *adj)


def neural_memory_tiled_triton_train(
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
    n_tiles: int = 4,
    segment_chunks: Optional[int] = None,
    precision: str = PREC,
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """Differentiable twin of :func:`neural_memory_tiled_triton` (depth 2, same coverage and
    requirements, same result): gradients flow to ``q, k, v, theta, eta, alpha``, ``weights`` and
    ``momentum`` from the cotangents of the output and of the final state.

    Shapes: ``q, k, v`` ``[B, H, T, d]``; gates ``[B, H, T]``; ``weights = [W1 [B, H, d, E d],
    W2 [B, H, E d, d]]``, ``momentum`` likewise (zeros if ``None``). Returns ``(o [B, H, T, d],
    [W1_T, W2_T], [S1_T, S2_T])`` in fp32. ``segment_chunks``: chunks between saved states
    (default ``ceil(sqrt(n_chunks))``).

    The backward (:class:`TiledTritonMemory`) is the hand-written tiled backward of
    :func:`~titans_memory.ops.tiled.chunk_backward_depth2` as Triton kernels, grid
    ``(B * heads, n_tiles)``, launches per chunk in reverse (no program waits on another):

    1. ``_bwd_keys_kernel``: R1 partials ``P_j = act(k W1_j) W2_j`` (and the previous chunk's
       ``dq, dk`` rows: the sums R7, R8 of its partials, tile 0 first, program ``j = 0``);
    2. ``_bwd_norms_kernel`` (clip only): R2 partials;
    3. ``_bwd_retrieval_kernel``: R1 sum, forward recompute, retrieval backward; partials of R3,
       R4, R5, R7;
    4. ``_bwd_coeffs_kernel``: R3, R4, R5 sums; the per-head ``c x c`` coefficient backward
       (``_coeffs_bwd`` of ``triton_kernels.py``, in Triton; every tile computes it again rather
       than waiting on a broadcast) and the clip backward; ``d delta1_j``; R6 partials;
    5. ``_bwd_state_kernel``: R6 sum; ``dv``; ``dz1_j``; R8 partials; the adjoint of the tile's
       slice of the chunk-start state (in place).

    Every cross-tile sum is a later launch reading per-tile partials from scratch, so results
    are deterministic. No PyTorch compute runs between launches (only buffer copies for the
    checkpoints). Each launch recomputes the tile-local forward it needs from the chunk-start
    state (``z1_j, h1_j, delta1_j``; ``x1_j, da1_j, d delta1_j`` are stashed per tile instead).
    State memory: ``ceil(n_chunks / K) + K + 1`` states (checkpoints, one segment of recomputed
    chunk-start states) plus the adjoint, i.e. ``O(sqrt(T))`` by default.

    Tested only under ``TRITON_INTERPRET=1`` on the CPU against autograd through
    :func:`~titans_memory.ops.chunked.neural_memory_chunked` in fp64: it has NOT run on a GPU
    (compilation for sm_90, shared memory and speed are unknown).
    """
    W, S = _validated(q, weights, momentum, spec, chunk_size, n_tiles, precision, "neural_memory_tiled_triton_train")
    B, H, T, d = q.shape
    hid = W[0].shape[-1]
    BH = B * H
    if T == 0:
        return q.new_zeros(q.shape), [w.clone() for w in W], [s.clone() for s in S]
    f32 = torch.float32
    cfg = _TrainCfg(BH, T, d, hid, spec, chunk_size, n_tiles, max_update_norm, segment_chunks, precision)
    xs = [t.reshape(BH, T, d).to(f32).contiguous() for t in (q, k, v)]
    gates = [t.reshape(BH, T).to(f32).contiguous() for t in (theta, eta, alpha)]
    st = [t.reshape(BH, *t.shape[2:]).to(f32).contiguous() for t in (W[0], S[0], W[1], S[1])]
    o, w1, s1, w2, s2 = TiledTritonMemory.apply(cfg, *xs, *gates, *st)
    return (o.reshape(B, H, T, d), [w1.reshape(W[0].shape), w2.reshape(W[1].shape)],
            [s1.reshape(S[0].shape), s2.reshape(S[1].shape)])
