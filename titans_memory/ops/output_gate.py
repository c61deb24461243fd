"""Fused output side of the :class:`~titans_memory.memory.NeuralMemory` layer: RMSNorm of the
memory output per head, heads merged, times ``sigmoid`` of the output gate (``out_proj`` stays
outside).

Specification (:func:`output_norm_gate_reference`, plain PyTorch)::

    o: [B, H, T, d]                       memory output (any strides)
    z = rms_norm(o, (d,), weight, eps)    o * rsqrt(mean(o^2, -1) + eps) * weight
    z = z.transpose(1, 2).reshape(B, T, H*d).to(out_dtype)
    z = z * sigmoid(g)                    g: [B, T, H*d], e.g. out_gate(x)

:func:`output_norm_gate` runs it as two Triton kernels (``impl="triton"``), or the reference
(``impl="torch"``); ``impl="auto"`` picks Triton on CUDA where it covers the inputs. The kernels
read ``o`` in its ``[B, H, T, d]`` layout and ``g`` / write ``z`` in ``[B, T, H*d]`` (row stride
``H*d``, head ``h`` at column ``h*d``), so the transpose costs no copy. One program per tile of
``BT`` tokens of one (batch, head): ``[BT, d]`` in registers, fp32 arithmetic whatever the storage
dtypes. Nothing is saved for the backward but the inputs; it recomputes ``r, n, y, s``:

    forward:  r = rsqrt(mean(o^2) + eps) (per row),  n = o r,  y = n w,  s = sigmoid(g),  z = y s
    backward: dy = dz s,  dg = dz y s (1 - s),  dn = dy w,  do = r (dn - n mean(dn n)),
              dw = sum over rows of dy n (one partial row per program, summed by torch: no atomics)

Covered by the kernels: ``d`` a power of two in 16..128; ``o``, ``weight``, ``g`` and the output
in fp32, bf16 or fp16 (fp64 stays on the reference); CUDA tensors, or CPU ones under
``TRITON_INTERPRET=1`` (the tests). Under the interpreter a bf16 store truncates instead of
rounding (a Triton interpreter limitation), so bf16 results there are one bf16 ulp coarser.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, ShapeError
from .fused import _device_of, interpret_mode, triton_available  # noqa: F401  (re-exported)

IMPLS = ("auto", "triton", "torch")
#: head dims the kernels cover (``tl.arange`` needs a power of two)
TRITON_HEAD_DIMS = (16, 32, 64, 128)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NUM_WARPS = 8  # with ~2048 elements a tile: <= 108 registers, no spills on sm_90a (Triton 3.6)

_kernels = None
_import_error: Optional[BaseException] = None


def _load_kernels():
    """The Triton kernels (:mod:`titans_memory.ops.triton_output_gate_kernels`), imported on first use; ``None`` if Triton cannot be imported. Under
    ``TRITON_INTERPRET=1`` (set before the first call) they run on the CPU."""
    global _kernels, _import_error
    if _kernels is None and _import_error is None:
        try:
            from . import triton_output_gate_kernels

            _kernels = triton_output_gate_kernels
        except Exception as exc:  # noqa: BLE001  (ImportError, or a Triton without a usable backend)
            _import_error = exc
    return _kernels


def block_t(d: int) -> int:
    """Tokens per program for head dim ``d``: 2048 elements a tile (16..128 tokens)."""
    return max(16, min(128, 2048 // d))


# ---------------------------------------------------------------------------------------------
def output_norm_gate_reference(
    o: Tensor, weight: Optional[Tensor], eps: Optional[float], g: Tensor, out_dtype: torch.dtype
) -> Tensor:
    """The specification, in plain PyTorch (autograd through it).

    Args:
        o: ``[B, H, T, d]`` memory output, any strides.
        weight: ``[d]`` RMSNorm scale, or None (no scale).
        eps: RMSNorm epsilon; None means ``torch.finfo(o.dtype).eps`` (as ``nn.RMSNorm``).
        g: ``[B, T, H*d]`` gate pre-activations, any float dtype.
        out_dtype: dtype the normalised output is cast to before the gate.
    Returns:
        ``[B, T, H*d]`` in ``torch.promote_types(out_dtype, g.dtype)`` (the product promotes).
    """
    b, h, t, d = o.shape
    z = F.rms_norm(o, (d,), weight, eps)
    z = z.transpose(1, 2).reshape(b, t, h * d).to(out_dtype)
    return z * torch.sigmoid(g)


def _check_shapes(o: Tensor, weight: Optional[Tensor], g: Tensor) -> None:
    if o.dim() != 4:
        raise ShapeError(f"output_norm_gate: o must be [B, H, T, d], got shape {tuple(o.shape)}")
    b, h, t, d = o.shape
    if weight is not None and tuple(weight.shape) != (d,):
        raise ShapeError(f"output_norm_gate: weight must be [{d}] (the head dim of o), got {tuple(weight.shape)}")
    if tuple(g.shape) != (b, t, h * d):
        raise ShapeError(
            f"output_norm_gate: g must be [B, T, H*d] = {(b, t, h * d)} for o of shape {tuple(o.shape)}, "
            f"got {tuple(g.shape)}"
        )


def triton_unsupported_reason(
    o: Tensor, weight: Optional[Tensor], g: Tensor, out_dtype: torch.dtype
) -> Optional[str]:
    """``None`` if the kernels cover these (shape-checked) inputs, else why not (a phrase).

    The device is not considered here (see :func:`output_norm_gate`).
    """
    d = o.shape[-1]
    if d not in TRITON_HEAD_DIMS:
        return f"head dim {d} (the kernels cover powers of two {TRITON_HEAD_DIMS})"
    for name, dt in (("o", o.dtype), ("weight", None if weight is None else weight.dtype), ("g", g.dtype),
                     ("out_dtype", out_dtype)):
        if dt is not None and dt not in _KERNEL_DTYPES:
            return f"{name} dtype {dt} (the kernels cover fp32, bf16, fp16; fp64 stays on the reference)"
    if (weight is not None and weight.device != o.device) or g.device != o.device:
        return "tensors on different devices"
    return None


class _OutputNormGate(torch.autograd.Function):
    """``(o [B, H, T, d], weight [d] or None, eps, g [B, T, H*d], out_dtype) -> z [B, T, H*d]``
    through the Triton kernels; gradients to ``o``, ``weight`` and ``g`` (None where not needed)."""

    @staticmethod
    def forward(ctx, o, weight, eps, g, out_dtype):
        B, H, T, d = o.shape
        eps_v = float(torch.finfo(o.dtype).eps if eps is None else eps)
        o_c = o.contiguous()
        g_c = g.contiguous()
        w_c = torch.ones(d, device=o.device, dtype=torch.float32) if weight is None else weight.contiguous()
        z = torch.empty(B, T, H * d, device=o.device, dtype=torch.promote_types(out_dtype, g.dtype))
        BT = block_t(d)
        n_tiles = -(-T // BT)
        if B * H * n_tiles > 0:
            with _device_of(o):
                _load_kernels()._output_gate_fwd_kernel[(B * H * n_tiles,)](
                    o_c, w_c, g_c, z, T, H, n_tiles, eps_v, D=d, BT=BT, num_warps=_NUM_WARPS,
                )
        ctx.save_for_backward(o_c, w_c, g_c)
        ctx.eps = eps_v
        ctx.o_dtype, ctx.w_dtype = o.dtype, (None if weight is None else weight.dtype)
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dz):
        need_o, need_w, _, need_g, _ = ctx.needs_input_grad
        need_w = need_w and ctx.w_dtype is not None
        if dz is None or not (need_o or need_w or need_g):
            return None, None, None, None, None
        o, w, g = ctx.saved_tensors
        B, H, T, d = o.shape
        BT = block_t(d)
        n_tiles = -(-T // BT)
        n_prog = B * H * n_tiles
        dz = dz.contiguous()
        do = torch.empty_like(o) if need_o else o  # unused pointers where a flag is off
        dg = torch.empty_like(g) if need_g else g
        dw = torch.zeros(max(n_prog, 1), d, device=o.device, dtype=torch.float32) if need_w else w
        if n_prog > 0:
            with _device_of(o):
                _load_kernels()._output_gate_bwd_kernel[(n_prog,)](
                    o, w, g, dz, do, dg, dw, T, H, n_tiles, ctx.eps,
                    D=d, BT=BT, DO=need_o, DG=need_g, DW=need_w, num_warps=_NUM_WARPS,
                )
        return (
            do if need_o else None,
            dw.sum(0).to(ctx.w_dtype) if need_w else None,
            None,
            dg if need_g else None,
            None,
        )


def output_norm_gate(
    o: Tensor,
    weight: Optional[Tensor],
    eps: Optional[float],
    g: Tensor,
    out_dtype: torch.dtype,
    impl: str = "auto",
) -> Tensor:
    """``sigmoid(g) * rms_norm(o) * weight`` with the heads merged: the layer's output before ``out_proj``.

    Args:
        o: ``[B, H, T, d]`` memory output (fp32 in the layer), any strides.
        weight: ``[d]`` RMSNorm scale, or None.
        eps: RMSNorm epsilon; None means ``torch.finfo(o.dtype).eps``.
        g: ``[B, T, H*d]`` gate pre-activations (fp32, or bf16 under autocast).
        out_dtype: dtype of the normalised output before the gate (the layer input's dtype).
        impl: ``"auto"`` (Triton on CUDA where :func:`triton_unsupported_reason` is None, else the
            reference; ``TITANS_MEMORY_TRITON=0`` turns the Triton choice off), ``"triton"``
            (CUDA, or CPU under ``TRITON_INTERPRET=1``) or ``"torch"`` (:func:`output_norm_gate_reference`).
    Returns:
        ``[B, T, H*d]`` in ``torch.promote_types(out_dtype, g.dtype)``, as the reference.
        Gradients flow to ``o``, ``weight`` and ``g``.
    Raises:
        ShapeError: bad shapes; or ``impl="triton"`` with inputs the kernels do not cover.
        ConfigError: unknown ``impl``; or ``impl="triton"`` where Triton cannot run the tensors.
    """
    if impl not in IMPLS:
        raise ConfigError(f"output_norm_gate: unknown impl {impl!r}; choose from {IMPLS}")
    _check_shapes(o, weight, g)
    if impl == "auto":
        use = (
            os.environ.get("TITANS_MEMORY_TRITON", "1") != "0"
            and o.is_cuda
            and triton_unsupported_reason(o, weight, g, out_dtype) is None
            and triton_available()
        )
        impl = "triton" if use else "torch"
    if impl == "torch":
        return output_norm_gate_reference(o, weight, eps, g, out_dtype)
    if not (o.is_cuda or (interpret_mode() and o.device.type == "cpu")):
        raise ConfigError(
            f"output_norm_gate: impl='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1; "
            f"got tensors on {o.device}; use impl='auto' or 'torch'"
        )
    if _load_kernels() is None:
        raise ConfigError(f"output_norm_gate: impl='triton' needs an importable Triton ({_import_error!r}); "
                          "use impl='auto' or 'torch'")
    reason = triton_unsupported_reason(o, weight, g, out_dtype)
    if reason is not None:
        raise ShapeError(f"output_norm_gate: impl='triton' does not cover {reason}; use impl='auto' or 'torch'")
    return _OutputNormGate.apply(o, weight, eps, g, out_dtype)


__all__ = [
    "TRITON_HEAD_DIMS",
    "block_t",
    "output_norm_gate",
    "output_norm_gate_reference",
    "triton_available",
    "triton_unsupported_reason",
]
