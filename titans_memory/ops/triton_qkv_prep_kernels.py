"""Triton kernels of :mod:`titans_memory.ops.qkv_prep`: one stream of the memory layer's
projection through the causal depthwise convolution, SiLU and (q, k) the per-head l2 norm.

A program covers one (batch, head) and a block of ``BT`` tokens, a ``[BT, D]`` tile, ``D`` the
head dim. ``p`` is the stream's columns of the projection (row stride ``RS``, the ``C`` columns of
the stream from the pointer on); the convolution's ``K`` taps are ``K`` row-shifted loads. Rows
before the sequence start come from the carried cache ``[B, K-1, C]`` (or are zero).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _conv_tap(p_ptr, cache_ptr, b, src, cols, T, RS, C, K: tl.constexpr, HAS_CACHE: tl.constexpr):
    """The inputs at rows ``src`` (any sign) of batch ``b`` for channel offsets ``cols``."""
    inside = (src >= 0) & (src < T)
    x = tl.load(p_ptr + (b * T + src)[:, None] * RS + cols[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
    if HAS_CACHE:
        before = (src < 0) & (src >= 1 - K)
        x += tl.load(cache_ptr + (b * (K - 1) + (K - 1) + src)[:, None] * C + cols[None, :], mask=before[:, None],
                     other=0.0)
    return x


@triton.jit
def _conv_pre(p_ptr, w_ptr, cache_ptr, b, rows, cols, bias, T, RS, C, K: tl.constexpr, BT: tl.constexpr,
              D: tl.constexpr, HAS_CACHE: tl.constexpr):
    """The convolution's output (before SiLU) at ``rows``."""
    pre = tl.zeros((BT, D), tl.float32) + bias[None, :]
    for i in tl.static_range(K):
        wi = tl.load(w_ptr + cols * K + i)
        pre += wi[None, :] * _conv_tap(p_ptr, cache_ptr, b, rows - (K - 1) + i, cols, T, RS, C, K, HAS_CACHE)
    return pre


@triton.jit
def _prep_fwd_kernel(p_ptr, w_ptr, bias_ptr, cache_ptr, out_ptr, T, H, RS, C, eps,
                     K: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, NORMALIZE: tl.constexpr,
                     HAS_CACHE: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    rows = tl.program_id(1) * BT + tl.arange(0, BT)
    d = tl.arange(0, D)
    cols = h * D + d
    pre = _conv_pre(p_ptr, w_ptr, cache_ptr, b, rows, cols, tl.load(bias_ptr + cols), T, RS, C, K, BT, D, HAS_CACHE)
    y = pre * tl.sigmoid(pre)
    if NORMALIZE:
        y = y / tl.maximum(tl.sqrt(tl.sum(y * y, 1)), eps)[:, None]
    tl.store(out_ptr + (bh * T + rows)[:, None] * D + d[None, :], y, mask=(rows < T)[:, None])


@triton.jit
def _prep_bwd_kernel(p_ptr, w_ptr, bias_ptr, cache_ptr, dy_ptr, dp_ptr, dw_ptr, db_ptr, T, H, RS, C, eps,
                     K: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, NORMALIZE: tl.constexpr,
                     HAS_CACHE: tl.constexpr):
    """``dp`` at this block's rows; this block's partial sums of the conv weight and bias gradients.

    ``dp[r] = sum_m w[K-1-m] dpre[r+m]``, so the block needs ``dpre`` at ``K`` row shifts; each is
    recomputed from ``p`` (the convolution is cheaper to redo than to save).
    """
    bh = tl.program_id(0)
    tb = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tb * BT + tl.arange(0, BT)
    d = tl.arange(0, D)
    cols = h * D + d
    bias = tl.load(bias_ptr + cols)
    acc = tl.zeros((BT, D), tl.float32)
    for m in tl.static_range(K):
        u = rows + m
        pre = _conv_pre(p_ptr, w_ptr, cache_ptr, b, u, cols, bias, T, RS, C, K, BT, D, HAS_CACHE)
        sig = tl.sigmoid(pre)
        a = pre * sig
        g = tl.load(dy_ptr + (bh * T + u)[:, None] * D + d[None, :], mask=(u < T)[:, None], other=0.0)
        if NORMALIZE:  # y = a / max(|a|, eps)
            nrm = tl.sqrt(tl.sum(a * a, 1))
            den = tl.maximum(nrm, eps)
            y = a / den[:, None]
            dot = tl.sum(y * g, 1)
            g = tl.where((nrm > eps)[:, None], g - y * dot[:, None], g) / den[:, None]
        dpre = g * sig * (1.0 + pre * (1.0 - sig))
        acc += tl.load(w_ptr + cols * K + (K - 1 - m))[None, :] * dpre
        if m == 0:  # this block's rows: the weight and bias gradients
            part = (b * tl.num_programs(1) + tb) * C + cols
            tl.store(db_ptr + part, tl.sum(dpre, 0))
            for i in tl.static_range(K):
                x = _conv_tap(p_ptr, cache_ptr, b, rows - (K - 1) + i, cols, T, RS, C, K, HAS_CACHE)
                tl.store(dw_ptr + part * K + i, tl.sum(dpre * x, 0))
    tl.store(dp_ptr + (b * T + rows)[:, None] * RS + cols[None, :], acc.to(dp_ptr.dtype.element_ty),
             mask=(rows < T)[:, None])
