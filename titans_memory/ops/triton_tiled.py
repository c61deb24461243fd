"""Forward-only Triton kernels of the tiled memory update, with the launch-per-phase driver.

This is step 2 of the plan in ``docs/kernels.md``: the phases of
:mod:`titans_memory.ops.tiled` (the specification: a head's fast-weight state split over tiles,
cross-tile sums explicit) as ``@triton.jit`` kernels, with the tiles synchronised by kernel
launches. Each launch has the grid ``(B * heads, n_tiles)``; program ``(bh, j)`` owns the hidden
units ``cols_j`` of one head, i.e. ``W1[:, cols_j], S1[:, cols_j]`` and ``W2[cols_j, :],
S2[cols_j, :]`` (fp32, in global memory, updated in place), and never waits for another program.
It is the CI path (it runs under ``TRITON_INTERPRET=1``, which runs programs one after another)
and the fallback of the planned persistent kernel with a per-head barrier, which would call the
same phase functions.

Scope: inference only (``torch.no_grad``, no autograd graph, no backward); memory depth 2
(``d -> H -> d``) with ``spec.norm`` off; activations silu, gelu, relu, identity; residual on or
off; update clip on or off. Requirements (``tl.dot`` needs every dimension >= 16 on a GPU, and
``tl.arange`` powers of two): head dim ``d``, tile width ``H / n_tiles`` and ``chunk_size`` are
powers of two >= 16, and ``n_tiles`` divides ``H``. Anything else raises
:class:`~titans_memory.errors.ConfigError`. Inputs of any float dtype are computed in fp32
(``input_precision="ieee"`` matmuls) and returned in the dtype of ``q`` (output) and of the given
weights / momentum (state). Not dispatched by :func:`~titans_memory.ops.neural_memory`; its speed
has not been measured yet.

Launches per chunk ``n`` (``P``: per-tile partial MLP outputs on the keys, double-buffered by
chunk parity; ``Z``: the tile's ``z1 = k W1_j``; ``O``: per-tile partial retrievals,
double-buffered):

- ``_keys_kernel`` (once, before chunk 0; phase A): ``z1_j = k W1_j``, ``P_j = act(z1_j) W2_j``.
- ``_norms_kernel`` (clip only; phase B): every program sums the ``P`` of all tiles (reduction 1)
  into ``y``, forms ``delta2 = 2 (y [+ k] - v)`` and ``delta1_j = (delta2 W2_j^T) * act'(z1_j)``,
  and writes its per-token partial norms ``|delta1_j|^2, |h1_j|^2``.
- ``_update_kernel`` (phase B without clip, then C): ``y`` and ``delta2`` (reduction 1 again,
  same order, same result), ``delta1_j``; with the clip the partial norms are summed
  (reduction 2) into the clip scale of ``theta``; the chunk coefficients; the tile's partial
  retrieval ``o_j`` (dual form); the in-place update of the tile's state. Fused into the same
  launch, because they are tile-local: phase A of chunk ``n + 1`` with the updated weights, and
  (program ``j = 0``) the sum over tiles of chunk ``n - 1``'s ``o_j`` into the output
  (reduction 3).
- ``_output_kernel`` (once, after the last chunk): reduction 3 of the last chunk.

So a chunk costs one launch (two with the clip), plus one before and one after the sequence.
Summation orders are fixed (tile 0 first), so results are deterministic. A last partial chunk is
masked (rows past the sequence end load as zero keys/values and neutral gates, and the
coefficients take the last *valid* row), never padded into the state.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import ConfigError, ShapeError
from .fused import TRITON_ACTIVATIONS, _device_of, interpret_mode
from .mlp import MemoryMLPSpec
from .triton_kernels import _act, _act_d, _clip_scale, _coeffs, _load_chunk, _mm

#: Matmul precision of every ``tl.dot`` here (fp32 FMA: the interpreter and the GPU agree closely).
PREC = "ieee"


# ---------------------------------------------------------------------------------------------
# phase functions (called by the kernels below; a persistent kernel would call them too)
@triton.jit
def _rows(ptr, bh, T, t0, BC: tl.constexpr, D: tl.constexpr):
    """Rows ``t0 .. t0 + BC - 1`` of head ``bh`` of a ``[BH, T, D]`` tensor (zero past ``T``)."""
    rc = tl.arange(0, BC)
    rd = tl.arange(0, D)
    rmask = (t0 + rc) < T
    return tl.load(ptr + bh * T * D + (t0 + rc)[:, None] * D + rd[None, :], mask=rmask[:, None], other=0.0)


@triton.jit
def _tile_offsets(bh, j, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr):
    """Offsets of tile ``j``'s slice of ``W1/S1 [BH, D, F]`` (columns) and ``W2/S2 [BH, F, D]`` (rows)."""
    rd = tl.arange(0, D)
    cols = j * BF + tl.arange(0, BF)
    o1 = bh * D * F + rd[:, None] * F + cols[None, :]
    o2 = bh * F * D + cols[:, None] * D + rd[None, :]
    return o1, o2


@triton.jit
def _phase_keys(k, w1, w2, z_dst, p_dst, BC: tl.constexpr, D: tl.constexpr, BF: tl.constexpr,
                ACT: tl.constexpr, PREC: tl.constexpr):
    """Phase A (tile-local): store ``z1_j = k W1_j`` and the partial output ``P_j = act(z1_j) W2_j``."""
    rc = tl.arange(0, BC)
    z1 = _mm(k, w1, PREC)
    tl.store(z_dst + rc[:, None] * BF + tl.arange(0, BF)[None, :], z1)
    tl.store(p_dst + rc[:, None] * D + tl.arange(0, D)[None, :], _mm(_act(z1, ACT), w2, PREC))


@triton.jit
def _phase_errors(p_src, z_src, k, v, w2, rmask, NT, BC: tl.constexpr, D: tl.constexpr, BF: tl.constexpr,
                  ACT: tl.constexpr, RES: tl.constexpr, PREC: tl.constexpr):
    """Phase B: ``y = sum_t P_t`` (reduction 1, tiles in order), ``delta2`` (zero on rows past the
    sequence end) and the tile-local ``z1_j, h1_j, delta1_j``."""
    rc = tl.arange(0, BC)
    ocd = rc[:, None] * D + tl.arange(0, D)[None, :]
    y = tl.zeros([BC, D], dtype=tl.float32)
    for t in range(NT):
        y += tl.load(p_src + t * BC * D + ocd)
    if RES:
        y += k
    delta2 = tl.where(rmask[:, None], 2.0 * (y - v), 0.0)
    z1 = tl.load(z_src + rc[:, None] * BF + tl.arange(0, BF)[None, :])
    h1 = _act(z1, ACT)
    delta1 = _mm(delta2, tl.trans(w2), PREC) * _act_d(z1, ACT)
    return delta2, z1, h1, delta1


@triton.jit
def _phase_output(o_src, q_ptr, o_ptr, bh, T, t0, NT, BC: tl.constexpr, D: tl.constexpr, RES: tl.constexpr):
    """Reduction 3: the chunk's output ``sum_t o_t [+ q]`` from the per-tile partials."""
    rc = tl.arange(0, BC)
    rd = tl.arange(0, D)
    ocd = rc[:, None] * D + rd[None, :]
    out = tl.zeros([BC, D], dtype=tl.float32)
    for t in range(NT):
        out += tl.load(o_src + t * BC * D + ocd)
    rmask = (t0 + rc) < T
    xoff = bh * T * D + (t0 + rc)[:, None] * D + rd[None, :]
    if RES:
        out += tl.load(q_ptr + xoff, mask=rmask[:, None], other=0.0)
    tl.store(o_ptr + xoff, out, mask=rmask[:, None])


# ---------------------------------------------------------------------------------------------
# kernels: grid (BH, NT) except _output_kernel (BH,)
# scratch: P [BH, 2, NT, BC, D], Z [BH, NT, BC, BF], N [BH, NT, 2, BC], O [BH, 2, NT, BC, D]
@triton.jit
def _keys_kernel(k_ptr, w1_ptr, w2_ptr, z_ptr, p_ptr, T, t0, slot, NT,
                 BC: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
                 ACT: tl.constexpr, PREC: tl.constexpr):
    """Phase A of the chunk at ``t0`` (only before the first chunk; later ones are fused into
    ``_update_kernel``)."""
    bh = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    o1, o2 = _tile_offsets(bh, j, D, F, BF)
    k = _rows(k_ptr, bh, T, t0, BC, D)
    _phase_keys(k, tl.load(w1_ptr + o1), tl.load(w2_ptr + o2), z_ptr + (bh * NT + j) * BC * BF,
                p_ptr + ((bh * 2 + slot) * NT + j) * BC * D, BC, D, BF, ACT, PREC)


@triton.jit
def _norms_kernel(k_ptr, v_ptr, w2_ptr, z_ptr, p_ptr, n_ptr, T, t0, slot, NT,
                  BC: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
                  ACT: tl.constexpr, RES: tl.constexpr, PREC: tl.constexpr):
    """Phase B with the update clip: per-token partial norms ``|delta1_j|^2`` and ``|h1_j|^2``."""
    bh = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    rc = tl.arange(0, BC)
    rmask = (t0 + rc) < T
    _, o2 = _tile_offsets(bh, j, D, F, BF)
    k = _rows(k_ptr, bh, T, t0, BC, D)
    v = _rows(v_ptr, bh, T, t0, BC, D)
    _, _, h1, delta1 = _phase_errors(p_ptr + (bh * 2 + slot) * NT * BC * D, z_ptr + (bh * NT + j) * BC * BF,
                                     k, v, tl.load(w2_ptr + o2), rmask, NT, BC, D, BF, ACT, RES, PREC)
    dst = n_ptr + (bh * NT + j) * 2 * BC
    tl.store(dst + rc, tl.sum(delta1 * delta1, axis=1))
    tl.store(dst + BC + rc, tl.sum(h1 * h1, axis=1))


@triton.jit
def _update_kernel(q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, w1_ptr, s1_ptr, w2_ptr, s2_ptr,
                   z_ptr, p_ptr, n_ptr, op_ptr, o_ptr, T, t0, slot, NT, clip,
                   BC: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
                   ACT: tl.constexpr, RES: tl.constexpr, CLIP: tl.constexpr, NEXT: tl.constexpr,
                   PREV: tl.constexpr, PREC: tl.constexpr):
    """Phases B (without clip) and C of the chunk at ``t0``; NEXT: phase A of the next chunk;
    PREV: program ``j = 0`` writes the previous chunk's output (reduction 3)."""
    bh = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    rc = tl.arange(0, BC)
    rd = tl.arange(0, D)
    q, k, v, th, et, al, valid, rmask, xoff, goff = _load_chunk(
        q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, bh, T, t0, BC, D)
    o1, o2 = _tile_offsets(bh, j, D, F, BF)
    w1 = tl.load(w1_ptr + o1)
    s1 = tl.load(s1_ptr + o1)
    w2 = tl.load(w2_ptr + o2)
    s2 = tl.load(s2_ptr + o2)
    z_tile = z_ptr + (bh * NT + j) * BC * BF
    delta2, z1, h1, delta1 = _phase_errors(p_ptr + (bh * 2 + slot) * NT * BC * D, z_tile, k, v, w2, rmask, NT,
                                           BC, D, BF, ACT, RES, PREC)
    if CLIP:  # reduction 2: |G_t|^2 = |k_t|^2 sum_j |delta1_j,t|^2 + |delta2_t|^2 sum_j |h1_j,t|^2
        b1 = tl.zeros([BC], dtype=tl.float32)
        a2 = tl.zeros([BC], dtype=tl.float32)
        n_head = n_ptr + bh * NT * 2 * BC
        for t in range(NT):
            b1 += tl.load(n_head + t * 2 * BC + rc)
            a2 += tl.load(n_head + t * 2 * BC + BC + rc)
        sc, _, _ = _clip_scale(tl.sum(k * k, axis=1) * b1 + tl.sum(delta2 * delta2, axis=1) * a2, clip)
        th = th * sc
    A, Dm, Pm, C, beta, E, g, cl, ml, bl, gl, el = _coeffs(th, et, al, valid, BC)

    # phase C: the tile's partial retrieval (dual form through the owned hidden units)
    a1 = (beta[:, None] * _mm(q, w1, PREC) + g[:, None] * _mm(q, s1, PREC)
          - _mm(_mm(q, tl.trans(k), PREC) * C, delta1, PREC))
    x1 = _act(a1, ACT)
    o_j = (beta[:, None] * _mm(x1, w2, PREC) + g[:, None] * _mm(x1, s2, PREC)
           - _mm(_mm(x1, tl.trans(h1), PREC) * C, delta2, PREC))
    ocd = rc[:, None] * D + rd[None, :]
    tl.store(op_ptr + ((bh * 2 + slot) * NT + j) * BC * D + ocd, o_j)

    # phase C: in-place update of the tile's state (gradients h^T delta, last-row coefficients)
    tk = tl.trans(k)
    w1n = bl * w1 + gl * s1 - _mm(tk, cl[:, None] * delta1, PREC)
    s1n = el * s1 - _mm(tk, ml[:, None] * delta1, PREC)
    th1 = tl.trans(h1)
    w2n = bl * w2 + gl * s2 - _mm(th1, cl[:, None] * delta2, PREC)
    s2n = el * s2 - _mm(th1, ml[:, None] * delta2, PREC)
    # every thread of the program has read the tile's state and Z before any overwrites them
    tl.debug_barrier()
    tl.store(w1_ptr + o1, w1n)
    tl.store(s1_ptr + o1, s1n)
    tl.store(w2_ptr + o2, w2n)
    tl.store(s2_ptr + o2, s2n)

    if NEXT:  # phase A of the next chunk: tile-local, from the weights just computed
        kn = _rows(k_ptr, bh, T, t0 + BC, BC, D)
        _phase_keys(kn, w1n, w2n, z_tile, p_ptr + ((bh * 2 + 1 - slot) * NT + j) * BC * D, BC, D, BF, ACT, PREC)
    if PREV:  # the previous chunk's partial outputs are complete (written by the previous launch)
        if j == 0:
            _phase_output(op_ptr + (bh * 2 + 1 - slot) * NT * BC * D, q_ptr, o_ptr, bh, T, t0 - BC, NT, BC, D, RES)


@triton.jit
def _output_kernel(q_ptr, op_ptr, o_ptr, T, t0, slot, NT, BC: tl.constexpr, D: tl.constexpr, RES: tl.constexpr):
    """Reduction 3 of the last chunk."""
    bh = tl.program_id(0).to(tl.int64)
    _phase_output(op_ptr + (bh * 2 + slot) * NT * BC * D, q_ptr, o_ptr, bh, T, t0, NT, BC, D, RES)


# ---------------------------------------------------------------------------------------------
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
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """Same interface and result (to fp32 rounding) as
    :func:`~titans_memory.ops.tiled.neural_memory_tiled`, forward only, depth 2.

    Shapes: ``q, k, v`` ``[B, H, T, d]``; gates ``[B, H, T]``; ``weights = [W1 [B, H, d, E d],
    W2 [B, H, E d, d]]``, ``momentum`` likewise (zeros if ``None``). Returns ``(o [B, H, T, d],
    [W1_T, W2_T], [S1_T, S2_T])``. The given tensors are not modified. Raises
    :class:`~titans_memory.errors.ConfigError` for what it does not cover
    (:func:`tiled_triton_unsupported_reason`).
    """
    W = list(weights)
    reason = tiled_triton_unsupported_reason(q, W, spec, chunk_size, n_tiles)
    if reason is not None:
        raise ConfigError(f"neural_memory_tiled_triton does not cover {reason}")
    S = [torch.zeros_like(w) for w in W] if momentum is None else list(momentum)
    B, H, T, d = q.shape
    hid = W[0].shape[-1]
    BH = B * H
    expect = [(B, H, d, hid), (B, H, hid, d)]
    for name, group in (("weights", W), ("momentum", S)):
        if len(group) != 2 or any(tuple(t.shape) != e for t, e in zip(group, expect)):
            raise ShapeError(f"{name} must be shaped {expect}, got {[tuple(t.shape) for t in group]}")
    if T == 0:
        return q.new_zeros(q.shape), [w.clone() for w in W], [s.clone() for s in S]

    f32 = torch.float32
    xs = [t.detach().reshape(BH, T, d).to(f32).contiguous() for t in (q, k, v)]
    gates = [t.detach().reshape(BH, T).to(f32).contiguous() for t in (theta, eta, alpha)]
    # private fp32 copies of the state, updated in place tile by tile
    w1, w2 = (t.detach().reshape(BH, *t.shape[2:]).to(f32).clone().contiguous() for t in W)
    s1, s2 = (t.detach().reshape(BH, *t.shape[2:]).to(f32).clone().contiguous() for t in S)

    NT, BC, BF = n_tiles, chunk_size, hid // n_tiles
    dev = q.device
    p_scr = torch.empty(BH, 2, NT, BC, d, device=dev, dtype=f32)
    z_scr = torch.empty(BH, NT, BC, BF, device=dev, dtype=f32)
    n_scr = torch.empty(BH, NT, 2, BC, device=dev, dtype=f32) if max_update_norm is not None else p_scr
    o_scr = torch.empty(BH, 2, NT, BC, d, device=dev, dtype=f32)
    out = torch.empty(BH, T, d, device=dev, dtype=f32)
    clip = float(max_update_norm) if max_update_norm is not None else 1.0
    CLIP = max_update_norm is not None
    qf, kf, vf = xs
    sizes = dict(BC=BC, D=d, F=hid, BF=BF)
    launch = dict(num_warps=4, num_stages=1)
    grid = (BH, NT)
    n_chunks = -(-T // BC)
    with _device_of(q):
        _keys_kernel[grid](kf, w1, w2, z_scr, p_scr, T, 0, 0, NT, ACT=spec.activation, PREC=PREC, **sizes, **launch)
        for n in range(n_chunks):
            t0, slot = n * BC, n % 2
            if CLIP:
                _norms_kernel[grid](kf, vf, w2, z_scr, p_scr, n_scr, T, t0, slot, NT,
                                    ACT=spec.activation, RES=bool(spec.residual), PREC=PREC, **sizes, **launch)
            _update_kernel[grid](
                qf, kf, vf, *gates, w1, s1, w2, s2, z_scr, p_scr, n_scr, o_scr, out, T, t0, slot, NT, clip,
                ACT=spec.activation, RES=bool(spec.residual), CLIP=CLIP, NEXT=n + 1 < n_chunks, PREV=n > 0,
                PREC=PREC, **sizes, **launch,
            )
        _output_kernel[(BH,)](qf, o_scr, out, T, (n_chunks - 1) * BC, (n_chunks - 1) % 2, NT,
                              BC=BC, D=d, RES=bool(spec.residual), **launch)

    o = out.reshape(B, H, T, d).to(q.dtype)
    W_T = [w1.reshape(W[0].shape).to(W[0].dtype), w2.reshape(W[1].shape).to(W[1].dtype)]
    S_T = [s1.reshape(S[0].shape).to(S[0].dtype), s2.reshape(S[1].shape).to(S[1].dtype)]
    return o, W_T, S_T
