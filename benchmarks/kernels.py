#!/usr/bin/env python
"""Kernel benchmark of the neural memory (workload W1) and the GPU correctness check.

W1 (fixed): batch 4, model dim 512, 8 heads x 64, 2-layer MLP memory with expansion 4, chunk 64,
the library's default :class:`~titans_memory.config.MemoryConfig` otherwise (silu, residual,
update clip 1.0, causal conv 4), fp32 parameters and activations (TF32 matmuls allowed in PyTorch),
forward + backward of a full layer (projections included); sequence lengths 2k, 8k, 32k, 128k.

Rows (``impl``):

- ``ours_triton``: :class:`~titans_memory.memory.NeuralMemory` with ``impl="triton_tiled"`` (the
  persistent tiled kernels, ``ops/triton_persistent_kernels.py``, segment checkpointing; what
  ``impl="auto"`` picks on CUDA for these shapes), forward + backward;
- ``ours_triton_bf16fwd``: the same layer with ``MemoryConfig(kernel_precision="bf16-forward")``
  (bf16 operands in the memory's forward and recompute, tf32 in the backward's walk);
- ``ours_triton_stream``: the same layer, forward only under ``torch.inference_mode``, the sequence
  fed in pieces of 4096 tokens with the carried state (streaming inference);
- ``ours_triton_fused`` / ``ours_triton_fused_stream``: the same two rows with ``impl="triton"``
  (the fused kernels, one program per head, ``ops/fused.py``);
- ``ours_torch``: ``impl="torch"`` (chunked PyTorch, autograd through the chunk loop);
- ``titans_pytorch``: PyPI ``titans-pytorch`` 0.5.5 ``NeuralMemory(dim=512, heads=8, dim_head=64,
  chunk_size=64)`` (its defaults: 2-layer MLP, expansion 4), forward + backward; a benchmark-only
  peer, never a dependency (skipped with a note when not importable);
- ``sdpa_causal_bf16``: ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` on
  bf16 ``[4, 8, T, 64]`` q/k/v, forward + backward (attention alone, no projections).

Timing: CUDA events, warm-up, median of repeats (fewer repeats for slow rows); peak memory is
``torch.cuda.max_memory_allocated`` during one step (inputs and parameters included). An OOM is
caught, recorded (``tokens_per_s = OOM``) and the longer lengths of that row are skipped; a row
whose step exceeds ``--max-step-s`` skips its longer lengths too (``skipped``).

    python benchmarks/kernels.py --check                     # triton vs reference, exit 1 on mismatch
    python benchmarks/kernels.py --out-md benchmarks/RESULTS.md
    python benchmarks/kernels.py --sweep                     # quick: precision x num_warps at 8k
    python benchmarks/kernels.py --tiled --lengths 2048,8192 # fused vs tiled kernels (fwd; fwd+bwd)

``--check`` compares ``impl="triton"`` (on CUDA also the persistent tiled kernels of
``impl="triton_tiled"``, through ``kernels_persistent.py``'s check) with the chunked PyTorch
reference in fp64 on the device (kernel level: outputs, final state and the gradients of q, k, v, theta, eta, alpha, initial
weights and momentum, depth 1 and 2, clip on/off, T=1000 with a last partial chunk), and the full
layer (output and every parameter gradient vs ``impl="torch"`` in fp32 without TF32). Tolerance on
``||x - ref|| / ||ref||``: tf32 2e-2, bf16 5e-2 (layer: 2e-2).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from titans_memory.config import MemoryConfig  # noqa: E402
from titans_memory.memory import NeuralMemory  # noqa: E402
from titans_memory.ops import layer_shapes, neural_memory_chunked, neural_memory_triton  # noqa: E402
from titans_memory.ops.mlp import MemoryMLPSpec  # noqa: E402

B, D_MODEL, HEADS, HEAD_DIM, CHUNK = 4, 512, 8, 64, 64
LENGTHS = (2048, 8192, 32768, 131072)
IMPLS = ("ours_triton", "ours_triton_bf16fwd", "ours_triton_fused", "ours_triton_stream", "ours_triton_fused_stream",
         "ours_torch", "titans_pytorch", "sdpa_causal_bf16")
TOL = {"tf32": 2e-2, "bf16": 5e-2, "ieee": 1e-4, "layer": 2e-2}
TARGET_TPS_8K = 10e6
TARGET_PEAK_8K = 2.5
STREAM_PIECE = 4096


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------
# correctness
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _inputs(Bq, H, T, d, depth, expansion, dev, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = (rn(Bq, H, T, d) for _ in range(3))
    q, k, v = (t / t.norm(dim=-1, keepdim=True) for t in (q, k, v))
    theta = torch.rand(Bq, H, T, generator=g, dtype=torch.float64) * 0.02
    eta = 0.8 + 0.2 * torch.rand(Bq, H, T, generator=g, dtype=torch.float64)
    alpha = torch.rand(Bq, H, T, generator=g, dtype=torch.float64) * 0.01
    W = [rn(Bq, H, a, b) / math.sqrt(a) for a, b in layer_shapes(d, depth, expansion)]
    S = [0.01 * rn(*w.shape) for w in W]
    return [t.to(dev) for t in (q, k, v, theta, eta, alpha)], [w.to(dev) for w in W], [s.to(dev) for s in S]


def check_kernel(depth: int, clip: Optional[float], precision: str, dev, small: bool) -> Dict[str, float]:
    Bq, H, T, d, E, c = (1, 2, 40, 16, 2, 16) if small else (2, 4, 1000, 64, 4, 64)
    args, W, S = _inputs(Bq, H, T, d, depth, E, dev, seed=depth * 10 + (clip is not None))
    spec = MemoryMLPSpec("silu", residual=True)
    ref = [t.clone().requires_grad_() for t in args + W + S]
    o, Wt, St = neural_memory_chunked(*ref[:6], ref[6 : 6 + depth], ref[6 + depth :], spec, c, clip)
    roots = [o, *Wt, *St]
    g = torch.Generator(device="cpu").manual_seed(99)
    cots = [torch.randn(r.shape, generator=g, dtype=torch.float64).to(dev) for r in roots]
    g_ref = torch.autograd.grad(roots, ref, cots)
    x = [t.detach().float().requires_grad_() for t in args + W + S]
    o2, Wt2, St2 = neural_memory_triton(*x[:6], x[6 : 6 + depth], x[6 + depth :], spec, c, clip, precision=precision)
    g2 = torch.autograd.grad([o2, *Wt2, *St2], x, [t.float() for t in cots])
    names = ["o", *(f"W_T{i}" for i in range(depth)), *(f"S_T{i}" for i in range(depth))]
    errs = {n: _rel(a, b) for n, a, b in zip(names, [o2, *Wt2, *St2], roots)}
    gn = ["dq", "dk", "dv", "dtheta", "deta", "dalpha", *(f"dW0{i}" for i in range(depth)), *(f"dS0{i}" for i in range(depth))]
    errs.update({n: _rel(a, b) for n, a, b in zip(gn, g2, g_ref)})
    return errs


def check_layer(dev, small: bool, impl: str = "triton") -> Dict[str, float]:
    """The NeuralMemory layer with ``impl`` against ``impl="torch"``: output and every parameter
    gradient (relative errors)."""
    cfg = MemoryConfig(depth=2, expansion=2 if small else 4, chunk_size=16 if small else CHUNK)
    dm, h, hd, T = (32, 2, 16, 41) if small else (D_MODEL, HEADS, HEAD_DIM, 1000)
    torch.manual_seed(0)
    ref = NeuralMemory(dm, h, hd, cfg, impl="torch").to(dev)
    tri = NeuralMemory(dm, h, hd, cfg, impl=impl).to(dev)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, T, dm, device=dev)
    gy = torch.randn(2, T, dm, device=dev)
    res = {}
    for name, layer in (("ref", ref), ("tri", tri)):
        y = layer(x)
        (y * gy).sum().backward()
        res[name] = (y.detach(), {n: p.grad for n, p in layer.named_parameters()})
    errs = {"y": _rel(res["tri"][0], res["ref"][0])}
    errs.update({f"d.{n}": _rel(res["tri"][1][n], gr) for n, gr in res["ref"][1].items()})
    return errs


def run_check(small: bool, full: bool = True) -> bool:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ok = True
    print(f"# check on {device_name()} (small={small})")
    print("| case | tol | max rel err | worst tensor | pass |")
    print("|---|---|---|---|---|")
    if full:
        cases = [(dep, clip, "tf32") for dep in (1, 2) for clip in (None, 1.0)] + [(2, 1.0, "bf16")]
    else:
        cases = [(1, 1.0, "tf32"), (2, 1.0, "tf32")]
    for dep, clip, prec in cases:
        t0 = time.perf_counter()
        try:
            errs = check_kernel(dep, clip, prec, dev, small)
            worst = max(errs, key=lambda n: errs[n] if errs[n] == errs[n] else float("inf"))
            e = errs[worst]
            good = e <= TOL[prec]
        except Exception as exc:  # a compile or launch failure is a failed check
            worst, e, good = f"{type(exc).__name__}: {str(exc)[:200]}", float("nan"), False
        ok &= good
        print(f"| depth {dep}, clip {clip}, {prec} | {TOL[prec]:g} | {e:.2e} | {worst} | {'yes' if good else 'NO'} | "
              f"({time.perf_counter() - t0:.1f} s)")
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        errs = check_layer(dev, small)
        worst = max(errs, key=lambda n: errs[n])
        e = errs[worst]
        good = e <= TOL["layer"]
    except Exception as exc:
        worst, e, good = f"{type(exc).__name__}: {str(exc)[:200]}", float("nan"), False
    torch.backends.cuda.matmul.allow_tf32 = old
    ok &= good
    print(f"| layer W1 dims, triton vs torch | {TOL['layer']:g} | {e:.2e} | {worst} | {'yes' if good else 'NO'} |")
    if dev.type == "cuda" and full:  # the persistent tiled kernels, which impl="auto" uses for depth 2
        import kernels_persistent

        kernels_persistent.warm(kernels_persistent.CHECKED)
        ok &= kernels_persistent.check(kernels_persistent.CHECKED)
    print("check:", "PASS" if ok else "FAIL")
    return ok


# ---------------------------------------------------------------------------------------------
# timing
def _time_step(step: Callable[[], None], max_step_s: float, budget_s: float = 4.0, cuda: bool = True):
    """(median seconds, peak GiB) of ``step`` after a warm-up; few repeats for slow steps.

    On CUDA: device events around each step, peak = ``max_memory_allocated`` of the second step.
    ``cuda=False`` (harness test on the CPU): wall clock, peak = nan.
    """
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step()  # warm-up (compilation, allocator)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    if first > max_step_s:
        return first, peak
    reps = int(max(2, min(20, budget_s / max(first, 1e-4))))
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), peak


def _make(impl: str, dev, segment_chunks=None):
    """(setup(T) -> step) for an impl, or raise ImportError for a missing peer. ``segment_chunks``:
    ``MemoryConfig.segment_chunks`` of our layer rows."""
    torch.manual_seed(0)
    if impl in ("ours_triton", "ours_triton_bf16fwd", "ours_torch", "ours_triton_stream", "ours_triton_fused",
                "ours_triton_fused_stream"):
        which = {"ours_torch": "torch"}.get(impl, "triton" if "fused" in impl else "triton_tiled")
        prec = "bf16-forward" if impl == "ours_triton_bf16fwd" else "tf32"
        layer = NeuralMemory(D_MODEL, HEADS, HEAD_DIM, MemoryConfig(depth=2, expansion=4, chunk_size=CHUNK,
                                                                   kernel_precision=prec, segment_chunks=segment_chunks),
                            impl=which).to(dev)

        def setup(T):
            x = torch.randn(B, T, D_MODEL, device=dev)
            gy = torch.randn(B, T, D_MODEL, device=dev)
            if impl.endswith("_stream"):
                def step():
                    with torch.inference_mode():
                        state = None
                        for s in range(0, T, STREAM_PIECE):
                            _, state = layer(x[:, s : s + STREAM_PIECE], state=state, return_state=True)
            else:
                def step():
                    layer.zero_grad(set_to_none=True)
                    (layer(x) * gy).sum().backward()
            return step
        return setup
    if impl == "titans_pytorch":
        from titans_pytorch import NeuralMemory as PeerMemory

        mem = PeerMemory(dim=D_MODEL, heads=HEADS, dim_head=HEAD_DIM, chunk_size=CHUNK).to(dev)

        def setup(T):
            x = torch.randn(B, T, D_MODEL, device=dev)
            gy = torch.randn(B, T, D_MODEL, device=dev)

            def step():
                mem.zero_grad(set_to_none=True)
                y, _ = mem(x)
                (y * gy).sum().backward()
            return step
        return setup
    if impl == "sdpa_causal_bf16":
        import torch.nn.functional as F

        def setup(T):
            q, k, v = (torch.randn(B, HEADS, T, HEAD_DIM, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
            go = torch.randn(B, HEADS, T, HEAD_DIM, device=dev, dtype=torch.bfloat16)

            def step():
                q.grad = k.grad = v.grad = None
                F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(go)
            return step
        return setup
    raise ValueError(impl)


def run_bench(impls, lengths, max_step_s: float, device: str = "cuda") -> List[dict]:
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    date = _dt.date.today().isoformat()
    rows = []
    for impl in impls:
        try:
            setup = _make(impl, dev)
        except ImportError as exc:
            print(f"{impl}: not importable ({exc}); skipped")
            for T in lengths:
                rows.append(dict(impl=impl, seq_len=T, tokens_per_s="not installed", peak_gib="", device=device_name(), date=date))
            continue
        stop: Optional[str] = None
        for T in lengths:
            if stop:
                rows.append(dict(impl=impl, seq_len=T, tokens_per_s=stop, peak_gib="", device=device_name(), date=date))
                continue
            t_start = time.perf_counter()
            try:
                step = setup(T)
                sec, peak = _time_step(step, max_step_s, cuda=cuda)
                tps = B * T / sec
                rows.append(dict(impl=impl, seq_len=T, tokens_per_s=f"{tps:.0f}", peak_gib=f"{peak:.3f}", device=device_name(), date=date))
                print(f"{impl:>20} T={T:>6}: {tps / 1e6:8.3f} M tok/s  {sec * 1e3:9.2f} ms/step  peak {peak:7.3f} GiB"
                      f"  ({time.perf_counter() - t_start:.0f} s)", flush=True)
                if sec > max_step_s:
                    stop = "skipped"
            except torch.OutOfMemoryError:
                rows.append(dict(impl=impl, seq_len=T, tokens_per_s="OOM", peak_gib="", device=device_name(), date=date))
                print(f"{impl:>20} T={T:>6}: OOM", flush=True)
                stop = "OOM"
            except Exception as exc:
                msg = f"error: {type(exc).__name__}"
                print(f"{impl:>20} T={T:>6}: {msg} {str(exc)[:300]}", flush=True)
                rows.append(dict(impl=impl, seq_len=T, tokens_per_s=msg, peak_gib="", device=device_name(), date=date))
                stop = "skipped"
            step = None
            if cuda:  # the captured backward graphs of impl="triton_tiled" hold buffers: not in the next row's peak
                from titans_memory.ops.triton_tiled import clear_backward_graphs

                clear_backward_graphs()
                torch.cuda.empty_cache()
        if impl.startswith("ours_triton_fused"):
            import titans_memory.ops.fused as fused

            print("kernel compiler report (regs/thread, spilled regs, shared bytes):", fused.KERNEL_STATS, flush=True)
    return rows


def run_sweep(T: int = 8192) -> None:
    """ours_triton (layer fwd+bwd) at T over matmul precision x num_warps (a quick tuning table)."""
    import titans_memory.ops.fused as fused

    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    layer = NeuralMemory(D_MODEL, HEADS, HEAD_DIM, MemoryConfig(depth=2, expansion=4, chunk_size=CHUNK), impl="triton").to(dev)
    x = torch.randn(B, T, D_MODEL, device=dev)
    gy = torch.randn(B, T, D_MODEL, device=dev)
    orig = fused.neural_memory_triton
    print("| precision | num_warps | M tok/s | ms/step | peak GiB |")
    print("|---|---|---|---|---|")
    for prec, nw in (("tf32", 8), ("tf32", 4), ("bf16", 8)):
        def patched(*a, _p=prec, _w=nw, **kw):
            return orig(*a, precision=_p, num_warps=_w, **kw)
        import titans_memory.ops as ops
        ops.neural_memory_triton = patched
        try:
            def step():
                layer.zero_grad(set_to_none=True)
                (layer(x) * gy).sum().backward()
            sec, peak = _time_step(step, 30.0, budget_s=2.0)
            print(f"| {prec} | {nw} | {B * T / sec / 1e6:.3f} | {sec * 1e3:.2f} | {peak:.3f} |", flush=True)
        except Exception as exc:
            print(f"| {prec} | {nw} | error: {type(exc).__name__}: {str(exc)[:200]} | | |", flush=True)
        finally:
            ops.neural_memory_triton = orig


def run_tiled(lengths, device: str = "cuda", tiles=(1, 2, 4, 8)) -> bool:
    """Forward only (inference), W1 operator shapes: the fused kernel (one program per head) vs the
    tiled launch-per-phase kernels (``n_tiles`` programs per head, ``ops/triton_tiled.py``), with a
    correctness check of each tiled run against the chunked form (fp64) at the first length; then
    the same for forward + backward (:func:`run_tiled_train`). Returns False on a mismatch
    (relative error above 2e-2, the tf32 bound of ``--check``)."""
    from titans_memory.ops.triton_tiled import neural_memory_tiled_triton

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    spec = MemoryMLPSpec("silu", residual=True)
    ok = True
    print("| impl | T | M tok/s | ms | rel. err vs chunked fp64 |")
    print("|---|---|---|---|---|")
    for i, T in enumerate(lengths):
        args, W, S = _inputs(B, HEADS, T, HEAD_DIM, 2, 4, dev, seed=7)
        x = [t.float() for t in args]
        Wf, Sf = [w.float() for w in W], [s.float() for s in S]
        ref = neural_memory_chunked(*args, W, S, spec, CHUNK, 1.0)[0] if i == 0 else None
        runs = [("fused (1 program/head)", lambda: neural_memory_triton(*x, Wf, Sf, spec, CHUNK, 1.0))]
        runs += [(f"tiled x{n}", (lambda n=n: neural_memory_tiled_triton(*x, Wf, Sf, spec, CHUNK, 1.0, n_tiles=n)))
                 for n in tiles]
        for name, fn in runs:
            with torch.no_grad():
                err = "" if ref is None else f"{_rel(fn()[0], ref):.1e}"
                if ref is not None and name.startswith("tiled") and float(err) > TOL["tf32"]:
                    ok = False
                sec, _ = _time_step(fn, 30.0, budget_s=2.0, cuda=cuda)
            print(f"| {name} | {T} | {B * T / sec / 1e6:.3f} | {sec * 1e3:.2f} | {err} |", flush=True)
    return ok and run_tiled_train(lengths, dev, tiles)


def run_tiled_train(lengths, dev, tiles=(1, 2, 4, 8)) -> bool:
    """Forward + backward, W1 operator shapes: the fused kernels vs the tiled training kernels, with
    a gradient check (every input) against autograd through the chunked form in fp64 at the first
    length. Returns False on a relative error above 2e-2 (the tf32 bound of ``--check``)."""
    from titans_memory.ops.triton_tiled import neural_memory_tiled_triton_train

    cuda = dev.type == "cuda"
    spec = MemoryMLPSpec("silu", residual=True)
    ok = True
    print("\n| impl (fwd+bwd) | T | M tok/s | ms | peak GiB | max rel. err of the gradients |")
    print("|---|---|---|---|---|---|")
    for i, T in enumerate(lengths):
        args, W, S = _inputs(B, HEADS, T, HEAD_DIM, 2, 4, dev, seed=8)
        gref = None
        if i == 0:
            ref_in = [t.clone().requires_grad_() for t in args + W + S]
            o = neural_memory_chunked(*ref_in[:6], ref_in[6:8], ref_in[8:], spec, CHUNK, 1.0)[0]
            gref = torch.autograd.grad(o, ref_in, o.detach() * 0 + 1.0 / math.sqrt(o.numel()))
        x = [t.float().requires_grad_() for t in args + W + S]
        cot = torch.full(x[0].shape, 1.0 / math.sqrt(x[0].numel()), device=dev)
        runs = [("fused (1 program/head)", lambda: neural_memory_triton(*x[:6], x[6:8], x[8:], spec, CHUNK, 1.0)[0])]
        runs += [(f"tiled x{n}", (lambda n=n: neural_memory_tiled_triton_train(
            *x[:6], x[6:8], x[8:], spec, CHUNK, 1.0, n_tiles=n)[0])) for n in tiles]
        for name, fn in runs:
            err = ""
            if gref is not None:
                g = torch.autograd.grad(fn(), x, cot)
                e = max(_rel(a, b) for a, b in zip(g, gref))
                err = f"{e:.1e}"
                ok &= e < TOL["tf32"]
            sec, peak = _time_step(lambda: torch.autograd.grad(fn(), x, cot), 30.0, budget_s=2.0, cuda=cuda)
            print(f"| {name} | {T} | {B * T / sec / 1e6:.3f} | {sec * 1e3:.2f} | {peak:.3f} | {err} |", flush=True)
    return ok


# ---------------------------------------------------------------------------------------------
# autograd memory of the memory operator (any device)
def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of ``fn()``."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[(st.device, st.data_ptr())] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def run_saved(impls, lengths, device: str) -> None:
    """Saved-for-backward GiB of ``neural_memory`` alone at W1 shapes (inputs included)."""
    from titans_memory.ops import neural_memory

    dev = torch.device(device)
    print(f"# bytes autograd keeps for the backward of neural_memory, W1 shapes, on {dev} (GiB)")
    print("| impl | " + " | ".join(_len(T) for T in lengths) + " |")
    print("|---" * (len(lengths) + 1) + "|")
    for impl in impls:
        cells = []
        for T in lengths:
            torch.manual_seed(0)
            args, W, S = _inputs(B, HEADS, T, HEAD_DIM, 2, 4, dev, seed=0)
            x = [t.float().requires_grad_() for t in args + W + S]
            t0 = time.perf_counter()
            n = saved_bytes(lambda: neural_memory(*x[:6], x[6:8], x[8:], chunk_size=CHUNK, max_update_norm=1.0, impl=impl))
            cells.append(f"{n / 2**30:.3f}")
            print(f"  {impl} T={T}: {n / 2**30:.3f} GiB ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        print(f"| {impl} | " + " | ".join(cells) + " |", flush=True)


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile report (no GPU needed)
SMEM_LIMIT_H100 = 232448  # bytes of shared memory one block may opt into on sm_90


def _aot_compile(fn, consts: dict, nw: int, label: str) -> bool:
    """Compile one Triton kernel for sm_90a without a GPU (Triton's bundled ptxas) and print a table
    row: registers, spill bytes, shared memory, wgmma count, compile time. False if the kernel
    needs more shared memory than an H100 block has. Arguments named ``*_ptr`` are fp32 pointers,
    ``clip`` an fp32 scalar, the others int32 scalars."""
    import inspect
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = dict(consts)
    for prm in getattr(fn, "params", ()):  # a constexpr left out would compile as a run-time argument
        if getattr(prm, "is_constexpr", False) and prm.name not in consts:
            default = getattr(prm, "default", inspect.Parameter.empty)
            if default is inspect.Parameter.empty:
                raise ValueError(f"{label}: constexpr {prm.name} needs a value")
            consts[prm.name] = default
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = next((str(bindir / n) for n in ("ptxas-blackwell", "ptxas") if (bindir / n).exists()), "ptxas")
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("cnt_ptr", "err_ptr"):
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name == "clip":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    t0 = time.perf_counter()
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=nw, num_stages=1))
    dt = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(k.asm["ptx"])
        out = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True)
    info = " ".join(re.sub(r"^ptxas\S* info\s*:\s*", "", ln.strip()) for ln in out.stderr.splitlines()
                    if "registers" in ln or "spill" in ln)
    smem = k.metadata.shared
    ok = smem <= SMEM_LIMIT_H100
    print(f"| {label} | {nw} | {dt:.1f} | {smem} | {k.asm['ptx'].count('wgmma.mma_async')} | {info} | "
          f"{'ok' if ok else 'TOO MUCH SHARED MEMORY'} |", flush=True)
    return ok


def _aot_header() -> None:
    import triton

    print(f"# AOT compile for sm_90a, Triton {triton.__version__} (no GPU used)")
    print("| kernel variant | warps | compile s | shared bytes | wgmma | ptxas report | fits H100 |")
    print("|---|---|---|---|---|---|---|")


def run_aot() -> int:
    """Compile the kernel variants W1 and the check use for sm_90a and print the compiler report.

    Needs only Triton (its bundled ptxas): registers, spill bytes, stack, shared memory, wgmma count,
    compile time. Fails (exit 1) if a variant needs more shared memory than an H100 block has.
    """
    from titans_memory.ops import triton_kernels as K

    _aot_header()
    ok = True
    for prec in ("tf32", "bf16"):
        c2 = dict(BC=CHUNK, D=HEAD_DIM, F=4 * HEAD_DIM, BF=64, ACT="silu", RES=True, PREC=prec, CLIP=True)
        ok &= _aot_compile(K._fwd2_kernel, dict(c2, OUT=True, SAVE=True, LINEAR=False, STORE_B1=True), 8, f"fwd2 train {prec}")
        ok &= _aot_compile(K._fwd2_kernel, dict(c2, OUT=True, SAVE=False, LINEAR=False, STORE_B1=False), 8, f"fwd2 inference {prec}")
        ok &= _aot_compile(K._fwd2_kernel, dict(c2, OUT=False, SAVE=False, LINEAR=True, STORE_B1=False), 8, f"fwd2 recompute {prec}")
        ok &= _aot_compile(K._bwd2_kernel, c2, 8, f"bwd2 {prec}")
        c1 = dict(c2, F=HEAD_DIM, BF=HEAD_DIM)
        ok &= _aot_compile(K._fwd1_kernel, dict(c1, OUT=True, SAVE=True, LINEAR=False, STORE_B1=False), 8, f"fwd1 train {prec}")
        ok &= _aot_compile(K._bwd1_kernel, c1, 8, f"bwd1 {prec}")
    print("aot:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def run_aot_tiled(tiles=(4, 8)) -> int:
    """The same compiler report for the tiled kernels (``ops/triton_tiled_kernels.py``, launch per
    phase) and the persistent ones (``ops/triton_persistent_kernels.py``) at W1 shapes, tile width
    ``4 d / n_tiles``, with the launch options the drivers use (1 stage; 4 warps, 8 for the
    persistent forward, 4 and 8 for the persistent backward). Run it with the GPU machine's Triton
    (3.6) on the path for figures that hold there: shared memory differs between versions."""
    from titans_memory.ops import triton_persistent_kernels as TP
    from titans_memory.ops import triton_tiled_kernels as TT
    from titans_memory.ops.fused import backward_prec

    _aot_header()
    ok = True
    F = 4 * HEAD_DIM
    for n in tiles:
        # every constexpr given (one left out would compile as a run-time argument, both branches)
        base = dict(BC=CHUNK, D=HEAD_DIM, F=F, BF=F // n, ACT="silu", PREC=TT.PREC, RES=True, CLIP=True,
                    SYNC=True, STASH=False)
        for fn, extra, nw, label in (
            (TT._keys_kernel, {}, 4, "_keys_kernel"),
            (TT._norms_kernel, {}, 4, "_norms_kernel"),
            (TT._update_kernel, dict(NEXT=True, PREV=True), 4, "_update_kernel"),
            *((TP._bwd_kernel, dict(PHASE=ph), 4, f"_bwd_kernel phase {ph}") for ph in (1, 2, 3, 4, 5)),
            (TP._fwd_persistent_kernel, dict(OUT=True, SAVE=True), 8, "persistent fwd (train)"),
            (TP._fwd_persistent_kernel, dict(OUT=False, SAVE=True), 8, "persistent fwd (recompute)"),
            # the split forward's walk, and its code variants (WALK_CODE of ops/triton_tiled.py)
            *((TP._fwd_persistent_kernel, dict(OUT=False, SAVE=True, STASH=True, **code), 8,
               f"persistent walk (split fwd) {'+'.join(code) or 'default'}")
              for code in ({}, dict(LATE_SAVE=True), dict(PREFETCH=True), dict(MERGE=True))),
            (TT._coeff_products_kernel, dict(CV=TT.CV_ROWS.value), 8, "coefficient products (all chunks)"),
            (TT._coeff_vectors_kernel, dict(CV=TT.CV_ROWS.value), 2, "coefficient vectors (all chunks)"),
            (TP._bwd_kernel, dict(PHASE=0), 4, "persistent bwd"),
            (TP._bwd_kernel, dict(PHASE=0), 8, "persistent bwd"),
            (TP._bwd_kernel, dict(PHASE=0, STASH=True), 8, "persistent bwd, stash"),
            # the default (hoisted coefficients, FREE, the two-launch walk: AHEAD in phases 4, 6 and 7);
            # PHASE 5 is the walk's phase 4 when not hoisted, 8 the three-launch walk's
            *((TT._bwd_segment_kernel, dict(PHASE=ph, FREE=ph != TT.SEG_COEFFS, AHEAD=ph in (4, 6, 7)), 8,
               f"segment walk phase {ph}") for ph in range(1, 9)),
            *((TT._bwd_segment_kernel, dict(PHASE=ph, FREE=True, AHEAD=False), 8,
               f"segment walk phase {ph}, three launches per chunk") for ph in (4, 6, 7)),
            (TT._bwd_segment_kernel, dict(PHASE=TT.SEG_STATE, FREE=True, MERGE=True), 8,
             f"segment walk phase {TT.SEG_STATE}, MERGE (STATE_MERGE)"),
            # the phases over a segment's chunks at 4 warps (SEGMENT_PHASE_WARPS), tf32 and bf16
            *((TT._bwd_segment_kernel, dict(PHASE=ph, FREE=True, PREC=backward_prec(pr)), 4,
               f"segment walk phase {ph}, {pr}") for ph in (1, 2, 3, 7) for pr in ("tf32", "bf16")),
        ):
            if fn in (TP._bwd_kernel, TT._bwd_segment_kernel) and "PREC" not in extra:
                extra = dict(extra, PREC=backward_prec(TT.PREC))  # the backward's phases: truncated tf32
            consts = {k: v for k, v in dict(base, **extra).items() if k in fn.arg_names}
            ok &= _aot_compile(fn, consts, nw, f"tiled x{n} {label}")
    print("aot:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------
# reporting
def _fmt_tps(v: str) -> str:
    try:
        return f"{float(v) / 1e6:.3f}"
    except ValueError:
        return v


def _len(T: int) -> str:
    return f"{T // 1024}k" if T >= 1024 and T % 1024 == 0 else str(T)


def table(rows: List[dict], lengths) -> str:
    by = {(r["impl"], r["seq_len"]): r for r in rows}
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    head = "| impl | " + " | ".join(f"{_len(T)} M tok/s (peak GiB)" for T in lengths) + " |"
    lines = [head, "|---" * (len(lengths) + 1) + "|"]
    for impl in impls:
        cells = []
        for T in lengths:
            r = by.get((impl, T))
            if r is None:
                cells.append("")
            elif r["peak_gib"]:
                cells.append(f"{_fmt_tps(r['tokens_per_s'])} ({float(r['peak_gib']):.2f})")
            else:
                cells.append(r["tokens_per_s"])
        lines.append(f"| {impl} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows: List[dict]) -> List[str]:
    by = {(r["impl"], r["seq_len"]): r for r in rows}
    out = []
    r8 = by.get(("ours_triton", 8192))
    r128 = by.get(("ours_triton", 131072))

    def num(r, key):
        try:
            return float(r[key])
        except (TypeError, ValueError, KeyError):
            return None

    tps8, peak8 = (num(r8, "tokens_per_s"), num(r8, "peak_gib")) if r8 else (None, None)
    tps128 = num(r128, "tokens_per_s") if r128 else None
    if tps8 is None:
        out.append("- ours_triton at 8k >= 10 M tok/s fwd+bwd with peak <= 2.5 GiB: **missed** (no measurement)")
    else:
        met = tps8 >= TARGET_TPS_8K and peak8 is not None and peak8 <= TARGET_PEAK_8K
        out.append(f"- ours_triton at 8k >= 10 M tok/s fwd+bwd with peak <= 2.5 GiB: **{'met' if met else 'missed'}** "
                   f"({tps8 / 1e6:.2f} M tok/s: {'met' if tps8 >= TARGET_TPS_8K else 'missed'}; peak {peak8:.2f} GiB: "
                   f"{'met' if peak8 is not None and peak8 <= TARGET_PEAK_8K else 'missed'})")
    if tps8 is None or tps128 is None:
        out.append("- ours_triton tok/s at 128k within 20% of 8k: **missed** (no measurement at both lengths)")
    else:
        ratio = tps128 / tps8
        out.append(f"- ours_triton tok/s at 128k within 20% of 8k: **{'met' if ratio >= 0.8 else 'missed'}** "
                   f"(128k / 8k = {ratio:.2f})")
    return out


def write_csv(rows: List[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["impl", "seq_len", "tokens_per_s", "peak_gib", "device", "date"])
        w.writeheader()
        w.writerows(rows)


GENERATED = "### Latest run of `benchmarks/kernels.py` (generated)"


def write_section(md_path: Path, section: str, title: str = GENERATED, parent: str = "## Kernels") -> None:
    """Replace the ``title`` subsection (up to the next ``##``/``###`` heading) of ``md_path``,
    or insert it first under ``parent`` (appending ``parent`` if missing); the hand-written
    subsections and the rest of the file are kept."""
    lines = md_path.read_text().splitlines() if md_path.exists() else ["# Results", ""]
    new = section.rstrip("\n").splitlines() + [""]
    start = next((i for i, line in enumerate(lines) if line.strip() == title), None)
    if start is not None:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith(("## ", "### "))), len(lines))
        lines = lines[:start] + new + lines[end:]
    else:
        at = next((i for i, line in enumerate(lines) if line.strip() == parent), None)
        if at is None:
            if lines and lines[-1].strip():
                lines.append("")
            lines += [parent, ""] + new
        else:
            rest = lines[at + 1 :]
            while rest and not rest[0].strip():
                rest.pop(0)
            lines = lines[: at + 1] + [""] + new + rest
    while len(lines) > 1 and not lines[-1].strip() and not lines[-2].strip():
        lines.pop()
    md_path.write_text("\n".join(lines).rstrip("\n") + "\n")


def section_text(rows, lengths, command: str, limits: str) -> str:
    date = rows[0]["date"] if rows else _dt.date.today().isoformat()
    parts = [
        GENERATED,
        "",
        f"Device: {device_name()}; torch {torch.__version__}"
        + (f", triton {__import__('triton').__version__}" if _has_triton() else "")
        + f"; date {date}.",
        f"Command: `{command}`.",
        "",
        "Workload W1: batch 4, d_model 512, 8 heads x 64, 2-layer MLP memory (expansion 4), chunk 64, "
        "default MemoryConfig otherwise (silu, residual, update clip 1.0, causal conv 4), fp32 with TF32 "
        "matmuls; full layer forward + backward (projections included) except the `_stream` rows "
        "(forward only, inference mode, 4096-token pieces with carried state) and `sdpa_causal_bf16` "
        "(attention alone, bf16). Cells: million tokens/s (peak allocated GiB during one step, inputs "
        "and parameters included). CSV: `benchmarks/results/kernels.csv`.",
        "",
        table(rows, lengths),
        "",
        "Targets:",
        *targets(rows),
        "",
        limits,
    ]
    return "\n".join(parts) + "\n"


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401

        return True
    except Exception:
        return False


# matmuls per chunk and head in the W1 kernels (clip on): forward 66, segment recompute 40,
# backward 185, each 64 x 64 x 64 (see titans_memory/ops/fused.py)
MEM_FLOP_PER_TOKEN = 291 * 2 * 64**3 / CHUNK * HEADS
TF32_PEAK_PER_SM = 494.7e12 / 132  # H100 SXM dense tf32 (the H200 has the same SMs)


def limits_text(rows: List[dict]) -> str:
    """What limits the kernel, with the achieved rate of the memory kernels at 8k when measured."""
    by = {(r["impl"], r["seq_len"]): r for r in rows}
    achieved = ""
    try:
        tps = float(by[("ours_triton", 8192)]["tokens_per_s"])
        tflops = tps * MEM_FLOP_PER_TOKEN / 1e12
        achieved = (f" Measured: {tps / 1e6:.2f} M tok/s at 8k is about {tflops:.0f} TFLOP/s in the memory "
                    f"kernels ({MEM_FLOP_PER_TOKEN / 1e6:.1f} MFLOP/token: the matmuls of the fused kernels, projections excluded), "
                    f"{100 * tflops * 1e12 / (132 * TF32_PEAK_PER_SM):.1f}% of the dense tf32 peak of the "
                    "H100's and H200's 132 SMs.")
    except (KeyError, ValueError):
        pass
    return (
        "What limits the kernel: latency and registers, not the GPU's FLOPs or bytes. The chunk recurrence is "
        "sequential; `ours_triton` (the persistent tiled kernels) splits each head's hidden units over 4 "
        "programs (128 of the 132 SMs at W1) that synchronise per chunk, and each chunk is a chain of "
        "dependent 64x64x64 matmuls with ~255 registers per thread and local-memory spills (profiles: "
        "`benchmarks/kernels_persistent.py --diag`, `--diag-bwd`; `docs/kernels.md`)."
        + achieved
    )


def gpu_kernels(fn) -> list:
    """(name, start us, duration us) of every GPU kernel ``fn`` launched, from the CUDA profiler
    (CUPTI: GPU time only, whatever the CPU's launch gaps; kernels replayed from CUDA graphs
    included), in start order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ks = [(e.name, e.time_range.start, e.time_range.elapsed_us()) for e in prof.events()
          if e.device_type == torch.autograd.DeviceType.CUDA]
    return sorted(ks, key=lambda k: k[1])


def run_profile(impls, lengths, top: int = 14) -> None:
    """Where one step's GPU time goes, per impl and length: wall time of the step (CUDA events),
    the summed GPU time of its kernels and the idle rest, and the kernels by total time."""
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True  # as in run_bench: the layer's projections in tf32
    torch.backends.cudnn.allow_tf32 = True
    for impl in impls:
        setup = _make(impl, dev)
        for T in lengths:
            step = setup(T)
            for _ in range(3):  # compile; a graph backward is captured at the second step
                step()
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            wall = a.elapsed_time(b)
            ks = gpu_kernels(step)
            busy = sum(k[2] for k in ks) / 1e3
            groups = {}
            for name, _, us in ks:
                g = groups.setdefault(name[:80], [0, 0.0])
                g[0] += 1
                g[1] += us
            print(f"\n# {impl}, T = {T}, {device_name()}: step {wall:.2f} ms (CUDA events), kernels {busy:.2f} ms "
                  f"GPU time, idle or overlapped {wall - busy:.2f} ms")
            print("| kernel | launches | total ms | share of the step |")
            print("|---|---|---|---|")
            for name, (n, us) in sorted(groups.items(), key=lambda g: -g[1][1])[:top]:
                print(f"| {name} | {n} | {us / 1e3:.2f} | {us / 1e3 / wall:.0%} |")
            rest = sorted(groups.values(), key=lambda g: -g[1])[top:]
            if rest:
                print(f"| ({len(rest)} other kernels) | {sum(g[0] for g in rest)} | {sum(g[1] for g in rest) / 1e3:.2f} | |")
            print(flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="correctness check only; exit 1 on mismatch")
    p.add_argument("--small", action="store_true", help="tiny check shapes (CPU interpreter smoke test)")
    p.add_argument("--quick-check", action="store_true", help="check depth 1 and 2 with clipping, tf32, and the layer only")
    p.add_argument("--sweep", action="store_true", help="quick precision x num_warps table at 8k")
    p.add_argument("--tiled", action="store_true",
                   help="fused kernels vs the tiled kernels (1-8 programs per head), forward and fwd+bwd, with checks")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    p.add_argument("--max-step-s", type=float, default=12.0, help="skip longer lengths of a row after a step this slow")
    p.add_argument("--out-csv", type=Path, default=ROOT / "benchmarks" / "results" / "kernels.csv")
    p.add_argument("--out-md", type=Path, default=None, help="write the '## Kernels' section into this markdown file")
    p.add_argument("--command", default=None, help="command line to record in the markdown section")
    p.add_argument("--device", default="cuda", help="cpu: test the harness (Triton rows need TRITON_INTERPRET=1)")
    p.add_argument("--saved", action="store_true",
                   help="print the bytes autograd keeps for neural_memory's backward (--impls torch,checkpointed,triton)")
    p.add_argument("--profile", action="store_true",
                   help="GPU time per kernel of one step of each --impls at each --lengths (CUDA profiler)")
    p.add_argument("--aot-tiled", action="store_true", help="the --aot report for the tiled kernels")
    p.add_argument("--aot", action="store_true",
                   help="compile every W1 kernel variant for sm_90a without a GPU and print the compiler report")
    a = p.parse_args()
    if a.check:
        return 0 if run_check(a.small, full=not a.quick_check) else 1
    if a.aot:
        return run_aot()
    if a.aot_tiled:
        return run_aot_tiled()
    if a.saved:
        run_saved([s for s in a.impls.split(",") if s], [int(s) for s in a.lengths.split(",") if s], a.device)
        return 0
    if a.device == "cuda" and not torch.cuda.is_available():
        print("the benchmark needs a CUDA device (or --device cpu to test the harness)")
        return 2
    if a.profile:
        run_profile([s for s in a.impls.split(",") if s], [int(s) for s in a.lengths.split(",") if s])
        return 0
    if a.sweep:
        run_sweep()
        return 0
    if a.tiled:
        return 0 if run_tiled([int(s) for s in a.lengths.split(",") if s], a.device) else 1
    lengths = [int(s) for s in a.lengths.split(",") if s]
    impls = [s for s in a.impls.split(",") if s]
    rows = run_bench(impls, lengths, a.max_step_s, a.device)
    write_csv(rows, a.out_csv)
    print()
    print(table(rows, lengths))
    print()
    print("\n".join(targets(rows)))
    if a.out_md:
        cmd = a.command or "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
        write_section(a.out_md, section_text(rows, lengths, cmd, limits_text(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
