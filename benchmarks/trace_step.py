"""Where the GPU waits in one training step of a kernel-benchmark impl: a host-side trace (torch
profiler, CPU and CUDA activities) of one W1 step, and every GPU idle gap longer than
``--min-gap-us`` with what the host was doing during it.

For each gap it prints the kernel that ended it, the CPU operators around the host call that
launched that kernel (outermost first), and the CUDA runtime calls the host spent the gap in
(a synchronisation, a copy, launches). A gap whose next launch was issued after the previous
kernel had finished means the host was late (CPU-bound or waiting on a sync); one whose launch
was issued before means the GPU itself waited (a dependency across streams, a graph launch).
GPU only; optionally writes the Chrome trace (``--trace-json``, open in Perfetto).

    python benchmarks/trace_step.py --impl ours_triton --length 8192 [--trace-json step.json]
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from kernels import _make, device_name  # noqa: E402

_SYNC_CALLS = ("Synchronize", "cudaMemcpy", "cudaStreamWaitEvent", "cudaEventQuery")


def _load_trace(step, path: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(path))
    return json.loads(path.read_text())


def _events(trace: dict):
    """(kernels, runtime calls by correlation id, runtime calls, CPU ops), times in us."""
    kernels, runtime, ops = [], [], []
    for e in trace.get("traceEvents", []):
        if e.get("ph") != "X":
            continue
        cat = e.get("cat", "")
        rec = (float(e["ts"]), float(e.get("dur", 0.0)), e.get("name", "?"), e.get("args", {}))
        if cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            kernels.append(rec)
        elif cat == "cuda_runtime" or cat == "cuda_driver":
            runtime.append(rec)
        elif cat == "cpu_op":
            ops.append(rec)
    kernels.sort(key=lambda r: r[0])
    runtime.sort(key=lambda r: r[0])
    ops.sort(key=lambda r: r[0])
    by_corr = {r[3].get("correlation"): r for r in runtime if r[3].get("correlation") is not None}
    return kernels, by_corr, runtime, ops


def _enclosing(ops, t: float, depth: int = 4) -> str:
    """The CPU operators running at host time ``t``, outermost first (at most ``depth``)."""
    stack = [o for o in ops if o[0] <= t <= o[0] + o[1]]
    stack.sort(key=lambda o: (o[0], -o[1]))
    names = [o[2] for o in stack]
    return " > ".join(names[:depth]) + (" > ..." if len(names) > depth else "") if names else "(no op)"


def _calls_in(runtime, starts, t0: float, t1: float, top: int = 3) -> str:
    """The runtime calls overlapping host time ``[t0, t1]``, summed by name, longest first."""
    tot = defaultdict(float)
    i = max(bisect.bisect_left(starts, t0) - 1, 0)
    while i < len(runtime) and runtime[i][0] < t1:
        s, d, name, _ = runtime[i]
        ov = min(s + d, t1) - max(s, t0)
        if ov > 0:
            tot[name] += ov
        i += 1
    items = sorted(tot.items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{n} {v:.0f}" for n, v in items) or "-"


def analyse(trace: dict, min_gap_us: float, top: int) -> None:
    kernels, by_corr, runtime, ops = _events(trace)
    if not kernels:
        print("no GPU activity recorded")
        return
    starts = [r[0] for r in runtime]
    t_begin, t_end = kernels[0][0], max(k[0] + k[1] for k in kernels)
    busy_end = kernels[0][0]
    gaps = []
    for k in kernels:
        gap = k[0] - busy_end
        if gap > min_gap_us:
            launch = by_corr.get(k[3].get("correlation"))
            gaps.append((gap, busy_end, k, launch))
        busy_end = max(busy_end, k[0] + k[1])
    idle = sum(g[0] for g in gaps)
    span = t_end - t_begin
    late = [g for g in gaps if g[3] is not None and g[3][0] > g[1]]
    print(f"GPU span {span / 1e3:.2f} ms, {len(kernels)} kernels/copies, idle in gaps > {min_gap_us:.0f} us: "
          f"{idle / 1e3:.2f} ms in {len(gaps)} gaps; of which the host launched late: "
          f"{sum(g[0] for g in late) / 1e3:.2f} ms in {len(late)} gaps")
    by_op = defaultdict(lambda: [0, 0.0])
    for gap, _, _, launch in gaps:
        key = _enclosing(ops, launch[0], depth=2) if launch is not None else "(launch not traced)"
        by_op[key][0] += 1
        by_op[key][1] += gap
    print("\n| host operators at the late launch (outermost two) | gaps | idle ms |")
    print("|---|---|---|")
    for key, (n, us) in sorted(by_op.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"| {key} | {n} | {us / 1e3:.2f} |")
    print(f"\n| gap us | at ms | next kernel | launched by (host ops) | launch issued vs GPU free, us | host runtime calls in the gap, us |")
    print("|---|---|---|---|---|---|")
    for gap, t_free, k, launch in sorted(gaps, key=lambda g: -g[0])[:top]:
        if launch is None:
            where, lag, calls = "(launch not traced)", "-", "-"
        else:
            where = _enclosing(ops, launch[0])
            lag = f"{launch[0] - t_free:+.0f}"
            calls = _calls_in(runtime, starts, t_free, launch[0] + launch[1])
        print(f"| {gap:.0f} | {(t_free - t_begin) / 1e3:.2f} | {k[2][:48]} | {where[:110]} | {lag} | {calls} |")
    sync = defaultdict(lambda: [0, 0.0])
    for s, d, name, _ in runtime:
        if any(m in name for m in _SYNC_CALLS):
            sync[name][0] += 1
            sync[name][1] += d
    print("\n| host calls that synchronise or copy (or poll an event) | calls | host ms |")
    print("|---|---|---|")
    for name, (n, us) in sorted(sync.items(), key=lambda kv: -kv[1][1]):
        print(f"| {name} | {n} | {us / 1e3:.2f} |")


def host_and_gpu(step, reps: int = 5) -> str:
    """The step's wall time (CUDA events, from an idle GPU), the host's time to issue it (until
    ``step`` returns, no sync) and its kernels' GPU time (CUDA profiler only): if the host's issue
    time approaches the wall time, the step is host-bound."""
    import statistics
    import time

    from kernels import gpu_kernels

    wall, issue = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        a.record()
        step()
        issue.append((time.perf_counter() - t0) * 1e3)
        b.record()
        b.synchronize()
        wall.append(a.elapsed_time(b))
    busy = statistics.median(sum(k[2] for k in gpu_kernels(step)) / 1e3 for _ in range(3))
    w = statistics.median(wall)
    return (f"step {w:.2f} ms (CUDA events), host issue time {statistics.median(issue):.2f} ms, kernels' GPU time "
            f"{busy:.2f} ms, GPU idle {w - busy:.2f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", default="ours_triton")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--warmup", type=int, default=3, help="steps before the traced one (compile, graph capture)")
    ap.add_argument("--min-gap-us", type=float, default=20.0)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--trace-json", type=Path, default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("the trace needs a CUDA device")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True  # as in kernels.py's run_bench
    torch.backends.cudnn.allow_tf32 = True
    step = _make(a.impl, torch.device("cuda"))(a.length)
    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    print(f"# {a.impl}, T = {a.length}, {device_name()}, without the host-side profiler (median of 5):")
    print(host_and_gpu(step))
    path = a.trace_json or Path(tempfile.mkdtemp()) / "step.json"
    trace = _load_trace(step, path)
    print(f"# {a.impl}, T = {a.length}, {device_name()}: one step after {a.warmup} warm-up steps")
    analyse(trace, a.min_gap_us, a.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
