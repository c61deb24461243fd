"""The q/k/v streams of the memory layer in one pass: causal depthwise convolution, SiLU,
per-head l2 normalisation (q and k) and the head-major layout the memory kernels read.

The :class:`~titans_memory.memory.NeuralMemory` layer projects ``x`` to ``p = x W_qkv``
(``[B, T, 3 C]``, ``C = H d``, columns ``q | k | v``) and then, per stream ``s``:

    pre = causal_depthwise_conv(p_s)          (kernel K, left padding: zeros or the carried cache)
    a   = silu(pre)
    y   = a / max(||a||, eps)   per head      (q and k only)
    out = y as [B, H, T, d], fp32

In PyTorch that is about twenty kernels forward and thirty backward over full-size tensors
(concatenation for the padding, the convolution, transposes, SiLU, the norm, layout copies):
about 4 ms of a W1 training step at 8k on an H200 (``benchmarks/RESULTS.md``). The Triton
kernels here do each stream in one launch forward and one backward, recomputing the
convolution in the backward instead of saving it.

:func:`qkv_prep` dispatches; :func:`qkv_prep_reference` is the PyTorch composition, the
specification the kernels are tested against (``tests/test_qkv_prep.py``).
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, ShapeError

STREAMS = "qkv"
#: streams that are l2-normalised per head (``q`` and ``k``)
NORMALIZED = (True, True, False)
# Tokens per program and warps, forward and backward. The backward keeps about 25 tiles live (the
# convolution recomputed at K row shifts): at 64 tokens and 4 warps ptxas reports 26 KB of spills a
# thread, at 16 tokens and 8 warps none (Triton 3.6, sm_90a). Yet on an H200 (W1 layer step at 8k,
# CUDA profiler, 2026-12-02) the three backward launches took 1.17 ms at 64 x 4 and 1.78 ms at
# 16 x 8 (the spills stay in L1), so 64 x 4 it is; ``benchmarks/qkv_prep.py`` times the others.
BLOCK_T, WARPS = 64, 4
BLOCK_T_BWD, WARPS_BWD = 64, 4

_kernels = None
_import_error: Optional[BaseException] = None


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def causal_depthwise_conv(x: Tensor, weight: Tensor, bias: Tensor, cache: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Depthwise 1-D convolution over time that only looks back.

    ``x`` ``[B, T, C]``, ``weight`` ``[C, 1, K]``, ``bias`` ``[C]``, ``cache`` ``[B, K-1, C]`` (the
    previous piece's last inputs) or None (zeros). Returns ``(y [B, T, C], new_cache [B, K-1, C])``.
    """
    k = weight.shape[-1]
    if cache is None:
        cache = x.new_zeros(x.shape[0], k - 1, x.shape[2])
    padded = torch.cat([cache.to(x.dtype), x], dim=1)
    y = F.conv1d(padded.transpose(1, 2), weight.to(x.dtype), bias.to(x.dtype), groups=x.shape[2])
    return y.transpose(1, 2), padded[:, padded.shape[1] - (k - 1) :]


def stream_reference(
    t: Tensor, conv: Optional[Tuple[Tensor, Tensor]], cache: Optional[Tensor], n_heads: int, normalize: bool,
    out_dtype: torch.dtype, eps: float = 1e-6,
) -> Tuple[Tensor, Optional[Tensor]]:
    """One stream in PyTorch: ``t`` ``[B, T, C]`` -> ``([B, H, T, d] out_dtype, new cache or None)``."""
    new_cache = None
    if conv is not None:
        t, new_cache = causal_depthwise_conv(t, conv[0], conv[1], cache)
    b, n, c = t.shape
    t = F.silu(t).view(b, n, n_heads, c // n_heads).transpose(1, 2).to(out_dtype)
    if normalize:
        t = F.normalize(t, dim=-1, eps=eps)
    return t, new_cache


def qkv_prep_reference(
    p: Tensor, convs: Optional[Sequence[Tuple[Tensor, Tensor]]], caches: Sequence[Optional[Tensor]], n_heads: int,
    out_dtype: torch.dtype = torch.float32, eps: float = 1e-6,
) -> Tuple[List[Tensor], List[Optional[Tensor]]]:
    """The specification of :func:`qkv_prep` (same arguments and results), in PyTorch."""
    outs, new = [], []
    for s, t in enumerate(p.chunk(3, dim=-1)):
        y, c = stream_reference(t, None if convs is None else convs[s], caches[s], n_heads, NORMALIZED[s], out_dtype, eps)
        outs.append(y)
        new.append(c)
    return outs, new


def triton_unsupported_reason(p: Tensor, caches: Sequence[Optional[Tensor]], head_dim: int, out_dtype: torch.dtype) -> Optional[str]:
    """``None`` if the Triton kernels take these inputs, else why not."""
    if out_dtype != torch.float32 or p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtypes {p.dtype} -> {out_dtype} (the kernels read fp32/bf16/fp16 and write fp32)"
    if head_dim < 16 or head_dim > 128 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} (the kernels take a power of two in 16..128)"
    if any(c is not None and c.requires_grad and torch.is_grad_enabled() for c in caches):
        return "a carried convolution cache that requires grad (the kernels give no gradient to it)"
    if not (p.is_cuda or (_interpret_mode() and p.device.type == "cpu")):
        return f"tensors on {p.device} (needs CUDA, or CPU with TRITON_INTERPRET=1)"
    if _load_kernels() is None:
        return f"Triton not importable ({_import_error})"
    return None


def qkv_prep(
    p: Tensor, convs: Optional[Sequence[Tuple[Tensor, Tensor]]], caches: Sequence[Optional[Tensor]], n_heads: int,
    out_dtype: torch.dtype = torch.float32, eps: float = 1e-6, impl: str = "auto",
) -> Tuple[List[Tensor], List[Optional[Tensor]]]:
    """q, k, v of the memory layer from its projection ``p``.

    Args:
        p: ``[B, T, 3 C]``, the projection ``x W_qkv`` (columns ``q | k | v``, ``C = H d``).
        convs: per stream ``(weight [C, 1, K], bias [C])`` of the causal depthwise convolution, or
            None for no convolution.
        caches: per stream the carried last ``K - 1`` inputs ``[B, K-1, C]``, or None (zeros).
        n_heads: ``H``.
        out_dtype: dtype of the outputs (the memory's state dtype).
        eps: of the l2 normalisation of q and k.
        impl: ``"auto"`` (the Triton kernels for CUDA inputs where :func:`triton_unsupported_reason`
            allows it and ``TITANS_MEMORY_TRITON`` is not ``0``, else PyTorch), ``"triton"`` (those kernels, or a
            :class:`~titans_memory.errors.ConfigError` saying why not) or ``"torch"``.
    Returns:
        ``([q, k, v], new_caches)``: each ``[B, H, T, d]`` (contiguous from the kernels);
        the new caches ``[B, K-1, C]`` (None without convolution).
    """
    if p.dim() != 3 or p.shape[-1] % (3 * n_heads):
        raise ShapeError(f"qkv_prep expects p [batch, time, 3 * heads * head_dim], got {tuple(p.shape)} for {n_heads} heads")
    if len(caches) != 3:
        raise ShapeError(f"qkv_prep expects one cache entry per stream (3), got {len(caches)}")
    head_dim = p.shape[-1] // (3 * n_heads)
    if impl == "torch":
        return qkv_prep_reference(p, convs, caches, n_heads, out_dtype, eps)
    if impl not in ("auto", "triton"):
        raise ConfigError(f"unknown qkv_prep implementation {impl!r}; choose from ('auto', 'triton', 'torch')")
    reason = triton_unsupported_reason(p, caches, head_dim, out_dtype)
    if impl == "auto" and (reason is not None or not p.is_cuda or os.environ.get("TITANS_MEMORY_TRITON", "1") == "0"):
        return qkv_prep_reference(p, convs, caches, n_heads, out_dtype, eps)
    if reason is not None:
        raise ConfigError(f'qkv_prep(impl="triton") cannot run here: {reason}')
    return _qkv_prep_triton(p, convs, caches, n_heads, eps)


# ---------------------------------------------------------------------------------------------
# Triton
def _new_caches(p: Tensor, k: int, caches: Sequence[Optional[Tensor]]) -> List[Tensor]:
    """The last ``k - 1`` inputs of each stream after ``p`` (as the PyTorch path: views of ``p``)."""
    n = p.shape[1]
    out = []
    for s, x in enumerate(p.chunk(3, dim=-1)):
        if n >= k - 1:
            out.append(x[:, n - (k - 1) :])
        else:
            c = caches[s] if caches[s] is not None else x.new_zeros(x.shape[0], k - 1, x.shape[2])
            out.append(torch.cat([c.to(x.dtype)[:, n:], x], dim=1))
    return out


def _qkv_prep_triton(p, convs, caches, n_heads, eps):
    p = p.contiguous()
    b, n, c3 = p.shape
    c = c3 // 3
    if convs is None:  # no convolution: one tap of weight 1, bias 0 (the same kernel)
        w = p.new_ones(3, c, 1, dtype=torch.float32)
        bias = p.new_zeros(3, c, dtype=torch.float32)
        k, new, cache = 1, [None, None, None], None
        weights = biases = None
    else:
        weights = [cv[0] for cv in convs]
        biases = [cv[1] for cv in convs]
        k = weights[0].shape[-1]
        new = _new_caches(p, k, caches)
        cache = None
        if any(cc is not None for cc in caches):
            cache = torch.stack([(cc if cc is not None else p.new_zeros(b, k - 1, c)).detach().float() for cc in caches])
            if cache.shape != (3, b, k - 1, c):
                raise ShapeError(f"convolution caches must be [batch, {k - 1}, {c}], got {tuple(cache.shape[1:])}")
    if weights is None:
        outs = _PrepFunction.apply(p, w, bias, cache, n_heads, k, eps)
    else:
        outs = _PrepFunctionConv.apply(p, cache, n_heads, k, eps, *weights, *biases)
    return list(outs), new


def _launch_fwd(p, w, bias, cache, n_heads, k, eps):
    kern = _load_kernels()
    b, n, c3 = p.shape
    c = c3 // 3
    d = c // n_heads
    out = torch.empty(3, b, n_heads, n, d, device=p.device, dtype=torch.float32)
    grid = (b * n_heads, triton_cdiv(n, BLOCK_T))
    for s in range(3):
        kern._prep_fwd_kernel[grid](
            p[..., s * c :], w[s], bias[s], cache[s] if cache is not None else w, out[s],
            n, n_heads, c3, c, eps,
            K=k, D=d, BT=BLOCK_T, NORMALIZE=NORMALIZED[s], HAS_CACHE=cache is not None, num_warps=WARPS,
        )
    return out


def _launch_bwd(p, w, bias, cache, grads, n_heads, k, eps):
    kern = _load_kernels()
    b, n, c3 = p.shape
    c = c3 // 3
    d = c // n_heads
    n_tb = triton_cdiv(n, BLOCK_T_BWD)
    dp = torch.empty_like(p) if all(g is not None for g in grads) else torch.zeros_like(p)
    dw = torch.zeros(3, b * n_tb, c, k, device=p.device, dtype=torch.float32)
    db = torch.zeros(3, b * n_tb, c, device=p.device, dtype=torch.float32)
    for s in range(3):
        if grads[s] is None:
            continue
        kern._prep_bwd_kernel[(b * n_heads, n_tb)](
            p[..., s * c :], w[s], bias[s], cache[s] if cache is not None else w, grads[s].float().contiguous(),
            dp[..., s * c :], dw[s], db[s],
            n, n_heads, c3, c, eps,
            K=k, D=d, BT=BLOCK_T_BWD, NORMALIZE=NORMALIZED[s], HAS_CACHE=cache is not None, num_warps=WARPS_BWD,
        )
    return dp, dw.sum(1), db.sum(1)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _PrepFunction(torch.autograd.Function):
    """No convolution: gradients to ``p`` only."""

    @staticmethod
    def forward(ctx, p, w, bias, cache, n_heads, k, eps):
        out = _launch_fwd(p, w, bias, cache, n_heads, k, eps)
        ctx.save_for_backward(p, w, bias)
        ctx.args = (n_heads, k, eps)
        return out[0], out[1], out[2]

    @staticmethod
    def backward(ctx, gq, gk, gv):
        p, w, bias = ctx.saved_tensors
        dp, _, _ = _launch_bwd(p, w, bias, None, (gq, gk, gv), *ctx.args)
        return dp, None, None, None, None, None, None


class _PrepFunctionConv(torch.autograd.Function):
    """With the convolution: gradients to ``p`` and to each stream's conv weight and bias."""

    @staticmethod
    def forward(ctx, p, cache, n_heads, k, eps, *params):
        weights, biases = params[:3], params[3:]
        w = torch.stack([t.detach().reshape(t.shape[0], k).float() for t in weights]).contiguous()
        bias = torch.stack([t.detach().float() for t in biases]).contiguous()
        out = _launch_fwd(p, w, bias, cache, n_heads, k, eps)
        ctx.save_for_backward(p, w, bias, cache)
        ctx.args = (n_heads, k, eps)
        ctx.param_meta = [(t.shape, t.dtype) for t in params]
        return out[0], out[1], out[2]

    @staticmethod
    def backward(ctx, gq, gk, gv):
        p, w, bias, cache = ctx.saved_tensors
        dp, dw, db = _launch_bwd(p, w, bias, cache, (gq, gk, gv), *ctx.args)
        grads = [dw[s].reshape(ctx.param_meta[s][0]).to(ctx.param_meta[s][1]) for s in range(3)]
        grads += [db[s].to(ctx.param_meta[3 + s][1]) for s in range(3)]
        return (dp, None, None, None, None, *grads)


def _load_kernels():
    """Define the Triton kernels on first use (Triton is optional)."""
    global _kernels, _import_error
    if _kernels is None and _import_error is None:
        try:
            from . import triton_qkv_prep_kernels

            _kernels = triton_qkv_prep_kernels
        except Exception as exc:  # noqa: BLE001  (any import failure means: no Triton here)
            _import_error = exc
    return _kernels
