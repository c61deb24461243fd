"""Persistent Triton kernels of the tiled memory update: one launch runs a whole chunk range, the
``n_tiles`` programs of a head synchronised by a per-head barrier in global memory.

Step 4 of the plan in ``docs/kernels.md``. The maths and the per-tile phases are those of
:mod:`titans_memory.ops.triton_tiled_kernels` (whose launch-per-phase kernels are the CI path);
here a program ``(j, hp)`` owns hidden tile ``j`` of the heads ``hp, hp + n_hp, ...`` and walks
their chunks in one launch, waiting on :func:`_head_sync` wherever the launch-per-phase driver
starts a new launch:

- :func:`_fwd_persistent_kernel` (forward, training and inference): the tile's fp32 state
  ``W1[:, j], S1[:, j], W2[j, :], S2[j, :]`` stays in registers across chunks; per chunk one
  barrier (the sum ``y`` of the per-tile partial MLP outputs), two with the update clip (the
  per-token gradient norms). The retrieval partials of chunk ``n`` are summed into the output by
  tile ``n mod n_tiles`` during chunk ``n + 1`` (round robin). Optionally saves the chunk-start
  state every ``save_every`` chunks (the training checkpoints, or every chunk start of a
  segment for the backward's recompute).
- :func:`_bwd_kernel` (backward): ``PHASE = 0`` walks chunks ``c0 + nc - 1 .. c0`` in reverse with
  the five backward phases of a chunk (``_bwd_keys``, ``_bwd_norms``,
  ``_bwd_retrieval``, ``_bwd_coeffs``, ``_bwd_state``) separated by barriers; ``PHASE = 1..5``
  runs that one phase of chunk ``c0`` for the grid ``(n_tiles, BH)`` with no barrier: this is
  the launch-per-phase backward (the same code, which is how CI tests it under the
  interpreter).

Scratch that one tile writes before a barrier and another reads after it is double-buffered by
chunk parity where a fast tile could otherwise overwrite it for the next chunk before a slow one
has read it (the forward's partial sums; the backward's ``P``, ``dq``/``dk`` partials); everything
else is written after the chunk's first barrier, which no tile passes before every tile has
finished the previous chunk. Cross-tile data is read with ``.cg`` loads (L2, not the SM's L1).

Co-residency: a barrier needs every program of a head running at once, so the grid is
``(n_tiles, n_hp)`` with ``n_tiles * n_hp`` at most the number of SMs (the drivers choose
``n_hp``), and each program loops over heads. The interpreter runs programs one after another,
so these kernels run there only with ``n_tiles = 1`` (the drivers refuse more). A barrier gives
up after about ``2**22`` polls, counts the failure in ``err`` and opens the head's later
barriers, rather than hang the GPU; the drivers then raise
:class:`~titans_memory.errors.BarrierTimeout` (their ``check``, on by default).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernels import _act, _act_d, _clip_scale, _coeffs_given, _last_coeffs, _load_chunk, _mm
from .triton_tiled_kernels import (
    _bwd_coeffs,
    _bwd_keys,
    _bwd_norms,
    _bwd_retrieval,
    _bwd_rows,
    _bwd_state,
    _cat_cols,
    _chunk_products,
    _chunk_vectors,
    _partial_retrieval,
    _phase_output,
    _split_cols,
    _sum_tiles,
    _tile_offsets,
)

_MAX_SPIN = tl.constexpr(1 << 22)


@triton.jit
def _head_sync(cnt_ptr, err_ptr, nb, NT):
    """Barrier ``nb + 1`` of the ``NT`` programs of one head (counter ``cnt``, zeroed by the
    host before the launch); returns ``nb + 1``. Every thread's earlier stores are issued before
    the release (``debug_barrier``), and no thread reads before the acquire."""
    nb += 1
    target = nb * NT
    tl.debug_barrier()
    tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    spins = 0
    while (seen < target) & (spins < _MAX_SPIN):
        seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    if seen < target:  # count the failure, and open this head's later barriers at once
        tl.atomic_add(err_ptr, 1)
        tl.atomic_add(cnt_ptr, 1 << 30)
    tl.debug_barrier()
    return nb


@triton.jit
def _store_state(w1_ptr, s1_ptr, w2_ptr, s2_ptr, off, o1, o2, w1, s1, w2, s2):
    """The tile's state into the slot at ``off`` of ``w1 ..`` (offsets ``o1, o2``: :func:`_tile_offsets`)."""
    tl.store(w1_ptr + off + o1, w1)
    tl.store(s1_ptr + off + o1, s1)
    tl.store(w2_ptr + off + o2, w2)
    tl.store(s2_ptr + off + o2, s2)


# Integer arguments are not specialised (no recompilation for a new length, chunk offset or
# head count: Triton would otherwise compile a variant per divisibility-by-16 class).
_FWD_INTS = ["BH", "T", "c0", "c1", "save_every", "n_hp", "NT"]
_BWD_INTS = ["BH", "T", "c0", "nc", "n_chunks", "n_hp", "NT", "p_stride", "qk_stride"]


# ---------------------------------------------------------------------------------------------
# forward
@triton.jit(do_not_specialize=_FWD_INTS)
def _fwd_persistent_kernel(
    q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr,
    w1_ptr, s1_ptr, w2_ptr, s2_ptr,
    fw1_ptr, fs1_ptr, fw2_ptr, fs2_ptr,
    cw1_ptr, cs1_ptr, cw2_ptr, cs2_ptr,
    p_ptr, n_ptr, op_ptr, o_ptr, pm_ptr, cnt_ptr, err_ptr, d2_ptr, the_ptr,
    BH, T, c0, c1, save_every, n_hp, NT, clip,
    BC: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
    ACT: tl.constexpr, RES: tl.constexpr, CLIP: tl.constexpr, OUT: tl.constexpr, SAVE: tl.constexpr,
    PREC: tl.constexpr, SYNC: tl.constexpr = True, STASH: tl.constexpr = False,
    LATE_SAVE: tl.constexpr = False, PREFETCH: tl.constexpr = False, MERGE: tl.constexpr = False,
):
    """Chunks ``c0 .. c1 - 1`` of every head; grid ``(NT, n_hp)``.

    State: read from ``w1, s1, w2, s2`` (``[BH, D, F]`` / ``[BH, F, D]``), the state after chunk
    ``c1 - 1`` written to ``fw1 ..`` (may alias). SAVE: the state at the start of chunk ``n`` goes
    to slot ``(n - c0) / save_every`` of ``cw1 ..`` (slot stride ``BH D F``) when
    ``(n - c0) % save_every == 0``. OUT: the retrieval into ``o`` ``[BH, T, D]``, with the chunks'
    gate-only products ``A Dm`` from ``PM`` (``_coeff_products_kernel``); without OUT (the
    recompute) only the last-row coefficients are needed, from the chunk's gate-only vectors in
    ``PM`` (no ``c x c`` work). Scratch: ``P,
    O`` ``[BH, 2, NT, BC, D]``, ``N`` ``[BH, 2, NT, 2, BC]``; ``cnt`` ``[BH]`` zeros. STASH (for the
    split forward's retrieval, ``triton_retrieval_kernels.py``): tile 0 stores chunk ``n``'s
    ``delta2`` into slot ``n - c0`` of ``d2 [nc, BH, BC, D]`` and, with CLIP, its clipped ``theta``
    into ``the [nc, BH, BC]``. Code variants, measured on the H200 and not faster (``WALK_CODE`` of
    ``triton_tiled.py``; same results): LATE_SAVE stores the chunk-start state after the chunk's
    barriers, PREFETCH loads the next chunk's inputs during this chunk's update, MERGE computes a
    layer's weight and momentum increments in one matmul."""
    j = tl.program_id(0)
    hp = tl.program_id(1)
    rc = tl.arange(0, BC)
    ocd = rc[:, None] * D + tl.arange(0, D)[None, :]
    sstride = BH * D * F
    for bh32 in range(hp, BH, n_hp):
        bh = tl.zeros([], dtype=tl.int64) + bh32
        o1, o2 = _tile_offsets(bh, j, D, F, BF)
        w1 = tl.load(w1_ptr + o1)
        s1 = tl.load(s1_ptr + o1)
        w2 = tl.load(w2_ptr + o2)
        s2 = tl.load(s2_ptr + o2)
        cnt = cnt_ptr + bh
        nb = 0
        if PREFETCH:  # chunk c0's inputs; later chunks' are loaded one chunk ahead (below)
            _, nk, nv, nth, net, nal, _, _, _, _ = _load_chunk(
                k_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, bh, T, c0 * BC, BC, D)
        for n in range(c0, c1):
            t0 = n * BC
            slot = n % 2
            if SAVE:
                if not LATE_SAVE:
                    if (n - c0) % save_every == 0:
                        _store_state(cw1_ptr, cs1_ptr, cw2_ptr, cs2_ptr, ((n - c0) // save_every) * sstride, o1, o2,
                                     w1, s1, w2, s2)
            if PREFETCH:
                valid = tl.minimum(T - t0, BC)
                rmask = rc < valid
                k, v, th, et, al = nk, nv, nth, net, nal
                if OUT:
                    q = tl.load(q_ptr + bh * T * D + (t0 + rc)[:, None] * D + tl.arange(0, D)[None, :],
                                mask=rmask[:, None], other=0.0)
                else:
                    q = k
            else:
                q, k, v, th, et, al, valid, rmask, xoff, goff = _load_chunk(
                    q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, bh, T, t0, BC, D)
            z1 = _mm(k, w1, PREC)
            h1 = _act(z1, ACT)
            p_head = p_ptr + (bh * 2 + slot) * NT * BC * D
            tl.store(p_head + j * BC * D + ocd, _mm(h1, w2, PREC))
            if SYNC:  # R1: y = sum_j h1_j W2_j
                nb = _head_sync(cnt, err_ptr, nb, NT)
            y = _sum_tiles(p_head, NT, BC * D, ocd)
            if RES:
                y += k
            delta2 = tl.where(rmask[:, None], 2.0 * (y - v), 0.0)
            delta1 = _mm(delta2, tl.trans(w2), PREC) * _act_d(z1, ACT)
            if CLIP:  # R2: |G_t|^2 = |k_t|^2 sum_j |delta1_j,t|^2 + |delta2_t|^2 sum_j |h1_j,t|^2
                n_head = n_ptr + (bh * 2 + slot) * NT * 2 * BC
                tl.store(n_head + j * 2 * BC + rc, tl.sum(delta1 * delta1, axis=1))
                tl.store(n_head + j * 2 * BC + BC + rc, tl.sum(h1 * h1, axis=1))
                if SYNC:
                    nb = _head_sync(cnt, err_ptr, nb, NT)
                b1 = _sum_tiles(n_head, NT, 2 * BC, rc)
                a2 = _sum_tiles(n_head + BC, NT, 2 * BC, rc)
                sc, _, _ = _clip_scale(tl.sum(k * k, axis=1) * b1 + tl.sum(delta2 * delta2, axis=1) * a2, clip)
                th = th * sc
            if SAVE:
                if LATE_SAVE:  # after the chunk's barriers: no barrier's release waits on these stores
                    if (n - c0) % save_every == 0:
                        _store_state(cw1_ptr, cs1_ptr, cw2_ptr, cs2_ptr, ((n - c0) // save_every) * sstride, o1, o2,
                                     w1, s1, w2, s2)
            if STASH:
                if j == 0:
                    sl = (n - c0) * BH + bh
                    tl.store(d2_ptr + sl * BC * D + ocd, delta2)
                    if CLIP:
                        tl.store(the_ptr + sl * BC + rc, th)
            if PREFETCH:  # the next chunk's inputs, in flight during this chunk's update
                _, nk, nv, nth, net, nal, _, _, _, _ = _load_chunk(
                    k_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, bh, T, t0 + BC, BC, D)
            if not OUT:  # the recompute: the state update reads only the last-row coefficients
                pL, dL, v_aL, v_beta, v_g, v_E, bl, gl, el = _chunk_vectors(pm_ptr, bh, T, t0, BC)
                cl, ml = _last_coeffs(th, valid, pL, dL, BC)
            else:  # the tile's partial retrieval (dual form through its hidden units)
                A, Dm, Pm, C, beta, E, g, cl, ml, bl, gl, el = _coeffs_given(
                    th, et, al, valid, _chunk_products(pm_ptr, bh, T, t0, BC), BC)
                o_j = _partial_retrieval(q, k, w1, s1, w2, s2, h1, delta1, delta2, C, beta, g, ACT, PREC)
                tl.store(op_ptr + (bh * 2 + slot) * NT * BC * D + j * BC * D + ocd, o_j)
            tk = tl.trans(k)
            th1 = tl.trans(h1)
            if MERGE:  # one matmul per layer for the weight and momentum increments (N concatenated)
                u1w, u1s = _split_cols(_mm(tk, _cat_cols(cl[:, None] * delta1, ml[:, None] * delta1, BC, BF), PREC),
                                       D, BF)
                u2w, u2s = _split_cols(_mm(th1, _cat_cols(cl[:, None] * delta2, ml[:, None] * delta2, BC, D), PREC),
                                       BF, D)
                w1n = bl * w1 + gl * s1 - u1w
                s1 = el * s1 - u1s
                w2n = bl * w2 + gl * s2 - u2w
                s2 = el * s2 - u2s
            else:
                w1n = bl * w1 + gl * s1 - _mm(tk, cl[:, None] * delta1, PREC)
                s1 = el * s1 - _mm(tk, ml[:, None] * delta1, PREC)
                w2n = bl * w2 + gl * s2 - _mm(th1, cl[:, None] * delta2, PREC)
                s2 = el * s2 - _mm(th1, ml[:, None] * delta2, PREC)
            w1 = w1n
            w2 = w2n
            if OUT:  # reduction 3 of the previous chunk (all its partials precede this chunk's R1)
                if n > c0:
                    if j == (n - 1) % NT:
                        _phase_output(op_ptr + (bh * 2 + 1 - slot) * NT * BC * D, q_ptr, o_ptr, bh, T, t0 - BC,
                                      NT, BC, D, RES)
        if OUT:
            if SYNC:
                nb = _head_sync(cnt, err_ptr, nb, NT)
            if j == (c1 - 1) % NT:
                _phase_output(op_ptr + (bh * 2 + (c1 - 1) % 2) * NT * BC * D, q_ptr, o_ptr, bh, T,
                              (c1 - 1) * BC, NT, BC, D, RES)
        tl.store(fw1_ptr + o1, w1)
        tl.store(fs1_ptr + o1, s1)
        tl.store(fw2_ptr + o2, w2)
        tl.store(fs2_ptr + o2, s2)


# ---------------------------------------------------------------------------------------------
# backward
@triton.jit
def _bwd_chunk(bh, j, n, nb,
               q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, go_ptr, dq_ptr, dk_ptr, dv_ptr,
               dth_ptr, det_ptr, dal_ptr, w1_ptr, s1_ptr, w2_ptr, s2_ptr, aw1_ptr, as1_ptr, aw2_ptr, as2_ptr,
               p_ptr, dqs_ptr, dks_ptr, n_ptr, xh_ptr, dn1_ptr, gt_ptr, gs_ptr, dd2_ptr, hd_ptr,
               x1_ptr, da1_ptr, ddl1_ptr, zs_ptr, us_ptr, d2s_ptr, cnt_ptr, err_ptr,
               T, n_chunks, NT, clip, p_stride, qk_stride,
               BC: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
               ACT: tl.constexpr, RES: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr,
               MASK: tl.constexpr, SYNC: tl.constexpr, STASH: tl.constexpr):
    """The backward phases of chunk ``n`` selected by the bit mask ``MASK`` (1 keys, 2 norms and
    adjoint gate terms, 4 retrieval, 8 coefficients, 16 state), with a head barrier after each
    that another tile's later phase depends on when ``SYNC`` (3 per chunk, 4 with the clip). ``w1 ..``
    point at the chunk-start state; the adjoint ``aw1 ..`` is updated in place."""
    t0 = n * BC
    slot = n % 2
    p_s = p_ptr + slot * p_stride
    dqs = dqs_ptr + slot * qk_stride
    dks = dks_ptr + slot * qk_stride
    if MASK & 1:
        _bwd_keys(bh, j, k_ptr, w1_ptr, w2_ptr, p_s, T, t0, NT, BC, D, F, BF, ACT, PREC)
    if SYNC:
        nb = _head_sync(cnt_ptr + bh, err_ptr, nb, NT)
    if MASK & 2:
        _bwd_norms(bh, j, k_ptr, v_ptr, w1_ptr, s1_ptr, w2_ptr, s2_ptr, aw1_ptr, as1_ptr, aw2_ptr, as2_ptr,
                   p_s, n_ptr, gt_ptr, gs_ptr, zs_ptr, us_ptr, d2s_ptr, T, t0, NT, BC, D, F, BF, ACT, RES,
                   CLIP, PREC, STASH)
    if CLIP:  # R2 (without the clip, phases 2 and 3 are both tile-local: no barrier between them)
        if SYNC:
            nb = _head_sync(cnt_ptr + bh, err_ptr, nb, NT)
    elif STASH:  # the stash is written and read by different threads of this program
        tl.debug_barrier()
    # the phase functions' FREE / HOISTED scratch (DF1, DH1F, HDP, DD2P) is segment-walk only:
    # other pointers fill those arguments here, unused
    if MASK & 4:
        if n + 1 < n_chunks:  # R7 / R8 of the chunk after this one (its partials are complete)
            if j == (n + 1) % NT:
                other = (1 - slot) * qk_stride + bh * (NT + 1) * BC * D
                _bwd_rows(dqs_ptr + other, dks_ptr + other, dq_ptr, dk_ptr, bh, T, t0 + BC, NT, BC, D)
        _bwd_retrieval(bh, j, q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, go_ptr,
                       w1_ptr, s1_ptr, w2_ptr, s2_ptr,
                       p_s, n_ptr, xh_ptr, dn1_ptr, gt_ptr, dqs, x1_ptr, da1_ptr, zs_ptr, us_ptr, d2s_ptr,
                       x1_ptr, x1_ptr, T, t0, NT, clip, BC, D, F, BF, ACT, RES, CLIP, PREC, STASH)
    if SYNC:
        nb = _head_sync(cnt_ptr + bh, err_ptr, nb, NT)
    if MASK & 8:
        _bwd_coeffs(bh, j, q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, go_ptr,
                    w1_ptr, w2_ptr, aw1_ptr, as1_ptr, aw2_ptr, as2_ptr,
                    p_s, n_ptr, xh_ptr, dn1_ptr, gt_ptr, gs_ptr, dqs, da1_ptr, ddl1_ptr, dd2_ptr, hd_ptr, hd_ptr,
                    dth_ptr, det_ptr, dal_ptr, zs_ptr, us_ptr, d2s_ptr, da1_ptr, T, t0, NT, clip, BC, D, F, BF,
                    ACT, RES, CLIP, PREC, STASH)
    if SYNC:
        nb = _head_sync(cnt_ptr + bh, err_ptr, nb, NT)
    if MASK & 16:
        _bwd_state(bh, j, q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, go_ptr, dv_ptr,
                   w1_ptr, w2_ptr, aw1_ptr, as1_ptr, aw2_ptr, as2_ptr,
                   p_s, n_ptr, xh_ptr, dn1_ptr, dd2_ptr, hd_ptr, dks, x1_ptr, da1_ptr, ddl1_ptr,
                   zs_ptr, us_ptr, d2s_ptr, x1_ptr, dd2_ptr, T, t0, NT, clip, BC, D, F, BF, ACT, RES, CLIP, PREC,
                   STASH)
    return nb


@triton.jit(do_not_specialize=_BWD_INTS)
def _bwd_kernel(q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, go_ptr, dq_ptr, dk_ptr, dv_ptr,
                dth_ptr, det_ptr, dal_ptr, w1_ptr, s1_ptr, w2_ptr, s2_ptr, aw1_ptr, as1_ptr, aw2_ptr, as2_ptr,
                p_ptr, dqs_ptr, dks_ptr, n_ptr, xh_ptr, dn1_ptr, gt_ptr, gs_ptr, dd2_ptr, hd_ptr,
                x1_ptr, da1_ptr, ddl1_ptr, zs_ptr, us_ptr, d2s_ptr, cnt_ptr, err_ptr,
                BH, T, c0, nc, n_chunks, n_hp, NT, clip, p_stride, qk_stride,
                BC: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
                ACT: tl.constexpr, RES: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr,
                PHASE: tl.constexpr, STASH: tl.constexpr = False):
    """``PHASE = 0``: persistent, grid ``(NT, n_hp)``, chunks ``c0 + nc - 1 .. c0`` in reverse, the
    start state of chunk ``n`` in slot ``n - c0`` of ``w1 ..`` (slot stride ``BH D F``).
    ``PHASE = 1..5``: grid ``(NT, BH)``, that phase of chunk ``c0`` alone (state in slot 0)."""
    j = tl.program_id(0)
    if PHASE == 0:
        hp = tl.program_id(1)
        sstride = BH * D * F
        for bh32 in range(hp, BH, n_hp):
            bh = tl.zeros([], dtype=tl.int64) + bh32
            nb = 0
            for i in range(nc):
                n = c0 + nc - 1 - i
                off = (n - c0) * sstride
                nb = _bwd_chunk(bh, j, n, nb, q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, go_ptr,
                                dq_ptr, dk_ptr, dv_ptr, dth_ptr, det_ptr, dal_ptr,
                                w1_ptr + off, s1_ptr + off, w2_ptr + off, s2_ptr + off,
                                aw1_ptr, as1_ptr, aw2_ptr, as2_ptr, p_ptr, dqs_ptr, dks_ptr, n_ptr, xh_ptr,
                                dn1_ptr, gt_ptr, gs_ptr, dd2_ptr, hd_ptr, x1_ptr, da1_ptr, ddl1_ptr,
                                zs_ptr, us_ptr, d2s_ptr, cnt_ptr, err_ptr, T, n_chunks, NT, clip, p_stride,
                                qk_stride, BC, D, F, BF, ACT, RES, CLIP, PREC, 31, True, STASH)
    else:
        bh = tl.program_id(1).to(tl.int64)
        _bwd_chunk(bh, j, c0, 0, q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, go_ptr,
                   dq_ptr, dk_ptr, dv_ptr, dth_ptr, det_ptr, dal_ptr, w1_ptr, s1_ptr, w2_ptr, s2_ptr,
                   aw1_ptr, as1_ptr, aw2_ptr, as2_ptr, p_ptr, dqs_ptr, dks_ptr, n_ptr, xh_ptr,
                   dn1_ptr, gt_ptr, gs_ptr, dd2_ptr, hd_ptr, x1_ptr, da1_ptr, ddl1_ptr,
                   zs_ptr, us_ptr, d2s_ptr, cnt_ptr, err_ptr, T, n_chunks, NT, clip, p_stride, qk_stride,
                   BC, D, F, BF, ACT, RES, CLIP, PREC, 1 << (PHASE - 1), False, STASH)
