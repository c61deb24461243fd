"""Triton kernels of the chunked neural-memory update (depth-1 and depth-2 per-head MLP memory).

Import this module only through :mod:`titans_memory.ops.fused` (it needs Triton). The kernels are
defined at import time; under ``TRITON_INTERPRET=1`` (set before the import) they run on the CPU
through Triton's interpreter, which is how CI tests them.

One program handles one (batch, head) pair and walks the chunks of a range in order (forward) or
in reverse (backward), so there is no launch per chunk. The fast-weight state of the pair
(``W1, S1, W2, S2`` in fp32, packed row-major in one buffer) lives in global memory (it is
L2-resident: 256 KB per head at d=64, E=4) and is streamed through the chip in tiles of
``BF`` hidden units; everything per chunk (keys, gradient factors, the ``c x c`` decay/mixing
coefficients, the dual-form retrieval) stays in registers/shared memory.

Maths: see :mod:`titans_memory.ops.chunked` (forward) and :mod:`titans_memory.ops.fused`
(backward derivation). Per chunk, with ``h0 = k``, ``z1 = k W1``, ``h1 = act(z1)``,
``delta2 = 2 (h1 W2 [+ k] - v)``, ``delta1 = (delta2 W2^T) * act'(z1)``:

    a1 = beta * q W1 + g * q S1 - ((q k^T) * C) delta1,      x1 = act(a1)
    o  = beta * x1 W2 + g * x1 S2 - ((x1 h1^T) * C) delta2  [+ q]
    W1' = bl W1 + gl S1 - k^T (cl * delta1),                 S1' = el S1 - k^T (ml * delta1)
    W2' = bl W2 + gl S2 - h1^T (cl * delta2),                S2' = el S2 - h1^T (ml * delta2)

(``cl = C[last, :]``, ``ml = theta * D[last, :]``, ``bl, gl, el`` = ``beta, g, E`` at the chunk's
last valid token; a last partial chunk is masked, never padded with "neutral" gates.)

Matmul precision (``PREC``): ``"ieee"`` (fp32 FMA), ``"tf32"`` (tensor cores, the default) or
``"bf16"`` (operands rounded to bf16, fp32 accumulation). The ``c x c`` coefficient products are
always fp32. State, gates and accumulation are fp32 throughout. ``"tf32"`` operands are rounded to
the nearest tf32 value before the product (:func:`_round_tf32`): Hopper's tensor cores read fp32
operands from shared memory as tf32 by dropping the low 13 mantissa bits, and that truncation
biases every product towards zero, so the state's error grew linearly along the walk (at W1, 8k:
2.2e-2 relative to fp64 truncated, 6e-4 rounded; ``benchmarks/kernels_persistent.py --diag-tf32``,
RESULTS.md).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton's interpreter multiplies bf16 operands as raw integers and truncates fp32 -> bf16; emulate
# a bf16 matmul there by rounding the fp32 operands to bf16 (round to nearest even, as the GPU's
# conversion does) and multiplying in fp32: the same products a GPU forms.
_EMU_BF16 = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
# tf32 operands are rounded on the GPU only: the interpreter multiplies fp32 operands in fp32, so
# it has no truncation to correct. Diagnostics only: TITANS_TF32_TRUNCATE=1 (read at import) leaves
# them unrounded on the GPU, to measure what the rounding changes (kernels_persistent.py --diag-tf32).
_TF32_ROUND = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1"
                           and os.environ.get("TITANS_TF32_TRUNCATE", "0") != "1")
_TINY = tl.constexpr(1e-20)
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT2PI = tl.constexpr(0.3989422804014327)


# ---------------------------------------------------------------------------------------------
# small helpers
@triton.jit
def _round_bf16(x):
    """fp32 -> nearest bf16 value (ties to even), kept in fp32 (finite inputs)."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + (((b >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _round_tf32(x):
    """fp32 -> the nearest tf32 value (10 mantissa bits, ties away from zero, as ``cvt.rna.tf32.f32``),
    kept in fp32 (finite inputs). Plain integer operations, so the interpreter runs it too."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x1000) & 0xFFFFE000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """``a @ b`` with fp32 accumulation. ``PREC``: ``"ieee"``, ``"tf32"`` (operands rounded to tf32 on
    the GPU), ``"tf32-trunc"`` (internal: tf32 as the tensor cores read fp32, truncated; what the
    backward kernels take for ``"tf32"``, ``fused.backward_prec``) or ``"bf16"``."""
    if PREC == "tf32" and _TF32_ROUND:
        r = tl.dot(_round_tf32(a), _round_tf32(b), input_precision="tf32")
    elif PREC == "tf32-trunc":
        r = tl.dot(a, b, input_precision="tf32")
    elif PREC == "bf16":
        if _EMU_BF16:
            r = tl.dot(_round_bf16(a), _round_bf16(b), input_precision="ieee")
        else:
            r = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        r = tl.dot(a, b, input_precision=PREC)
    return r


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == "silu":
        r = z * tl.sigmoid(z)
    elif ACT == "relu":
        r = tl.maximum(z, 0.0)
    elif ACT == "gelu":
        r = 0.5 * z * (1.0 + tl.math.erf(z * _INV_SQRT2))
    else:
        r = z
    return r


@triton.jit
def _act_d(z, ACT: tl.constexpr):
    if ACT == "silu":
        s = tl.sigmoid(z)
        r = s * (1.0 + z * (1.0 - s))
    elif ACT == "relu":
        r = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == "gelu":
        r = 0.5 * (1.0 + tl.math.erf(z * _INV_SQRT2)) + z * _INV_SQRT2PI * tl.exp(-0.5 * z * z)
    else:
        r = z * 0.0 + 1.0
    return r


@triton.jit
def _act_dd(z, ACT: tl.constexpr):
    if ACT == "silu":
        s = tl.sigmoid(z)
        r = s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    elif ACT == "gelu":
        r = _INV_SQRT2PI * tl.exp(-0.5 * z * z) * (2.0 - z * z)
    else:
        r = z * 0.0
    return r


@triton.jit
def _copy(src, dst, N: tl.constexpr, BLOCK: tl.constexpr):
    for i in range(0, N, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        m = offs < N
        tl.store(dst + offs, tl.load(src + offs, mask=m), mask=m)


@triton.jit
def _decays(th, et, al, valid, BC: tl.constexpr):
    """What both coefficient forms share: the decay matrices ``A, Dm`` (lower triangular), the
    per-token ``beta, E, g``, the masked step ``thm`` and the last-row coefficients ``ml, bl, gl,
    el`` (rows >= valid are padding)."""
    rows = tl.arange(0, BC)
    inb = rows < valid
    lk = tl.where(inb, tl.log(tl.maximum(1.0 - al, _TINY)), 0.0)
    le = tl.where(inb, tl.log(tl.maximum(et, _TINY)), 0.0)
    thm = tl.where(inb, th, 0.0)
    tri = rows[:, None] >= rows[None, :]
    ck = tl.sum(tl.where(tri, lk[None, :], 0.0), axis=1)
    ce = tl.sum(tl.where(tri, le[None, :], 0.0), axis=1)
    A = tl.where(tri, tl.exp(tl.where(tri, ck[:, None] - ck[None, :], 0.0)), 0.0)
    Dm = tl.where(tri, tl.exp(tl.where(tri, ce[:, None] - ce[None, :], 0.0)), 0.0)
    beta = tl.exp(ck)
    E = tl.exp(ce)
    g = tl.sum(A * E[None, :], axis=1)
    last = rows == (valid - 1)
    ml = thm * tl.sum(tl.where(last[:, None], Dm, 0.0), axis=0)
    bl = tl.sum(tl.where(last, beta, 0.0), axis=0)
    gl = tl.sum(tl.where(last, g, 0.0), axis=0)
    el = tl.sum(tl.where(last, E, 0.0), axis=0)
    return A, Dm, beta, E, g, thm, last, ml, bl, gl, el


@triton.jit
def _coeffs(th, et, al, valid, BC: tl.constexpr):
    """Decay/mixing coefficients of one chunk (rows >= valid are padding)."""
    A, Dm, beta, E, g, thm, last, ml, bl, gl, el = _decays(th, et, al, valid, BC)
    Pm = tl.dot(A, Dm, input_precision="ieee")
    C = Pm * thm[None, :]
    cl = tl.sum(tl.where(last[:, None], C, 0.0), axis=0)
    return A, Dm, Pm, C, beta, E, g, cl, ml, bl, gl, el


@triton.jit
def _coeffs_given(th, et, al, valid, Pm, BC: tl.constexpr):
    """:func:`_coeffs` with the gate-only product ``Pm = A Dm`` given (computed for every chunk
    at once, off the serial path, by ``_coeff_products_kernel`` of the tiled kernels)."""
    A, Dm, beta, E, g, thm, last, ml, bl, gl, el = _decays(th, et, al, valid, BC)
    C = Pm * thm[None, :]
    cl = tl.sum(tl.where(last[:, None], C, 0.0), axis=0)
    return A, Dm, Pm, C, beta, E, g, cl, ml, bl, gl, el


@triton.jit
def _first_order_combine(a1, b1, a2, b2):
    """Combine of a scan for ``y_i = a_i y_{i-1} + b_i``: ``(a, b)`` pairs compose as affine maps."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _last_row_vectors(et, et_next, al, valid, BC: tl.constexpr):
    """The gate-only vectors of a chunk that the serial chunk loops need, computed once per chunk
    and head off the serial path (``_coeff_products_kernel`` of the tiled kernels): ``(pL, dL,
    aL, beta, g, E, bl, gl, el)``, with ``pL, dL, aL`` the last valid rows of ``Pm = A Dm``,
    ``Dm`` and ``A`` (as :func:`_decays` defines them). The last-row coefficients are then ``cl =
    pL theta``, ``ml = dL theta`` (:func:`_last_coeffs`) for any (clipped) step ``theta``. No ``c
    x c`` work: cumulative sums, exponentials and two first-order scans, ``g_i = (1 - alpha_i)
    g_{i-1} + E_i`` and ``pL_j = aL_j + eta_{j+1} pL_{j+1}``; ``et_next`` is ``eta`` one token on
    (1 past the chunk's valid rows)."""
    rows = tl.arange(0, BC)
    inb = rows < valid
    last = rows == (valid - 1)
    ka = tl.where(inb, tl.maximum(1.0 - al, _TINY), 1.0)
    ea = tl.where(inb, tl.maximum(et, _TINY), 1.0)
    ck = tl.cumsum(tl.log(ka), axis=0)
    ce = tl.cumsum(tl.log(ea), axis=0)
    beta = tl.exp(ck)
    E = tl.exp(ce)
    upto = rows <= (valid - 1)
    aL = tl.where(upto, tl.exp(tl.sum(tl.where(last, ck, 0.0), axis=0) - ck), 0.0)
    dL = tl.where(upto, tl.exp(tl.sum(tl.where(last, ce, 0.0), axis=0) - ce), 0.0)
    _, g = tl.associative_scan((ka, E), 0, _first_order_combine)
    en = tl.where(rows + 1 < valid, tl.maximum(et_next, _TINY), 1.0)
    _, pL = tl.associative_scan((en, aL), 0, _first_order_combine, reverse=True)
    bl = tl.sum(tl.where(last, beta, 0.0), axis=0)
    gl = tl.sum(tl.where(last, g, 0.0), axis=0)
    el = tl.sum(tl.where(last, E, 0.0), axis=0)
    return pL, dL, aL, beta, g, E, bl, gl, el


@triton.jit
def _last_coeffs(th, valid, pL, dL, BC: tl.constexpr):
    """The last-row coefficients ``(cl, ml)`` of a chunk from its step ``theta`` (rows >= valid
    are padding) and its :func:`_last_row_vectors` ``pL, dL``: no ``c x c`` work."""
    thm = tl.where(tl.arange(0, BC) < valid, th, 0.0)
    return pL * thm, dL * thm


@triton.jit
def _decay_apply(et, p, inb):
    """``Dm p`` without the ``c x c`` matrix: ``(Dm p)_i = p_i + eta_i (Dm p)_{i-1}`` (``Dm[i, j]
    = prod_{j < t <= i} eta_t``; padding rows carry a factor of 1, as in :func:`_decays`), one
    associative scan."""
    a = tl.where(inb, tl.maximum(et, _TINY), 1.0)
    _, out = tl.associative_scan((a, p), 0, _first_order_combine)
    return out


@triton.jit
def _coeffs_bwd(dC, dbeta, dg, dcl, dml, dbl, dgl, d_el, th, et, al, valid, A, Dm, Pm, beta, E, BC: tl.constexpr):
    """Gradients of the gates from the gradients of the chunk coefficients.

    Through ``Pm = A Dm`` the cotangents are ``dA = dP Dm^T`` and ``dDm = A^T dP`` (``dP = dC *
    theta``), but only the row and column sums of ``dA * A`` and ``dDm * Dm`` are needed, and
    three of those four need no matmul: ``rowsum(dP Dm^T * A) = rowsum(dP * Pm)``,
    ``colsum(A^T dP * Dm) = colsum(dP * Pm)``, and ``colsum(dP Dm^T * A) = rowsum(A^T dP * Dm)``
    (both ``sum_{i,j} A[i, l] dP[i, j] Dm[l, j]``). So one ``c x c`` matmul remains, not two."""
    rows = tl.arange(0, BC)
    inb = rows < valid
    last = rows == (valid - 1)
    thm = tl.where(inb, th, 0.0)
    dC = dC + tl.where(last[:, None], dcl[None, :], 0.0)
    dbeta = dbeta + tl.where(last, dbl, 0.0)
    dg = dg + tl.where(last, dgl, 0.0)
    dE = tl.where(last, d_el, 0.0)
    dlast = tl.sum(tl.where(last[:, None], Dm, 0.0), axis=0)
    dth = tl.sum(dC * Pm, axis=0) + dml * dlast
    dP = dC * thm[None, :]
    Q = dP * Pm
    w = tl.sum(tl.dot(dP, tl.trans(Dm), input_precision="ieee") * A, axis=0)
    G = (dg[:, None] * E[None, :]) * A  # the rest of dA * A
    R = tl.where(last[:, None], (dml * thm)[None, :], 0.0) * Dm  # the rest of dDm * Dm
    dE = dE + tl.sum(A * dg[:, None], axis=0)
    dck = dbeta * beta + tl.sum(Q, axis=1) + tl.sum(G, axis=1) - w - tl.sum(G, axis=0)
    dce = dE * E + w + tl.sum(R, axis=1) - tl.sum(Q, axis=0) - tl.sum(R, axis=0)
    det, dal = _gates_from_log_grads(dck, dce, et, al, inb, BC)
    return dth, det, dal


@triton.jit
def _coeffs_bwd_last(dcl, dml, dbl, dgl, d_el, th, et, al, valid, aL, dL, pL, beta, E, BC: tl.constexpr):
    """:func:`_coeffs_bwd` when only the last-row coefficients have cotangents (``dC, dbeta, dg``
    zero), from the chunk's :func:`_last_row_vectors` and without any ``c x c`` work: ``dC`` is
    then one row (``dcl``), so ``dA`` is one row and ``dDm`` a rank-one term plus a row, and every
    row and column sum they need reduces to ``Dm p`` (``p = dcl theta``, :func:`_decay_apply`) and
    the given rows (``sum_i aL_i Dm[i, j] = pL_j``). The backward is linear in the cotangents, so
    this part and the rest (``_coeffs_bwd`` with ``dcl .. d_el`` zero) add up to the whole."""
    rows = tl.arange(0, BC)
    inb = rows < valid
    last = rows == (valid - 1)
    thm = tl.where(inb, th, 0.0)
    dth = dcl * pL + dml * dL
    p = dcl * thm  # row L of dP
    Dp = _decay_apply(et, p, inb)
    dAAL = (Dp + dgl * E) * aL  # row L of dA * A
    dck = tl.where(last, dbl * beta + tl.sum(dAAL, axis=0), 0.0) - dAAL
    # row and column sums of dDm * Dm, dDm = [row L: dml theta] + aL p^T
    rsum = tl.where(last, tl.sum(dml * thm * dL, axis=0), 0.0) + aL * Dp
    csum = dml * thm * dL + p * pL
    dE = tl.where(last, d_el, 0.0) + dgl * aL
    dce = dE * E + rsum - csum
    det, dal = _gates_from_log_grads(dck, dce, et, al, inb, BC)
    return dth, det, dal


@triton.jit
def _gates_from_log_grads(dck, dce, et, al, inb, BC: tl.constexpr):
    """``(deta, dalpha)`` from the gradients of the cumulative log decays (through the cumsums
    and the logs of ``eta`` and ``1 - alpha``)."""
    dck = tl.where(inb, dck, 0.0)
    dce = tl.where(inb, dce, 0.0)
    dlk = tl.cumsum(dck, axis=0, reverse=True)  # sum over i >= j
    dle = tl.cumsum(dce, axis=0, reverse=True)
    one_m = 1.0 - al
    dal = tl.where(one_m >= _TINY, -dlk / one_m, 0.0)
    det = tl.where(et >= _TINY, dle / et, 0.0)
    return det, dal


# ---------------------------------------------------------------------------------------------
# chunk inputs
@triton.jit
def _clip_scale(sq, clip):
    """Per-token update clip ``s = min(1, clip / ||G||)`` from ``sq = ||G||^2``."""
    nrm = tl.sqrt(sq + 1e-30)
    r = clip / nrm
    return tl.minimum(r, 1.0), nrm, r


@triton.jit
def _clip_bwd(dth_eff, th, nrm, r, clip, inb):
    """``(d theta, d sq)`` from the gradient of the clipped step ``theta * s``."""
    dth = dth_eff * tl.minimum(r, 1.0)
    dsq = tl.where((r < 1.0) & inb, -(dth_eff * th) * clip / (2.0 * nrm * nrm * nrm), 0.0)
    return dth, dsq


@triton.jit
def _load_chunk(q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, bh, T, t0, BC: tl.constexpr, D: tl.constexpr):
    rc = tl.arange(0, BC)
    rd = tl.arange(0, D)
    valid = tl.minimum(T - t0, BC)
    rmask = rc < valid
    xoff = bh * T * D + (t0 + rc)[:, None] * D + rd[None, :]
    goff = bh * T + t0 + rc
    q = tl.load(q_ptr + xoff, mask=rmask[:, None], other=0.0)
    k = tl.load(k_ptr + xoff, mask=rmask[:, None], other=0.0)
    v = tl.load(v_ptr + xoff, mask=rmask[:, None], other=0.0)
    th = tl.load(th_ptr + goff, mask=rmask, other=0.0)
    et = tl.load(et_ptr + goff, mask=rmask, other=1.0)
    al = tl.load(al_ptr + goff, mask=rmask, other=0.0)
    return q, k, v, th, et, al, valid, rmask, xoff, goff


# ---------------------------------------------------------------------------------------------
# depth 2: W1 [D, F], S1 [D, F], W2 [F, D], S2 [F, D] packed in that order (PS = 4 D F floats)
@triton.jit
def _fwd2_kernel(
    q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, o_ptr, buf_ptr, ck_ptr, b1_ptr, scr_ptr,
    T, chunk0, n_chunks, buf_stride, ck_stride, save_every, clip, scr_stride,
    BC: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
    ACT: tl.constexpr, RES: tl.constexpr, OUT: tl.constexpr, SAVE: tl.constexpr,
    LINEAR: tl.constexpr, PREC: tl.constexpr, CLIP: tl.constexpr, STORE_B1: tl.constexpr,
):
    """Chunks ``chunk0 .. chunk0 + n_chunks - 1`` of one (batch, head) pair.

    LINEAR: the state of chunk j is read from slot j of ``buf`` and written to slot j + 1 (the
    backward's segment recompute); else two slots alternate (slot 1 holds the initial state; chunk
    j writes slot j % 2). SAVE: the state at the start of chunk j is copied to ``ck`` slot
    ``j // save_every`` when ``j % save_every == 0``. OUT: compute and store the retrieval.
    CLIP: clip each token's gradient to Frobenius norm ``clip`` (the step ``theta`` is scaled);
    STORE_B1: store ``||delta1||^2`` per token in ``b1`` (the backward's clip needs it).
    ``scr`` (per program, ``BC D + 2 BC BC`` floats): ``delta2``, ``C``, ``(q k^T) * C``; these and
    q, k are re-read inside the tile loops rather than held in registers across them.
    """
    PS: tl.constexpr = 4 * D * F
    CC: tl.constexpr = BC * BC
    bh = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, BC)
    rd = tl.arange(0, D)
    rf = tl.arange(0, BF)
    ocd = rc[:, None] * D + rd[None, :]
    occ = rc[:, None] * BC + rc[None, :]
    buf = buf_ptr + bh * buf_stride
    s_d2 = scr_ptr + bh * scr_stride
    s_C = s_d2 + BC * D
    s_N1 = s_C + CC
    for j in range(n_chunks):
        if LINEAR:
            src = buf + j * PS
            dst = src + PS
        else:
            src = buf + ((j + 1) % 2) * PS
            dst = buf + (j % 2) * PS
        if SAVE:
            if j % save_every == 0:
                _copy(src, ck_ptr + bh * ck_stride + (j // save_every) * PS, PS, 2048)
        t0 = (chunk0 + j) * BC
        q, k, v, th, et, al, valid, rmask, xoff, goff = _load_chunk(
            q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, bh, T, t0, BC, D)

        # pass A: key forward through the MLP at the chunk-start weights
        y = tl.zeros([BC, D], dtype=tl.float32)
        a2v = tl.zeros([BC], dtype=tl.float32)
        for f in range(0, F, BF):
            w1 = tl.load(src + rd[:, None] * F + (f + rf)[None, :])
            w2 = tl.load(src + 2 * D * F + (f + rf)[:, None] * D + rd[None, :])
            h1 = _act(_mm(k, w1, PREC), ACT)
            y += _mm(h1, w2, PREC)
            if CLIP:
                a2v += tl.sum(h1 * h1, axis=1)
        if RES:
            delta2 = 2.0 * (y + k - v)
        else:
            delta2 = 2.0 * (y - v)
        if CLIP:  # pass A2: ||delta1||^2, then the clipped step
            b1v = tl.zeros([BC], dtype=tl.float32)
            for f in range(0, F, BF):
                w1 = tl.load(src + rd[:, None] * F + (f + rf)[None, :])
                w2 = tl.load(src + 2 * D * F + (f + rf)[:, None] * D + rd[None, :])
                d1 = _mm(delta2, tl.trans(w2), PREC) * _act_d(_mm(k, w1, PREC), ACT)
                b1v += tl.sum(d1 * d1, axis=1)
            if STORE_B1:
                tl.store(b1_ptr + goff, b1v, mask=rmask)
            sc, nrm, r = _clip_scale(tl.sum(k * k, axis=1) * b1v + a2v * tl.sum(delta2 * delta2, axis=1), clip)
            th = th * sc
        A, Dm, Pm, C, beta, E, g, cl, ml, bl, gl, el = _coeffs(th, et, al, valid, BC)
        tl.store(s_d2 + ocd, delta2)
        tl.store(s_C + occ, C)
        if OUT:
            tl.store(s_N1 + occ, _mm(q, tl.trans(k), PREC) * C)
        tl.debug_barrier()

        # pass B: gradient factors of layer 1, retrieval, state update, tile by tile
        if OUT:
            acc = tl.zeros([BC, D], dtype=tl.float32)
            XH = tl.zeros([BC, BC], dtype=tl.float32)
        for f in range(0, F, BF):
            o1 = rd[:, None] * F + (f + rf)[None, :]
            o2 = (f + rf)[:, None] * D + rd[None, :]
            kk = tl.load(k_ptr + xoff, mask=rmask[:, None], other=0.0)
            d2 = tl.load(s_d2 + ocd)
            w1 = tl.load(src + o1)
            w2 = tl.load(src + 2 * D * F + o2)
            z1 = _mm(kk, w1, PREC)
            h1 = _act(z1, ACT)
            d1 = _mm(d2, tl.trans(w2), PREC) * _act_d(z1, ACT)
            s1 = tl.load(src + D * F + o1)
            s2 = tl.load(src + 3 * D * F + o2)
            if OUT:
                qq = tl.load(q_ptr + xoff, mask=rmask[:, None], other=0.0)
                a1 = (beta[:, None] * _mm(qq, w1, PREC) + g[:, None] * _mm(qq, s1, PREC)
                      - _mm(tl.load(s_N1 + occ), d1, PREC))
                x1 = _act(a1, ACT)
                acc += _mm(beta[:, None] * x1, w2, PREC) + _mm(g[:, None] * x1, s2, PREC)
                XH += _mm(x1, tl.trans(h1), PREC)
            tk = tl.trans(kk)
            tl.store(dst + o1, bl * w1 + gl * s1 - _mm(tk, cl[:, None] * d1, PREC))
            tl.store(dst + D * F + o1, el * s1 - _mm(tk, ml[:, None] * d1, PREC))
            th1 = tl.trans(h1)
            tl.store(dst + 2 * D * F + o2, bl * w2 + gl * s2 - _mm(th1, cl[:, None] * d2, PREC))
            tl.store(dst + 3 * D * F + o2, el * s2 - _mm(th1, ml[:, None] * d2, PREC))
        if OUT:
            out = acc - _mm(XH * tl.load(s_C + occ), tl.load(s_d2 + ocd), PREC)
            if RES:
                out += tl.load(q_ptr + xoff, mask=rmask[:, None], other=0.0)
            tl.store(o_ptr + xoff, out, mask=rmask[:, None])
        tl.debug_barrier()


@triton.jit
def _bwd2_kernel(
    q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, go_ptr,
    dq_ptr, dk_ptr, dv_ptr, dth_ptr, det_ptr, dal_ptr,
    st_ptr, adj_ptr, scr_ptr, b1_ptr,
    T, chunk0, n_chunks, st_stride, adj_stride, scr_stride, phase0, clip,
    BC: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
    ACT: tl.constexpr, RES: tl.constexpr, PREC: tl.constexpr, CLIP: tl.constexpr,
):
    """Backward of chunks ``chunk0 + n_chunks - 1`` down to ``chunk0`` of one (batch, head) pair.

    ``st`` slot j holds the state at the start of chunk ``chunk0 + j``. ``adj`` holds two slots:
    the adjoint of the state after the current chunk is read from slot ``(phase0 + it) % 2`` and
    the adjoint of its start state written to the other one. ``scr`` (per program,
    ``scr_stride = 3 BC F + 8 BC BC + 2 BC D`` floats): ``a1, da1, d delta1`` ``[BC, F]``, the chunk's
    ``c x c`` matrices, ``delta2`` and ``d y``: re-read inside the tile loops (as are q, k, dO) rather than
    held in registers (and shared memory) across them.
    Four passes over the hidden tiles: 0 key forward; 1 layer-1 factors + retrieval layer 1
    (``a1`` saved) + reductions for layer 2; 2 retrieval layer-1 backward and ``d delta1`` (reaches
    ``d delta2``); 3 ``dz1`` and the adjoints of the start state (needs the complete ``d delta2``).
    """
    PS: tl.constexpr = 4 * D * F
    DF: tl.constexpr = D * F
    CF: tl.constexpr = BC * F
    CC: tl.constexpr = BC * BC
    bh = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, BC)
    rd = tl.arange(0, D)
    rf = tl.arange(0, BF)
    occ = rc[:, None] * BC + rc[None, :]
    adj = adj_ptr + bh * adj_stride
    scr = scr_ptr + bh * scr_stride
    s_a1 = scr
    s_da1 = scr + CF
    s_dd1 = scr + 2 * CF
    s_A = scr + 3 * CF
    s_D = s_A + CC
    s_P = s_A + 2 * CC
    s_C = s_A + 3 * CC
    s_M1 = s_A + 4 * CC
    s_dM2 = s_A + 5 * CC
    s_dC = s_A + 6 * CC
    s_N1 = s_A + 7 * CC
    s_d2 = s_A + 8 * CC
    s_dy = s_d2 + BC * D
    ocd = rc[:, None] * D + rd[None, :]
    for it in range(n_chunks):
        j = n_chunks - 1 - it
        src = st_ptr + bh * st_stride + j * PS
        ain = adj + ((phase0 + it) % 2) * PS
        aout = adj + ((phase0 + it + 1) % 2) * PS
        t0 = (chunk0 + j) * BC
        q, k, v, th, et, al, valid, rmask, xoff, goff = _load_chunk(
            q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, bh, T, t0, BC, D)

        # pass 0: key forward
        y = tl.zeros([BC, D], dtype=tl.float32)
        a2v = tl.zeros([BC], dtype=tl.float32)
        for f in range(0, F, BF):
            w1 = tl.load(src + rd[:, None] * F + (f + rf)[None, :])
            w2 = tl.load(src + 2 * DF + (f + rf)[:, None] * D + rd[None, :])
            h1 = _act(_mm(k, w1, PREC), ACT)
            y += _mm(h1, w2, PREC)
            if CLIP:
                a2v += tl.sum(h1 * h1, axis=1)
        if RES:
            delta2 = 2.0 * (y + k - v)
        else:
            delta2 = 2.0 * (y - v)
        th_raw = th
        if CLIP:
            b1v = tl.load(b1_ptr + goff, mask=rmask, other=0.0)
            a1v = tl.sum(k * k, axis=1)
            b2v = tl.sum(delta2 * delta2, axis=1)
            sc, nrm, r = _clip_scale(a1v * b1v + a2v * b2v, clip)
            th = th * sc
        A, Dm, Pm, C, beta, E, g, cl, ml, bl, gl, el = _coeffs(th, et, al, valid, BC)
        tl.store(s_A + occ, A)
        tl.store(s_D + occ, Dm)
        tl.store(s_P + occ, Pm)
        tl.store(s_C + occ, C)
        M1 = _mm(q, tl.trans(k), PREC)
        tl.store(s_M1 + occ, M1)
        tl.store(s_N1 + occ, M1 * C)
        tl.store(s_d2 + ocd, delta2)
        tl.debug_barrier()

        # pass 1: layer-1 factors, retrieval layer 1, reductions over the hidden units
        M2 = tl.zeros([BC, BC], dtype=tl.float32)
        Ddl2 = tl.zeros([BC, D], dtype=tl.float32)
        dbeta = tl.zeros([BC], dtype=tl.float32)
        dg = tl.zeros([BC], dtype=tl.float32)
        dcl = tl.zeros([BC], dtype=tl.float32)
        dml = tl.zeros([BC], dtype=tl.float32)
        vbl = tl.zeros([D], dtype=tl.float32)
        vgl = tl.zeros([D], dtype=tl.float32)
        vel = tl.zeros([D], dtype=tl.float32)
        for f in range(0, F, BF):
            o1 = rd[:, None] * F + (f + rf)[None, :]
            o2 = (f + rf)[:, None] * D + rd[None, :]
            kk = tl.load(k_ptr + xoff, mask=rmask[:, None], other=0.0)
            qq = tl.load(q_ptr + xoff, mask=rmask[:, None], other=0.0)
            d2 = tl.load(s_d2 + ocd)
            w1 = tl.load(src + o1)
            s1 = tl.load(src + DF + o1)
            w2 = tl.load(src + 2 * DF + o2)
            s2 = tl.load(src + 3 * DF + o2)
            z1 = _mm(kk, w1, PREC)
            h1 = _act(z1, ACT)
            d1 = _mm(d2, tl.trans(w2), PREC) * _act_d(z1, ACT)
            a1 = (beta[:, None] * _mm(qq, w1, PREC) + g[:, None] * _mm(qq, s1, PREC)
                  - _mm(tl.load(s_N1 + occ), d1, PREC))
            tl.store(s_a1 + rc[:, None] * F + (f + rf)[None, :], a1)
            x1 = _act(a1, ACT)
            M2 += _mm(x1, tl.trans(h1), PREC)
            go = tl.load(go_ptr + xoff, mask=rmask[:, None], other=0.0)
            dbeta += tl.sum(go * _mm(x1, w2, PREC), axis=1)
            dg += tl.sum(go * _mm(x1, s2, PREC), axis=1)
            aw2 = tl.load(ain + 2 * DF + o2)
            as2 = tl.load(ain + 3 * DF + o2)
            GW = _mm(h1, aw2, PREC)
            GS = _mm(h1, as2, PREC)
            Ddl2 -= cl[:, None] * GW + ml[:, None] * GS
            dcl -= tl.sum(d2 * GW, axis=1)
            dml -= tl.sum(d2 * GS, axis=1)
            aw1 = tl.load(ain + o1)
            as1 = tl.load(ain + DF + o1)
            vbl += tl.sum(w1 * aw1, axis=1) + tl.sum(w2 * aw2, axis=0)
            vgl += tl.sum(s1 * aw1, axis=1) + tl.sum(s2 * aw2, axis=0)
            vel += tl.sum(s1 * as1, axis=1) + tl.sum(s2 * as2, axis=0)
        dbl = tl.sum(vbl, axis=0)
        dgl = tl.sum(vgl, axis=0)
        d_el = tl.sum(vel, axis=0)
        C = tl.load(s_C + occ)
        go = tl.load(go_ptr + xoff, mask=rmask[:, None], other=0.0)
        dN2 = -_mm(go, tl.trans(tl.load(s_d2 + ocd)), PREC)
        tl.store(s_dM2 + occ, dN2 * C)
        tl.store(s_dC + occ, dN2 * M2)
        Ddl2 -= _mm(tl.trans(M2 * C), go, PREC)
        tl.debug_barrier()

        # pass 2: retrieval layer-1 backward, adjoint of delta1, its contribution to delta2's
        if RES:
            dq = go
        else:
            dq = tl.zeros([BC, D], dtype=tl.float32)
        dk = tl.zeros([BC, D], dtype=tl.float32)
        dN1 = tl.zeros([BC, BC], dtype=tl.float32)
        for f in range(0, F, BF):
            o1 = rd[:, None] * F + (f + rf)[None, :]
            o2 = (f + rf)[:, None] * D + rd[None, :]
            os_ = rc[:, None] * F + (f + rf)[None, :]
            kk = tl.load(k_ptr + xoff, mask=rmask[:, None], other=0.0)
            d2 = tl.load(s_d2 + ocd)
            gg = tl.load(go_ptr + xoff, mask=rmask[:, None], other=0.0)
            w1 = tl.load(src + o1)
            s1 = tl.load(src + DF + o1)
            w2 = tl.load(src + 2 * DF + o2)
            s2 = tl.load(src + 3 * DF + o2)
            z1 = _mm(kk, w1, PREC)
            sd1 = _act_d(z1, ACT)
            d1 = _mm(d2, tl.trans(w2), PREC) * sd1
            dx1 = (_mm(beta[:, None] * gg, tl.trans(w2), PREC) + _mm(g[:, None] * gg, tl.trans(s2), PREC)
                   + _mm(tl.load(s_dM2 + occ), _act(z1, ACT), PREC))
            da1 = dx1 * _act_d(tl.load(s_a1 + os_), ACT)
            tl.store(s_da1 + os_, da1)
            qq = tl.load(q_ptr + xoff, mask=rmask[:, None], other=0.0)
            dbeta += tl.sum(da1 * _mm(qq, w1, PREC), axis=1)
            dg += tl.sum(da1 * _mm(qq, s1, PREC), axis=1)
            dq += _mm(beta[:, None] * da1, tl.trans(w1), PREC) + _mm(g[:, None] * da1, tl.trans(s1), PREC)
            dN1 -= _mm(da1, tl.trans(d1), PREC)
            aw1 = tl.load(ain + o1)
            as1 = tl.load(ain + DF + o1)
            KW = _mm(kk, aw1, PREC)
            KS = _mm(kk, as1, PREC)
            Dd1 = -_mm(tl.trans(tl.load(s_N1 + occ)), da1, PREC) - cl[:, None] * KW - ml[:, None] * KS
            tl.store(s_dd1 + os_, Dd1)
            dcl -= tl.sum(d1 * KW, axis=1)
            dml -= tl.sum(d1 * KS, axis=1)
            Ddl2 += _mm(Dd1 * sd1, w2, PREC)
            dk -= _mm(cl[:, None] * d1, tl.trans(aw1), PREC) + _mm(ml[:, None] * d1, tl.trans(as1), PREC)
        C = tl.load(s_C + occ)
        M1 = tl.load(s_M1 + occ)
        dM1 = dN1 * C
        dC = tl.load(s_dC + occ) + dN1 * M1
        dq += _mm(dM1, tl.load(k_ptr + xoff, mask=rmask[:, None], other=0.0), PREC)
        dk += _mm(tl.trans(dM1), tl.load(q_ptr + xoff, mask=rmask[:, None], other=0.0), PREC)
        dth, det, dal = _coeffs_bwd(dC, dbeta, dg, dcl, dml, dbl, dgl, d_el, th, et, al, valid,
                                    tl.load(s_A + occ), tl.load(s_D + occ), tl.load(s_P + occ), beta, E, BC)
        if CLIP:  # the clip scale depends on ||k||, ||delta1||, ||h1||, ||delta2||
            dth, dsq = _clip_bwd(dth, th_raw, nrm, r, clip, rmask)
            c1 = 2.0 * dsq * a1v  # d delta1 += c1 * delta1
            c2 = 2.0 * dsq * b2v  # d h1 += c2 * h1
            Ddl2 += (2.0 * dsq * a2v)[:, None] * tl.load(s_d2 + ocd)
            dk += (2.0 * dsq * b1v)[:, None] * tl.load(k_ptr + xoff, mask=rmask[:, None], other=0.0)
            for f in range(0, F, BF):  # pass 2b: the clip's d delta1 reaches delta2 through W2
                kk = tl.load(k_ptr + xoff, mask=rmask[:, None], other=0.0)
                w1 = tl.load(src + rd[:, None] * F + (f + rf)[None, :])
                w2 = tl.load(src + 2 * DF + (f + rf)[:, None] * D + rd[None, :])
                sd1 = _act_d(_mm(kk, w1, PREC), ACT)
                d1 = _mm(tl.load(s_d2 + ocd), tl.trans(w2), PREC) * sd1
                Ddl2 += _mm(c1[:, None] * d1 * sd1, w2, PREC)
        dy = 2.0 * Ddl2
        if RES:
            dk += dy
        tl.store(dq_ptr + xoff, dq, mask=rmask[:, None])
        tl.store(dv_ptr + xoff, -dy, mask=rmask[:, None])
        tl.store(s_dy + ocd, dy)
        tl.store(dth_ptr + goff, dth, mask=rmask)
        tl.store(det_ptr + goff, det, mask=rmask)
        tl.store(dal_ptr + goff, dal, mask=rmask)
        tl.debug_barrier()

        # pass 3: layer-1 pre-activation adjoint, adjoints of the start state
        for f in range(0, F, BF):
            o1 = rd[:, None] * F + (f + rf)[None, :]
            o2 = (f + rf)[:, None] * D + rd[None, :]
            os_ = rc[:, None] * F + (f + rf)[None, :]
            kk = tl.load(k_ptr + xoff, mask=rmask[:, None], other=0.0)
            d2 = tl.load(s_d2 + ocd)
            w1 = tl.load(src + o1)
            w2 = tl.load(src + 2 * DF + o2)
            z1 = _mm(kk, w1, PREC)
            h1 = _act(z1, ACT)
            sd1 = _act_d(z1, ACT)
            P1 = _mm(d2, tl.trans(w2), PREC)
            x1 = _act(tl.load(s_a1 + os_), ACT)
            Dd1 = tl.load(s_dd1 + os_)
            aw2 = tl.load(ain + 2 * DF + o2)
            as2 = tl.load(ain + 3 * DF + o2)
            dyy = tl.load(s_dy + ocd)
            Dh1 = (_mm(tl.trans(tl.load(s_dM2 + occ)), x1, PREC) + _mm(dyy, tl.trans(w2), PREC)
                   - _mm(cl[:, None] * d2, tl.trans(aw2), PREC) - _mm(ml[:, None] * d2, tl.trans(as2), PREC))
            if CLIP:
                Dd1 += c1[:, None] * (P1 * sd1)
                Dh1 += c2[:, None] * h1
            dz1 = Dh1 * sd1 + Dd1 * P1 * _act_dd(z1, ACT)
            dk += _mm(dz1, tl.trans(w1), PREC)
            gg = tl.load(go_ptr + xoff, mask=rmask[:, None], other=0.0)
            tx1 = tl.trans(x1)
            tl.store(aout + 2 * DF + o2, bl * aw2 + _mm(tx1, beta[:, None] * gg, PREC)
                     + _mm(tl.trans(Dd1 * sd1), d2, PREC) + _mm(tl.trans(h1), dyy, PREC))
            tl.store(aout + 3 * DF + o2, gl * aw2 + el * as2 + _mm(tx1, g[:, None] * gg, PREC))
            aw1 = tl.load(ain + o1)
            as1 = tl.load(ain + DF + o1)
            da1 = tl.load(s_da1 + os_)
            tq = tl.trans(tl.load(q_ptr + xoff, mask=rmask[:, None], other=0.0))
            tl.store(aout + o1, bl * aw1 + _mm(tq, beta[:, None] * da1, PREC) + _mm(tl.trans(kk), dz1, PREC))
            tl.store(aout + DF + o1, gl * aw1 + el * as1 + _mm(tq, g[:, None] * da1, PREC))
        tl.store(dk_ptr + xoff, dk, mask=rmask[:, None])
        tl.debug_barrier()


# ---------------------------------------------------------------------------------------------
# depth 1 (linear memory): W1 [D, D], S1 [D, D] packed (PS = 2 D D floats)
@triton.jit
def _fwd1_kernel(
    q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, o_ptr, buf_ptr, ck_ptr, b1_ptr, scr_ptr,
    T, chunk0, n_chunks, buf_stride, ck_stride, save_every, clip, scr_stride,
    BC: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
    ACT: tl.constexpr, RES: tl.constexpr, OUT: tl.constexpr, SAVE: tl.constexpr,
    LINEAR: tl.constexpr, PREC: tl.constexpr, CLIP: tl.constexpr, STORE_B1: tl.constexpr,
):
    """Depth-1 twin of :func:`_fwd2_kernel` (same arguments; F, BF, ACT, b1, scr are unused)."""
    PS: tl.constexpr = 2 * D * D
    bh = tl.program_id(0).to(tl.int64)
    rd = tl.arange(0, D)
    buf = buf_ptr + bh * buf_stride
    ow = rd[:, None] * D + rd[None, :]
    for j in range(n_chunks):
        if LINEAR:
            src = buf + j * PS
            dst = src + PS
        else:
            src = buf + ((j + 1) % 2) * PS
            dst = buf + (j % 2) * PS
        if SAVE:
            if j % save_every == 0:
                _copy(src, ck_ptr + bh * ck_stride + (j // save_every) * PS, PS, 2048)
        t0 = (chunk0 + j) * BC
        q, k, v, th, et, al, valid, rmask, xoff, goff = _load_chunk(
            q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, bh, T, t0, BC, D)
        w1 = tl.load(src + ow)
        s1 = tl.load(src + D * D + ow)
        y = _mm(k, w1, PREC)
        if RES:
            d1 = 2.0 * (y + k - v)
        else:
            d1 = 2.0 * (y - v)
        if CLIP:
            sc, nrm, r = _clip_scale(tl.sum(k * k, axis=1) * tl.sum(d1 * d1, axis=1), clip)
            th = th * sc
        A, Dm, Pm, C, beta, E, g, cl, ml, bl, gl, el = _coeffs(th, et, al, valid, BC)
        if OUT:
            N1 = _mm(q, tl.trans(k), PREC) * C
            out = beta[:, None] * _mm(q, w1, PREC) + g[:, None] * _mm(q, s1, PREC) - _mm(N1, d1, PREC)
            if RES:
                out += q
            tl.store(o_ptr + xoff, out, mask=rmask[:, None])
        tk = tl.trans(k)
        tl.store(dst + ow, bl * w1 + gl * s1 - _mm(tk, cl[:, None] * d1, PREC))
        tl.store(dst + D * D + ow, el * s1 - _mm(tk, ml[:, None] * d1, PREC))
        tl.debug_barrier()


@triton.jit
def _bwd1_kernel(
    q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, go_ptr,
    dq_ptr, dk_ptr, dv_ptr, dth_ptr, det_ptr, dal_ptr,
    st_ptr, adj_ptr, scr_ptr, b1_ptr,
    T, chunk0, n_chunks, st_stride, adj_stride, scr_stride, phase0, clip,
    BC: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr,
    ACT: tl.constexpr, RES: tl.constexpr, PREC: tl.constexpr, CLIP: tl.constexpr,
):
    """Depth-1 twin of :func:`_bwd2_kernel` (same arguments; F, BF, ACT and b1 unused).

    ``scr`` (per program, ``6 BC BC + 2 BC D`` floats): the chunk's ``c x c`` matrices, ``delta1``
    and ``d y``, written once and re-read by the later phases (keeps registers and shared memory
    small; the phases are separated by barriers).
    """
    PS: tl.constexpr = 2 * D * D
    DD: tl.constexpr = D * D
    CC: tl.constexpr = BC * BC
    bh = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, BC)
    rd = tl.arange(0, D)
    ow = rd[:, None] * D + rd[None, :]
    occ = rc[:, None] * BC + rc[None, :]
    ocd = rc[:, None] * D + rd[None, :]
    adj = adj_ptr + bh * adj_stride
    scr = scr_ptr + bh * scr_stride
    s_A = scr
    s_D = scr + CC
    s_P = scr + 2 * CC
    s_C = scr + 3 * CC
    s_M1 = scr + 4 * CC
    s_dC = scr + 5 * CC
    s_d1 = scr + 6 * CC
    s_dq = s_d1 + BC * D
    for it in range(n_chunks):
        j = n_chunks - 1 - it
        src = st_ptr + bh * st_stride + j * PS
        ain = adj + ((phase0 + it) % 2) * PS
        aout = adj + ((phase0 + it + 1) % 2) * PS
        t0 = (chunk0 + j) * BC
        q, k, v, th, et, al, valid, rmask, xoff, goff = _load_chunk(
            q_ptr, k_ptr, v_ptr, th_ptr, et_ptr, al_ptr, bh, T, t0, BC, D)
        # phase 0: key forward, clip, coefficients
        y = _mm(k, tl.load(src + ow), PREC)
        if RES:
            d1 = 2.0 * (y + k - v)
        else:
            d1 = 2.0 * (y - v)
        th_raw = th
        if CLIP:
            a1v = tl.sum(k * k, axis=1)
            b1v = tl.sum(d1 * d1, axis=1)
            sc, nrm, r = _clip_scale(a1v * b1v, clip)
            th = th * sc
        A, Dm, Pm, C, beta, E, g, cl, ml, bl, gl, el = _coeffs(th, et, al, valid, BC)
        tl.store(s_A + occ, A)
        tl.store(s_D + occ, Dm)
        tl.store(s_P + occ, Pm)
        tl.store(s_C + occ, C)
        tl.store(s_M1 + occ, _mm(q, tl.trans(k), PREC))
        tl.store(s_d1 + ocd, d1)
        tl.debug_barrier()

        # phase 1: retrieval backward (dO -> q, beta, g, and the masked key products)
        go = tl.load(go_ptr + xoff, mask=rmask[:, None], other=0.0)
        qq = tl.load(q_ptr + xoff, mask=rmask[:, None], other=0.0)
        w1 = tl.load(src + ow)
        s1 = tl.load(src + DD + ow)
        dbeta = tl.sum(go * _mm(qq, w1, PREC), axis=1)
        dg = tl.sum(go * _mm(qq, s1, PREC), axis=1)
        if RES:
            dq = go
        else:
            dq = tl.zeros([BC, D], dtype=tl.float32)
        dq += _mm(beta[:, None] * go, tl.trans(w1), PREC) + _mm(g[:, None] * go, tl.trans(s1), PREC)
        dN1 = -_mm(go, tl.trans(tl.load(s_d1 + ocd)), PREC)
        tl.store(s_dC + occ, dN1 * tl.load(s_M1 + occ))
        dM1 = dN1 * tl.load(s_C + occ)
        dq += _mm(dM1, tl.load(k_ptr + xoff, mask=rmask[:, None], other=0.0), PREC)
        tl.store(s_dq + ocd, dq)
        dk = _mm(tl.trans(dM1), qq, PREC)
        tl.debug_barrier()

        # phase 2: adjoint of delta1 (retrieval + state update), coefficient and clip backward
        kk = tl.load(k_ptr + xoff, mask=rmask[:, None], other=0.0)
        d1 = tl.load(s_d1 + ocd)
        aw1 = tl.load(ain + ow)
        as1 = tl.load(ain + DD + ow)
        KW = _mm(kk, aw1, PREC)
        KS = _mm(kk, as1, PREC)
        dcl = -tl.sum(d1 * KW, axis=1)
        dml = -tl.sum(d1 * KS, axis=1)
        Dd1 = -cl[:, None] * KW - ml[:, None] * KS
        go = tl.load(go_ptr + xoff, mask=rmask[:, None], other=0.0)
        Dd1 -= _mm(tl.trans(tl.load(s_M1 + occ) * tl.load(s_C + occ)), go, PREC)
        dk -= _mm(cl[:, None] * d1, tl.trans(aw1), PREC) + _mm(ml[:, None] * d1, tl.trans(as1), PREC)
        w1 = tl.load(src + ow)
        s1 = tl.load(src + DD + ow)
        dbl = tl.sum(tl.sum(w1 * aw1, axis=1), axis=0)
        dgl = tl.sum(tl.sum(s1 * aw1, axis=1), axis=0)
        d_el = tl.sum(tl.sum(s1 * as1, axis=1), axis=0)
        dth, det, dal = _coeffs_bwd(tl.load(s_dC + occ), dbeta, dg, dcl, dml, dbl, dgl, d_el, th, et, al, valid,
                                    tl.load(s_A + occ), tl.load(s_D + occ), tl.load(s_P + occ), beta, E, BC)
        if CLIP:
            dth, dsq = _clip_bwd(dth, th_raw, nrm, r, clip, rmask)
            Dd1 += (2.0 * dsq * a1v)[:, None] * d1
            dk += (2.0 * dsq * b1v)[:, None] * kk
        dy = 2.0 * Dd1
        dk += _mm(dy, tl.trans(w1), PREC)
        if RES:
            dk += dy
        tl.store(dk_ptr + xoff, dk, mask=rmask[:, None])
        tl.store(dv_ptr + xoff, -dy, mask=rmask[:, None])
        tl.store(dq_ptr + xoff, tl.load(s_dq + ocd), mask=rmask[:, None])
        tl.store(dth_ptr + goff, dth, mask=rmask)
        tl.store(det_ptr + goff, det, mask=rmask)
        tl.store(dal_ptr + goff, dal, mask=rmask)

        # phase 3: adjoint of the start state
        tq = tl.trans(tl.load(q_ptr + xoff, mask=rmask[:, None], other=0.0))
        tl.store(aout + ow, bl * aw1 + _mm(tq, beta[:, None] * go, PREC) + _mm(tl.trans(kk), dy, PREC))
        tl.store(aout + DD + ow, gl * aw1 + el * as1 + _mm(tq, g[:, None] * go, PREC))
        tl.debug_barrier()
