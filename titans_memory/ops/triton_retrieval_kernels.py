"""The forward's retrieval off the serial chunk chain: every chunk of a segment at once.

The retrieval of chunk ``n`` (the output ``o_t = M_t(q_t)`` of its tokens, in the dual form of
the chunk's update) feeds nothing later in the chain: the next chunk starts from the updated
state only. So the split forward (``_forward_segments`` of :mod:`titans_memory.ops.triton_tiled`)
walks a segment's chunks with the state update alone (the persistent walk with ``OUT=False``,
which also stashes what the retrieval needs and is tiling-independent: every chunk-start state,
the chunk's ``delta2 = 2 (y - v)`` and, with the update clip, its clipped ``theta``), then runs

- :func:`_segment_retrieval_kernel`: grid ``(NT, nc, BH)``, hidden tile ``j`` of chunk
  ``c0 + i`` of head ``bh``, its partial retrieval ``o_j`` from the stash (no cross-tile sum:
  ``delta2`` and the clip scale came from the walk), the same expressions as the persistent
  forward's retrieval;
- :func:`_segment_output_kernel`: grid ``(nc, BH)``, reduction 3 (the tiles' partials summed in
  tile order, plus ``q`` for the residual memory) into the output.

Both are checked under ``TRITON_INTERPRET=1`` in CI (``tests/test_triton_tiled.py``) with 1-4
retrieval tiles, whatever the walk's tiling.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernels import _act, _act_d, _coeffs_given, _mm
from .triton_tiled_kernels import _chunk_products, _partial_retrieval, _phase_output, _rows, _tile_offsets


@triton.jit(do_not_specialize=["BH", "T", "c0"])
def _segment_retrieval_kernel(q_ptr, k_ptr, th_ptr, et_ptr, al_ptr, w1_ptr, s1_ptr, w2_ptr, s2_ptr,
                              d2_ptr, the_ptr, pm_ptr, op_ptr, BH, T, c0,
                              BC: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
                              ACT: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr):
    """Partial retrieval of tile ``j = program_id(0)`` (``BF`` of the ``F`` hidden units) of chunk
    ``c0 + i`` (``i = program_id(1)``) of head ``bh = program_id(2)`` into ``op [nc, BH, NT, BC, D]``.

    Stash of the walk, slot ``i``: the chunk-start state ``w1, s1 [nc, BH, D, F]``, ``w2, s2
    [nc, BH, F, D]``; ``delta2 [nc, BH, BC, D]`` (zero past ``T``); with ``CLIP`` the clipped
    ``theta [nc, BH, BC]`` (else ``theta`` comes from ``th``). ``pm``: the chunks' ``A Dm``."""
    j = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    bh = tl.program_id(2).to(tl.int64)
    NT = tl.num_programs(0)
    rc = tl.arange(0, BC)
    rd = tl.arange(0, D)
    t0 = (c0 + i) * BC
    valid = tl.minimum(T - t0, BC)
    rmask = rc < valid
    goff = bh * T + t0 + rc
    q = _rows(q_ptr, bh, T, t0, BC, D)
    k = _rows(k_ptr, bh, T, t0, BC, D)
    et = tl.load(et_ptr + goff, mask=rmask, other=1.0)
    al = tl.load(al_ptr + goff, mask=rmask, other=0.0)
    slot = i * BH + bh
    if CLIP:
        th = tl.load(the_ptr + slot * BC + rc)
    else:
        th = tl.load(th_ptr + goff, mask=rmask, other=0.0)
    ocd = rc[:, None] * D + rd[None, :]
    delta2 = tl.load(d2_ptr + slot * BC * D + ocd)
    o1, o2 = _tile_offsets(bh, j, D, F, BF)
    sst = i * BH * D * F
    w1 = tl.load(w1_ptr + sst + o1)
    s1 = tl.load(s1_ptr + sst + o1)
    w2 = tl.load(w2_ptr + sst + o2)
    s2 = tl.load(s2_ptr + sst + o2)
    z1 = _mm(k, w1, PREC)
    h1 = _act(z1, ACT)
    delta1 = _mm(delta2, tl.trans(w2), PREC) * _act_d(z1, ACT)
    A, Dm, Pm, C, beta, E, g, cl, ml, bl, gl, el = _coeffs_given(
        th, et, al, valid, _chunk_products(pm_ptr, bh, T, t0, BC), BC)
    o_j = _partial_retrieval(q, k, w1, s1, w2, s2, h1, delta1, delta2, C, beta, g, ACT, PREC)
    tl.store(op_ptr + (slot * NT + j) * BC * D + ocd, o_j)


@triton.jit(do_not_specialize=["BH", "T", "c0", "NT"])
def _segment_output_kernel(op_ptr, q_ptr, o_ptr, BH, T, c0, NT, BC: tl.constexpr, D: tl.constexpr,
                           RES: tl.constexpr):
    """Reduction 3 of chunk ``c0 + program_id(0)`` of head ``program_id(1)``: the ``NT`` partials
    of ``op [nc, BH, NT, BC, D]`` summed in tile order (plus ``q`` if ``RES``) into ``o [BH, T, D]``."""
    i = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    _phase_output(op_ptr + (i * BH + bh) * NT * BC * D, q_ptr, o_ptr, bh, T, (c0 + i) * BC, NT, BC, D, RES)
