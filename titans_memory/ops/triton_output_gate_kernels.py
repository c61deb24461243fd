"""Triton kernels of :mod:`titans_memory.ops.output_gate`: RMSNorm of the memory output per head,
heads merged, times ``sigmoid`` of the gate. A program covers a ``[BT, D]`` tile of one
(batch, head); ``o`` is read in ``[B, H, T, D]``, ``g`` and ``z`` in ``[B, T, H*D]``."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(pid, T, H, n_tiles, D: tl.constexpr, BT: tl.constexpr):
    """Offsets of program ``pid``'s tile in ``o`` and in ``g``/``z``, its row mask, its columns."""
    bh = pid // n_tiles
    tile = pid - bh * n_tiles
    b = bh // H
    h = bh - b * H
    rows = tile * BT + tl.arange(0, BT)
    cols = tl.arange(0, D)
    o_off = (bh.to(tl.int64) * T + rows[:, None]) * D + cols[None, :]
    gz_off = (b.to(tl.int64) * T + rows[:, None]) * (H * D) + h * D + cols[None, :]
    return o_off, gz_off, (rows < T)[:, None], cols


@triton.jit
def _output_gate_fwd_kernel(o_ptr, w_ptr, g_ptr, z_ptr, T, H, n_tiles, eps,
                            D: tl.constexpr, BT: tl.constexpr):
    """z[b, t, h*D:(h+1)*D] = rmsnorm(o[b, h, t]) * w * sigmoid(g[b, t, h*D:(h+1)*D])."""
    o_off, gz_off, mask, cols = _tile(tl.program_id(0), T, H, n_tiles, D, BT)
    o = tl.load(o_ptr + o_off, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + gz_off, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(o * o, axis=1) / D + eps)
    z = o * r[:, None] * w[None, :] * tl.sigmoid(g)
    tl.store(z_ptr + gz_off, z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _output_gate_bwd_kernel(o_ptr, w_ptr, g_ptr, dz_ptr, do_ptr, dg_ptr, dw_ptr, T, H, n_tiles, eps,
                            D: tl.constexpr, BT: tl.constexpr, DO: tl.constexpr, DG: tl.constexpr, DW: tl.constexpr):
    """Gradients of the forward kernel's tile: ``do`` [B, H, T, D], ``dg`` [B, T, H*D] and the
    program's partial ``dw`` row ``dw_ptr[pid, :]`` (each written only when its flag is set)."""
    pid = tl.program_id(0)
    o_off, gz_off, mask, cols = _tile(pid, T, H, n_tiles, D, BT)
    o = tl.load(o_ptr + o_off, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + gz_off, mask=mask, other=0.0).to(tl.float32)
    dz = tl.load(dz_ptr + gz_off, mask=mask, other=0.0).to(tl.float32)  # 0 on padded rows
    w = tl.load(w_ptr + cols).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(o * o, axis=1) / D + eps)
    n = o * r[:, None]
    s = tl.sigmoid(g)
    dy = dz * s
    if DG:
        dg = dz * (n * w[None, :]) * s * (1.0 - s)
        tl.store(dg_ptr + gz_off, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    if DW:
        tl.store(dw_ptr + pid.to(tl.int64) * D + cols, tl.sum(dy * n, axis=0))
    if DO:
        dn = dy * w[None, :]
        c = tl.sum(dn * n, axis=1) / D
        do = r[:, None] * (dn - n * c[:, None])
        tl.store(do_ptr + o_off, do.to(do_ptr.dtype.element_ty), mask=mask)
