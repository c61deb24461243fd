"""Triton kernels of the tiled memory update (forward, and backward for training); the drivers
are in :mod:`titans_memory.ops.triton_tiled`.

This is step 2 of the plan in ``docs/kernels.md``: the phases of
:mod:`titans_memory.ops.tiled` (the specification: a head's fast-weight state split over tiles,
cross-tile sums explicit) as ``@triton.jit`` kernels, with the tiles synchronised by kernel
launches. Each launch has the grid ``(B * heads, n_tiles)``; program ``(bh, j)`` owns the hidden
units ``cols_j`` of one head, i.e. ``W1[:, cols_j], S1[:, cols_j]`` and ``W2[cols_j, :],
S2[cols_j, :]`` (fp32, in global memory, updated in place), and never waits for another program.
It is the CI path (it runs under ``TRITON_INTERPRET=1``, which runs programs one after another)
and the fallback of the persistent kernels (:mod:`titans_memory.ops.triton_persistent_kernels`),
which call the same phase functions between per-head barriers.

Two entry points: :func:`neural_memory_tiled_triton` (inference: ``torch.no_grad``, no autograd
graph) and :func:`neural_memory_tiled_triton_train` (training: an autograd function whose backward
is step 3 of the plan, the hand-written tiled backward of :mod:`titans_memory.ops.tiled` as Triton
kernels, described in its docstring).

Scope of both: memory depth 2 (``d -> H -> d``) with ``spec.norm`` off; activations silu, gelu,
relu, identity; residual on or off; update clip on or off. Requirements (``tl.dot`` needs every
dimension >= 16 on a GPU, and ``tl.arange`` powers of two): head dim ``d``, tile width ``H /
n_tiles`` and ``chunk_size`` are powers of two >= 16, and ``n_tiles`` divides ``H``. Anything else
raises :class:`~titans_memory.errors.ConfigError`. Inputs of any float dtype are computed in fp32
(matmuls with tf32 tensor-core operands by default, ``precision="ieee"`` for fp32 FMA,
``"bf16"`` for bf16 operands with fp32 accumulation) and returned in the dtype of ``q`` (output)
and of the given weights / momentum (state) by the inference function, in fp32 by the training
one.

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

import triton
import triton.language as tl

from .triton_kernels import (
    _act,
    _act_d,
    _act_dd,
    _clip_bwd,
    _clip_scale,
    _coeffs,
    _coeffs_bwd,
    _coeffs_bwd_last,
    _coeffs_given,
    _decays,
    _last_coeffs,
    _last_row_vectors,
    _load_chunk,
    _mm,
)

#: Matmul precision of the ``tl.dot`` calls (``precision=`` of the public functions): ``"tf32"``
#: (tensor cores, the default: ``"ieee"`` compiles to fp32 FMA without tensor cores, about 7x
#: fewer FLOP/s on an H100) or ``"ieee"`` (fp32 FMA, bitwise closer to the reference). The
#: interpreter computes both in fp32.
PREC = "tf32"
PRECISIONS = ("tf32", "ieee", "bf16")


# ---------------------------------------------------------------------------------------------
# phase functions (called by the kernels below; a persistent kernel would call them too)
#: rows of a chunk's gate-only vectors after its ``c x c`` product in the coefficient buffer
#: (``_coeff_products_kernel``): ``pL, dL, aL, beta, g, E`` and ``(bl, gl, el, 0 ..)``
CV_ROWS = tl.constexpr(7)


@triton.jit
def _coeff_products_kernel(et_ptr, al_ptr, pm_ptr, T, BC: tl.constexpr, CV: tl.constexpr):
    """``Pm = A Dm`` (``c x c``, fp32 FMA) of chunk ``program_id(1)`` of head ``program_id(0)``
    into rows ``0 .. BC - 1`` of ``PM`` ``[BH, n_chunks, BC + CV, BC]`` (the ``CV = CV_ROWS`` rows
    after them: ``_coeff_vectors_kernel``). It depends on the gates ``eta, alpha`` only, so it is
    computed for all chunks at once rather than inside the serial chunk loops, where this one
    fp32 matmul took a large part of a chunk's time (benchmarks/RESULTS.md, 2026-12-02)."""
    bh = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1)
    rc = tl.arange(0, BC)
    t0 = n * BC
    valid = tl.minimum(T - t0, BC)
    rmask = rc < valid
    et = tl.load(et_ptr + bh * T + t0 + rc, mask=rmask, other=1.0)
    al = tl.load(al_ptr + bh * T + t0 + rc, mask=rmask, other=0.0)
    A, Dm, beta, E, g, thm, last, ml, bl, gl, el = _decays(tl.zeros([BC], dtype=tl.float32), et, al, valid, BC)
    n_chunks = (T + BC - 1) // BC
    tl.store(pm_ptr + (bh * n_chunks + n) * (BC + CV) * BC + rc[:, None] * BC + rc[None, :],
             tl.dot(A, Dm, input_precision="ieee"))


@triton.jit
def _coeff_vectors_kernel(et_ptr, al_ptr, pm_ptr, T, BC: tl.constexpr, CV: tl.constexpr):
    """The gate-only vectors of :func:`_last_row_vectors` of chunk ``program_id(1)`` of head
    ``program_id(0)`` into the ``CV = CV_ROWS`` rows after its ``Pm`` in ``PM``: ``pL, dL, aL,
    beta, g, E`` and ``(bl, gl, el, 0 ..)``, read by the serial chunk loops instead of their
    ``c x c`` decay work (:func:`_chunk_vectors`)."""
    bh = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1)
    rc = tl.arange(0, BC)
    t0 = n * BC
    valid = tl.minimum(T - t0, BC)
    rmask = rc < valid
    et = tl.load(et_ptr + bh * T + t0 + rc, mask=rmask, other=1.0)
    al = tl.load(al_ptr + bh * T + t0 + rc, mask=rmask, other=0.0)
    et_next = tl.load(et_ptr + bh * T + t0 + rc + 1, mask=rc + 1 < valid, other=1.0)
    pL, dL, aL, beta, g, E, bl, gl, el = _last_row_vectors(et, et_next, al, valid, BC)
    n_chunks = (T + BC - 1) // BC
    dst = pm_ptr + (bh * n_chunks + n) * (BC + CV) * BC + BC * BC
    tl.store(dst + rc, pL)
    tl.store(dst + BC + rc, dL)
    tl.store(dst + 2 * BC + rc, aL)
    tl.store(dst + 3 * BC + rc, beta)
    tl.store(dst + 4 * BC + rc, g)
    tl.store(dst + 5 * BC + rc, E)
    tl.store(dst + 6 * BC + rc, tl.where(rc == 0, bl, tl.where(rc == 1, gl, tl.where(rc == 2, el, 0.0))))


@triton.jit
def _chunk_products(pm_ptr, bh, T, t0, BC: tl.constexpr):
    """The ``Pm`` of the chunk starting at ``t0`` from ``_coeff_products_kernel``'s buffer."""
    rc = tl.arange(0, BC)
    n_chunks = (T + BC - 1) // BC
    return tl.load(pm_ptr + (bh * n_chunks + t0 // BC) * (BC + CV_ROWS) * BC + rc[:, None] * BC + rc[None, :])


@triton.jit
def _chunk_vectors(pm_ptr, bh, T, t0, BC: tl.constexpr):
    """The :func:`_last_row_vectors` ``(pL, dL, aL, beta, g, E, bl, gl, el)`` of the chunk starting
    at ``t0`` from ``_coeff_products_kernel``'s buffer."""
    rc = tl.arange(0, BC)
    n_chunks = (T + BC - 1) // BC
    src = pm_ptr + (bh * n_chunks + t0 // BC) * (BC + CV_ROWS) * BC + BC * BC
    return (tl.load(src + rc), tl.load(src + BC + rc), tl.load(src + 2 * BC + rc), tl.load(src + 3 * BC + rc),
            tl.load(src + 4 * BC + rc), tl.load(src + 5 * BC + rc), tl.load(src + 6 * BC), tl.load(src + 6 * BC + 1),
            tl.load(src + 6 * BC + 2))


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
def _cat_cols(a, b, M: tl.constexpr, N: tl.constexpr):
    """``[a | b]``: two ``[M, N]`` tensors side by side, ``[M, 2 N]``."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (M, 2 * N))


@triton.jit
def _cat_rows(a, b, M: tl.constexpr, N: tl.constexpr):
    """``[a; b]``: two ``[M, N]`` tensors one above the other, ``[2 M, N]``."""
    return tl.reshape(tl.permute(tl.join(a, b), (2, 0, 1)), (2 * M, N))


@triton.jit
def _split_cols(x, M: tl.constexpr, N: tl.constexpr):
    """The inverse of :func:`_cat_cols`: ``[M, 2 N] -> ([M, N], [M, N])``."""
    return tl.split(tl.permute(tl.reshape(x, (M, 2, N)), (0, 2, 1)))


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
def _partial_retrieval(q, k, w1, s1, w2, s2, h1, delta1, delta2, C, beta, g, ACT: tl.constexpr, PREC: tl.constexpr):
    """Phase C's retrieval of one tile: the chunk's outputs through the tile's hidden units, in
    the dual form of the chunk's update (``C``, ``beta``, ``g`` from ``_coeffs``)."""
    a1 = (beta[:, None] * _mm(q, w1, PREC) + g[:, None] * _mm(q, s1, PREC)
          - _mm(_mm(q, tl.trans(k), PREC) * C, delta1, PREC))
    x1 = _act(a1, ACT)
    return (beta[:, None] * _mm(x1, w2, PREC) + g[:, None] * _mm(x1, s2, PREC)
            - _mm(_mm(x1, tl.trans(h1), PREC) * C, delta2, PREC))


@triton.jit
def _phase_output(o_src, q_ptr, o_ptr, bh, T, t0, NT, BC: tl.constexpr, D: tl.constexpr, RES: tl.constexpr):
    """Reduction 3: the chunk's output ``sum_t o_t [+ q]`` from the per-tile partials."""
    rc = tl.arange(0, BC)
    rd = tl.arange(0, D)
    ocd = rc[:, None] * D + rd[None, :]
    out = tl.zeros([BC, D], dtype=tl.float32)
    for t in range(NT):
        out += tl.load(o_src + t * BC * D + ocd, cache_modifier=".cg")
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
    o_j = _partial_retrieval(q, k, w1, s1, w2, s2, h1, delta1, delta2, C, beta, g, ACT, PREC)
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
# and in the segment walk (per chunk of a segment, see below):
#   HDP [BH, BC]             the coefficient pre-pass's part of d n^2 (clip only)
#   DF1, DH1F [BH, NT, BC, BF]  adjoint-free terms of d delta1_j, d h1_j (FREE, from phase 3)
#   DD2P [BH, BC, D]         adjoint-free term of d delta2 (FREE, from the coefficient pre-pass)
@triton.jit
def _sum_tiles(ptr, n, stride, offs):
    """``sum_t ptr[t * stride + offs]`` for ``t = 0 .. n - 1``, tile 0 first (deterministic)."""
    acc = tl.load(ptr + offs, cache_modifier=".cg")
    for t in range(1, n):
        acc += tl.load(ptr + t * stride + offs, cache_modifier=".cg")
    return acc


@triton.jit
def _tile_scratch(bh, j, NT, BC: tl.constexpr, BF: tl.constexpr):
    """Offsets of tile ``j``'s ``[BC, BF]`` block of a ``[BH, NT, BC, BF]`` scratch."""
    rc = tl.arange(0, BC)
    return (bh * NT + j) * BC * BF + rc[:, None] * BF + tl.arange(0, BF)[None, :]


@triton.jit
def _bwd_delta2(k, v, p_head, d2s_ptr, bh, j, rmask, NT, BC: tl.constexpr, D: tl.constexpr, RES: tl.constexpr,
                STASH: tl.constexpr):
    """``delta2`` of the chunk (zero past the sequence end): from R1 (``y = sum_t P_t``), or read
    back from the tile's stash (``STASH``). Needs no state tile."""
    rc = tl.arange(0, BC)
    ocd = rc[:, None] * D + tl.arange(0, D)[None, :]
    if STASH:
        delta2 = tl.load(d2s_ptr + (bh * NT + j) * BC * D + ocd)
    else:
        y = _sum_tiles(p_head, NT, BC * D, ocd)
        if RES:
            y += k
        delta2 = tl.where(rmask[:, None], 2.0 * (y - v), 0.0)
    return delta2


@triton.jit
def _bwd_hidden(k, delta2, w1, w2, zs_ptr, us_ptr, bh, j, NT, BC: tl.constexpr, BF: tl.constexpr,
                ACT: tl.constexpr, PREC: tl.constexpr, STASH: tl.constexpr):
    """The tile's ``z1_j = k W1_j, h1_j, act'(z1_j), u_j = delta2 W2_j^T, delta1_j``: recomputed
    from the chunk-start state tiles ``w1, w2`` (two matmuls) or read back from the stash (the
    state tiles are then unused)."""
    if STASH:
        ts = _tile_scratch(bh, j, NT, BC, BF)
        z1 = tl.load(zs_ptr + ts)
        u = tl.load(us_ptr + ts)
    else:
        z1 = _mm(k, w1, PREC)
        u = _mm(delta2, tl.trans(w2), PREC)
    h1 = _act(z1, ACT)
    sd1 = _act_d(z1, ACT)
    return z1, h1, sd1, u, u * sd1


@triton.jit
def _bwd_fetch(k, v, w1, w2, p_head, zs_ptr, us_ptr, d2s_ptr, bh, j, rmask, NT, BC: tl.constexpr, D: tl.constexpr,
               BF: tl.constexpr, ACT: tl.constexpr, RES: tl.constexpr, PREC: tl.constexpr, STASH: tl.constexpr):
    """The chunk's forward quantities of the tile from the chunk-start state: ``(delta2, z1, h1,
    act'(z1), u, delta1)`` (:func:`_bwd_delta2`, :func:`_bwd_hidden`)."""
    delta2 = _bwd_delta2(k, v, p_head, d2s_ptr, bh, j, rmask, NT, BC, D, RES, STASH)
    z1, h1, sd1, u, delta1 = _bwd_hidden(k, delta2, w1, w2, zs_ptr, us_ptr, bh, j, NT, BC, BF, ACT, PREC, STASH)
    return delta2, z1, h1, sd1, u, delta1


@triton.jit
def _bwd_clip(k, delta2, th, n_head, NT, clip, BC: tl.constexpr, CLIP: tl.constexpr, clv_ptr=None, bh=0,
              GIVEN: tl.constexpr = False):
    """R2 and the clipped step ``theta' = theta s``. Returns ``(theta', |G|, ratio, |k|^2,
    sum_j |delta1_j|^2, sum_j |h1_j|^2, |delta2|^2)`` per token (dummies without the clip).
    ``GIVEN``: read from head ``bh``'s ``[7, BC]`` slot of the clip vectors ``clv_ptr``, which
    :func:`_bwd_coeffs_pre` stores for the segment walk (``CLV``), instead of computed."""
    rc = tl.arange(0, BC)
    if CLIP and GIVEN:
        clv_head = clv_ptr + bh * 7 * BC
        thc = tl.load(clv_head + rc)
        nrm = tl.load(clv_head + BC + rc)
        r = tl.load(clv_head + 2 * BC + rc)
        kk = tl.load(clv_head + 3 * BC + rc)
        dd1 = tl.load(clv_head + 4 * BC + rc)
        hh = tl.load(clv_head + 5 * BC + rc)
        dd2 = tl.load(clv_head + 6 * BC + rc)
    elif CLIP:
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
def _bwd_keys(bh, j, k_ptr, w1_ptr, w2_ptr, p_ptr, T, t0, NT,
              BC: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
              ACT: tl.constexpr, PREC: tl.constexpr):
    """Phase 1 of a chunk's backward: R1 partial ``P_j = act(k W1_j) W2_j``."""
    o1, o2 = _tile_offsets(bh, j, D, F, BF)
    rc = tl.arange(0, BC)
    k = _rows(k_ptr, bh, T, t0, BC, D)
    p = _mm(_act(_mm(k, tl.load(w1_ptr + o1), PREC), ACT), tl.load(w2_ptr + o2), PREC)
    tl.store(p_ptr + (bh * NT + j) * BC * D + rc[:, None] * D + tl.arange(0, D)[None, :], p)


@triton.jit
def _bwd_rows_kernel(dqs_ptr, dks_ptr, dq_ptr, dk_ptr, T, c0, NT, chunk_stride, BC: tl.constexpr, D: tl.constexpr):
    """Grid ``(BH, nc)``: the ``dq, dk`` rows of chunks ``c0 .. c0 + nc - 1``, program ``(bh, s)``
    summing the partials of chunk ``c0 + s`` at ``dqs, dks + s * chunk_stride`` (the persistent
    walk: grid ``(BH, 1)`` for chunk 0, its parity slot; the segment walk: every chunk of a
    segment, one slot each)."""
    bh = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    off = s * chunk_stride + bh * (NT + 1) * BC * D
    _bwd_rows(dqs_ptr + off, dks_ptr + off, dq_ptr, dk_ptr, bh, T, (c0 + s) * BC, NT, BC, D)


@triton.jit
def _bwd_stash_norms(bh, j, k, v, w1, w2, p_ptr, n_ptr, zs_ptr, us_ptr, d2s_ptr, rmask, NT,
                     BC: tl.constexpr, D: tl.constexpr, BF: tl.constexpr, ACT: tl.constexpr, RES: tl.constexpr,
                     CLIP: tl.constexpr, PREC: tl.constexpr, STASH: tl.constexpr):
    """The adjoint-free half of phase 2: recompute the tile's ``delta2, z1_j, h1_j, u_j,
    delta1_j`` from R1 and the chunk-start state tiles, store the R2 partials ``|delta1_j|^2``,
    ``|h1_j|^2`` (clip only) and (``STASH``) the tile's ``z1_j, u_j, delta2``. Returns
    ``(delta2, h1, delta1)``."""
    rc = tl.arange(0, BC)
    delta2, z1, h1, _, u, delta1 = _bwd_fetch(k, v, w1, w2, p_ptr + bh * NT * BC * D, zs_ptr, us_ptr, d2s_ptr,
                                              bh, j, rmask, NT, BC, D, BF, ACT, RES, PREC, False)
    if STASH:
        ts = _tile_scratch(bh, j, NT, BC, BF)
        tl.store(zs_ptr + ts, z1)
        tl.store(us_ptr + ts, u)
        tl.store(d2s_ptr + (bh * NT + j) * BC * D + rc[:, None] * D + tl.arange(0, D)[None, :], delta2)
    if CLIP:
        dst = n_ptr + (bh * NT + j) * 2 * BC
        tl.store(dst + rc, tl.sum(delta1 * delta1, axis=1))
        tl.store(dst + BC + rc, tl.sum(h1 * h1, axis=1))
    return delta2, h1, delta1


@triton.jit
def _bwd_adjoint_gates(bh, j, k, delta2, h1, delta1, w1, w2, o1, o2, s1_ptr, s2_ptr,
                       aw1_ptr, as1_ptr, aw2_ptr, as2_ptr, gt_ptr, gs_ptr, NT, BC: tl.constexpr,
                       PREC: tl.constexpr):
    """The half of phase 2 that reads the state adjoint (of the state after this chunk): the tile's
    partials of the R5 gate cotangents through it, per token ``dcl, dml`` (rows 2, 3 of ``GT``) and
    per head ``dbl, dgl, del`` (``GS``). Returns the products with the adjoint ``(k aW1_j, k
    aS1_j, h1_j aW2_j, h1_j aS2_j)`` (for :func:`_bwd_adjoint_ahead`)."""
    rc = tl.arange(0, BC)
    aw1 = tl.load(aw1_ptr + o1)
    as1 = tl.load(as1_ptr + o1)
    aw2 = tl.load(aw2_ptr + o2)
    as2 = tl.load(as2_ptr + o2)
    ka1 = _mm(k, aw1, PREC)
    ks1 = _mm(k, as1, PREC)
    ha2 = _mm(h1, aw2, PREC)
    hs2 = _mm(h1, as2, PREC)
    dcl = -tl.sum(ka1 * delta1, axis=1) - tl.sum(ha2 * delta2, axis=1)
    dml = -tl.sum(ks1 * delta1, axis=1) - tl.sum(hs2 * delta2, axis=1)
    gt = gt_ptr + (bh * NT + j) * 4 * BC
    tl.store(gt + 2 * BC + rc, dcl)
    tl.store(gt + 3 * BC + rc, dml)
    s1 = tl.load(s1_ptr + o1)
    s2 = tl.load(s2_ptr + o2)
    gs = gs_ptr + (bh * NT + j) * 4
    tl.store(gs, tl.sum(tl.sum(aw1 * w1, axis=1), axis=0) + tl.sum(tl.sum(aw2 * w2, axis=1), axis=0))
    tl.store(gs + 1, tl.sum(tl.sum(aw1 * s1, axis=1), axis=0) + tl.sum(tl.sum(aw2 * s2, axis=1), axis=0))
    tl.store(gs + 2, tl.sum(tl.sum(as1 * s1, axis=1), axis=0) + tl.sum(tl.sum(as2 * s2, axis=1), axis=0))
    return ka1, ks1, ha2, hs2


@triton.jit
def _bwd_adjoint_ahead(bh, j, k, delta2, sd1, ka1, ks1, ha2, hs2, w2, th_ptr, pm_ptr, clv_ptr, df1_ptr,
                       ddl1_ptr, dd2_ptr, T, t0, NT, clip, BC: tl.constexpr, D: tl.constexpr, BF: tl.constexpr,
                       CLIP: tl.constexpr, PREC: tl.constexpr):
    """Phase 4's tile work done ahead, in phase 2a (``AHEAD`` of the segment walk): the last-row
    coefficients ``cl, ml`` need only the clipped step (R2 is summed before the walk), so the
    tile's ``d delta1_j`` and its R6 partial are known here up to their clip terms, which are
    linear in the per-token ``d n^2`` that the coefficient backward gives later:
    ``d delta1_j = DF1_j - cl k aW1_j - ml k aS1_j (+ 2 d n^2 |k|^2 delta1_j)`` to ``DDL1`` and
    ``(d delta1_j act'(z1_j)) W2_j - cl h1_j aW2_j - ml h1_j aS2_j`` to ``DD2`` without the
    bracket; phase 5 adds the clip terms (their R6 part is ``Q2S`` of :func:`_bwd_coeffs_pre`).
    The products with the adjoint are :func:`_bwd_adjoint_gates`' (phase 4 recomputed them)."""
    rc = tl.arange(0, BC)
    valid = tl.minimum(T - t0, BC)
    goff = bh * T + t0 + rc
    rmask = rc < valid
    th = tl.load(th_ptr + goff, mask=rmask, other=0.0)
    thc, _, _, _, _, _, _ = _bwd_clip(k, delta2, th, clv_ptr, NT, clip, BC, CLIP, clv_ptr, bh, True)
    pL, dL, _, _, _, _, _, _, _ = _chunk_vectors(pm_ptr, bh, T, t0, BC)
    cl, ml = _last_coeffs(thc, valid, pL, dL, BC)
    ts = _tile_scratch(bh, j, NT, BC, BF)
    e1 = tl.load(df1_ptr + ts) - cl[:, None] * ka1 - ml[:, None] * ks1
    tl.store(ddl1_ptr + ts, e1)
    dd2_j = _mm(e1 * sd1, w2, PREC) - cl[:, None] * ha2 - ml[:, None] * hs2
    tl.store(dd2_ptr + (bh * NT + j) * BC * D + rc[:, None] * D + tl.arange(0, D)[None, :], dd2_j)


@triton.jit
def _bwd_norms(bh, j, k_ptr, v_ptr, w1_ptr, s1_ptr, w2_ptr, s2_ptr, aw1_ptr, as1_ptr, aw2_ptr, as2_ptr,
               p_ptr, n_ptr, gt_ptr, gs_ptr, zs_ptr, us_ptr, d2s_ptr, T, t0, NT,
               BC: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
               ACT: tl.constexpr, RES: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr,
               STASH: tl.constexpr):
    """Phase 2: the R2 partials ``|delta1_j|^2``, ``|h1_j|^2`` per token (clip only), and the
    parts of the R5 gate cotangents that go through the state adjoint (per token ``dcl, dml``;
    per head ``dbl, dgl, del``): :func:`_bwd_stash_norms` then :func:`_bwd_adjoint_gates`.
    Separate from the retrieval phase so that neither needs more shared memory than a block has
    (Triton 3.6, 4 tiles at W1 shapes). ``STASH``: also store the tile's ``z1_j, u_j, delta2``
    for the later phases of this chunk (:func:`_bwd_fetch`)."""
    rc = tl.arange(0, BC)
    rmask = (t0 + rc) < T
    o1, o2 = _tile_offsets(bh, j, D, F, BF)
    k = _rows(k_ptr, bh, T, t0, BC, D)
    v = _rows(v_ptr, bh, T, t0, BC, D)
    w1 = tl.load(w1_ptr + o1)
    w2 = tl.load(w2_ptr + o2)
    delta2, h1, delta1 = _bwd_stash_norms(bh, j, k, v, w1, w2, p_ptr, n_ptr, zs_ptr, us_ptr, d2s_ptr, rmask, NT,
                                          BC, D, BF, ACT, RES, CLIP, PREC, STASH)
    _bwd_adjoint_gates(bh, j, k, delta2, h1, delta1, w1, w2, o1, o2, s1_ptr, s2_ptr, aw1_ptr, as1_ptr, aw2_ptr,
                       as2_ptr, gt_ptr, gs_ptr, NT, BC, PREC)


@triton.jit
def _bwd_retrieval(bh, j, q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, go_ptr,
                   w1_ptr, s1_ptr, w2_ptr, s2_ptr,
                   p_ptr, n_ptr, xh_ptr, dn1_ptr, gt_ptr, dqs_ptr, x1_ptr, da1_ptr, zs_ptr, us_ptr, d2s_ptr,
                   df1_ptr, dh1f_ptr, T, t0, NT, clip,
                   BC: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
                   ACT: tl.constexpr, RES: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr,
                   STASH: tl.constexpr, FREE: tl.constexpr = False, pm_ptr=None):
    """Phase 3. Recompute, then the retrieval backward of the tile: partials of R3
    (``x1_j h1_j^T``), R4 (``-da1_j delta1_j^T``), the per-token R5 terms ``dbeta, dg`` and R7
    (``dq``); stash ``x1_j``, ``da1_j``. ``FREE``: also stash the tile's adjoint-free terms of
    phases 4 and 5, ``-((q k^T) * C)^T da1_j`` of ``d delta1_j`` (``DF1``) and
    ``(-(g_o delta2^T) * C)^T x1_j`` of ``d h1_j`` (``DH1F``)."""
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
    delta2, z1, h1, sd1, u, delta1 = _bwd_fetch(k, v, w1, w2, p_ptr + bh * NT * BC * D, zs_ptr, us_ptr, d2s_ptr,
                                                bh, j, rmask, NT, BC, D, BF, ACT, RES, PREC, STASH)
    thc, _, _, _, _, _, _ = _bwd_clip(k, delta2, th, n_ptr + bh * NT * 2 * BC, NT, clip, BC, CLIP)
    if pm_ptr is None:
        A, Dm, Pm, C, beta, E, g, cl, ml, bl, gl, el = _coeffs(thc, et, al, valid, BC)
    else:
        A, Dm, Pm, C, beta, E, g, cl, ml, bl, gl, el = _coeffs_given(thc, et, al, valid,
                                                                     _chunk_products(pm_ptr, bh, T, t0, BC), BC)
    qW1 = _mm(q, w1, PREC)
    qS1 = _mm(q, s1, PREC)
    QKC = _mm(q, tl.trans(k), PREC) * C
    a1 = beta[:, None] * qW1 + g[:, None] * qS1 - _mm(QKC, delta1, PREC)
    x1 = _act(a1, ACT)
    dXHC = -_mm(go, tl.trans(delta2), PREC) * C
    dx1 = (beta[:, None] * _mm(go, tl.trans(w2), PREC) + g[:, None] * _mm(go, tl.trans(s2), PREC)
           + _mm(dXHC, h1, PREC))
    da1 = dx1 * _act_d(a1, ACT)
    ts = _tile_scratch(bh, j, NT, BC, BF)
    tl.store(x1_ptr + ts, x1)
    tl.store(da1_ptr + ts, da1)
    if FREE:
        tl.store(df1_ptr + ts, -_mm(tl.trans(QKC), da1, PREC))
        tl.store(dh1f_ptr + ts, _mm(tl.trans(dXHC), x1, PREC))
    tcc = (bh * NT + j) * BC * BC + occ
    tl.store(xh_ptr + tcc, _mm(x1, tl.trans(h1), PREC))
    tl.store(dn1_ptr + tcc, -_mm(da1, tl.trans(delta1), PREC))
    # the state tiles are loaded again for their last uses (after the stores above), so that their
    # first shared-memory copies are dead by now: this phase fits a block at 4 tiles (Triton 3.6)
    dbeta = tl.sum(go * _mm(x1, tl.load(w2_ptr + o2), PREC), axis=1) + tl.sum(da1 * qW1, axis=1)
    dg = tl.sum(go * _mm(x1, tl.load(s2_ptr + o2), PREC), axis=1) + tl.sum(da1 * qS1, axis=1)
    gt = gt_ptr + (bh * NT + j) * 4 * BC
    tl.store(gt + rc, dbeta)
    tl.store(gt + BC + rc, dg)
    dq_j = (_mm(beta[:, None] * da1, tl.trans(tl.load(w1_ptr + o1)), PREC)
            + _mm(g[:, None] * da1, tl.trans(tl.load(s1_ptr + o1)), PREC))
    tl.store(dqs_ptr + (bh * (NT + 1) + j) * BC * D + ocd, dq_j)


@triton.jit
def _bwd_coeff_inputs(bh, q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, p_ptr, n_ptr, d2s_ptr, j, T, t0, NT, clip,
                      BC: tl.constexpr, D: tl.constexpr, RES: tl.constexpr, CLIP: tl.constexpr,
                      PREC: tl.constexpr, STASH: tl.constexpr, clv_ptr=None, GIVEN: tl.constexpr = False):
    """What phase 4 needs of the forward: the chunk's rows and gates, ``delta2`` (tile ``j``'s
    stash or R1) and the clipped step with the clip's per-token vectors (:func:`_bwd_clip`,
    ``GIVEN`` as there; the callers compute the chunk coefficients from it)."""
    q, k, v, th, et, al, valid, rmask, xoff, goff = _load_chunk(
        q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, bh, T, t0, BC, D)
    delta2 = _bwd_delta2(k, v, p_ptr + bh * NT * BC * D, d2s_ptr, bh, j, rmask, NT, BC, D, RES, STASH)
    thc, nrm, r, kk, dd1, hh, dd2 = _bwd_clip(k, delta2, th, n_ptr + bh * NT * 2 * BC, NT, clip, BC, CLIP,
                                              clv_ptr, bh, GIVEN)
    return q, k, th, et, al, valid, rmask, xoff, goff, delta2, thc, nrm, r, kk, dd1, hh, dd2


@triton.jit
def _bwd_coeffs_pre(bh, q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, go_ptr, p_ptr, n_ptr, xh_ptr, dn1_ptr,
                    gt_ptr, dqs_ptr, hdp_ptr, dth_ptr, det_ptr, dal_ptr, d2s_ptr, dd2p_ptr, dks_ptr, pm_ptr, T, t0, NT,
                    clip, BC: tl.constexpr, D: tl.constexpr, RES: tl.constexpr, CLIP: tl.constexpr,
                    PREC: tl.constexpr, FREE: tl.constexpr = False, AHEAD: tl.constexpr = False,
                    q2s_ptr=None, zs_ptr=None, us_ptr=None, w2_ptr=None, F: tl.constexpr = 1, BF: tl.constexpr = 1,
                    ACT: tl.constexpr = "identity", clv_ptr=None):
    """The adjoint-free part of phase 4's per-head coefficient backward (one program per head and
    chunk; the segment walk runs it for all chunks of a segment before walking them): sums R3,
    R4 and the per-token R5 terms ``dbeta, dg`` (all from the retrieval backward), runs
    ``_coeffs_bwd`` with the last-row cotangents (``dcl .. d_el``, through the state adjoint)
    left at zero and the clip backward, and writes that part of ``dtheta, deta, dalpha``, of
    ``d n^2`` (to ``HDP``, clip only) and the per-head ``dq`` term. The walk adds the rest
    (:func:`_bwd_coeffs` with ``HOISTED``): the coefficient and clip backward are linear in
    their cotangents. ``FREE``: also the adjoint-free terms of phase 5's per-head work, ``-(XH *
    C)^T g_o`` of ``d delta2`` (``DD2P``) and ``(dN1 * C)^T q`` of the per-head ``dk`` term (its
    slot of ``DK``, which phase 5 completes). ``AHEAD`` (the two-launch walk) with the clip: also
    ``Q2S = |k|^2 sum_j (delta1_j act'(z1_j)) W2_j + |h1|^2 delta2`` per token, what phase 5
    scales by ``2 d n^2`` for the clip terms of ``d delta2`` (:func:`_bwd_adjoint_ahead`). ``FREE``
    with the clip: also the clip's per-token vectors of :func:`_bwd_clip` into the head's slot of
    ``CLV`` (``[BH, 7, BC]``), which the walk reads instead of computing them."""
    rc = tl.arange(0, BC)
    rd = tl.arange(0, D)
    ocd = rc[:, None] * D + rd[None, :]
    occ = rc[:, None] * BC + rc[None, :]
    q, k, th, et, al, valid, rmask, xoff, goff, delta2, thc, nrm, r, kk, dd1, hh, dd2 = _bwd_coeff_inputs(
        bh, q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, p_ptr, n_ptr, d2s_ptr, 0, T, t0, NT, clip, BC, D, RES, CLIP,
        PREC, True, clv_ptr, False)
    if FREE and CLIP:
        clv = clv_ptr + bh * 7 * BC
        tl.store(clv + rc, thc)
        tl.store(clv + BC + rc, nrm)
        tl.store(clv + 2 * BC + rc, r)
        tl.store(clv + 3 * BC + rc, kk)
        tl.store(clv + 4 * BC + rc, dd1)
        tl.store(clv + 5 * BC + rc, hh)
        tl.store(clv + 6 * BC + rc, dd2)
    A, Dm, Pm, C, beta, E, g, cl, ml, bl, gl, el = _coeffs_given(thc, et, al, valid,
                                                                 _chunk_products(pm_ptr, bh, T, t0, BC), BC)
    QK = _mm(q, tl.trans(k), PREC)
    go = tl.load(go_ptr + xoff, mask=rmask[:, None], other=0.0)
    XH = _sum_tiles(xh_ptr + bh * NT * BC * BC, NT, BC * BC, occ)  # R3
    dN1 = _sum_tiles(dn1_ptr + bh * NT * BC * BC, NT, BC * BC, occ)  # R4
    gt = gt_ptr + bh * NT * 4 * BC  # R5, the per-token terms of the retrieval
    dbeta = _sum_tiles(gt, NT, 4 * BC, rc)
    dg = _sum_tiles(gt + BC, NT, 4 * BC, rc)
    zero = th * 0.0
    z0 = tl.sum(zero, axis=0)
    dth, det, dal = _coeffs_bwd(dN1 * QK - _mm(go, tl.trans(delta2), PREC) * XH, dbeta, dg, zero, zero, z0, z0, z0,
                                thc, et, al, valid, A, Dm, Pm, beta, E, BC)
    if CLIP:
        dth, dn2 = _clip_bwd(dth, th, nrm, r, clip, rmask)
        tl.store(hdp_ptr + bh * BC + rc, dn2)
    tl.store(dth_ptr + goff, dth, mask=rmask)
    tl.store(det_ptr + goff, det, mask=rmask)
    tl.store(dal_ptr + goff, dal, mask=rmask)
    dq_head = _mm(dN1 * C, k, PREC)
    if RES:
        dq_head += go
    tl.store(dqs_ptr + (bh * (NT + 1) + NT) * BC * D + ocd, dq_head)
    if FREE:
        tl.store(dd2p_ptr + bh * BC * D + ocd, -_mm(tl.trans(XH * C), go, PREC))
        tl.store(dks_ptr + (bh * (NT + 1) + NT) * BC * D + ocd, _mm(tl.trans(dN1 * C), q, PREC))
    if AHEAD and CLIP:
        q2 = tl.zeros([BC, D], dtype=tl.float32)
        for jj in range(NT):
            ts = _tile_scratch(bh, jj, NT, BC, BF)
            sd1 = _act_d(tl.load(zs_ptr + ts), ACT)
            _, o2 = _tile_offsets(bh, jj, D, F, BF)
            q2 += _mm(tl.load(us_ptr + ts) * sd1 * sd1, tl.load(w2_ptr + o2), PREC)
        tl.store(q2s_ptr + bh * BC * D + ocd, kk[:, None] * q2 + hh[:, None] * delta2)


@triton.jit
def _bwd_coeffs_walk_head(bh, j, gt_ptr, gs_ptr, hdp_ptr, hd_ptr, dth_ptr, det_ptr, dal_ptr, goff, rmask,
                          th, thc, et, al, valid, nrm, r, aL, dL, pL, beta, E, NT, clip,
                          BC: tl.constexpr, CLIP: tl.constexpr, STORE_HD: tl.constexpr):
    """The walk's part of the per-head coefficient backward (after :func:`_bwd_coeffs_pre`): sums
    the R5 cotangents of the last-row coefficients (through the state adjoint: ``dcl, dml`` per
    token, ``dbl, dgl, d_el`` per head), back-propagates them (``_coeffs_bwd_last``, no matmul)
    and through the clip; program 0 adds the hoisted part to ``dtheta, deta, dalpha`` and writes
    them (and ``d n^2`` to ``HD`` with ``STORE_HD``). Returns the whole ``d n^2`` per token
    (zero without the clip). Every tile computes it again rather than waiting on a broadcast."""
    rc = tl.arange(0, BC)
    gt = gt_ptr + bh * NT * 4 * BC  # R5
    dcl = _sum_tiles(gt + 2 * BC, NT, 4 * BC, rc)
    dml = _sum_tiles(gt + 3 * BC, NT, 4 * BC, rc)
    gs = gs_ptr + bh * NT * 4
    dbl = _sum_tiles(gs, NT, 4, 0)
    dgl = _sum_tiles(gs + 1, NT, 4, 0)
    d_el = _sum_tiles(gs + 2, NT, 4, 0)
    dth, det, dal = _coeffs_bwd_last(dcl, dml, dbl, dgl, d_el, thc, et, al, valid, aL, dL, pL, beta, E, BC)
    if CLIP:
        dth, dn2 = _clip_bwd(dth, th, nrm, r, clip, rmask)
        dn2 += tl.load(hdp_ptr + bh * BC + rc)
    else:
        dn2 = th * 0.0
    if j == 0:
        tl.store(dth_ptr + goff, dth + tl.load(dth_ptr + goff, mask=rmask, other=0.0), mask=rmask)
        tl.store(det_ptr + goff, det + tl.load(det_ptr + goff, mask=rmask, other=0.0), mask=rmask)
        tl.store(dal_ptr + goff, dal + tl.load(dal_ptr + goff, mask=rmask, other=0.0), mask=rmask)
        if CLIP and STORE_HD:
            tl.store(hd_ptr + bh * BC + rc, dn2)
    return dn2


@triton.jit
def _bwd_coeffs(bh, j, q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, go_ptr,
                w1_ptr, w2_ptr, aw1_ptr, as1_ptr, aw2_ptr, as2_ptr,
                p_ptr, n_ptr, xh_ptr, dn1_ptr, gt_ptr, gs_ptr, dqs_ptr, da1_ptr, ddl1_ptr, dd2_ptr, hd_ptr, hdp_ptr,
                dth_ptr, det_ptr, dal_ptr, zs_ptr, us_ptr, d2s_ptr, df1_ptr,
                T, t0, NT, clip,
                BC: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
                ACT: tl.constexpr, RES: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr,
                STASH: tl.constexpr, HOISTED: tl.constexpr = False, FREE: tl.constexpr = False, pm_ptr=None,
                clv_ptr=None):
    """Phase 4. The per-head part: sums R3, R4, R5, runs the ``c x c`` coefficient backward
    (``_coeffs_bwd``) and the clip backward (every program again, rather than waiting on a
    broadcast; program 0 writes ``dtheta, deta, dalpha``, the per-head ``dq`` term and ``d n^2``).
    Then the tile's ``d delta1_j`` (stashed) and its R6 partial of ``d delta2``.

    ``HOISTED`` (the segment walk): :func:`_bwd_coeffs_pre` has already done the adjoint-free
    part, so only the cotangents of the last-row coefficients (``dcl, dml`` per token, ``dbl,
    dgl, d_el`` per head, all through the state adjoint) are summed and back-propagated
    (``_coeffs_bwd_last``, no matmul); program 0 adds that part to ``dtheta, deta, dalpha`` and
    writes the whole ``d n^2`` (``HDP`` holds the other part), with the chunk's gate-only vectors
    from ``PM`` (:func:`_chunk_vectors`). ``FREE`` (with ``HOISTED``): the adjoint-free term of
    ``d delta1_j`` comes from ``DF1`` (stashed by phase 3)."""
    rc = tl.arange(0, BC)
    rd = tl.arange(0, D)
    ocd = rc[:, None] * D + rd[None, :]
    occ = rc[:, None] * BC + rc[None, :]
    # the per-head coefficient backward first, the tile's hidden activations after it: fewer
    # tensors live at once (this phase spilled most)
    q, k, th, et, al, valid, rmask, xoff, goff, delta2, thc, nrm, r, kk, dd1, hh, dd2 = _bwd_coeff_inputs(
        bh, q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, p_ptr, n_ptr, d2s_ptr, j, T, t0, NT, clip, BC, D, RES, CLIP,
        PREC, STASH, clv_ptr, HOISTED and FREE)
    if FREE:  # (with HOISTED) no q k^T and no c x c coefficient matrix here: their uses come stashed
        pL, dL, aL, beta, g, E, bl, gl, el = _chunk_vectors(pm_ptr, bh, T, t0, BC)
        cl, ml = _last_coeffs(thc, valid, pL, dL, BC)
    else:
        A, Dm, Pm, C, beta, E, g, cl, ml, bl, gl, el = _coeffs(thc, et, al, valid, BC)
        QK = _mm(q, tl.trans(k), PREC)
    if HOISTED:
        pL, dL, aL, _, _, _, _, _, _ = _chunk_vectors(pm_ptr, bh, T, t0, BC)
        dn2 = _bwd_coeffs_walk_head(bh, j, gt_ptr, gs_ptr, hdp_ptr, hd_ptr, dth_ptr, det_ptr, dal_ptr, goff, rmask,
                                    th, thc, et, al, valid, nrm, r, aL, dL, pL, beta, E, NT, clip, BC, CLIP, True)
    else:
        gt = gt_ptr + bh * NT * 4 * BC  # R5
        dcl = _sum_tiles(gt + 2 * BC, NT, 4 * BC, rc)
        dml = _sum_tiles(gt + 3 * BC, NT, 4 * BC, rc)
        gs = gs_ptr + bh * NT * 4
        dbl = _sum_tiles(gs, NT, 4, 0)
        dgl = _sum_tiles(gs + 1, NT, 4, 0)
        d_el = _sum_tiles(gs + 2, NT, 4, 0)
        go = tl.load(go_ptr + xoff, mask=rmask[:, None], other=0.0)
        XH = _sum_tiles(xh_ptr + bh * NT * BC * BC, NT, BC * BC, occ)  # R3
        dN1 = _sum_tiles(dn1_ptr + bh * NT * BC * BC, NT, BC * BC, occ)  # R4
        dbeta = _sum_tiles(gt, NT, 4 * BC, rc)
        dg = _sum_tiles(gt + BC, NT, 4 * BC, rc)
        dN2 = -_mm(go, tl.trans(delta2), PREC)
        dth, det, dal = _coeffs_bwd(dN1 * QK + dN2 * XH, dbeta, dg, dcl, dml, dbl, dgl, d_el, thc, et, al, valid,
                                    A, Dm, Pm, beta, E, BC)
        if CLIP:
            dth, dn2 = _clip_bwd(dth, th, nrm, r, clip, rmask)
        else:
            dn2 = th * 0.0
        if j == 0:
            dq_head = _mm(dN1 * C, k, PREC)
            if RES:
                dq_head += go
            tl.store(dqs_ptr + (bh * (NT + 1) + NT) * BC * D + ocd, dq_head)
            tl.store(dth_ptr + goff, dth, mask=rmask)
            tl.store(det_ptr + goff, det, mask=rmask)
            tl.store(dal_ptr + goff, dal, mask=rmask)
            if CLIP:
                tl.store(hd_ptr + bh * BC + rc, dn2)
    o1, o2 = _tile_offsets(bh, j, D, F, BF)
    ts = _tile_scratch(bh, j, NT, BC, BF)
    if FREE:
        ddelta1 = tl.load(df1_ptr + ts)
    else:
        ddelta1 = -_mm(tl.trans(QK * C), tl.load(da1_ptr + ts), PREC)
    ddelta1 += (- cl[:, None] * _mm(k, tl.load(aw1_ptr + o1), PREC)
                - ml[:, None] * _mm(k, tl.load(as1_ptr + o1), PREC))
    z1, h1, sd1, u, delta1 = _bwd_hidden(k, delta2, tl.load(w1_ptr + o1), tl.load(w2_ptr + o2), zs_ptr, us_ptr,
                                         bh, j, NT, BC, BF, ACT, PREC, STASH)
    if CLIP:
        ddelta1 += (2.0 * dn2 * kk)[:, None] * delta1
    tl.store(ddl1_ptr + ts, ddelta1)
    dd2_j = (_mm(ddelta1 * sd1, tl.load(w2_ptr + o2), PREC)
             - cl[:, None] * _mm(h1, tl.load(aw2_ptr + o2), PREC)
             - ml[:, None] * _mm(h1, tl.load(as2_ptr + o2), PREC))
    tl.store(dd2_ptr + (bh * NT + j) * BC * D + ocd, dd2_j)


@triton.jit
def _bwd_state(bh, j, q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, go_ptr, dv_ptr,
               w1_ptr, w2_ptr, aw1_ptr, as1_ptr, aw2_ptr, as2_ptr,
               p_ptr, n_ptr, xh_ptr, dn1_ptr, dd2_ptr, hd_ptr, dks_ptr, x1_ptr, da1_ptr, ddl1_ptr,
               zs_ptr, us_ptr, d2s_ptr, dh1f_ptr, dd2p_ptr, T, t0, NT, clip,
               BC: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
               ACT: tl.constexpr, RES: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr,
               STASH: tl.constexpr, FREE: tl.constexpr = False, MERGE: tl.constexpr = False,
               AHEAD: tl.constexpr = False, gt_ptr=None, gs_ptr=None, hdp_ptr=None, q2s_ptr=None,
               dth_ptr=None, det_ptr=None, dal_ptr=None, pm_ptr=None, clv_ptr=None):
    """Phase 5. Sums R6 (``d delta2``; program 0 writes ``dv`` and the per-head ``dk`` term), then
    the tile's ``dz1``, its R8 partial of ``dk``, and the adjoint of its slice of the chunk-start
    state, written in place over the adjoint of the state after the chunk: first the ``W1, S1``
    half (with ``dz1`` and ``dk``), then the ``W2, S2`` half, so that fewer tensors are live at
    once (Triton 3.6 compile report, W1 shapes without ``FREE``: 3296 spill bytes and 144 KB of
    shared memory, against 3692 and 224 KB with the four new adjoint tiles computed before any is
    stored). ``FREE``: the chunk's gate-only vectors come from ``PM`` (:func:`_chunk_vectors`), the
    adjoint-free terms come stashed (``DD2P`` and the per-head ``dk`` slot from
    :func:`_bwd_coeffs_pre`, ``DH1F`` from phase 3), so ``R3``, ``R4`` and ``g_o delta2^T`` are
    not needed here. ``MERGE``: matmuls that add up share one matmul over the concatenated
    contraction axis (9 instead of 13), the stacked operands loaded as one tile where they come
    from memory. ``AHEAD`` (with ``FREE``; the two-launch walk): no phase 4 ran; this phase first
    does its per-head part (:func:`_bwd_coeffs_walk_head`), then adds the clip terms to what
    phase 2a left in ``DDL1`` and ``DD2`` (:func:`_bwd_adjoint_ahead`)."""
    rc = tl.arange(0, BC)
    rd = tl.arange(0, D)
    ocd = rc[:, None] * D + rd[None, :]
    occ = rc[:, None] * BC + rc[None, :]
    q, k, v, th, et, al, valid, rmask, xoff, goff = _load_chunk(
        q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, bh, T, t0, BC, D)
    go = tl.load(go_ptr + xoff, mask=rmask[:, None], other=0.0)
    o1, o2 = _tile_offsets(bh, j, D, F, BF)
    delta2, z1, h1, sd1, u, delta1 = _bwd_fetch(k, v, tl.load(w1_ptr + o1), tl.load(w2_ptr + o2),
                                                p_ptr + bh * NT * BC * D, zs_ptr, us_ptr, d2s_ptr,
                                                bh, j, rmask, NT, BC, D, BF, ACT, RES, PREC, STASH)
    thc, nrm, r, kk, dd1, hh, dd2 = _bwd_clip(k, delta2, th, n_ptr + bh * NT * 2 * BC, NT, clip, BC, CLIP,
                                              clv_ptr, bh, FREE)
    if FREE:  # the c x c coefficient matrix's uses come stashed: only its last row is needed
        pL, dL, aL, beta, g, E, bl, gl, el = _chunk_vectors(pm_ptr, bh, T, t0, BC)
        cl, ml = _last_coeffs(thc, valid, pL, dL, BC)
    else:
        A, Dm, Pm, C, beta, E, g, cl, ml, bl, gl, el = _coeffs(thc, et, al, valid, BC)
    if AHEAD:
        dn2 = _bwd_coeffs_walk_head(bh, j, gt_ptr, gs_ptr, hdp_ptr, hd_ptr, dth_ptr, det_ptr, dal_ptr, goff, rmask,
                                    th, thc, et, al, valid, nrm, r, aL, dL, pL, beta, E, NT, clip, BC, CLIP, False)
    ddelta2 = _sum_tiles(dd2_ptr + bh * NT * BC * D, NT, BC * D, ocd)  # R6
    if FREE:
        ddelta2 += tl.load(dd2p_ptr + bh * BC * D + ocd)
    else:
        XH = _sum_tiles(xh_ptr + bh * NT * BC * BC, NT, BC * BC, occ)  # R3 (again)
        ddelta2 -= _mm(tl.trans(XH * C), go, PREC)
    if CLIP:
        if AHEAD:  # the clip terms of the R6 partials and of d delta2 itself: 2 d n^2 (|k|^2 Q2 + |h1|^2 delta2)
            ddelta2 += (2.0 * dn2)[:, None] * tl.load(q2s_ptr + bh * BC * D + ocd)
        else:
            dn2 = tl.load(hd_ptr + bh * BC + rc, cache_modifier=".cg")
            ddelta2 += (2.0 * dn2 * hh)[:, None] * delta2
    elif not AHEAD:
        dn2 = th * 0.0
    dy = 2.0 * ddelta2
    ts = _tile_scratch(bh, j, NT, BC, BF)
    if j == 0:
        tl.store(dv_ptr + xoff, -dy, mask=rmask[:, None])
        if FREE:
            dk_head = tl.load(dks_ptr + (bh * (NT + 1) + NT) * BC * D + ocd)
        else:
            dN1 = _sum_tiles(dn1_ptr + bh * NT * BC * BC, NT, BC * BC, occ)  # R4 (again)
            dk_head = _mm(tl.trans(dN1 * C), q, PREC)
        if RES:
            dk_head += dy
        if CLIP:
            dk_head += (2.0 * dn2 * dd1)[:, None] * k
        tl.store(dks_ptr + (bh * (NT + 1) + NT) * BC * D + ocd, dk_head)
    # the W1, S1 half: dz1, the dk partial, the new adjoint of W1, S1
    ddelta1 = tl.load(ddl1_ptr + ts)
    if AHEAD and CLIP:
        ddelta1 += (2.0 * dn2 * kk)[:, None] * delta1
    if FREE:
        dh1 = tl.load(dh1f_ptr + ts)
    else:
        dh1 = _mm(tl.trans(-_mm(go, tl.trans(delta2), PREC) * C), tl.load(x1_ptr + ts), PREC)
    if MERGE:  # [dy | -cl delta2] [W2^T; aW2^T] - ml delta2 aS2^T
        r2 = tl.arange(0, 2 * D)
        o2t = bh * F * D + (j * BF + tl.arange(0, BF))[None, :] * D + (r2 % D)[:, None]  # [2D, BF]
        wa2t = tl.load(tl.where(r2[:, None] < D, w2_ptr + o2t, aw2_ptr + o2t))
        dh1 += (_mm(_cat_cols(dy, -(cl[:, None] * delta2), BC, D), wa2t, PREC)
                - _mm(ml[:, None] * delta2, tl.trans(tl.load(as2_ptr + o2)), PREC))
    else:
        dh1 += (_mm(dy, tl.trans(tl.load(w2_ptr + o2)), PREC)
                - _mm(cl[:, None] * delta2, tl.trans(tl.load(aw2_ptr + o2)), PREC)
                - _mm(ml[:, None] * delta2, tl.trans(tl.load(as2_ptr + o2)), PREC))
    if CLIP:
        dh1 += (2.0 * dn2 * dd2)[:, None] * h1
    dz1 = dh1 * sd1 + ddelta1 * u * _act_dd(z1, ACT)
    aw1 = tl.load(aw1_ptr + o1)
    as1 = tl.load(as1_ptr + o1)
    if MERGE:  # [dz1 | -cl delta1] [W1^T; aW1^T] - ml delta1 aS1^T
        r1 = tl.arange(0, 2 * BF)
        o1t = bh * D * F + rd[None, :] * F + j * BF + (r1 % BF)[:, None]  # [2BF, D]
        wa1t = tl.load(tl.where(r1[:, None] < BF, w1_ptr + o1t, aw1_ptr + o1t))
        dk_j = (_mm(_cat_cols(dz1, -(cl[:, None] * delta1), BC, BF), wa1t, PREC)
                - _mm(ml[:, None] * delta1, tl.trans(as1), PREC))
    else:
        dk_j = (_mm(dz1, tl.trans(tl.load(w1_ptr + o1)), PREC) - _mm(cl[:, None] * delta1, tl.trans(aw1), PREC)
                - _mm(ml[:, None] * delta1, tl.trans(as1), PREC))
    tl.store(dks_ptr + (bh * (NT + 1) + j) * BC * D + ocd, dk_j)
    tq = tl.trans(q)
    da1 = tl.load(da1_ptr + ts)
    if MERGE:  # [q; k]^T [beta da1; dz1], [q; k] loaded as one tile
        r = tl.arange(0, 2 * BC)
        tok = t0 + r % BC
        oqk = bh * T * D + tok[:, None] * D + rd[None, :]
        qk = tl.load(tl.where(r[:, None] < BC, q_ptr + oqk, k_ptr + oqk), mask=(tok < T)[:, None], other=0.0)
        aw1n = bl * aw1 + _mm(tl.trans(qk), _cat_rows(beta[:, None] * da1, dz1, BC, BF), PREC)
    else:
        aw1n = bl * aw1 + _mm(tq, beta[:, None] * da1, PREC) + _mm(tl.trans(k), dz1, PREC)
    as1n = gl * aw1 + el * as1 + _mm(tq, g[:, None] * da1, PREC)
    # every thread of the program has read the tile's W1, S1 adjoint before any overwrites it
    tl.debug_barrier()
    tl.store(aw1_ptr + o1, aw1n)
    tl.store(as1_ptr + o1, as1n)
    # the W2, S2 half (its adjoint was last read above, before the barrier below); x1, d delta1
    # loaded again rather than kept live across the half above
    x1 = tl.load(x1_ptr + ts)
    ddelta1 = tl.load(ddl1_ptr + ts)
    if AHEAD and CLIP:
        ddelta1 += (2.0 * dn2 * kk)[:, None] * delta1
    tx1 = tl.trans(x1)
    aw2 = tl.load(aw2_ptr + o2)
    as2 = tl.load(as2_ptr + o2)
    if MERGE:  # [x1; d delta1 act'(z1)]^T [beta g_o; delta2] + h1^T dy
        aw2n = (bl * aw2 + _mm(tl.trans(_cat_rows(x1, ddelta1 * sd1, BC, BF)),
                               _cat_rows(beta[:, None] * go, delta2, BC, D), PREC)
                + _mm(tl.trans(h1), dy, PREC))
    else:
        aw2n = (bl * aw2 + _mm(tx1, beta[:, None] * go, PREC) + _mm(tl.trans(ddelta1 * sd1), delta2, PREC)
                + _mm(tl.trans(h1), dy, PREC))
    as2n = gl * aw2 + el * as2 + _mm(tx1, g[:, None] * go, PREC)
    tl.debug_barrier()
    tl.store(aw2_ptr + o2, aw2n)
    tl.store(as2_ptr + o2, as2n)


# ---------------------------------------------------------------------------------------------
# the segment walk of the backward (launch per phase; the CUDA-graph backward's walk)
#
# Of a chunk's five phases only parts of phase 2 and phases 4, 5 read the state adjoint; phase 1,
# the rest of phase 2 and phase 3 (the retrieval backward) need only the chunk-start state, which
# the recompute has just stored for every chunk of the segment. So they run first for all chunks
# of the segment at once (grid ``(NT, BH, nc)``, each chunk with its own scratch slot), and the
# reverse walk over the chunks is left with three launches per chunk, each of grid ``(NT, BH)``.
# So does the part of phase 4's per-head coefficient backward whose cotangents come from the
# retrieval (``SEG_COEFFS_PRE``, grid ``(1, BH, nc)``, after phase 3): the coefficient and clip
# backward are linear in their cotangents, so the walk back-propagates only the rest.
# Per-chunk scratch (leading axis: the chunk's slot in the segment): P, N, XH, DN1, GT, DQ, DK,
# X1, DA1, ZS, US, D2S, HDP (and with FREE DF1, DH1F, DD2P); one slot: GS, DD2, DDL1, HD (written
# and read within one chunk's walk).
# PHASE of _bwd_segment_kernel (the kernel compares literals: Triton reads no plain globals)
SEG_KEYS, SEG_NORMS, SEG_RETRIEVAL, SEG_GATES, SEG_COEFFS, SEG_STATE = 1, 2, 3, 4, 5, 6
# the hoisted coefficient backward (``hoist_coeffs``): its adjoint-free part over the chunks of a
# segment (grid (1, BH, nc), after SEG_RETRIEVAL), then phase 4 with only the rest in the walk
SEG_COEFFS_PRE, SEG_COEFFS_WALK = 7, 8


@triton.jit(do_not_specialize=["c0", "s_walk"])
def _bwd_segment_kernel(q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, go_ptr, dv_ptr, dth_ptr, det_ptr, dal_ptr,
                        w1_ptr, s1_ptr, w2_ptr, s2_ptr, aw1_ptr, as1_ptr, aw2_ptr, as2_ptr,
                        p_ptr, n_ptr, xh_ptr, dn1_ptr, gt_ptr, dqs_ptr, dks_ptr, x1_ptr, da1_ptr,
                        zs_ptr, us_ptr, d2s_ptr, hdp_ptr, df1_ptr, dh1f_ptr, dd2p_ptr, gs_ptr, dd2_ptr, ddl1_ptr,
                        hd_ptr, pm_ptr, q2s_ptr, clv_ptr, BH, T, c0, s_walk, NT, clip,
                        BC: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
                        ACT: tl.constexpr, RES: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr,
                        PHASE: tl.constexpr, FREE: tl.constexpr = False, MERGE: tl.constexpr = False,
                        AHEAD: tl.constexpr = False):
    """One phase of the segment walk for tile ``program_id(0)`` of head ``program_id(1)``: for
    ``PHASE`` ``SEG_KEYS, SEG_NORMS, SEG_RETRIEVAL`` (phases 1, 2 without the adjoint, 3) and
    ``SEG_COEFFS_PRE`` (the adjoint-free part of phase 4's per-head coefficient backward, one
    program per head) of chunk ``c0 + program_id(2)``; for ``SEG_GATES, SEG_COEFFS, SEG_STATE``
    (the adjoint half of phase 2, phases 4, 5) and ``SEG_COEFFS_WALK`` (phase 4 after
    ``SEG_COEFFS_PRE``) of chunk ``c0 + s_walk``. ``w1 ..`` hold the segment's chunk-start states
    (slot stride ``BH D F``); the adjoint ``aw1 ..`` is updated in place by ``SEG_STATE``.
    ``FREE`` (with the hoisted phases): phases 3 and ``SEG_COEFFS_PRE`` also stash the
    adjoint-free terms of phases 4 and 5 (``DF1, DH1F, DD2P`` and the per-head ``dk`` slot), which
    the walk then reads instead of computing them. ``PM``: every chunk's gate-only ``c x c``
    product ``A Dm`` (``_coeff_products_kernel``), which phases 3 and ``SEG_COEFFS_PRE`` read
    instead of computing it. ``MERGE``: phase 5's matmuls merged (:func:`_bwd_state`).
    ``AHEAD`` (with ``FREE``): the two-launch walk, ``SEG_GATES`` then ``SEG_STATE`` per chunk,
    phase 4's tile work done ahead in ``SEG_GATES`` (:func:`_bwd_adjoint_ahead`) and its per-head
    part at the start of ``SEG_STATE``; ``Q2S`` (one ``[BH, BC, D]`` slot per chunk) from
    ``SEG_COEFFS_PRE``."""
    j = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    if PHASE <= 3 or PHASE == 7:  # SEG_KEYS .. SEG_RETRIEVAL, SEG_COEFFS_PRE: over the chunks
        s = tl.program_id(2).to(tl.int64)
    else:
        s = tl.zeros([], dtype=tl.int64) + s_walk
    t0 = (c0 + s) * BC
    tile = BH * NT * BC  # one chunk's slot of a per-tile scratch, per column
    sst = s * BH * D * F
    w1 = w1_ptr + sst
    s1 = s1_ptr + sst
    w2 = w2_ptr + sst
    s2 = s2_ptr + sst
    p = p_ptr + s * tile * D
    n = n_ptr + s * tile * 2
    xh = xh_ptr + s * tile * BC
    dn1 = dn1_ptr + s * tile * BC
    gt = gt_ptr + s * tile * 4
    dqs = dqs_ptr + s * BH * (NT + 1) * BC * D
    dks = dks_ptr + s * BH * (NT + 1) * BC * D
    x1 = x1_ptr + s * tile * BF
    da1 = da1_ptr + s * tile * BF
    zs = zs_ptr + s * tile * BF
    us = us_ptr + s * tile * BF
    d2s = d2s_ptr + s * tile * D
    hdp = hdp_ptr + s * BH * BC
    df1 = df1_ptr + s * tile * BF
    dh1f = dh1f_ptr + s * tile * BF
    dd2p = dd2p_ptr + s * BH * BC * D
    q2s = q2s_ptr + s * BH * BC * D
    clv = clv_ptr + s * BH * 7 * BC
    if PHASE == 1:  # SEG_KEYS
        _bwd_keys(bh, j, k_ptr, w1, w2, p, T, t0, NT, BC, D, F, BF, ACT, PREC)
    elif PHASE == 2:  # SEG_NORMS
        rmask = (t0 + tl.arange(0, BC)) < T
        o1, o2 = _tile_offsets(bh, j, D, F, BF)
        k = _rows(k_ptr, bh, T, t0, BC, D)
        v = _rows(v_ptr, bh, T, t0, BC, D)
        _bwd_stash_norms(bh, j, k, v, tl.load(w1 + o1), tl.load(w2 + o2), p, n, zs, us, d2s, rmask, NT, BC, D, BF,
                         ACT, RES, CLIP, PREC, True)
    elif PHASE == 4:  # SEG_GATES, from the stash: v (passed as k) and the R1 partials are not read
        rmask = (t0 + tl.arange(0, BC)) < T
        o1, o2 = _tile_offsets(bh, j, D, F, BF)
        k = _rows(k_ptr, bh, T, t0, BC, D)
        w1t = tl.load(w1 + o1)
        w2t = tl.load(w2 + o2)
        delta2, _, h1, sd1, _, delta1 = _bwd_fetch(k, k, w1t, w2t, p + bh * NT * BC * D, zs, us, d2s, bh, j,
                                                   rmask, NT, BC, D, BF, ACT, RES, PREC, True)
        ka1, ks1, ha2, hs2 = _bwd_adjoint_gates(bh, j, k, delta2, h1, delta1, w1t, w2t, o1, o2, s1, s2, aw1_ptr,
                                                as1_ptr, aw2_ptr, as2_ptr, gt, gs_ptr, NT, BC, PREC)
        if AHEAD:
            _bwd_adjoint_ahead(bh, j, k, delta2, sd1, ka1, ks1, ha2, hs2, w2t, th_ptr, pm_ptr, clv, df1, ddl1_ptr,
                               dd2_ptr, T, t0, NT, clip, BC, D, BF, CLIP, PREC)
    elif PHASE == 3:  # SEG_RETRIEVAL
        _bwd_retrieval(bh, j, q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, go_ptr, w1, s1, w2, s2,
                       p, n, xh, dn1, gt, dqs, x1, da1, zs, us, d2s, df1, dh1f, T, t0, NT, clip,
                       BC, D, F, BF, ACT, RES, CLIP, PREC, True, FREE, pm_ptr)
    elif PHASE == 7:  # SEG_COEFFS_PRE
        _bwd_coeffs_pre(bh, q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, go_ptr, p, n, xh, dn1, gt, dqs, hdp,
                        dth_ptr, det_ptr, dal_ptr, d2s, dd2p, dks, pm_ptr, T, t0, NT, clip, BC, D, RES, CLIP, PREC,
                        FREE, AHEAD, q2s, zs, us, w2, F, BF, ACT, clv)
    elif PHASE == 5 or PHASE == 8:  # SEG_COEFFS, SEG_COEFFS_WALK
        _bwd_coeffs(bh, j, q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, go_ptr, w1, w2,
                    aw1_ptr, as1_ptr, aw2_ptr, as2_ptr, p, n, xh, dn1, gt, gs_ptr, dqs, da1, ddl1_ptr, dd2_ptr,
                    hd_ptr, hdp, dth_ptr, det_ptr, dal_ptr, zs, us, d2s, df1, T, t0, NT, clip,
                    BC, D, F, BF, ACT, RES, CLIP, PREC, True, PHASE == 8, FREE, pm_ptr, clv)
    else:  # SEG_STATE
        _bwd_state(bh, j, q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, go_ptr, dv_ptr, w1, w2,
                   aw1_ptr, as1_ptr, aw2_ptr, as2_ptr, p, n, xh, dn1, dd2_ptr, hd_ptr, dks, x1, da1, ddl1_ptr,
                   zs, us, d2s, dh1f, dd2p, T, t0, NT, clip, BC, D, F, BF, ACT, RES, CLIP, PREC, True, FREE,
                   MERGE, AHEAD, gt, gs_ptr, hdp, q2s, dth_ptr, det_ptr, dal_ptr, pm_ptr, clv)
