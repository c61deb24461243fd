#!/usr/bin/env python
"""GPU check of the CUDA-graph backward's other paths (``bwd_graph`` of
``neural_memory_tiled_triton_train``), which CI can only test with a stub (no CUDA there):

1. a configuration's first backward (the walk launched eagerly), its second (captured, replayed)
   and its third (replayed) give bitwise-equal gradients, within the tf32 bound of the fp64
   chunked form;
2. eviction: two more configurations captured evict the first (``GRAPH_CACHE_SIZE`` 2); its next
   backward runs eagerly and still gives the same bits;
3. a capture that really fails (a host sync inside the captured body) warns, runs eagerly with
   the same bits, is not retried, and leaves the CUDA context usable (a next configuration still
   captures and replays);
4. timing at W1 and T = 8192 (fwd+bwd of the operator): replayed graph, the same walk eagerly (a
   configuration seen for the first time or evicted) and the persistent backward
   (``bwd_graph=False``).

    python benchmarks/device/graph_paths_check.py          # prints a table, exits 1 on a failure
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import titans_memory.ops.triton_tiled as tt  # noqa: E402
from kernels import B, CHUNK, HEAD_DIM, HEADS, TOL, _inputs, _rel, device_name  # noqa: E402
from titans_memory.ops import neural_memory_chunked  # noqa: E402
from titans_memory.ops.mlp import MemoryMLPSpec  # noqa: E402

SPEC = MemoryMLPSpec("silu", residual=True)
CLIP = 1.0


def step(T: int, seed: int = 0, **options):
    """Outputs and all ten gradients of one fwd+bwd at W1 head shapes (fixed cotangents)."""
    args, W, S = _inputs(B, HEADS, T, HEAD_DIM, 2, 4, torch.device("cuda"), seed=seed)
    x = [t.float().requires_grad_() for t in args + W + S]
    o, Wt, St = tt.neural_memory_tiled_triton_train(*x[:6], x[6:8], x[8:], SPEC, CHUNK, CLIP, **options)
    outs = [o, *Wt, *St]
    g = torch.Generator(device="cpu").manual_seed(99)
    cots = [torch.randn(t.shape, generator=g).cuda() for t in outs]
    return outs, torch.autograd.grad(outs, x, cots)


def reference(T: int, seed: int = 0):
    args, W, S = _inputs(B, HEADS, T, HEAD_DIM, 2, 4, torch.device("cuda"), seed=seed)
    x = [t.clone().requires_grad_() for t in args + W + S]
    o, Wt, St = neural_memory_chunked(*x[:6], x[6:8], x[8:], SPEC, CHUNK, CLIP)
    outs = [o, *Wt, *St]
    g = torch.Generator(device="cpu").manual_seed(99)
    cots = [torch.randn(t.shape, generator=g).cuda().double() for t in outs]
    return torch.autograd.grad(outs, x, cots)


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def n_graphs() -> int:
    return len(tt._GRAPHS)


def main() -> int:
    rows, ok = [], True

    def record(name: str, good: bool, detail: str) -> None:
        nonlocal ok
        ok &= bool(good)
        rows.append((name, "yes" if good else "NO", detail))
        print(f"| {name} | {'yes' if good else 'NO'} | {detail} |", flush=True)

    print(f"# CUDA-graph backward paths on {device_name()}, W1 heads (B {B} x {HEADS} x {HEAD_DIM}), clip {CLIP}")
    print("| check | pass | detail |\n|---|---|---|")
    TA, TB, TC, TD = 1008, 1072, 1136, 1200
    tt.clear_backward_graphs()
    _, g_eager = step(TA)
    eager_ok = n_graphs() == 0
    _, g_capt = step(TA)
    _, g_repl = step(TA)
    err = max(_rel(a, b) for a, b in zip(g_eager, reference(TA)))
    record("first (eager) = captured = replayed, bitwise", eager_ok and n_graphs() == 1
           and same(g_eager, g_capt) and same(g_eager, g_repl),
           f"graphs after the calls: 0 -> {n_graphs()}")
    record("eager walk within the tf32 bound", err <= TOL["tf32"], f"max grad rel err {err:.2e} (bound {TOL['tf32']})")

    for T in (TB, TB, TC, TC):  # two more captured configurations: the first is evicted
        step(T)
    evicted = any(key[1][1] == TA for key in tt._EVICTED)
    _, g_after = step(TA)
    record("evicted configuration runs eagerly, same bits", evicted and same(g_eager, g_after)
           and all(key[1][1] != TA for key in tt._GRAPHS), f"cached lengths {[k[1][1] for k in tt._GRAPHS]}")

    # a real capture failure: a host sync inside the captured body
    tt.clear_backward_graphs()
    real_body = tt._BackwardGraph._body

    def syncing_body(self, cfg):
        out = real_body(self, cfg)
        out[-1].sum().item()  # not permitted while the stream is capturing
        return out

    tt._BackwardGraph._body = syncing_body
    try:
        step(TA)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, g_fail = step(TA)
        warned = any("capture" in str(w.message) for w in caught)
        _, g_fail2 = step(TA)
        record("failed capture: warning, eager, same bits, not retried",
               warned and n_graphs() == 0 and same(g_eager, g_fail) and same(g_eager, g_fail2),
               f"warnings {[str(w.message)[:90] for w in caught]}")
    finally:
        tt._BackwardGraph._body = real_body
    step(TD)
    _, g_d = step(TD)
    _, g_d2 = step(TD)
    record("context usable after the failed capture (next config captured)", n_graphs() == 1 and same(g_d, g_d2),
           f"graphs {n_graphs()}")

    # timing at 8k: graph replay, the same walk eagerly, the persistent backward
    T = 8192
    args, W, S = _inputs(B, HEADS, T, HEAD_DIM, 2, 4, torch.device("cuda"), seed=1)
    x = [t.float().requires_grad_() for t in args + W + S]

    def fwd_bwd(clear: bool, **options):
        if clear:
            tt.clear_backward_graphs()
        o, Wt, St = tt.neural_memory_tiled_triton_train(*x[:6], x[6:8], x[8:], SPEC, CHUNK, CLIP, **options)
        torch.autograd.grad([o, *Wt, *St], x, [torch.ones_like(t) for t in (o, *Wt, *St)])

    print("\n| backward at T = 8192 | fwd+bwd ms (median of 5) |\n|---|---|")
    for name, clear, options in (("graph replay", False, {}), ("same walk, eager", True, {}),
                                 ("persistent backward (bwd_graph=False)", False, dict(bwd_graph=False))):
        fwd_bwd(clear, **options)
        fwd_bwd(clear, **options)
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fwd_bwd(clear, **options)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        print(f"| {name} | {1e3 * sorted(times)[2]:.2f} |", flush=True)
    print("graph paths check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
