#!/usr/bin/env python
"""GPU check and timing of the persistent tiled kernels (``ops/triton_persistent_kernels.py``).

One run, for the device machine (see ``benchmarks/device/run_all.sh``, stage ``persistent``):

1. compile every variant first, in parallel worker processes (Triton's cache is shared), so the
   timings below exclude compilation and the call fits the device time;
2. check each variant (``n_tiles``, clip, precision) against the chunked PyTorch form in fp64 on
   the GPU: output, final state and the gradients of all ten inputs at T = 1008 (a last partial
   chunk), plus a second identical run that must give bitwise-equal gradients (a race between the
   tiles of a head would show there), and the barrier-timeout counter; the NeuralMemory layer at
   W1 dims with ``impl="triton_tiled"`` against ``impl="torch"`` (fp32, no TF32);
3. time the memory operator alone at W1 shapes (B 4, 8 heads x 64, depth 2, E 4, chunk 64, clip
   1.0), forward only and forward + backward, for the timed variants and the fused kernel.

Tolerances on ``||x - ref|| / ||ref||``: tf32 2e-2, bf16 5e-2, layer 2e-2 (as ``kernels.py --check``).

    python benchmarks/kernels_persistent.py                 # everything, prints markdown tables
    python benchmarks/kernels_persistent.py --lengths 8192  # fewer timing lengths
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from kernels import B, CHUNK, HEAD_DIM, HEADS, TOL, _inputs, _rel, _time_step, device_name, gpu_kernels  # noqa: E402
from titans_memory.ops import neural_memory_chunked, neural_memory_triton  # noqa: E402
from titans_memory.ops.checkpointed import default_segment_chunks  # noqa: E402
from titans_memory.ops.mlp import MemoryMLPSpec  # noqa: E402
from titans_memory.ops.triton_tiled import (  # noqa: E402
    clear_backward_graphs,
    neural_memory_tiled_triton,
    neural_memory_tiled_triton_train,
)

SPEC = MemoryMLPSpec("silu", residual=True)
# (n_tiles, clip, precision, persistent[, bwd_tiles, bwd_warps, stash, bwd_graph, hoist_coeffs,
# hoist_free, bwd_precision, walk_launches]; defaults n_tiles, 4, False, False, True, True, precision,
# None: the default).
# bf16 operands in the persistent backward are left out: on the H200 (Triton 3.6) it stopped with
# an illegal memory access (2026-12-01), and that poisons the CUDA context of the run; the segment
# walk with bf16 operands ran and passed there (2026-12-02).
CHECKED = [(4, 1.0, "tf32", True, 4, 8, True), (4, 1.0, "tf32", True, 4, 8, True, True),
           (4, None, "tf32", True, 4, 8, True, True)]
# the default (x4, 8 warps, stash) and its backward from a CUDA graph; others: --timed
TIMED = [(4, 1.0, "tf32", True, 4, 8, True), (4, 1.0, "tf32", True, 4, 8, True, True)]
# (head_dim, expansion, chunk) of the default-configuration check (impl="auto" uses the persistent
# kernels there, in training and inference)
SHAPES = [(64, 4, 64), (64, 2, 64), (32, 2, 32), (32, 4, 32), (16, 4, 16)]


def _label(v) -> str:
    n, clip, prec, pers, bt, bw, st, gr, ho, hf, bp, wl = _full(v)
    bwd = f", bwd x{bt} {bw} warps" if (bt, bw) != (n, 4) else ""
    hoist = "" if ho and hf else " (adjoint-free terms not stashed)" if ho else " (coefficients not hoisted)"
    hoist += f", {wl} launches per chunk" if wl else ""
    walk = (", bwd graph, segment walk" + hoist) if st else ", bwd graph"
    prec = prec if bp == prec else f"{prec} (walk {bp})"
    return (f"x{n} clip {clip} {prec} {'persistent' if pers else 'launch/phase'}{bwd}{', stash' if st else ''}"
            f"{walk if gr else ''}")


def _full(v):
    """(n_tiles, clip, precision, persistent[, bwd_tiles, bwd_warps, stash, bwd_graph, hoist_coeffs,
    hoist_free, bwd_precision, walk_launches]) with the defaults filled in."""
    n, clip, prec, pers = v[:4]
    flag = lambda i, default=False: bool(v[i]) if len(v) > i else default  # noqa: E731
    return (n, clip, prec, pers, (v[4] if len(v) > 4 else n), (v[5] if len(v) > 5 else 4), flag(6), flag(7),
            flag(8, True), flag(9, True), (v[10] if len(v) > 10 and v[10] else prec), (v[11] if len(v) > 11 else None))


def _walk_options(v) -> dict:
    """The keyword arguments of ``neural_memory_tiled_triton_train`` for variant ``v``'s backward."""
    n, clip, prec, pers, bt, bw, st, gr, ho, hf, bp, wl = _full(v)
    return dict(bwd_tiles=bt, num_warps=(8, bw), stash=st, bwd_graph=gr, hoist_coeffs=ho, hoist_free=hf,
                bwd_precision=bp, walk_launches=wl)


def _run_variant(v, T, Bq=B, H=HEADS, seed=0, train=True):
    """One call of a variant at W1 head shapes; returns (outputs, grads or None)."""
    n, clip, prec, pers = _full(v)[:4]
    args, W, S = _inputs(Bq, H, T, HEAD_DIM, 2, 4, torch.device("cuda"), seed=seed)
    x = [t.float().requires_grad_(train) for t in args + W + S]
    if not train:
        with torch.no_grad():
            o, Wt, St = neural_memory_tiled_triton(*x[:6], x[6:8], x[8:], SPEC, CHUNK, clip, n_tiles=n,
                                                   precision=prec, persistent=pers, check=True)
        return [o, *Wt, *St], None
    o, Wt, St = neural_memory_tiled_triton_train(*x[:6], x[6:8], x[8:], SPEC, CHUNK, clip, n_tiles=n,
                                                 precision=prec, persistent=pers, check=True, **_walk_options(v))
    outs = [o, *Wt, *St]
    g = torch.Generator(device="cpu").manual_seed(99)
    cots = [torch.randn(t.shape, generator=g).cuda() for t in outs]
    return outs, torch.autograd.grad(outs, x, cots)


def warm(variants) -> None:
    """Compile every kernel of the variants in parallel worker processes."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--warm-one", json.dumps(list(v))]) for v in variants]
    codes = [p.wait() for p in procs]
    print(f"# compiled {len(variants)} variants in parallel in {time.perf_counter() - t0:.0f} s (exit codes {codes})",
          flush=True)


def warm_one(v) -> None:
    v = tuple(v)
    for _ in range(2 if _full(v)[7] else 1):  # with the graph backward: the second call captures it
        _run_variant(v, 200, Bq=1, H=2, train=True)
    _run_variant(v, 200, Bq=1, H=2, train=False)
    torch.cuda.synchronize()


def check(variants, T=1008, full=True) -> bool:
    ok = True
    print(f"# persistent kernels: check on {device_name()}, T = {T}, B {B} x {HEADS} heads x {HEAD_DIM}, depth 2, E 4")
    print("| variant | tol | fwd (inference) err | max grad err (tensor) | bitwise repeat | pass |")
    print("|---|---|---|---|---|---|")
    args, W, S = _inputs(B, HEADS, T, HEAD_DIM, 2, 4, torch.device("cuda"), seed=0)
    refs = {}
    for v in variants:
        n, clip, prec, pers, _, _, _, graph, _, _, _, _ = _full(v)
        t0 = time.perf_counter()
        try:
            if clip not in refs:  # the fp64 reference: outputs and gradients (same cotangents as _run_variant)
                ref_in = [t.clone().requires_grad_() for t in args + W + S]
                ro, rW, rS = neural_memory_chunked(*ref_in[:6], ref_in[6:8], ref_in[8:], SPEC, CHUNK, clip)
                outs_ref = [ro, *rW, *rS]
                g = torch.Generator(device="cpu").manual_seed(99)
                cots = [torch.randn(t.shape, generator=g).cuda().double() for t in outs_ref]
                refs[clip] = ([t.detach() for t in outs_ref], torch.autograd.grad(outs_ref, ref_in, cots))
            ref_outs, gref = refs[clip]
            if graph:  # the checked gradients then come from replaying a graph captured on other inputs
                _run_variant(v, T, seed=5, train=True)
            inf_outs, _ = _run_variant(v, T, train=False)
            e_fwd = max(_rel(a, b) for a, b in zip(inf_outs, ref_outs))
            outs, grads = _run_variant(v, T, train=True)
            _, grads2 = _run_variant(v, T, train=True)
            names = ["o", "W1_T", "W2_T", "S1_T", "S2_T", "dq", "dk", "dv", "dtheta", "deta", "dalpha",
                     "dW1", "dW2", "dS1", "dS2"]
            errs = dict(zip(names, [_rel(a, b) for a, b in zip(outs, ref_outs)] + [_rel(a, b) for a, b in zip(grads, gref)]))
            worst = max(errs, key=lambda k: errs[k] if errs[k] == errs[k] else float("inf"))
            same = all(torch.equal(a, b) for a, b in zip(grads, grads2))
            good = max(e_fwd, errs[worst]) <= TOL[prec] and same
            cells = f"{e_fwd:.2e} | {errs[worst]:.2e} ({worst}) | {'yes' if same else 'NO'}"
        except Exception as exc:  # a compile, launch or barrier failure is a failed check
            good = False
            cells = f"{type(exc).__name__}: {str(exc)[:200]} | | "
        ok &= good
        print(f"| {_label(v)} | {TOL[prec]:g} | {cells} | {'yes' if good else 'NO'} | ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    if full:
        ok &= check_layer()
        ok &= check_shapes()
    print("persistent check:", "PASS" if ok else "FAIL", flush=True)
    return ok


def check_shapes(shapes=SHAPES) -> bool:
    """The persistent kernels with their default configuration (what ``impl="auto"`` runs) against
    the chunked form in fp64 at the head shapes ``impl="auto"`` sends to them: the forward without
    gradients, and forward + backward (outputs, final state, all ten gradients; the backward
    replayed from its CUDA graph); T = 1000, B 2 x 4 heads, clip 1.0."""
    from titans_memory.ops.triton_tiled import default_n_tiles

    ok = True
    print("\n| head shape (head dim, expansion, chunk, tiles) | tol | inference max rel err | training max rel err | pass |")
    print("|---|---|---|---|---|")
    for d, E, c in shapes:
        n = default_n_tiles(E * d)
        try:
            args, W, S = _inputs(2, 4, 1000, d, 2, E, torch.device("cuda"), seed=d + E)
            ref_in = [t.clone().requires_grad_() for t in args + W + S]
            ro, rW, rS = neural_memory_chunked(*ref_in[:6], ref_in[6:8], ref_in[8:], SPEC, c, 1.0)
            refs = [ro, *rW, *rS]
            g = torch.Generator(device="cpu").manual_seed(7)
            cots = [torch.randn(t.shape, generator=g).cuda().double() for t in refs]
            gref = torch.autograd.grad(refs, ref_in, cots)
            x = [t.detach().float().requires_grad_() for t in args + W + S]
            with torch.no_grad():
                o, Wt, St = neural_memory_tiled_triton(*x[:6], x[6:8], x[8:], SPEC, c, 1.0, n_tiles=n,
                                                       persistent=True, check=True)
            e_inf = max(_rel(a, b) for a, b in zip([o, *Wt, *St], refs))
            # a first backward of this configuration on other inputs (run eagerly), so that the
            # checked one below is captured into a CUDA graph and replayed (the default on CUDA)
            y = [(t.detach() + 0.01).requires_grad_() for t in x]
            oy = neural_memory_tiled_triton_train(*y[:6], y[6:8], y[8:], SPEC, c, 1.0, n_tiles=n, persistent=True)
            torch.autograd.grad(oy[0].sum(), y)
            o, Wt, St = neural_memory_tiled_triton_train(*x[:6], x[6:8], x[8:], SPEC, c, 1.0, n_tiles=n,
                                                         persistent=True, check=True)
            grads = torch.autograd.grad([o, *Wt, *St], x, [t.float() for t in cots])
            e_tr = max(_rel(a, b) for a, b in zip([o, *Wt, *St, *grads], refs + list(gref)))
            good = max(e_inf, e_tr) <= TOL["tf32"]
            cell = f"{e_inf:.2e} | {e_tr:.2e}"
        except Exception as exc:
            good, cell = False, f"{type(exc).__name__}: {str(exc)[:150]} |"
        ok &= good
        print(f"| {d}, {E}, {c}, x{n} | {TOL['tf32']:g} | {cell} | {'yes' if good else 'NO'} |", flush=True)
    return ok


def check_layer() -> bool:
    """``kernels.check_layer`` with ``impl="triton_tiled"`` (W1 dims, T = 1000, fp32, no TF32)."""
    import kernels

    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        errs = kernels.check_layer(torch.device("cuda"), small=False, impl="triton_tiled")
        worst = max(errs, key=lambda k: errs[k])
        good = errs[worst] <= TOL["layer"]
        print(f"| layer W1 dims, triton_tiled vs torch | {TOL['layer']:g} | | {errs[worst]:.2e} ({worst}) | | "
              f"{'yes' if good else 'NO'} |", flush=True)
        return good
    except Exception as exc:
        print(f"| layer W1 dims, triton_tiled vs torch | | {type(exc).__name__}: {str(exc)[:200]} | | | NO |")
        return False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def timing(variants, lengths) -> list:
    rows = []
    print(f"\n# memory operator alone, W1 shapes (B {B}, {HEADS} heads x {HEAD_DIM}, depth 2, E 4, chunk {CHUNK}, "
          f"clip 1.0), {device_name()}")
    print("| impl | T | fwd M tok/s | fwd ms | fwd+bwd M tok/s | fwd+bwd ms | fwd+bwd peak GiB |")
    print("|---|---|---|---|---|---|---|")
    dev = torch.device("cuda")
    for T in lengths:
        args, W, S = _inputs(B, HEADS, T, HEAD_DIM, 2, 4, dev, seed=1)
        x = [t.float().requires_grad_() for t in args + W + S]
        cot = torch.randn(x[0].shape, device=dev)
        runs = [(_label(v), v) for v in variants]
        if T <= 32768:
            runs.append(("fused (1 program/head)", None))
        for name, v in runs:
            if v is None:
                fwd = lambda: neural_memory_triton(*x[:6], x[6:8], x[8:], SPEC, CHUNK, 1.0)[0]  # noqa: E731
                inf = fwd
            else:
                n, clip, prec, pers = _full(v)[:4]
                fwd = lambda n=n, c=clip, p=prec, q=pers, kw=_walk_options(v): neural_memory_tiled_triton_train(  # noqa: E731
                    *x[:6], x[6:8], x[8:], SPEC, CHUNK, c, n_tiles=n, precision=p, persistent=q, **kw)[0]
                inf = lambda n=n, c=clip, p=prec, q=pers: neural_memory_tiled_triton(  # noqa: E731
                    *x[:6], x[6:8], x[8:], SPEC, CHUNK, c, n_tiles=n, precision=p, persistent=q)[0]
            try:
                with torch.no_grad():
                    sf, _ = _time_step(inf, 30.0, budget_s=1.5)
                sb, peak = _time_step(lambda: torch.autograd.grad(fwd(), x[:6], cot), 30.0, budget_s=2.0)
                row = dict(impl=name, T=T, fwd_tps=B * T / sf, fwd_ms=sf * 1e3, train_tps=B * T / sb,
                           train_ms=sb * 1e3, peak_gib=peak)
                print(f"| {name} | {T} | {row['fwd_tps'] / 1e6:.3f} | {sf * 1e3:.2f} | {row['train_tps'] / 1e6:.3f} | "
                      f"{sb * 1e3:.2f} | {peak:.3f} |", flush=True)
                rows.append(row)
            except Exception as exc:
                print(f"| {name} | {T} | {type(exc).__name__}: {str(exc)[:200]} | | | | |", flush=True)
            clear_backward_graphs()  # the next row's peak without this one's captured graph
            torch.cuda.empty_cache()
    return rows


def diag(T: int = 8192) -> None:
    """Forward-only (inference) timings of the persistent kernel at W1 shapes with one knob changed
    at a time (tiles, warps, clip, barriers off, retrieval off, bf16): where its time goes."""
    from titans_memory.ops.triton_tiled import _forward_persistent

    dev = torch.device("cuda")
    args, W, S = _inputs(B, HEADS, T, HEAD_DIM, 2, 4, dev, seed=2)
    BH = B * HEADS
    xs = [t.float().reshape(BH, T, HEAD_DIM).contiguous() for t in args[:3]]
    gates = [t.float().reshape(BH, T).contiguous() for t in args[3:]]
    st0 = [t.float().reshape(BH, *t.shape[2:]).contiguous() for t in (W[0], S[0], W[1], S[1])]
    out = torch.empty_like(xs[0])
    err = torch.zeros(1, device=dev, dtype=torch.int32)
    print(f"\n# persistent forward (inference), T = {T}, W1 shapes, one knob at a time, {device_name()}")
    print("| n_tiles | warps | clip | precision | barriers | retrieval | ms | M tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for n, nw, clip, prec, sync, ret in [(4, 8, 1.0, "tf32", True, True), (4, 16, 1.0, "tf32", True, True),
                                         (4, 4, 1.0, "tf32", True, True),
                                         (8, 8, 1.0, "tf32", True, True), (8, 4, 1.0, "tf32", True, True),
                                         (4, 8, None, "tf32", True, True), (4, 8, 1.0, "tf32", False, True),
                                         (4, 8, 1.0, "tf32", True, False), (4, 8, 1.0, "bf16", True, True)]:
        def step():
            st = [t.clone() for t in st0]
            _forward_persistent(xs, gates, st, st, out if ret else None, 0, -(-T // CHUNK), SPEC, clip, n, CHUNK, err,
                                prec=prec, num_warps=nw, sync=sync)
        try:
            sec, _ = _time_step(step, 30.0, budget_s=1.0)
            print(f"| {n} | {nw} | {clip} | {prec} | {sync} | {ret} | {sec * 1e3:.2f} | {B * T / sec / 1e6:.3f} |",
                  flush=True)
        except Exception as exc:
            print(f"| {n} | {nw} | {clip} | {prec} | {sync} | {ret} | {type(exc).__name__}: {str(exc)[:150]} | |",
                  flush=True)


def _w1_operator_inputs(T: int):
    """The memory operator's inputs at W1 shapes and length ``T`` on the GPU (q, k, v, gates,
    weights, momentum, all requiring gradients), and an output cotangent."""
    dev = torch.device("cuda")
    args, W, S = _inputs(B, HEADS, T, HEAD_DIM, 2, 4, dev, seed=3)
    x = [t.float().requires_grad_() for t in args + W + S]
    return x, torch.randn(x[0].shape, device=dev)


def diag_split(T: int = 8192) -> None:
    """The split forward (``split_forward``, ``ops/triton_retrieval_kernels.py``) against the
    persistent forward that retrieves as it walks, at W1 shapes (clip 1.0, defaults otherwise):
    the operator's inference forward and fwd+bwd (the backward from its CUDA graph), with 4 and 8
    retrieval warps, and the GPU time per kernel of one split inference forward."""
    import titans_memory.ops.triton_tiled as tt

    x, cot = _w1_operator_inputs(T)
    print(f"\n# split forward vs retrieval in the walk, T = {T}, W1 shapes, clip 1.0, {device_name()}")
    print("| forward | retrieval warps | retrieval tiles | inference fwd ms | fwd+bwd ms | fwd+bwd peak GiB |")
    print("|---|---|---|---|---|---|")
    for split, warps, tiles in [(False, 4, None), (True, 4, None), (True, 8, None), (True, 4, 8), (True, 4, 2)]:
        tt.RETRIEVAL_WARPS, tt.RETRIEVAL_TILES = warps, tiles
        inf = lambda: tt.neural_memory_tiled_triton(*x[:6], x[6:8], x[8:], SPEC, CHUNK, 1.0,  # noqa: E731
                                                    split_forward=split)[0]
        fwd = lambda: tt.neural_memory_tiled_triton_train(*x[:6], x[6:8], x[8:], SPEC, CHUNK, 1.0,  # noqa: E731
                                                          split_forward=split)[0]
        try:
            with torch.no_grad():
                sf, _ = _time_step(inf, 30.0, budget_s=1.0)
            sb, peak = _time_step(lambda: torch.autograd.grad(fwd(), x[:6], cot), 30.0, budget_s=1.5)
            print(f"| {'split' if split else 'walk retrieves'} | {warps if split else '-'} | "
                  f"{(tiles or 4) if split else '-'} | {sf * 1e3:.2f} | "
                  f"{sb * 1e3:.2f} | {peak:.3f} |", flush=True)
        except Exception as exc:
            print(f"| {split} | {warps} | {tiles} | {type(exc).__name__}: {str(exc)[:200]} | | |", flush=True)
        clear_backward_graphs()
        torch.cuda.empty_cache()
    tt.RETRIEVAL_WARPS, tt.RETRIEVAL_TILES = 4, None
    with torch.no_grad():
        ks = gpu_kernels(lambda: tt.neural_memory_tiled_triton(*x[:6], x[6:8], x[8:], SPEC, CHUNK, 1.0))
    tot = {}
    for name, _, us in ks:
        n, t = tot.get(name[:60], (0, 0.0))
        tot[name[:60]] = (n + 1, t + us)
    print("\n| kernel of one split inference forward | launches | GPU ms |\n|---|---|---|")
    for name, (n, us) in sorted(tot.items(), key=lambda kv: -kv[1][1])[:8]:
        print(f"| {name} | {n} | {us / 1e3:.3f} |")


SEG_PREPASS = ["1 keys (all chunks)", "2 norms, stash (all chunks)", "3 retrieval (all chunks)"]


SEG_WALK = ["2a adjoint gate terms", "4 coefficients", "5 state adjoint"]
# the two-launch walk (walk_launches=2): phase 4's work ahead in 2a and at the start of 5
SEG_WALK_AHEAD = ["2a adjoint gate terms, phase 4's tile work", "5 state adjoint, phase 4's per-head part"]


def diag_parallel(T: int = 8192) -> None:
    """Warps and matmul operands of the segment walk's phases over all chunks of a segment
    (``SEGMENT_PHASE_WARPS``, ``SEGMENT_PHASE_PREC`` of ``ops/triton_tiled.py``) at W1 shapes
    (clip 1.0, defaults otherwise): the operator's fwd+bwd, and each gradient's distance from
    the default's (norm of the difference over the norm, the largest over the inputs)."""
    import titans_memory.ops.triton_tiled as tt

    x, cot = _w1_operator_inputs(T)
    fwd = lambda: tt.neural_memory_tiled_triton_train(*x[:6], x[6:8], x[8:], SPEC, CHUNK, 1.0)[0]  # noqa: E731
    print(f"\n# the segment walk's parallel phases, T = {T}, W1 shapes, clip 1.0, {device_name()}")
    print("| parallel-phase warps | operands | fwd+bwd ms | peak GiB | max grad distance from the default (tensor) |")
    print("|---|---|---|---|---|")
    ref = None
    for warps, prec in [(None, None), (4, None), (None, "bf16"), (4, "bf16"), (None, None)]:
        tt.SEGMENT_PHASE_WARPS, tt.SEGMENT_PHASE_PREC = warps, prec
        clear_backward_graphs()
        try:
            sb, peak = _time_step(lambda: torch.autograd.grad(fwd(), x[:6], cot), 30.0, budget_s=1.5)
            g = torch.autograd.grad(fwd(), x[:6], cot)
            if ref is None:
                ref, dist = g, "-"
            else:
                d = [((a - b).norm() / b.norm()).item() for a, b in zip(g, ref)]
                i = max(range(len(d)), key=d.__getitem__)
                dist = f"{d[i]:.2e} ({['q', 'k', 'v', 'theta', 'eta', 'alpha'][i]})"
            print(f"| {warps or 8} | {prec or 'tf32'} | {sb * 1e3:.2f} | {peak:.3f} | {dist} |", flush=True)
        except Exception as exc:
            print(f"| {warps} | {prec} | {type(exc).__name__}: {str(exc)[:200]} | | |", flush=True)
        torch.cuda.empty_cache()
    tt.SEGMENT_PHASE_WARPS, tt.SEGMENT_PHASE_PREC = None, None
    clear_backward_graphs()


def diag_walk(T: int = 8192) -> None:
    """The split forward's state walk (and the recompute's, with the walk's warps) in other
    tilings and warps than the default (4 tiles of 64 hidden units, 8 warps), the retrieval and the
    backward kept at 4 tiles (``bwd_tiles``, ``RETRIEVAL_TILES``), at W1 shapes, 8k, clip 1.0: the
    operator's fwd+bwd. A failing row is printed and the next is tried (the riskiest come last)."""
    import titans_memory.ops.triton_tiled as tt

    x, cot = _w1_operator_inputs(T)
    print(f"\n# the split forward's walk: tiles and warps, T = {T}, W1 shapes, clip 1.0, {device_name()}")
    print("| walk tiles | walk warps | fwd+bwd ms | fwd+bwd peak GiB |")
    print("|---|---|---|---|")
    tt.RETRIEVAL_TILES = 4
    for tiles, warps in [(4, 8), (2, 8), (4, 4), (2, 16), (4, 16)]:
        fwd = lambda: tt.neural_memory_tiled_triton_train(*x[:6], x[6:8], x[8:], SPEC, CHUNK, 1.0,  # noqa: E731
                                                          n_tiles=tiles, bwd_tiles=4, num_warps=(warps, 8))[0]
        try:
            sb, peak = _time_step(lambda: torch.autograd.grad(fwd(), x[:6], cot), 30.0, budget_s=1.5)
            print(f"| {tiles} | {warps} | {sb * 1e3:.2f} | {peak:.3f} |", flush=True)
        except Exception as exc:
            print(f"| {tiles} | {warps} | {type(exc).__name__}: {str(exc)[:200]} | |", flush=True)
        clear_backward_graphs()
        torch.cuda.empty_cache()
    tt.RETRIEVAL_TILES = None


# WALK_CODE entries; STATE_MERGE: phase 5 of the segment walk merged (STATE_MERGE of ops/triton_tiled.py)
WALK_CODES = [{}, dict(LATE_SAVE=True), dict(PREFETCH=True), dict(MERGE=True), dict(LATE_SAVE=True, MERGE=True),
              dict(PREFETCH=True, MERGE=True), dict(STATE_MERGE=True), dict(MERGE=True, STATE_MERGE=True), {}]


def diag_walk_code(T: int = 8192, codes=None) -> None:
    """The persistent walk's code variants (``WALK_CODE`` of ``ops/triton_tiled.py``: the
    chunk-start state stored after the chunk's barriers, the next chunk's inputs prefetched, the
    weight and momentum increments in one matmul per layer) and phase 5 of the segment walk with
    its matmuls merged (``STATE_MERGE``) at W1 shapes, 8k, clip 1.0: the
    operator's inference forward and fwd+bwd, and the largest distance of the output and the
    gradients from the default's (norm of the difference over the norm). The default comes first
    and last (run-to-run spread)."""
    import titans_memory.ops.triton_tiled as tt

    x, cot = _w1_operator_inputs(T)
    print(f"\n# the persistent walk's code variants, T = {T}, W1 shapes, clip 1.0, {device_name()}")
    print("| variant | inference fwd ms | fwd+bwd ms | peak GiB | max distance from the default |")
    print("|---|---|---|---|---|")
    inf = lambda: tt.neural_memory_tiled_triton(*x[:6], x[6:8], x[8:], SPEC, CHUNK, 1.0)[0]  # noqa: E731
    fwd = lambda: tt.neural_memory_tiled_triton_train(*x[:6], x[6:8], x[8:], SPEC, CHUNK, 1.0)[0]  # noqa: E731
    ref = None
    for code in codes or WALK_CODES:
        tt.WALK_CODE = {k: v for k, v in code.items() if k != "STATE_MERGE"}
        tt.STATE_MERGE = bool(code.get("STATE_MERGE"))
        clear_backward_graphs()
        try:
            with torch.no_grad():
                sf, _ = _time_step(inf, 30.0, budget_s=1.0)
                o = inf()
            sb, peak = _time_step(lambda: torch.autograd.grad(fwd(), x[:6], cot), 30.0, budget_s=1.5)
            g = [o, *torch.autograd.grad(fwd(), x[:6], cot)]
            if ref is None:
                ref, dist = g, "-"
            else:
                d = [((a - b).norm() / b.norm()).item() for a, b in zip(g, ref)]
                i = max(range(len(d)), key=d.__getitem__)
                dist = f"{d[i]:.2e} ({['o', 'q', 'k', 'v', 'theta', 'eta', 'alpha'][i]})"
            print(f"| {'+'.join(k.lower() for k in code) or 'default'} | {sf * 1e3:.2f} | {sb * 1e3:.2f} | "
                  f"{peak:.3f} | {dist} |", flush=True)
        except Exception as exc:
            print(f"| {code} | {type(exc).__name__}: {str(exc)[:200]} | | | |", flush=True)
        torch.cuda.empty_cache()
    tt.WALK_CODE, tt.STATE_MERGE = {}, False
    clear_backward_graphs()


def diag_walk_parts(T: int = 8192) -> None:
    """What the split inference forward's walk kernel (``_fwd_persistent_kernel``) spends its GPU
    time on, at W1 shapes, clip 1.0 and none: per chunk, by default and with the head barriers
    and / or the stored chunk-start states left out (``WALK_CODE`` ``SYNC`` / ``SAVE`` False: timing
    only, the results are wrong), and the retrieval kernels for comparison. The default comes
    first and last."""
    import titans_memory.ops.triton_tiled as tt

    x, _ = _w1_operator_inputs(T)
    n_chunks = -(-T // CHUNK)
    print(f"\n# the walk's parts, GPU time per chunk, split inference forward, T = {T}, W1 shapes, {device_name()}")
    print("| clip | variant | walk us per chunk | retrieval kernels us per chunk |\n|---|---|---|---|")
    run = lambda clip: tt.neural_memory_tiled_triton(*x[:6], x[6:8], x[8:], SPEC, CHUNK, clip, check=False)  # noqa: E731
    for clip in (1.0, None):
        for label, code in [("default", {}), ("no barriers", dict(SYNC=False)), ("no state stores", dict(SAVE=False)),
                            ("neither", dict(SYNC=False, SAVE=False)), ("default", {})]:
            tt.WALK_CODE = code
            with torch.no_grad():
                for _ in range(3):
                    run(clip)
                torch.cuda.synchronize()
                ks = gpu_kernels(lambda: run(clip))
            walk = sum(us for n, _, us in ks if "_fwd_persistent" in n)
            ret = sum(us for n, _, us in ks if "_segment_" in n)
            print(f"| {clip} | {label} | {walk / n_chunks:.1f} | {ret / n_chunks:.1f} |", flush=True)
    tt.WALK_CODE = {}


def diag_bwd(T: int = 8192, variant=None) -> None:
    """Where the training step's GPU time goes, W1 shapes, the default tiling (x4, 8 warps, stash):
    GPU time per kernel of one forward + backward at ``T``, with the persistent backward and with
    the CUDA-graph backward (the segment walk; its phases told apart by their launch order).
    ``variant`` (a tuple as for ``--timed``, with the graph backward): that variant's walk only."""
    x, cot = _w1_operator_inputs(T)
    opts = [dict(bwd_graph=False), dict(bwd_graph=True)] if variant is None else [_walk_options(variant)]
    for kw in opts:
        graph = kw["bwd_graph"]
        pre = SEG_PREPASS + (["4' coefficients, adjoint-free part (all chunks)"] if kw.get("hoist_coeffs", True) else [])
        ahead = kw.get("walk_launches") == 2
        seg_walk = SEG_WALK_AHEAD if ahead else SEG_WALK
        n_tiles = _full(variant)[0] if variant is not None else 4

        def run():
            o = neural_memory_tiled_triton_train(*x[:6], x[6:8], x[8:], SPEC, CHUNK, 1.0, n_tiles=n_tiles, **kw)[0]
            torch.autograd.grad(o, x[:6], cot)

        for _ in range(3):  # compile; with the graph: first sighting eager, second captures
            run()
        torch.cuda.synchronize()
        ks = gpu_kernels(run)
        n_chunks = -(-T // CHUNK)
        total = sum(k[2] for k in ks)
        groups = {}
        seg_i = 0
        for name, _, us in ks:
            if "_bwd_segment_kernel" in name:  # per segment: 3 launches over its chunks, then 3 per chunk
                name = (f"_bwd_segment_kernel phase "
                        f"{pre[seg_i] if seg_i < len(pre) else seg_walk[(seg_i - len(pre)) % len(seg_walk)]}")
                seg_i += 1
            else:
                seg_i = 0
            g = groups.setdefault(name[:72], [0, 0.0])
            g[0] += 1
            g[1] += us
        mode = "CUDA-graph backward (segment walk)" if graph else "persistent backward"
        label = _label(variant) if variant is not None else "x4, 8 warps, stash"
        print(f"\n# GPU time per kernel, {mode}, fwd+bwd, T = {T}, W1 shapes ({label}), "
              f"{device_name()}; wall span {(ks[-1][1] + ks[-1][2] - ks[0][1]) / 1e3:.2f} ms")
        print("| kernel | launches | total ms | us per chunk | share |")
        print("|---|---|---|---|---|")
        for name, (n, us) in sorted(groups.items(), key=lambda g: -g[1][1]):
            print(f"| {name} | {n} | {us / 1e3:.2f} | {us / n_chunks:.1f} | {us / total:.0%} |")
        print(f"| all | {len(ks)} | {total / 1e3:.2f} | {total / n_chunks:.1f} | 100% |", flush=True)
        clear_backward_graphs()


def ncu_one(which: str, T: int = 8192) -> None:
    """One forward (inference, x4) or one forward + backward (x8) for ``ncu`` to profile."""
    v = (4, 1.0, "tf32", True) if which == "fwd" else (8, 1.0, "tf32", True)
    _run_variant(v, T, train=which != "fwd")
    torch.cuda.synchronize()


def diag_tf32(lengths=(2048, 8192, 32768)) -> None:
    """tf32 operand rounding: the default (rounded in the forward, the recompute and the retrieval,
    truncated in the backward's phases, ``fused.backward_prec``), rounded everywhere, and, when
    ``TITANS_TF32_TRUNCATE=1`` is in the environment (read at import: run this again with it),
    truncated everywhere. At W1 shapes, clip 1.0, per length: the training operator's relative error
    against the chunked form in fp64 (output, final state, the largest over the gradients of every
    input, with a cotangent on the output) and its fwd+bwd time."""
    import titans_memory.ops.triton_tiled as tt
    from titans_memory.ops import triton_kernels as tk

    default_bwd = tt.backward_prec  # as triton_tiled looks it up at each launch
    modes = ([("rounded, backward truncated (default)", default_bwd), ("rounded everywhere", lambda p: p)]
             if tk._TF32_ROUND else [("truncated everywhere", default_bwd)])
    print(f"\n# tf32 operands, W1 shapes, clip 1.0, {device_name()}")
    print("| tf32 operands | T | output | final W | final S | gradients (worst) | fwd+bwd ms |\n|---|---|---|---|---|---|---|")
    names = ["q", "k", "v", "theta", "eta", "alpha", "W1", "W2", "S1", "S2"]
    for T in lengths:
        try:
            args, W, S = _inputs(B, HEADS, T, HEAD_DIM, 2, 4, torch.device("cuda"), seed=3)
            ref = [t.clone().requires_grad_() for t in args + W + S]
            ro, rW, rS = neural_memory_chunked(*ref[:6], ref[6:8], ref[8:], SPEC, CHUNK, 1.0)
            cot = torch.randn(ro.shape, device=ro.device, dtype=torch.float64)
            gref = torch.autograd.grad(ro, ref, cot)
            ro, rW, rS = ro.detach(), [t.detach() for t in rW], [t.detach() for t in rS]
            del ref
        except torch.cuda.OutOfMemoryError:
            print(f"| (fp64 reference out of memory) | {T} | | | | | |")
            torch.cuda.empty_cache()
            continue
        x = [t.detach().float().requires_grad_() for t in args + W + S]
        fwd = lambda: neural_memory_tiled_triton_train(*x[:6], x[6:8], x[8:], SPEC, CHUNK, 1.0)  # noqa: E731
        for mode, bwd in modes:
            tt.backward_prec = bwd
            clear_backward_graphs()
            o, Wt, St = fwd()
            g = torch.autograd.grad(o, x, cot.float())
            eg = [_rel(a, b) for a, b in zip(g, gref)]
            i = max(range(len(eg)), key=eg.__getitem__)
            eo = _rel(o, ro)
            ew = max(_rel(a, b) for a, b in zip(Wt, rW))
            es = max(_rel(a, b) for a, b in zip(St, rS))
            sb, _ = _time_step(lambda: torch.autograd.grad(fwd()[0], x[:6], cot.float()), 30.0, budget_s=1.5)
            print(f"| {mode} | {T} | {eo:.2e} | {ew:.2e} | {es:.2e} | {eg[i]:.2e} ({names[i]}) | {sb * 1e3:.2f} |",
                  flush=True)
        tt.backward_prec = default_bwd
        del gref, ro, rW, rS, x, g
        clear_backward_graphs()
        torch.cuda.empty_cache()


def diag_segments(lengths=(8192, 32768), layer_lengths=(8192,)) -> None:
    """Memory for speed: the training operator with more chunks per segment (``segment_chunks``,
    default ``ceil(sqrt(n_chunks))``). The backward recomputes every segment's chunk-start states
    but the last's, so longer segments recompute fewer chunks (none with one segment) and hold
    more states (8 MiB per chunk at W1, plus the backward's per-chunk scratch and its CUDA
    graph's copy of the kept states). At W1 shapes, clip 1.0: fwd+bwd time, peak memory and the
    largest gradient distance from the default; then the W1 layer at ``layer_lengths``."""
    print(f"\n# chunks per segment, W1 shapes, clip 1.0, {device_name()}")
    print("| T | chunks per segment | segments | recomputed chunks | fwd+bwd ms | peak GiB | max grad distance from the default |")
    print("|---|---|---|---|---|---|---|")
    for T in lengths:
        x, cot = _w1_operator_inputs(T)
        n = -(-T // CHUNK)
        base = default_segment_chunks(n)
        ref = None
        for K in [base] + sorted({2 * base, n // 4, n // 2, n} - {base}):  # the default first: the reference
            if not 1 <= K <= n:
                continue
            fwd = lambda: neural_memory_tiled_triton_train(*x[:6], x[6:8], x[8:], SPEC, CHUNK, 1.0,  # noqa: E731
                                                           segment_chunks=K)[0]
            try:
                g = torch.autograd.grad(fwd(), x, cot)
                dist = "-" if ref is None else f"{max(_rel(a, b) for a, b in zip(g, ref)):.2e}"
                ref = g if ref is None else ref
                sb, peak = _time_step(lambda: torch.autograd.grad(fwd(), x[:6], cot), 30.0, budget_s=1.5)
                seg = -(-n // K)
                print(f"| {T} | {K} | {seg} | {n - min(K, n - (seg - 1) * K)} | {sb * 1e3:.2f} | {peak:.3f} | {dist} |",
                      flush=True)
            except torch.OutOfMemoryError:
                print(f"| {T} | {K} | | | OOM | | |", flush=True)
            g = None
            clear_backward_graphs()
            torch.cuda.empty_cache()
        del x, cot, ref
        torch.cuda.empty_cache()
    _layer_segments(layer_lengths)


def _layer_segments(lengths) -> None:
    """The W1 layer's training step (as ``kernels.py``'s ``ours_triton`` row) with
    ``MemoryConfig.segment_chunks``: synchronised per step and 20 steps back to back; the peak
    memory of the second step (as ``kernels.py`` reports it: the backward graph's capture) and of
    a later one (replays)."""
    from kernels import _make

    print(f"\n# W1 layer with MemoryConfig.segment_chunks, {device_name()}")
    print("| T | segment_chunks | M tok/s (synchronised) | peak GiB, 2nd step (capture) | peak GiB, later steps | "
          "M tok/s (back to back) |\n|---|---|---|---|---|---|")
    for T in lengths:
        n = -(-T // CHUNK)
        for K in (None, 32, 64, n):
            step = _make("ours_triton", torch.device("cuda"), segment_chunks=K)(T)
            try:
                sec, peak = _time_step(step, 30.0, budget_s=2.0)  # peak of the 2nd step: the graph's capture
                bb = _back_to_back(step)
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                steady = torch.cuda.max_memory_allocated() / 2**30
                print(f"| {T} | {K or 'default'} | {B * T / sec / 1e6:.3f} | {peak:.3f} | {steady:.3f} | "
                      f"{B * T / bb / 1e6:.3f} |", flush=True)
            except torch.OutOfMemoryError:
                print(f"| {T} | {K} | OOM | | | |", flush=True)
            step = None
            clear_backward_graphs()
            torch.cuda.empty_cache()


def diag_memory(T: int = 8192) -> None:
    """The W1 layer's training step, steps 1-4 one by one (the first runs the backward eagerly,
    the second captures its CUDA graph, the later ones replay it): per step the peak allocated
    memory (``max_memory_allocated``, what ``kernels.py`` reports), the peak reserved by the
    caching allocator and the reserved memory after the step, all in GiB. Memory a graph keeps
    in its private pool for its replays counts as reserved, not as allocated."""
    from kernels import _make

    print(f"\n# W1 layer step memory by step, T = {T}, {device_name()}")
    print("| step | backward | peak allocated | peak reserved | reserved after |\n|---|---|---|---|---|")
    step = _make("ours_triton", torch.device("cuda"))(T)
    for i, what in enumerate(("eager (first sighting)", "graph capture", "graph replay", "graph replay"), 1):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        print(f"| {i} | {what} | {torch.cuda.max_memory_allocated() / 2**30:.3f} | "
              f"{torch.cuda.max_memory_reserved() / 2**30:.3f} | {torch.cuda.memory_reserved() / 2**30:.3f} |",
              flush=True)
    step = None
    clear_backward_graphs()
    torch.cuda.empty_cache()


def _back_to_back(step, n: int = 20, repeats: int = 3) -> float:
    """Seconds per step of ``n`` steps issued back to back (one wait at the end), best of ``repeats``."""
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            step()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / n)
    return min(times)


def diag_back_to_back(lengths=(2048, 8192)) -> None:
    """The W1 layer's training step as ``kernels.py`` times it (the host waits for each step)
    against steps issued back to back (20 steps, one wait at the end), as a training loop that
    does not synchronise every step runs them: the difference is GPU time lost while the host
    issues the start of a step."""
    from kernels import _make

    print(f"\n# layer step, synchronised vs back to back, W1, {device_name()}")
    print("| T | step ms, synchronised (kernels.py) | step ms, 20 back to back | M tok/s back to back |")
    print("|---|---|---|---|")
    for T in lengths:
        step = _make("ours_triton", torch.device("cuda"))(T)
        sec, _ = _time_step(step, 30.0, budget_s=2.0)
        bb = _back_to_back(step)
        print(f"| {T} | {sec * 1e3:.2f} | {bb * 1e3:.2f} | {B * T / bb / 1e6:.3f} |", flush=True)
        step = None
        clear_backward_graphs()
        torch.cuda.empty_cache()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warm-one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--lengths", default="2048,8192,32768")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--diag", action="store_true", help="forward-only timings with one knob changed at a time")
    p.add_argument("--diag-split", action="store_true", help="the split forward against retrieval in the walk, at 8k")
    p.add_argument("--diag-walk", action="store_true", help="the split forward's walk in other tilings and warps, at 8k")
    p.add_argument("--diag-walk-parts", action="store_true",
                   help="the walk kernel's GPU time without its barriers / state stores (timing only), at 8k")
    p.add_argument("--diag-walk-code", action="store_true",
                   help="the persistent walk's code variants (WALK_CODE), at 8k")
    p.add_argument("--diag-parallel", action="store_true",
                   help="warps and operands of the segment walk's parallel phases, at 8k")
    p.add_argument("--diag-tf32", action="store_true",
                   help="errors and time with the tf32 operands rounded (run again with TITANS_TF32_TRUNCATE=1)")
    p.add_argument("--diag-segments", action="store_true",
                   help="memory for speed: the training operator with more chunks per segment, at 8k and 32k")
    p.add_argument("--diag-memory", action="store_true",
                   help="the W1 layer step's allocated and reserved memory, steps 1-4 (eager, capture, replays)")
    p.add_argument("--diag-back-to-back", action="store_true",
                   help="the layer step synchronised (as kernels.py times it) against steps issued back to back")
    p.add_argument("--diag-bwd", action="store_true", help="GPU time per kernel of a training step and per backward phase")
    p.add_argument("--timed", default=None, help="JSON list of timed variants (default: TIMED)")
    p.add_argument("--checked", default=None, help="JSON list of checked variants (default: CHECKED)")
    p.add_argument("--variants-only", action="store_true",
                   help="check only the variants, not the layer and the default configuration's head shapes")
    p.add_argument("--diag-variant", default=None, help="JSON variant for --diag-bwd (its graph backward only)")
    p.add_argument("--shapes-only", default=None,
                   help="JSON list of (head_dim, expansion, chunk): only the default-configuration check at those "
                        "shapes (run several processes at once to compile them in parallel)")
    p.add_argument("--ncu-one", default=None, choices=("fwd", "train"), help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "kernels_persistent.json")
    a = p.parse_args()
    if a.warm_one:
        warm_one(json.loads(a.warm_one))
        return 0
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    if a.ncu_one:
        ncu_one(a.ncu_one)
        return 0
    if a.shapes_only:
        torch.backends.cuda.matmul.allow_tf32 = True
        ok = check_shapes([tuple(s) for s in json.loads(a.shapes_only)])
        print("shape check:", "PASS" if ok else "FAIL")
        return 0 if ok else 1
    for flag, run in ((a.diag_split, diag_split), (a.diag_walk, diag_walk), (a.diag_parallel, diag_parallel),
                      (a.diag_walk_code, diag_walk_code),
                      (a.diag_walk_parts, diag_walk_parts), (a.diag_tf32, diag_tf32),
                      (a.diag_segments, diag_segments), (a.diag_back_to_back, diag_back_to_back),
                      (a.diag_memory, diag_memory)):
        if flag:
            torch.backends.cuda.matmul.allow_tf32 = True
            run()
            return 0
    if a.diag or a.diag_bwd:
        torch.backends.cuda.matmul.allow_tf32 = True
        diag() if a.diag else diag_bwd(variant=tuple(json.loads(a.diag_variant)) if a.diag_variant else None)
        return 0
    torch.backends.cuda.matmul.allow_tf32 = True
    timed = [tuple(v) for v in json.loads(a.timed)] if a.timed else TIMED
    checked = [tuple(v) for v in json.loads(a.checked)] if a.checked else CHECKED
    warm(list(dict.fromkeys(([] if a.no_check else checked) + timed)))
    ok = True if a.no_check else check(checked, full=not a.variants_only)
    rows = timing(timed, [int(s) for s in a.lengths.split(",") if s])
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(dict(device=device_name(), date=time.strftime("%Y-%m-%d"), check_pass=ok,
                                      torch=torch.__version__, rows=rows), indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
