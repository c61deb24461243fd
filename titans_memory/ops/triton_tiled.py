"""Drivers of the tiled Triton kernels: :func:`neural_memory_tiled_triton` (inference) and
:func:`neural_memory_tiled_triton_train` (an autograd function), both depth 2, ``n_tiles``
programs per head. Two drivers of the same phases: persistent (on CUDA by default: one launch per
chunk range, the tiles of a head synchronised by barriers,
:mod:`titans_memory.ops.triton_persistent_kernels`) or one launch per phase per chunk
(:mod:`titans_memory.ops.triton_tiled_kernels`; the interpreter's path with several tiles). The
specification is :mod:`titans_memory.ops.tiled`; the plan and the measurements are in
``docs/kernels.md`` and ``benchmarks/RESULTS.md``. ``impl="triton_tiled"`` of
:func:`~titans_memory.ops.neural_memory`; ``impl="auto"`` uses both on CUDA. In training on CUDA
the forward and the backward's recompute are persistent, and the backward's walk is the segment
walk (launch per phase, the adjoint-free phases of a segment's chunks in one launch each; see
:func:`_backward_walk`) replayed from a CUDA graph (``bwd_graph``): the fastest combination measured.
Checked on an H200 (``benchmarks/kernels_persistent.py``) and under ``TRITON_INTERPRET=1`` in CI.
"""

from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError
from .barrier_check import apply_check, validate_check
from .checkpointed import default_segment_chunks
from .fused import TRITON_ACTIVATIONS, _device_of, backward_prec, interpret_mode
from .mlp import MemoryMLPSpec
from .triton_persistent_kernels import _bwd_kernel, _fwd_persistent_kernel
from .triton_retrieval_kernels import _segment_output_kernel, _segment_retrieval_kernel
from .triton_tiled_kernels import (
    PREC,
    PRECISIONS,
    SEG_COEFFS,
    SEG_COEFFS_PRE,
    SEG_COEFFS_WALK,
    SEG_GATES,
    SEG_KEYS,
    SEG_NORMS,
    SEG_RETRIEVAL,
    SEG_STATE,
    _bwd_rows_kernel,
    _bwd_segment_kernel,
    CV_ROWS,
    _coeff_products_kernel,
    _coeff_vectors_kernel,
    _keys_kernel,
    _norms_kernel,
    _output_kernel,
    _update_kernel,
)


# warps and hidden tiles (None: the walk's) of the split forward's retrieval (_segment_retrieval_kernel)
RETRIEVAL_WARPS = 4
RETRIEVAL_TILES: Optional[int] = None
# the split forward without gradients keeps one segment's chunk-start states: at most this many bytes
INFERENCE_SEGMENT_BYTES = 256 * 2**20
# warps and matmul operands (None: the backward's) of the segment walk's phases over all chunks of a
# segment (SEG_KEYS, SEG_NORMS, SEG_RETRIEVAL, SEG_COEFFS_PRE): they are not on the serial path
SEGMENT_PHASE_WARPS: Optional[int] = None
SEGMENT_PHASE_PREC: Optional[str] = None
# code variants of the persistent walk (constexprs LATE_SAVE, PREFETCH, MERGE of _fwd_persistent_kernel;
# SYNC / SAVE False for timing what the barriers / the stored chunk-start states cost: wrong results)
WALK_CODE: dict = {}
# phase 5 of the segment walk with its matmuls merged (MERGE of _bwd_state)
STATE_MERGE = False


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


def head_programs(BH: int, NT: int, dev: torch.device) -> int:
    """``n_hp`` of the persistent grid ``(NT, n_hp)``: as many heads at once as fit one program
    per SM (every program of a head must be resident for its barriers), at most ``BH``."""
    if dev.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    if NT > sms:
        raise ConfigError(f"n_tiles={NT} programs per head exceed the {sms} SMs of {dev}: the persistent kernel needs them all resident")
    return max(1, min(BH, sms // NT))


def resolve_persistent(persistent: Optional[bool], NT: int, dev: torch.device) -> bool:
    """``None`` -> persistent on CUDA, launch per phase elsewhere; under the interpreter (which
    runs programs one after another) the persistent kernels need ``n_tiles = 1``."""
    if persistent is None:
        return dev.type == "cuda"
    if persistent and dev.type != "cuda" and NT > 1:
        raise ConfigError(
            f"persistent=True with n_tiles={NT} under TRITON_INTERPRET=1: the interpreter runs programs one "
            "after another, so the head barrier would never open; use n_tiles=1 or persistent=False")
    return bool(persistent)


def coefficient_products(gates, BC: int) -> Tensor:
    """``[BH, n_chunks, BC + CV_ROWS, BC]``: every chunk's gate-only ``c x c`` product ``A Dm``
    and its gate-only last-row vectors (fp32), one program per head and chunk
    (``_coeff_products_kernel``, ``_coeff_vectors_kernel``), for the kernels that would otherwise
    compute them inside their serial chunk loops. ``gates = (theta, eta, alpha)`` ``[BH, T]``."""
    _, et, al = gates
    BH, T = et.shape
    nc = -(-T // BC)
    cv = CV_ROWS.value
    pm = torch.empty(BH, nc, BC + cv, BC, device=et.device, dtype=torch.float32)
    if nc:
        # 8 warps: with 4, ptxas spills most of the fp32 FMA matmul (Triton 3.6 compile report)
        _coeff_products_kernel[(BH, nc)](et, al, pm, T, BC=BC, CV=cv, num_warps=8, num_stages=1)
        _coeff_vectors_kernel[(BH, nc)](et, al, pm, T, BC=BC, CV=cv, num_warps=2, num_stages=1)
    return pm


def _forward_persistent(xs, gates, st_in, st_out, out, c0, c1, spec, max_update_norm, NT, BC, err,
                        save=None, prec=PREC, num_warps=8, sync=True, pm=None, stash=None, scratch=None):
    """Chunks ``c0 .. c1 - 1`` in one persistent launch: state from ``st_in`` (``(w1, s1, w2, s2)``)
    to ``st_out`` (may be the same tensors); ``out`` receives the outputs (``None``: not
    computed); ``save = (slots, every)`` stores the state at every ``every``-th chunk start into
    ``slots`` (four ``[n, BH, ..]`` tensors). Barrier failures are counted in ``err``. ``pm``:
    :func:`coefficient_products` of ``gates`` (computed here when not given). ``stash = (d2, the)``: each chunk's ``delta2`` and clipped
    ``theta`` for the split forward's retrieval (``STASH`` of the kernel; with ``save`` every chunk).
    ``scratch = (P, N, cnt)`` (without ``out``): the scratch and zeroed barrier counters, allocated
    by a caller that launches many walks (fewer host operations per launch)."""
    BH, T, d = xs[0].shape
    hid = st_in[0].shape[-1]
    if c1 <= c0:
        for a, b in zip(st_out, st_in):
            if a.data_ptr() != b.data_ptr():
                a.copy_(b)
        return
    dev = xs[0].device
    CLIP = max_update_norm is not None
    OUT = out is not None
    if scratch is None:
        p_scr, n_scr, cnt = _walk_scratch(BH, NT, BC, d, CLIP, dev)
        cnt = cnt[0]
    else:
        p_scr, n_scr, cnt = scratch
    o_scr = torch.empty(BH, 2, NT, BC, d, device=dev, dtype=torch.float32) if OUT else p_scr
    if pm is None:
        pm = coefficient_products(gates, BC)
    slots, every = save if save is not None else (st_in, 1)
    n_hp = head_programs(BH, NT, dev)
    _fwd_persistent_kernel[(NT, n_hp)](
        *xs, *gates, *st_in, *st_out, *slots, p_scr, n_scr, o_scr, out if OUT else p_scr, pm, cnt,
        err, *(stash if stash is not None else (p_scr, p_scr)),
        BH, T, c0, c1, every, n_hp, NT, float(max_update_norm) if CLIP else 1.0,
        BC=BC, D=d, F=hid, BF=hid // NT, ACT=spec.activation, RES=bool(spec.residual), CLIP=CLIP, OUT=OUT,
        PREC=prec, STASH=stash is not None, num_warps=num_warps, num_stages=1,
        **{"SAVE": save is not None, "SYNC": sync, **WALK_CODE},
    )


def _walk_scratch(BH, NT, BC, d, CLIP, dev, n_counters: int = 1):
    """Scratch of a persistent walk: ``P [BH, 2, NT, BC, d]``, ``N [BH, 2, NT, 2, BC]`` (``P``
    without the clip), and zeroed barrier counters ``[n_counters, BH]`` (one row per launch)."""
    f32 = torch.float32
    p_scr = torch.empty(BH, 2, NT, BC, d, device=dev, dtype=f32)
    n_scr = torch.empty(BH, 2, NT, 2, BC, device=dev, dtype=f32) if CLIP else p_scr
    cnt = torch.zeros(n_counters, BH, device=dev, dtype=torch.int32)
    return p_scr, n_scr, cnt


def _forward_segments(xs, gates, st_in, st_out, out, c0, c1, spec, max_update_norm, NT, BC, err, K,
                      prec=PREC, num_warps=8, pm=None, ck=None, retrieval_tiles=None):
    """The split forward of chunks ``c0 .. c1 - 1`` (``triton_retrieval_kernels.py``): per segment
    of ``K`` chunks, the persistent walk without outputs (``NT`` tiles, stashing every chunk-start
    state, ``delta2`` and the clipped ``theta``), then the segment's retrieval for all its chunks at
    once (``retrieval_tiles`` tiles, default ``NT``) and their outputs into ``out``. State from
    ``st_in`` to ``st_out`` (may alias). ``ck`` (four ``[n_seg, BH, ..]``): the state at every
    segment start is kept there (the training checkpoints; the walk reads segment ``s`` from
    ``ck[s]`` and writes ``ck[s + 1]``). Returns the last segment's stashed chunk-start states
    (four ``[K, BH, ..]``; slots beyond its chunks unused)."""
    BH, T, d = xs[0].shape
    hid = st_in[0].shape[-1]
    dev, f32 = xs[0].device, torch.float32
    CLIP = max_update_norm is not None
    NR = retrieval_tiles or RETRIEVAL_TILES or NT
    K = max(1, min(K, c1 - c0))
    starts = [torch.empty(K, *t.shape, device=dev, dtype=f32) for t in st_in]
    d2 = torch.empty(K, BH, BC, d, device=dev, dtype=f32)
    the = torch.empty(K, BH, BC, device=dev, dtype=f32) if CLIP else d2
    o_scr = torch.empty(K, BH, NR, BC, d, device=dev, dtype=f32)
    if pm is None:
        pm = coefficient_products(gates, BC)
    if ck is not None:
        for c, t in zip(ck, st_in):
            c[0].copy_(t)
    meta = dict(BC=BC, D=d, F=hid, BF=hid // NR, ACT=spec.activation, CLIP=CLIP, PREC=prec)
    n_seg = -(-(c1 - c0) // K)
    p_scr, n_scr, cnt = _walk_scratch(BH, NT, BC, d, CLIP, dev, n_counters=n_seg)
    for s, n0 in enumerate(range(c0, c1, K)):
        n1 = min(n0 + K, c1)
        last = n1 == c1
        src = [c[s] for c in ck] if ck is not None else (st_in if s == 0 else st_out)
        dst = st_out if last or ck is None else [c[s + 1] for c in ck]
        _forward_persistent(xs, gates, src, dst, None, n0, n1, spec, max_update_norm, NT, BC, err,
                            save=(starts, 1), prec=prec, num_warps=num_warps, stash=(d2, the),
                            scratch=(p_scr, n_scr, cnt[s]), pm=pm)
        _segment_retrieval_kernel[(NR, n1 - n0, BH)](
            xs[0], xs[1], *gates, *starts, d2, the, pm, o_scr, BH, T, n0, **meta,
            num_warps=RETRIEVAL_WARPS, num_stages=1)
        _segment_output_kernel[(n1 - n0, BH)](o_scr, xs[0], out, BH, T, n0, NR, BC=BC, D=d,
                                              RES=bool(spec.residual), num_warps=4, num_stages=1)
    return starts


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
    persistent: Optional[bool] = None,
    check: Union[bool, str] = "async",
    split_forward: bool = True,
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """Same interface and result (to fp32 rounding) as
    :func:`~titans_memory.ops.tiled.neural_memory_tiled`, forward only, depth 2.

    ``persistent``: one launch for the whole sequence with per-head barriers
    (:mod:`~titans_memory.ops.triton_persistent_kernels`), or one launch per phase per chunk;
    ``None``: persistent on CUDA. ``check``: what a persistent call does if a head barrier gave up
    (the programs of a head were not all resident, e.g. when other kernels held SMs for seconds)
    rather than return wrong numbers (:mod:`~titans_memory.ops.barrier_check`): ``"async"``
    (default: no host sync; the call's outputs become NaN on the device and
    :class:`~titans_memory.errors.BarrierTimeout` is raised at the next call, or by
    ``raise_pending_barrier_timeouts``), ``True`` (synchronise and raise at once: one device sync
    per call) or ``False`` (neither; under the caller's own CUDA graph capture, say).
    ``split_forward`` (persistent only, default on): the split forward of
    :mod:`~titans_memory.ops.triton_retrieval_kernels` (the walk updates the state alone; each
    segment's chunks are retrieved at once; segments of ``INFERENCE_SEGMENT_BYTES`` of states);
    off, or for a single chunk: one persistent launch that retrieves as it walks.

    Shapes: ``q, k, v`` ``[B, H, T, d]``; gates ``[B, H, T]``; ``weights = [W1 [B, H, d, E d],
    W2 [B, H, E d, d]]``, ``momentum`` likewise (zeros if ``None``). Returns ``(o [B, H, T, d],
    [W1_T, W2_T], [S1_T, S2_T])``. The given tensors are not modified. Raises
    :class:`~titans_memory.errors.ConfigError` for what it does not cover
    (:func:`tiled_triton_unsupported_reason`).
    """
    W, S = _validated(q, weights, momentum, spec, chunk_size, n_tiles, precision, "neural_memory_tiled_triton")
    validate_check(check)
    B, H, T, d = q.shape
    BH = B * H
    if T == 0:
        return q.new_zeros(q.shape), [w.clone() for w in W], [s.clone() for s in S]

    f32 = torch.float32
    xs = [t.detach().reshape(BH, T, d).to(f32).contiguous() for t in (q, k, v)]
    gates = [t.detach().reshape(BH, T).to(f32).contiguous() for t in (theta, eta, alpha)]
    # private fp32 copies of the state, updated in place tile by tile
    w1, w2 = (t.detach().reshape(BH, *t.shape[2:]).to(f32).clone().contiguous() for t in W)
    s1, s2 = (t.detach().reshape(BH, *t.shape[2:]).to(f32).clone().contiguous() for t in S)

    NT, BC = n_tiles, chunk_size
    out = torch.empty(BH, T, xs[0].shape[-1], device=q.device, dtype=f32)
    state = (w1, s1, w2, s2)
    with _device_of(q):
        if resolve_persistent(persistent, NT, q.device):
            err = torch.zeros(1, device=q.device, dtype=torch.int32)
            n_chunks = -(-T // BC)
            # split: segments of as many chunks as INFERENCE_SEGMENT_BYTES of states allow; a single
            # chunk (streaming token by token, say) has nothing to retrieve in parallel, and one launch
            # costs the host less than three
            if split_forward and n_chunks > 1:
                K = max(1, min(n_chunks, INFERENCE_SEGMENT_BYTES // max(1, 4 * sum(t.numel() for t in state))))
                _forward_segments(xs, gates, state, state, out, 0, n_chunks, spec, max_update_norm, NT, BC, err, K,
                                  prec=precision)
            else:
                _forward_persistent(xs, gates, state, state, out, 0, n_chunks, spec, max_update_norm, NT, BC, err,
                                    prec=precision)
            apply_check(check, err, [out, *state])
        else:
            _forward_chunks(xs, gates, state, out, 0, -(-T // BC), spec, max_update_norm, NT, BC, prec=precision)

    o = out.reshape(B, H, T, d).to(q.dtype)
    W_T = [w1.reshape(W[0].shape).to(W[0].dtype), w2.reshape(W[1].shape).to(W[1].dtype)]
    S_T = [s1.reshape(S[0].shape).to(S[0].dtype), s2.reshape(S[1].shape).to(S[1].dtype)]
    return o, W_T, S_T


# ---------------------------------------------------------------------------------------------
# training path: forward with checkpoints, backward launch per phase, autograd wiring
class _TrainCfg:
    """Static configuration of one training call (flat shapes, tiling, segments, driver)."""

    def __init__(self, BH, T, d, hid, spec, chunk, n_tiles, max_update_norm, segment_chunks, prec=PREC,
                 persistent=False, check=True, bwd_tiles=None, num_warps=(8, 4), stash=False, bwd_graph=False,
                 hoist_coeffs=True, hoist_free=True, bwd_prec=None, split_forward=True, walk_launches=None):
        self.BH, self.T, self.d, self.hid = BH, T, d, hid
        # matmul operands of the forward and the recompute (prec), of the backward's walk (bwd_prec)
        self.prec = prec
        self.bwd_prec = bwd_prec or prec
        self.spec = spec
        # NT / BF: the backward's tiling (recompute and walk); NT_fwd: the forward's
        self.NT_fwd = n_tiles
        self.BC, self.NT = chunk, bwd_tiles or n_tiles
        self.BF = hid // self.NT
        if len(num_warps) != 2:
            raise ConfigError(f"num_warps must be (forward, backward), got {num_warps!r}")
        self.fwd_warps, self.bwd_warps = num_warps
        self.stash = stash
        # the segment walk: the adjoint-free part of phase 4's coefficient backward before the walk
        self.hoist_coeffs = hoist_coeffs
        # (with hoist_coeffs) phase 3 and the coefficient pre-pass also stash the adjoint-free
        # terms of phases 4 and 5's tile work
        self.hoist_free = hoist_coeffs and hoist_free
        # the segment walk's launches per chunk: 3 (phases 2a, 4, 5) or 2 (with hoist_free: phase 4's
        # tile work ahead in 2a, its per-head part in 5; AHEAD of the kernels)
        if walk_launches is None:
            walk_launches = 3
        if walk_launches not in (2, 3) or (walk_launches == 2 and not self.hoist_free):
            raise ConfigError(f"walk_launches must be 3, or 2 with hoist_coeffs and hoist_free, got {walk_launches!r}")
        self.ahead = walk_launches == 2
        self.n_chunks = -(-T // chunk)
        self.K = segment_chunks or default_segment_chunks(self.n_chunks)
        self.n_seg = -(-self.n_chunks // self.K)
        self.max_update_norm = max_update_norm
        self.CLIP = max_update_norm is not None
        self.clip = float(max_update_norm) if self.CLIP else 1.0
        self.persistent = persistent
        # the backward walk launch per phase, replayed from a CUDA graph (persistent: forward only)
        self.bwd_graph = bwd_graph
        self.check = check
        # persistent: the forward walks the state alone and retrieves a segment's chunks at once
        self.split_forward = split_forward
        if max(self.n_seg, self.K) * BH * d * hid >= 2**31:
            raise ConfigError(f"{max(self.n_seg, self.K)} saved states of {BH} heads x {d} x {hid} exceed 2^31 "
                              "elements; use a smaller batch or more segment_chunks")


def _uses_segment_walk(cfg: _TrainCfg, per_phase: bool) -> bool:
    """Whether the walk is the segment walk (:func:`_backward_walk`): launch per phase with the stash."""
    return cfg.stash and (per_phase or not cfg.persistent)


def _backward_scratch(cfg: _TrainCfg, dev, segmented: bool) -> dict:
    """Scratch of the backward (layout in ``triton_tiled_kernels.py``). The chunk walk: ``P``,
    ``DQ``, ``DK`` carry a leading chunk-parity axis of 2; the segment walk (``segmented``): the
    per-chunk buffers carry a leading axis of one slot per chunk of a segment."""
    BH, NT, BC, BF, d = cfg.BH, cfg.NT, cfg.BC, cfg.BF, cfg.d
    f32 = torch.float32
    shapes = dict(P=(BH, NT, BC, d), N=(BH, NT, 2, BC), XH=(BH, NT, BC, BC), DN1=(BH, NT, BC, BC),
                  GT=(BH, NT, 4, BC), GS=(BH, NT, 4), DD2=(BH, NT, BC, d), DQ=(BH, NT + 1, BC, d),
                  DK=(BH, NT + 1, BC, d), X1=(BH, NT, BC, BF), DA1=(BH, NT, BC, BF), DDL1=(BH, NT, BC, BF),
                  HD=(BH, BC))
    if cfg.stash:  # z1_j, u_j, delta2 of the current chunk, written in phase 2 (see _bwd_hidden)
        shapes.update(ZS=(BH, NT, BC, BF), US=(BH, NT, BC, BF), D2S=(BH, NT, BC, d))
    if segmented:
        # the hoisted coefficient backward's part of d n^2; the stashed adjoint-free terms
        shapes.update(HDP=(BH, BC))
        if cfg.hoist_free:
            shapes.update(DF1=(BH, NT, BC, BF), DH1F=(BH, NT, BC, BF), DD2P=(BH, BC, d))
        if cfg.hoist_free and cfg.CLIP:  # the clip's per-token vectors, read by the walk
            shapes.update(CLV=(BH, 7, BC))
        if cfg.ahead and cfg.CLIP:  # the clip terms of d delta2 in the two-launch walk
            shapes.update(Q2S=(BH, BC, d))
        per_chunk = ("P", "N", "XH", "DN1", "GT", "DQ", "DK", "X1", "DA1", "ZS", "US", "D2S", "HDP", "DF1", "DH1F",
                     "DD2P", "Q2S", "CLV")
        lead = {name: min(cfg.K, cfg.n_chunks) for name in per_chunk}
    else:
        lead = dict(P=2, DQ=2, DK=2)
    return {name: torch.zeros(((lead[name],) if name in lead else ()) + shape, device=dev, dtype=f32)
            for name, shape in shapes.items()}


def _backward_walk(cfg: _TrainCfg, xs, gates, go, starts, adj, scr, grads, c0: int, nc: int, err,
                   per_phase: bool) -> None:
    """The backward of chunks ``c0 + nc - 1 .. c0`` (in that order); ``starts`` (four ``[K, BH, ..]``
    tensors) hold their chunk-start states in slots ``0 .. nc - 1``; ``adj`` (the adjoint of the
    state after chunk ``c0 + nc - 1``) is overwritten with that of the state before chunk ``c0``.

    Three drivers of the same phases: ``cfg.persistent`` and not ``per_phase``: one persistent
    launch with barriers (the chunk walk, five phases per chunk); with the stash
    (:func:`_uses_segment_walk`, ``per_phase`` for the CUDA-graph backward): the segment walk, the
    adjoint-free phases of all ``nc`` chunks first (three launches, four with ``hoist_coeffs``),
    then three launches per chunk in reverse, then the ``dq, dk`` rows of the segment; else the
    chunk walk launched phase by phase (five launches per chunk)."""
    dq, dk, dv, dth, det, dal = grads
    BH, NT = cfg.BH, cfg.NT
    dev = xs[0].device
    meta = dict(BC=cfg.BC, D=cfg.d, F=cfg.hid, BF=cfg.BF, ACT=cfg.spec.activation, RES=bool(cfg.spec.residual),
                CLIP=cfg.CLIP, PREC=backward_prec(cfg.bwd_prec), num_warps=cfg.bwd_warps, num_stages=1)
    if _uses_segment_walk(cfg, per_phase):
        seg = (*xs, *gates, go, dv, dth, det, dal, *starts, *adj,
               *(scr[name] for name in ("P", "N", "XH", "DN1", "GT", "DQ", "DK", "X1", "DA1", "ZS", "US", "D2S",
                                        "HDP")),
               *((scr["DF1"], scr["DH1F"], scr["DD2P"]) if cfg.hoist_free else (scr["HDP"],) * 3),
               *(scr[name] for name in ("GS", "DD2", "DDL1", "HD", "PM")), scr.get("Q2S", scr["HD"]),
               scr.get("CLV", scr["HD"]), BH, cfg.T, c0)
        meta["FREE"] = cfg.hoist_free
        meta["AHEAD"] = cfg.ahead
        par = dict(meta, num_warps=SEGMENT_PHASE_WARPS or meta["num_warps"], PREC=SEGMENT_PHASE_PREC or meta["PREC"])
        for ph in (SEG_KEYS, SEG_NORMS, SEG_RETRIEVAL):
            _bwd_segment_kernel[(NT, BH, nc)](*seg, 0, NT, cfg.clip, PHASE=ph, **par)
        if cfg.hoist_coeffs:
            _bwd_segment_kernel[(1, BH, nc)](*seg, 0, NT, cfg.clip, PHASE=SEG_COEFFS_PRE, **par)
        if cfg.ahead:
            walk = (SEG_GATES, SEG_STATE)
        else:
            walk = (SEG_GATES, SEG_COEFFS_WALK if cfg.hoist_coeffs else SEG_COEFFS, SEG_STATE)
        for s in range(nc - 1, -1, -1):
            for ph in walk:
                _bwd_segment_kernel[(NT, BH)](*seg, s, NT, cfg.clip, PHASE=ph, MERGE=STATE_MERGE and ph == SEG_STATE,
                                              **meta)
        _bwd_rows_kernel[(BH, nc)](scr["DQ"], scr["DK"], dq, dk, cfg.T, c0, NT, scr["DQ"][0].numel(),
                                   BC=cfg.BC, D=cfg.d, num_warps=4, num_stages=1)
        return
    args = lambda st, n0, n: (
        *xs, *gates, go, dq, dk, dv, dth, det, dal, *st, *adj,
        scr["P"], scr["DQ"], scr["DK"], scr["N"], scr["XH"], scr["DN1"], scr["GT"], scr["GS"], scr["DD2"],
        scr["HD"], scr["X1"], scr["DA1"], scr["DDL1"],
        *((scr["ZS"], scr["US"], scr["D2S"]) if cfg.stash else (scr["X1"],) * 3), cnt, err,
        BH, cfg.T, n0, n, cfg.n_chunks, n_hp, NT, cfg.clip, scr["P"][0].numel(), scr["DQ"][0].numel())
    meta["STASH"] = cfg.stash
    if cfg.persistent and not per_phase:
        n_hp = head_programs(BH, NT, dev)
        cnt = torch.zeros(BH, device=dev, dtype=torch.int32)
        _bwd_kernel[(NT, n_hp)](*args(starts, c0, nc), PHASE=0, **meta)
        return
    n_hp, cnt = BH, err  # no barrier in this mode: the counter argument is unused
    for n in range(c0 + nc - 1, c0 - 1, -1):
        st = [t[n - c0] for t in starts]
        for ph in range(1, 6):
            _bwd_kernel[(NT, BH)](*args(st, n, 1), PHASE=ph, **meta)


def _recompute_starts(cfg: _TrainCfg, xs, gates, ck_slot, starts, c0: int, nc: int, err, pm=None) -> None:
    """Slots ``0 .. nc - 1`` of ``starts`` <- the start states of chunks ``c0 .. c0 + nc - 1``,
    recomputed (forward without outputs) from ``ck_slot``, the state before chunk ``c0``. ``pm``:
    :func:`coefficient_products` of ``gates`` (the persistent recompute's; computed if not given)."""
    last = [t[nc - 1] for t in starts]
    if cfg.persistent:  # in the forward's tiling (the saved states are whole, whatever the tiling)
        _forward_persistent(xs, gates, ck_slot, last, None, c0, c0 + nc - 1, cfg.spec, cfg.max_update_norm,
                            cfg.NT_fwd, cfg.BC, err, save=(starts, 1), prec=cfg.prec, num_warps=cfg.fwd_warps,
                            pm=pm)
        return
    cur = [c.clone() for c in ck_slot]

    def save(n):
        for dst, t in zip(starts, cur):
            dst[n - c0].copy_(t)

    _forward_chunks(xs, gates, cur, xs[0], c0, c0 + nc - 1, cfg.spec, cfg.max_update_norm, cfg.NT_fwd, cfg.BC,
                    with_output=False, prec=cfg.prec, on_chunk_start=save)
    for dst, t in zip(last, cur):
        dst.copy_(t)


class TiledTritonMemory(torch.autograd.Function):
    """``(q, k, v [BH, T, d], theta, eta, alpha [BH, T], W1, S1 [BH, d, F], W2, S2 [BH, F, d])
    -> (o [BH, T, d], W1_T, S1_T, W2_T, S2_T)``, all fp32 contiguous.

    Forward: the state at the start of every ``K``-th chunk is kept in ``ceil(n_chunks / K)``
    checkpoints (``K = cfg.K``, default ``ceil(sqrt(n_chunks))``). Backward: segments of ``K``
    chunks in reverse; per segment the forward (without outputs) recomputes the ``K`` chunk-start
    states from the checkpoint, then the segment's chunks are walked in reverse
    (:func:`_backward_walk`). ``cfg.persistent`` chooses the persistent kernels (one launch per
    segment and step) or the launch-per-phase ones; both compute the same numbers.
    """

    @staticmethod
    def forward(ctx, cfg, q, k, v, th, et, al, w1, s1, w2, s2):
        state = [t.detach().clone() for t in (w1, s1, w2, s2)]
        ck = [torch.empty(cfg.n_seg, *t.shape, device=t.device, dtype=t.dtype) for t in state]
        xs = [t.detach() for t in (q, k, v)]
        gates = [t.detach() for t in (th, et, al)]
        out = torch.empty_like(xs[0])
        err = torch.zeros(1, device=q.device, dtype=torch.int32)
        last_starts = []
        with _device_of(q):
            if cfg.persistent and cfg.split_forward:  # its last segment's states spare that recompute
                last_starts = _forward_segments(xs, gates, state, state, out, 0, cfg.n_chunks, cfg.spec,
                                                cfg.max_update_norm, cfg.NT_fwd, cfg.BC, err, cfg.K, prec=cfg.prec,
                                                num_warps=cfg.fwd_warps, ck=ck)
            elif cfg.persistent:
                _forward_persistent(xs, gates, state, state, out, 0, cfg.n_chunks, cfg.spec, cfg.max_update_norm,
                                    cfg.NT_fwd, cfg.BC, err, save=(ck, cfg.K), prec=cfg.prec,
                                    num_warps=cfg.fwd_warps)
            else:
                def save(n):
                    if n % cfg.K == 0:
                        for c, t in zip(ck, state):
                            c[n // cfg.K].copy_(t)

                _forward_chunks(xs, gates, state, out, 0, cfg.n_chunks, cfg.spec, cfg.max_update_norm, cfg.NT_fwd,
                                cfg.BC, on_chunk_start=save, prec=cfg.prec)
        apply_check(cfg.check, err, [out, *state])
        ctx.cfg = cfg
        ctx.save_for_backward(*xs, *gates, *ck, *last_starts)
        return (out, *state)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_o, g_w1, g_s1, g_w2, g_s2):
        cfg = ctx.cfg
        qf, kf, vf, th, et, al, *saved = ctx.saved_tensors
        ck, last = saved[:4], saved[4:]
        go = torch.zeros_like(qf) if g_o is None else g_o.float().contiguous()
        adj = [torch.zeros_like(c[0]) if g is None else g.float().contiguous()
               for g, c in zip((g_w1, g_s1, g_w2, g_s2), ck)]
        with _device_of(qf):
            graphed = (_graphed_backward(cfg, (qf, kf, vf), (th, et, al), go, ck, adj, last)
                       if cfg.bwd_graph else None)
            if graphed is not None:
                grads, adj, err = graphed
            else:  # the graph's walk, launched eagerly (first sighting, evicted, capture failed)
                grads, adj, err = _backward_body(cfg, (qf, kf, vf), (th, et, al), go, ck, [a.clone() for a in adj],
                                                 per_phase=cfg.bwd_graph, starts=[t.clone() for t in last])
        apply_check(cfg.check, err, [*grads, *adj])
        return (None, *grads, *adj)


def _backward_body(cfg: _TrainCfg, xs, gates, go, ck, adj, per_phase: bool = False, starts=None):
    """The whole backward: segments in reverse, each recomputed (:func:`_recompute_starts`) and
    walked (:func:`_backward_walk`, ``per_phase`` as there); ``adj`` (the final state's cotangent)
    is overwritten with the initial state's. ``starts`` (optional, four ``[K, BH, ..]``, overwritten):
    the last segment's chunk-start states, kept by the split forward, whose recompute is then
    skipped; the buffer serves the other segments' recomputes. Returns ``(grads of q, k, v,
    theta, eta, alpha; adj; barrier error count)``. Launches only (no host sync), so it can be
    captured in a CUDA graph."""
    qf = xs[0]
    grads = [torch.empty_like(t) for t in (*xs, *gates)]
    err = torch.zeros(1, device=qf.device, dtype=torch.int32)
    segmented = _uses_segment_walk(cfg, per_phase)
    scr = _backward_scratch(cfg, qf.device, segmented)
    # the chunks' gate-only coefficients: read by the persistent recompute and the segment walk
    scr["PM"] = coefficient_products(gates, cfg.BC)
    kept = bool(starts)
    if not kept:
        starts = [torch.empty(min(cfg.K, cfg.n_chunks), *c.shape[1:], device=c.device, dtype=c.dtype) for c in ck]
    for s in range(cfg.n_seg - 1, -1, -1):
        c0 = s * cfg.K
        nc = min(cfg.K, cfg.n_chunks - c0)
        if not (kept and s == cfg.n_seg - 1):
            _recompute_starts(cfg, xs, gates, [c[s] for c in ck], starts, c0, nc, err, pm=scr["PM"])
        _backward_walk(cfg, xs, gates, go, starts, adj, scr, grads, c0, nc, err, per_phase)
    if not segmented:  # the chunk walk leaves the dq, dk rows of chunk 0 (the segment walk does its own)
        _bwd_rows_kernel[(cfg.BH, 1)](scr["DQ"][0], scr["DK"][0], grads[0], grads[1], cfg.T, 0, cfg.NT, 0,
                                      BC=cfg.BC, D=cfg.d, num_warps=4, num_stages=1)
    return grads, adj, err


class _BackwardGraph:
    """:func:`_backward_body` of one configuration captured in a CUDA graph, with static input
    buffers: a call copies the inputs in, replays the graph and returns copies of the outputs.
    The launch-per-phase backward issues 3-5 launches per chunk; replayed from a graph their
    CPU cost (tens of microseconds each through Triton's launcher) goes away, leaving GPU time."""

    def __init__(self, cfg: _TrainCfg, xs, gates, go, ck, adj, last=()):
        self.inputs = [t.clone() for t in (*xs, *gates, go, *ck, *adj, *last)]
        side = torch.cuda.Stream(device=xs[0].device)
        side.wait_stream(torch.cuda.current_stream(xs[0].device))
        with torch.cuda.stream(side):  # compile and warm every kernel outside the capture
            self._body(cfg)
        torch.cuda.current_stream(xs[0].device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: only this (autograd) thread's unsafe calls are refused during the capture,
        # not those of other threads such as a DDP communication thread
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = self._body(cfg)

    def _body(self, cfg):
        xs, gates, go, ck = self.inputs[:3], self.inputs[3:6], self.inputs[6], self.inputs[7:11]
        adj, last = self.inputs[11:15], self.inputs[15:]
        grads, adj, err = _backward_body(cfg, xs, gates, go, ck, adj, per_phase=True, starts=last)
        return [*grads, *adj, err]

    def __call__(self, xs, gates, go, ck, adj, last=()):
        for dst, src in zip(self.inputs, (*xs, *gates, go, *ck, *adj, *last)):
            dst.copy_(src)
        self.graph.replay()
        out = [t.clone() for t in self.outputs]
        return out[:6], out[6:10], out[10]


# at most this many captured backward graphs are kept (each holds its buffers); least recent out
GRAPH_CACHE_SIZE = 2
_GRAPHS: "dict[tuple, _BackwardGraph]" = {}
# configurations seen once: a graph is captured at the second backward of a configuration, so
# shapes that occur once (a last partial batch, varying lengths) run eagerly instead of paying a
# capture each; configurations whose graph was evicted run eagerly from then on (no capture
# thrash when a model cycles through more configurations than the cache holds)
_SEEN: "dict[tuple, None]" = {}
_EVICTED: "dict[tuple, None]" = {}


def clear_backward_graphs() -> None:
    """Drop the captured backward graphs and their buffers (``bwd_graph=True``), e.g. after
    training at one sequence length before another, or before measuring peak memory."""
    _GRAPHS.clear()
    _SEEN.clear()
    _EVICTED.clear()


def _graphed_backward(cfg: _TrainCfg, xs, gates, go, ck, adj, last=()):
    """The backward from the cached graph of ``cfg``'s configuration, captured now if this is
    its second sighting; ``None`` at the first (the caller then runs it eagerly)."""
    key = (xs[0].device, tuple(xs[0].shape), cfg.hid, cfg.spec, cfg.BC, cfg.NT_fwd, cfg.NT, cfg.K, cfg.CLIP,
           cfg.clip, cfg.prec, cfg.bwd_prec, cfg.persistent, cfg.fwd_warps, cfg.bwd_warps, cfg.stash, cfg.hoist_coeffs,
           cfg.hoist_free, cfg.ahead, cfg.split_forward, len(last), SEGMENT_PHASE_WARPS, SEGMENT_PHASE_PREC,
           tuple(sorted(WALK_CODE.items())), STATE_MERGE)
    graph = _GRAPHS.pop(key, None)
    if graph is None:
        if key in _EVICTED:
            return None
        if key not in _SEEN:  # first sighting: None -> the caller runs the backward eagerly
            _SEEN[key] = None
            while len(_SEEN) > 64:
                _SEEN.pop(next(iter(_SEEN)))
            return None
        while len(_GRAPHS) >= GRAPH_CACHE_SIZE:
            oldest = next(iter(_GRAPHS))
            del _GRAPHS[oldest]
            _EVICTED[oldest] = None
        try:
            graph = _BackwardGraph(cfg, xs, gates, go, ck, adj, last)
        except RuntimeError as exc:  # e.g. a CUDA call another library makes during the capture
            warnings.warn(f"the CUDA-graph capture of the tiled memory backward failed ({exc}); this "
                          "configuration runs the backward eagerly from now on", RuntimeWarning, stacklevel=2)
            _EVICTED[key] = None
            return None
    _GRAPHS[key] = graph  # most recent last
    return graph(xs, gates, go, ck, adj, last)


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
    persistent: Optional[bool] = None,
    check: Union[bool, str] = "async",
    bwd_tiles: Optional[int] = None,
    num_warps: Tuple[int, int] = (8, 8),
    stash: bool = True,
    bwd_graph: Optional[bool] = None,
    hoist_coeffs: bool = True,
    hoist_free: bool = True,
    bwd_precision: Optional[str] = None,
    split_forward: bool = True,
    walk_launches: Optional[int] = None,
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """Differentiable twin of :func:`neural_memory_tiled_triton` (depth 2, same coverage and
    requirements, same result): gradients flow to ``q, k, v, theta, eta, alpha``, ``weights`` and
    ``momentum`` from the cotangents of the output and of the final state.

    Shapes: ``q, k, v`` ``[B, H, T, d]``; gates ``[B, H, T]``; ``weights = [W1 [B, H, d, E d],
    W2 [B, H, E d, d]]``, ``momentum`` likewise (zeros if ``None``). Returns ``(o [B, H, T, d],
    [W1_T, W2_T], [S1_T, S2_T])`` in fp32. ``segment_chunks``: chunks between saved states
    (default ``ceil(sqrt(n_chunks))``). ``persistent``, ``check``: as for
    :func:`neural_memory_tiled_triton`. ``bwd_tiles``: tiles per head of the backward (its
    recompute and walk; default ``n_tiles``: the backward holds about twice the live tensors per
    tile, so narrower tiles can fit where the forward's do not). ``num_warps``: (forward and
    recompute, backward) warps per program. ``stash`` (default on): the backward's phase 2 stores each tile's ``z1, u, delta2`` for phases 3-5 instead of their recomputing them (two matmuls,
    the R1 sum and two state loads fewer per phase: 4 % faster on an H200 at W1 shapes). The
    defaults (4 tiles at hidden 256, 8 + 8 warps, stash) are the fastest configuration measured
    there (``benchmarks/RESULTS.md``). ``bwd_graph`` (CUDA only; ``None``: on CUDA): the
    backward's walk runs launch per phase (no barriers; with the stash, the segment walk of
    :func:`_backward_walk`: phases 1, 2 (adjoint-free half) and 3 for all chunks of a segment in
    one launch each, then three launches per chunk), the whole backward captured once per
    configuration in a CUDA graph and replayed (``GRAPH_CACHE_SIZE`` graphs kept, each with its
    own buffers; captured at a configuration's second backward; the first runs the same walk
    eagerly, as does a configuration whose graph was evicted or failed to capture;
    ``clear_backward_graphs()`` frees them). ``hoist_coeffs`` (the segment walk only, default
    on): the part of phase 4's per-head
    coefficient and clip backward that does not depend on the state adjoint (the cotangents from
    the retrieval) runs for all chunks of a segment in one launch before the walk
    (``_bwd_coeffs_pre``), leaving the walk the last-row part, which needs no matmul.
    ``hoist_free`` (with ``hoist_coeffs``, default on): phase 3 and that launch also stash the
    terms of phases 4 and 5 that do not depend on the adjoint (``FREE`` of the kernels), so the
    walk reads them instead of computing them. ``walk_launches`` (the segment walk; default 3):
    launches per chunk in the walk. 3 runs phases 2 (its adjoint half),
    4 and 5; 2 runs phase 4's tile work ahead in phase 2 (the last-row coefficients need only the
    clipped step, known before the walk, and the clip terms are linear in ``d n^2``, added in
    phase 5) and its per-head part at the start of phase 5, so no launch and no matmul of
    phase 4 is left and four of its products come from phase 2. ``bwd_precision`` (default ``precision``): the
    matmul operands of the backward's walk; the forward and the recompute of the chunk-start
    states use ``precision`` (so ``precision="bf16", bwd_precision="tf32"`` runs bf16 operands
    where they pay, in the forward and the recompute, and tf32 in the walk, where bf16 was slower
    on an H200: ``benchmarks/RESULTS.md``). ``split_forward`` (persistent only, default on): the
    forward walks each segment's chunks with the state update alone, then retrieves all of them at
    once (:mod:`~titans_memory.ops.triton_retrieval_kernels`); the last segment's chunk-start
    states it stashed are kept for the backward, which then skips that segment's recompute.

    The backward (:class:`TiledTritonMemory`) is the hand-written tiled backward of
    :func:`~titans_memory.ops.tiled.chunk_backward_depth2` as Triton kernels: five phases per
    chunk, chunks in reverse (``_bwd_chunk`` of ``triton_persistent_kernels.py``), separated by
    head barriers (persistent) or by launches:

    1. ``_bwd_keys``: R1 partials ``P_j = act(k W1_j) W2_j``;
    2. ``_bwd_norms``: R2 partials (clip only) and the gate cotangents through the state adjoint
       (part of R5);
    3. ``_bwd_retrieval``: the ``dq, dk`` rows of the chunk after this one (R7, R8 of its
       partials, tile ``(n + 1) mod n_tiles``); R1 sum, forward recompute, retrieval backward;
       partials of R3, R4, R5, R7;
    4. ``_bwd_coeffs``: R3, R4, R5 sums; the per-head ``c x c`` coefficient backward
       (``_coeffs_bwd`` of ``triton_kernels.py``, in Triton; every tile computes it again rather
       than waiting on a broadcast) and the clip backward; ``d delta1_j``; R6 partials;
    5. ``_bwd_state``: R6 sum; ``dv``; ``dz1_j``; R8 partials; the adjoint of the tile's slice of
       the chunk-start state (in place).

    Every cross-tile sum reads per-tile partials from scratch in a fixed order, so results are
    deterministic (bitwise-equal repeats on the GPU check). No PyTorch compute runs between launches (only buffer copies for the
    checkpoints). Each launch recomputes the tile-local forward it needs from the chunk-start
    state (``z1_j, h1_j, delta1_j``; ``x1_j, da1_j, d delta1_j`` are stashed per tile instead).
    State memory: ``ceil(n_chunks / K) + K + 1`` states (checkpoints, one segment of recomputed
    chunk-start states) plus the adjoint, i.e. ``O(sqrt(T))`` by default.

    Tested under ``TRITON_INTERPRET=1`` on the CPU against autograd through
    :func:`~titans_memory.ops.chunked.neural_memory_chunked` in fp64 (launch per phase with 1-4
    tiles: the chunk walk without the stash, the segment walk with it; persistent with 1), and
    on an H200 by ``benchmarks/kernels_persistent.py``.
    """
    W, S = _validated(q, weights, momentum, spec, chunk_size, n_tiles, precision, "neural_memory_tiled_triton_train")
    validate_check(check)
    B, H, T, d = q.shape
    hid = W[0].shape[-1]
    BH = B * H
    if T == 0:
        return q.new_zeros(q.shape), [w.clone() for w in W], [s.clone() for s in S]
    f32 = torch.float32
    if bwd_tiles is not None:
        reason = tiled_triton_unsupported_reason(q, W, spec, chunk_size, bwd_tiles)
        if reason is not None:
            raise ConfigError(f"bwd_tiles: neural_memory_tiled_triton_train does not cover {reason}")
    persistent = resolve_persistent(persistent, max(n_tiles, bwd_tiles or 1), q.device)
    if bwd_graph and not q.is_cuda:
        raise ConfigError("bwd_graph=True needs CUDA tensors (CUDA graphs); the interpreter runs without it")
    bwd_graph = bool(bwd_graph) if bwd_graph is not None else q.is_cuda
    bwd_precision = bwd_precision or precision
    _check_precision(bwd_precision)
    cfg = _TrainCfg(BH, T, d, hid, spec, chunk_size, n_tiles, max_update_norm, segment_chunks, precision,
                    persistent=persistent, check=check, bwd_tiles=bwd_tiles, num_warps=num_warps, stash=stash,
                    bwd_graph=bwd_graph, hoist_coeffs=hoist_coeffs, hoist_free=hoist_free, bwd_prec=bwd_precision,
                    split_forward=split_forward, walk_launches=walk_launches)
    # the walk the backward runs (the graph's and the eager fallback's alike, see TiledTritonMemory)
    segment_walk = _uses_segment_walk(cfg, cfg.bwd_graph)
    if q.is_cuda and (num_warps[1] > 8 or (bwd_precision == "bf16" and not segment_walk)):
        # both stopped with "CUDA error: an illegal memory access" in the persistent backward on an
        # H200 with Triton 3.6 (2026-12-01, benchmarks/RESULTS.md), which leaves the CUDA context
        # unusable; the segment walk with bf16 operands is checked there (kernels_persistent.py)
        raise ConfigError(
            f"neural_memory_tiled_triton_train on CUDA does not cover bwd_precision={bwd_precision!r} with "
            f"{num_warps[1]} backward warps, stash={stash}, bwd_graph={bwd_graph}, persistent={persistent}: "
            "more than 8 backward warps, and bf16 operands outside the segment walk (stash with bwd_graph or "
            "persistent=False), failed on the GPU; use at most 8 warps, and the defaults for bf16")
    xs = [t.reshape(BH, T, d).to(f32).contiguous() for t in (q, k, v)]
    gates = [t.reshape(BH, T).to(f32).contiguous() for t in (theta, eta, alpha)]
    st = [t.reshape(BH, *t.shape[2:]).to(f32).contiguous() for t in (W[0], S[0], W[1], S[1])]
    o, w1, s1, w2, s2 = TiledTritonMemory.apply(cfg, *xs, *gates, *st)
    return (o.reshape(B, H, T, d), [w1.reshape(W[0].shape), w2.reshape(W[1].shape)],
            [s1.reshape(S[0].shape), s2.reshape(S[1].shape)])
