"""Triton kernels of the tiled memory update (forward, and backward for training), with the
launch-per-phase driver.

This is step 2 of the plan in ``docs/kernels.md``: the phases of
:mod:`titans_memory.ops.tiled` (the specification: a head's fast-weight state split over tiles,
cross-tile sums explicit) as ``@triton.jit`` kernels, with the tiles synchronised by kernel
launches. Each launch has the grid ``(B * heads, n_tiles)``; program ``(bh, j)`` owns the hidden
units ``cols_j`` of one head, i.e. ``W1[:, cols_j], S1[:, cols_j]`` and ``W2[cols_j, :],
S2[cols_j, :]`` (fp32, in global memory, updated in place), and never waits for another program.
It is the CI path (it runs under ``TRITON_INTERPRET=1``, which runs programs one after another)
and the fallback of the planned persistent kernel with a per-head barrier, which would call the
same phase functions.

Two entry points: :func:`neural_memory_tiled_triton` (inference: ``torch.no_grad``, no autograd
graph) and :func:`neural_memory_tiled_triton_train` (training: an autograd function whose backward
is step 3 of the plan, the hand-written tiled backward of :mod:`titans_memory.ops.tiled` as Triton
kernels, launch per phase, described in its docstring). Neither has run on a GPU yet.

Scope of both: memory depth 2 (``d -> H -> d``) with ``spec.norm`` off; activations silu, gelu,
relu, identity; residual on or off; update clip on or off. Requirements (``tl.dot`` needs every
dimension >= 16 on a GPU, and ``tl.arange`` powers of two): head dim ``d``, tile width ``H /
n_tiles`` and ``chunk_size`` are powers of two >= 16, and ``n_tiles`` divides ``H``. Anything else
raises :class:`~titans_memory.errors.ConfigError`. Inputs of any float dtype are computed in fp32
(matmuls with tf32 tensor-core operands by default, ``precision="ieee"`` for fp32 FMA) and returned in the dtype of ``q`` (output) and of the given
weights / momentum (state) by the inference function, in fp32 by the training one. Not dispatched by
:func:`~titans_memory.ops.neural_memory`; its speed has not been measured yet.

Forward launches per chunk ``n`` (``P``: per-tile partial MLP outputs on the keys, double-buffered by
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

import math
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import ConfigError, ShapeError
from .fused import TRITON_ACTIVATIONS, _device_of, interpret_mode
from .mlp import MemoryMLPSpec
from .triton_kernels import _act, _act_d, _act_dd, _clip_bwd, _clip_scale, _coeffs, _coeffs_bwd, _load_chunk, _mm

#: Matmul precision of the ``tl.dot`` calls (``precision=`` of the public functions): ``"tf32"``
#: (tensor cores, the default: ``"ieee"`` compiles to fp32 FMA without tensor cores, about 7x
#: fewer FLOP/s on an H100) or ``"ieee"`` (fp32 FMA, bitwise closer to the reference). The
#: interpreter computes both in fp32.
PREC = "tf32"
PRECISIONS = ("tf32", "ieee")


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
# backward phase functions and kernels (training path), grid (BH, NT) except _bwd_rows_kernel
#
# Scratch of one chunk (reused by every chunk; each launch reads only what earlier launches of
# the same chunk wrote, except the dq / dk partials, read by the next launch of the walk):
#   P   [BH, NT, BC, D]      R1 partials h1_j W2_j            N   [BH, NT, 2, BC]  R2 partials
#   XH  [BH, NT, BC, BC]     R3 partials x1_j h1_j^T          DN1 [BH, NT, BC, BC] R4 partials
#   GT  [BH, NT, 4, BC]      R5 per-token partials (dbeta, dg, dcl, dml)
#   GS  [BH, NT, 4]          R5 per-head partials (dbl, dgl, del, unused)
#   DD2 [BH, NT, BC, D]      R6 partials of d delta2
#   DQ, DK [BH, NT + 1, BC, D]  R7 / R8 partials; slot NT holds the per-head terms
#   X1, DA1, DDL1 [BH, NT, BC, BF]  tile-local stash: x1_j, da1_j, d delta1_j
#   HD  [BH, BC]             per head (clip only): d n^2 from the coefficient backward
@triton.jit
def _sum_tiles(ptr, n, stride, offs):
    """``sum_t ptr[t * stride + offs]`` for ``t = 0 .. n - 1``, tile 0 first (deterministic)."""
    acc = tl.load(ptr + offs)
    for t in range(1, n):
        acc += tl.load(ptr + t * stride + offs)
    return acc


@triton.jit
def _tile_scratch(bh, j, NT, BC: tl.constexpr, BF: tl.constexpr):
    """Offsets of tile ``j``'s ``[BC, BF]`` block of a ``[BH, NT, BC, BF]`` scratch."""
    rc = tl.arange(0, BC)
    return (bh * NT + j) * BC * BF + rc[:, None] * BF + tl.arange(0, BF)[None, :]


@triton.jit
def _bwd_errors(k, v, w1, w2, p_head, rmask, NT, BC: tl.constexpr, D: tl.constexpr,
                ACT: tl.constexpr, RES: tl.constexpr, PREC: tl.constexpr):
    """Forward recompute from the chunk-start state: R1 (``y = sum_t P_t``), ``delta2`` (zero past
    the sequence end), and the tile-local ``z1_j, h1_j, act'(z1_j), u_j = delta2 W2_j^T, delta1_j``."""
    rc = tl.arange(0, BC)
    ocd = rc[:, None] * D + tl.arange(0, D)[None, :]
    y = _sum_tiles(p_head, NT, BC * D, ocd)
    if RES:
        y += k
    delta2 = tl.where(rmask[:, None], 2.0 * (y - v), 0.0)
    z1 = _mm(k, w1, PREC)
    h1 = _act(z1, ACT)
    sd1 = _act_d(z1, ACT)
    u = _mm(delta2, tl.trans(w2), PREC)
    return delta2, z1, h1, sd1, u, u * sd1


@triton.jit
def _bwd_clip(k, delta2, th, n_head, NT, clip, BC: tl.constexpr, CLIP: tl.constexpr):
    """R2 and the clipped step ``theta' = theta s``. Returns ``(theta', |G|, ratio, |k|^2,
    sum_j |delta1_j|^2, sum_j |h1_j|^2, |delta2|^2)`` per token (dummies without the clip)."""
    if CLIP:
        rc = tl.arange(0, BC)
        dd1 = _sum_tiles(n_head, NT, 2 * BC, rc)
        hh = _sum_tiles(n_head + BC, NT, 2 * BC, rc)
        kk = tl.sum(k * k, axis=1)
        dd2 = tl.sum(delta2 * delta2, axis=1)
        sc, nrm, r = _clip_scale(kk * dd1 + hh * dd2, clip)
        thc = th * sc
    else:
        zero = th * 0.0
        dd1 = zero
        hh = zero
        kk = zero
        dd2 = zero
        nrm = zero + 1.0
        r = zero + 2.0
        thc = th
    return thc, nrm, r, kk, dd1, hh, dd2


@triton.jit
def _bwd_rows(dqs_head, dks_head, dq_ptr, dk_ptr, bh, T, t0, NT, BC: tl.constexpr, D: tl.constexpr):
    """R7 / R8: ``dq``, ``dk`` rows of the chunk at ``t0`` from the ``NT + 1`` partial slots."""
    rc = tl.arange(0, BC)
    rd = tl.arange(0, D)
    ocd = rc[:, None] * D + rd[None, :]
    rmask = (t0 + rc) < T
    xoff = bh * T * D + (t0 + rc)[:, None] * D + rd[None, :]
    tl.store(dq_ptr + xoff, _sum_tiles(dqs_head, NT + 1, BC * D, ocd), mask=rmask[:, None])
    tl.store(dk_ptr + xoff, _sum_tiles(dks_head, NT + 1, BC * D, ocd), mask=rmask[:, None])


@triton.jit
def _bwd_keys_kernel(k_ptr, w1_ptr, w2_ptr, p_ptr, dqs_ptr, dks_ptr, dq_ptr, dk_ptr, T, t0, NT,
                     BC: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
                     ACT: tl.constexpr, PREV: tl.constexpr, PREC: tl.constexpr):
    """Launch 1 of a chunk's backward: R1 partial ``P_j = act(k W1_j) W2_j``. PREV: program
    ``j = 0`` also writes the ``dq, dk`` rows of the chunk after this one (done in the launches before)."""
    bh = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    o1, o2 = _tile_offsets(bh, j, D, F, BF)
    rc = tl.arange(0, BC)
    k = _rows(k_ptr, bh, T, t0, BC, D)
    p = _mm(_act(_mm(k, tl.load(w1_ptr + o1), PREC), ACT), tl.load(w2_ptr + o2), PREC)
    tl.store(p_ptr + (bh * NT + j) * BC * D + rc[:, None] * D + tl.arange(0, D)[None, :], p)
    if PREV:
        if j == 0:
            _bwd_rows(dqs_ptr + bh * (NT + 1) * BC * D, dks_ptr + bh * (NT + 1) * BC * D, dq_ptr, dk_ptr,
                      bh, T, t0 + BC, NT, BC, D)


@triton.jit
def _bwd_rows_kernel(dqs_ptr, dks_ptr, dq_ptr, dk_ptr, T, t0, NT, BC: tl.constexpr, D: tl.constexpr):
    """Grid ``(BH,)``: the ``dq, dk`` rows of the first chunk (the walk's last)."""
    bh = tl.program_id(0).to(tl.int64)
    _bwd_rows(dqs_ptr + bh * (NT + 1) * BC * D, dks_ptr + bh * (NT + 1) * BC * D, dq_ptr, dk_ptr,
              bh, T, t0, NT, BC, D)


@triton.jit
def _bwd_norms_kernel(k_ptr, v_ptr, w1_ptr, w2_ptr, p_ptr, n_ptr, T, t0, NT,
                      BC: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
                      ACT: tl.constexpr, RES: tl.constexpr, PREC: tl.constexpr):
    """Clip only: R2 partials ``|delta1_j|^2``, ``|h1_j|^2`` per token."""
    bh = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    rc = tl.arange(0, BC)
    rmask = (t0 + rc) < T
    o1, o2 = _tile_offsets(bh, j, D, F, BF)
    k = _rows(k_ptr, bh, T, t0, BC, D)
    v = _rows(v_ptr, bh, T, t0, BC, D)
    _, _, h1, _, _, delta1 = _bwd_errors(k, v, tl.load(w1_ptr + o1), tl.load(w2_ptr + o2), p_ptr + bh * NT * BC * D,
                                         rmask, NT, BC, D, ACT, RES, PREC)
    dst = n_ptr + (bh * NT + j) * 2 * BC
    tl.store(dst + rc, tl.sum(delta1 * delta1, axis=1))
    tl.store(dst + BC + rc, tl.sum(h1 * h1, axis=1))


@triton.jit
def _bwd_retrieval_kernel(q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, go_ptr,
                          w1_ptr, s1_ptr, w2_ptr, s2_ptr, aw1_ptr, as1_ptr, aw2_ptr, as2_ptr,
                          p_ptr, n_ptr, xh_ptr, dn1_ptr, gt_ptr, gs_ptr, dqs_ptr, x1_ptr, da1_ptr,
                          T, t0, NT, clip,
                          BC: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
                          ACT: tl.constexpr, RES: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr):
    """Recompute, then the retrieval backward of the tile: partials of R3 (``x1_j h1_j^T``), R4
    (``-da1_j delta1_j^T``), R5 (gate cotangents) and R7 (``dq``); stash ``x1_j``, ``da1_j``."""
    bh = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    rc = tl.arange(0, BC)
    rd = tl.arange(0, D)
    ocd = rc[:, None] * D + rd[None, :]
    occ = rc[:, None] * BC + rc[None, :]
    q, k, v, th, et, al, valid, rmask, xoff, goff = _load_chunk(
        q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, bh, T, t0, BC, D)
    go = tl.load(go_ptr + xoff, mask=rmask[:, None], other=0.0)
    o1, o2 = _tile_offsets(bh, j, D, F, BF)
    w1 = tl.load(w1_ptr + o1)
    s1 = tl.load(s1_ptr + o1)
    w2 = tl.load(w2_ptr + o2)
    s2 = tl.load(s2_ptr + o2)
    delta2, z1, h1, sd1, u, delta1 = _bwd_errors(k, v, w1, w2, p_ptr + bh * NT * BC * D, rmask, NT,
                                                 BC, D, ACT, RES, PREC)
    thc, _, _, _, _, _, _ = _bwd_clip(k, delta2, th, n_ptr + bh * NT * 2 * BC, NT, clip, BC, CLIP)
    A, Dm, Pm, C, beta, E, g, cl, ml, bl, gl, el = _coeffs(thc, et, al, valid, BC)
    qW1 = _mm(q, w1, PREC)
    qS1 = _mm(q, s1, PREC)
    a1 = beta[:, None] * qW1 + g[:, None] * qS1 - _mm(_mm(q, tl.trans(k), PREC) * C, delta1, PREC)
    x1 = _act(a1, ACT)
    dXHC = -_mm(go, tl.trans(delta2), PREC) * C
    dx1 = (beta[:, None] * _mm(go, tl.trans(w2), PREC) + g[:, None] * _mm(go, tl.trans(s2), PREC)
           + _mm(dXHC, h1, PREC))
    da1 = dx1 * _act_d(a1, ACT)
    ts = _tile_scratch(bh, j, NT, BC, BF)
    tl.store(x1_ptr + ts, x1)
    tl.store(da1_ptr + ts, da1)
    tcc = (bh * NT + j) * BC * BC + occ
    tl.store(xh_ptr + tcc, _mm(x1, tl.trans(h1), PREC))
    tl.store(dn1_ptr + tcc, -_mm(da1, tl.trans(delta1), PREC))
    aw1 = tl.load(aw1_ptr + o1)
    as1 = tl.load(as1_ptr + o1)
    aw2 = tl.load(aw2_ptr + o2)
    as2 = tl.load(as2_ptr + o2)
    dbeta = tl.sum(go * _mm(x1, w2, PREC), axis=1) + tl.sum(da1 * qW1, axis=1)
    dg = tl.sum(go * _mm(x1, s2, PREC), axis=1) + tl.sum(da1 * qS1, axis=1)
    dcl = -tl.sum(_mm(k, aw1, PREC) * delta1, axis=1) - tl.sum(_mm(h1, aw2, PREC) * delta2, axis=1)
    dml = -tl.sum(_mm(k, as1, PREC) * delta1, axis=1) - tl.sum(_mm(h1, as2, PREC) * delta2, axis=1)
    gt = gt_ptr + (bh * NT + j) * 4 * BC
    tl.store(gt + rc, dbeta)
    tl.store(gt + BC + rc, dg)
    tl.store(gt + 2 * BC + rc, dcl)
    tl.store(gt + 3 * BC + rc, dml)
    gs = gs_ptr + (bh * NT + j) * 4
    tl.store(gs, tl.sum(tl.sum(aw1 * w1, axis=1), axis=0) + tl.sum(tl.sum(aw2 * w2, axis=1), axis=0))
    tl.store(gs + 1, tl.sum(tl.sum(aw1 * s1, axis=1), axis=0) + tl.sum(tl.sum(aw2 * s2, axis=1), axis=0))
    tl.store(gs + 2, tl.sum(tl.sum(as1 * s1, axis=1), axis=0) + tl.sum(tl.sum(as2 * s2, axis=1), axis=0))
    dq_j = _mm(beta[:, None] * da1, tl.trans(w1), PREC) + _mm(g[:, None] * da1, tl.trans(s1), PREC)
    tl.store(dqs_ptr + (bh * (NT + 1) + j) * BC * D + ocd, dq_j)


@triton.jit
def _bwd_coeffs_kernel(q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, go_ptr,
                       w1_ptr, w2_ptr, aw1_ptr, as1_ptr, aw2_ptr, as2_ptr,
                       p_ptr, n_ptr, xh_ptr, dn1_ptr, gt_ptr, gs_ptr, dqs_ptr, da1_ptr, ddl1_ptr, dd2_ptr, hd_ptr,
                       dth_ptr, det_ptr, dal_ptr,
                       T, t0, NT, clip,
                       BC: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
                       ACT: tl.constexpr, RES: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr):
    """Sums R3, R4, R5; every program runs the per-head coefficient backward (``_coeffs_bwd``) and
    the clip backward (program 0 writes ``dtheta, deta, dalpha``, the per-head ``dq`` term and
    ``d n^2``); then the tile's ``d delta1_j`` (stashed) and its R6 partial of ``d delta2``."""
    bh = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    rc = tl.arange(0, BC)
    rd = tl.arange(0, D)
    ocd = rc[:, None] * D + rd[None, :]
    occ = rc[:, None] * BC + rc[None, :]
    q, k, v, th, et, al, valid, rmask, xoff, goff = _load_chunk(
        q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, bh, T, t0, BC, D)
    go = tl.load(go_ptr + xoff, mask=rmask[:, None], other=0.0)
    o1, o2 = _tile_offsets(bh, j, D, F, BF)
    w2 = tl.load(w2_ptr + o2)
    delta2, z1, h1, sd1, u, delta1 = _bwd_errors(k, v, tl.load(w1_ptr + o1), w2, p_ptr + bh * NT * BC * D,
                                                 rmask, NT, BC, D, ACT, RES, PREC)
    thc, nrm, r, kk, dd1, hh, dd2 = _bwd_clip(k, delta2, th, n_ptr + bh * NT * 2 * BC, NT, clip, BC, CLIP)
    A, Dm, Pm, C, beta, E, g, cl, ml, bl, gl, el = _coeffs(thc, et, al, valid, BC)
    XH = _sum_tiles(xh_ptr + bh * NT * BC * BC, NT, BC * BC, occ)  # R3
    dN1 = _sum_tiles(dn1_ptr + bh * NT * BC * BC, NT, BC * BC, occ)  # R4
    gt = gt_ptr + bh * NT * 4 * BC  # R5
    dbeta = _sum_tiles(gt, NT, 4 * BC, rc)
    dg = _sum_tiles(gt + BC, NT, 4 * BC, rc)
    dcl = _sum_tiles(gt + 2 * BC, NT, 4 * BC, rc)
    dml = _sum_tiles(gt + 3 * BC, NT, 4 * BC, rc)
    gs = gs_ptr + bh * NT * 4
    dbl = _sum_tiles(gs, NT, 4, 0)
    dgl = _sum_tiles(gs + 1, NT, 4, 0)
    d_el = _sum_tiles(gs + 2, NT, 4, 0)
    QK = _mm(q, tl.trans(k), PREC)
    dN2 = -_mm(go, tl.trans(delta2), PREC)
    dth, det, dal = _coeffs_bwd(dN1 * QK + dN2 * XH, dbeta, dg, dcl, dml, dbl, dgl, d_el, thc, et, al, valid,
                                A, Dm, Pm, beta, E, BC)
    if CLIP:
        dth, dn2 = _clip_bwd(dth, th, nrm, r, clip, rmask)
    else:
        dn2 = th * 0.0
    if j == 0:
        tl.store(dth_ptr + goff, dth, mask=rmask)
        tl.store(det_ptr + goff, det, mask=rmask)
        tl.store(dal_ptr + goff, dal, mask=rmask)
        dq_head = _mm(dN1 * C, k, PREC)
        if RES:
            dq_head += go
        tl.store(dqs_ptr + (bh * (NT + 1) + NT) * BC * D + ocd, dq_head)
        if CLIP:
            tl.store(hd_ptr + bh * BC + rc, dn2)
    ts = _tile_scratch(bh, j, NT, BC, BF)
    da1 = tl.load(da1_ptr + ts)
    ddelta1 = (-_mm(tl.trans(QK * C), da1, PREC) - cl[:, None] * _mm(k, tl.load(aw1_ptr + o1), PREC)
               - ml[:, None] * _mm(k, tl.load(as1_ptr + o1), PREC))
    if CLIP:
        ddelta1 += (2.0 * dn2 * kk)[:, None] * delta1
    tl.store(ddl1_ptr + ts, ddelta1)
    dd2_j = (_mm(ddelta1 * sd1, w2, PREC) - cl[:, None] * _mm(h1, tl.load(aw2_ptr + o2), PREC)
             - ml[:, None] * _mm(h1, tl.load(as2_ptr + o2), PREC))
    tl.store(dd2_ptr + (bh * NT + j) * BC * D + ocd, dd2_j)


@triton.jit
def _bwd_state_kernel(q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, go_ptr, dv_ptr,
                      w1_ptr, w2_ptr, aw1_ptr, as1_ptr, aw2_ptr, as2_ptr,
                      p_ptr, n_ptr, xh_ptr, dn1_ptr, dd2_ptr, hd_ptr, dks_ptr, x1_ptr, da1_ptr, ddl1_ptr,
                      T, t0, NT, clip,
                      BC: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
                      ACT: tl.constexpr, RES: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr):
    """Sums R6 (``d delta2``; program 0 writes ``dv`` and the per-head ``dk`` term), then the tile's
    ``dz1``, its R8 partial of ``dk``, and the adjoint of its slice of the chunk-start state,
    written in place over the adjoint of the state after the chunk."""
    bh = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    rc = tl.arange(0, BC)
    rd = tl.arange(0, D)
    ocd = rc[:, None] * D + rd[None, :]
    occ = rc[:, None] * BC + rc[None, :]
    q, k, v, th, et, al, valid, rmask, xoff, goff = _load_chunk(
        q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, bh, T, t0, BC, D)
    go = tl.load(go_ptr + xoff, mask=rmask[:, None], other=0.0)
    o1, o2 = _tile_offsets(bh, j, D, F, BF)
    w1 = tl.load(w1_ptr + o1)
    w2 = tl.load(w2_ptr + o2)
    delta2, z1, h1, sd1, u, delta1 = _bwd_errors(k, v, w1, w2, p_ptr + bh * NT * BC * D, rmask, NT,
                                                 BC, D, ACT, RES, PREC)
    thc, _, _, kk, dd1, hh, dd2 = _bwd_clip(k, delta2, th, n_ptr + bh * NT * 2 * BC, NT, clip, BC, CLIP)
    A, Dm, Pm, C, beta, E, g, cl, ml, bl, gl, el = _coeffs(thc, et, al, valid, BC)
    XH = _sum_tiles(xh_ptr + bh * NT * BC * BC, NT, BC * BC, occ)  # R3 (again)
    ddelta2 = _sum_tiles(dd2_ptr + bh * NT * BC * D, NT, BC * D, ocd) - _mm(tl.trans(XH * C), go, PREC)  # R6
    if CLIP:
        dn2 = tl.load(hd_ptr + bh * BC + rc)
        ddelta2 += (2.0 * dn2 * hh)[:, None] * delta2
    else:
        dn2 = th * 0.0
    dy = 2.0 * ddelta2
    if j == 0:
        tl.store(dv_ptr + xoff, -dy, mask=rmask[:, None])
        dN1 = _sum_tiles(dn1_ptr + bh * NT * BC * BC, NT, BC * BC, occ)  # R4 (again)
        dk_head = _mm(tl.trans(dN1 * C), q, PREC)
        if RES:
            dk_head += dy
        if CLIP:
            dk_head += (2.0 * dn2 * dd1)[:, None] * k
        tl.store(dks_ptr + (bh * (NT + 1) + NT) * BC * D + ocd, dk_head)
    ts = _tile_scratch(bh, j, NT, BC, BF)
    x1 = tl.load(x1_ptr + ts)
    da1 = tl.load(da1_ptr + ts)
    ddelta1 = tl.load(ddl1_ptr + ts)
    aw1 = tl.load(aw1_ptr + o1)
    as1 = tl.load(as1_ptr + o1)
    aw2 = tl.load(aw2_ptr + o2)
    as2 = tl.load(as2_ptr + o2)
    dXHC = -_mm(go, tl.trans(delta2), PREC) * C
    cd2 = cl[:, None] * delta2
    md2 = ml[:, None] * delta2
    dh1 = (_mm(tl.trans(dXHC), x1, PREC) + _mm(dy, tl.trans(w2), PREC)
           - _mm(cd2, tl.trans(aw2), PREC) - _mm(md2, tl.trans(as2), PREC))
    if CLIP:
        dh1 += (2.0 * dn2 * dd2)[:, None] * h1
    dz1 = dh1 * sd1 + ddelta1 * u * _act_dd(z1, ACT)
    dk_j = (_mm(dz1, tl.trans(w1), PREC) - _mm(cl[:, None] * delta1, tl.trans(aw1), PREC)
            - _mm(ml[:, None] * delta1, tl.trans(as1), PREC))
    tl.store(dks_ptr + (bh * (NT + 1) + j) * BC * D + ocd, dk_j)
    tq = tl.trans(q)
    tx1 = tl.trans(x1)
    aw1n = bl * aw1 + _mm(tq, beta[:, None] * da1, PREC) + _mm(tl.trans(k), dz1, PREC)
    as1n = gl * aw1 + el * as1 + _mm(tq, g[:, None] * da1, PREC)
    aw2n = (bl * aw2 + _mm(tx1, beta[:, None] * go, PREC) + _mm(tl.trans(ddelta1 * sd1), delta2, PREC)
            + _mm(tl.trans(h1), dy, PREC))
    as2n = gl * aw2 + el * as2 + _mm(tx1, g[:, None] * go, PREC)
    # every thread of the program has read the tile's adjoint before any overwrites it
    tl.debug_barrier()
    tl.store(aw1_ptr + o1, aw1n)
    tl.store(as1_ptr + o1, as1n)
    tl.store(aw2_ptr + o2, aw2n)
    tl.store(as2_ptr + o2, as2n)


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
    hid = W[0].shape[-1]
    BH = B * H
    if T == 0:
        return q.new_zeros(q.shape), [w.clone() for w in W], [s.clone() for s in S]

    f32 = torch.float32
    xs = [t.detach().reshape(BH, T, d).to(f32).contiguous() for t in (q, k, v)]
    gates = [t.detach().reshape(BH, T).to(f32).contiguous() for t in (theta, eta, alpha)]
    # private fp32 copies of the state, updated in place tile by tile
    w1, w2 = (t.detach().reshape(BH, *t.shape[2:]).to(f32).clone().contiguous() for t in W)
    s1, s2 = (t.detach().reshape(BH, *t.shape[2:]).to(f32).clone().contiguous() for t in S)

    NT, BC, BF = n_tiles, chunk_size, hid // n_tiles
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
