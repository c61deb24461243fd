"""Time the fused q/k/v stream kernels (``titans_memory.ops.qkv_prep``) against the PyTorch
composition at W1 shapes (batch 4, 8 heads x 64, conv kernel 4), forward and forward + backward,
and the backward's block size. GPU only; prints a markdown table.

    python benchmarks/qkv_prep.py [--lengths 8192]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from kernels import B, HEAD_DIM, HEADS, device_name, gpu_kernels  # noqa: E402
import titans_memory.ops.qkv_prep as qp  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="8192")
    ap.add_argument("--bwd-blocks", default="64x4,64x8,32x4,32x8,16x4,16x8", help="backward (tokens x warps) to time")
    a = ap.parse_args()
    dev = torch.device("cuda")
    C, K = HEADS * HEAD_DIM, 4
    print(f"# qkv_prep on {device_name()}: B {B}, {HEADS} heads x {HEAD_DIM}, conv {K}, fp32 projection")
    print("GPU time of the kernels of one call (CUDA profiler), median of 5; the calls are CPU-bound at these sizes")
    print("| impl | T | fwd GPU ms | fwd+bwd GPU ms | of which the backward kernel | max rel err vs torch (out, dp) |")
    print("|---|---|---|---|---|---|")
    for T in map(int, a.lengths.split(",")):
        p = torch.randn(B, T, 3 * C, device=dev, requires_grad=True)
        convs = [(torch.randn(C, 1, K, device=dev, requires_grad=True), torch.randn(C, device=dev, requires_grad=True))
                 for _ in range(3)]
        gy = [torch.randn(B, HEADS, T, HEAD_DIM, device=dev) for _ in range(3)]
        ref = None
        for label, impl, blk in [("torch", "torch", None)] + [(f"triton, bwd {b}", "triton", b) for b in a.bwd_blocks.split(",")]:
            if blk:
                bt, nw = map(int, blk.split("x"))
                qp.BLOCK_T_BWD, qp.WARPS_BWD = bt, nw

            def fwd():
                with torch.no_grad():
                    qp.qkv_prep(p, convs, [None] * 3, HEADS, impl=impl)

            def step():
                p.grad = None
                outs, _ = qp.qkv_prep(p, convs, [None] * 3, HEADS, impl=impl)
                sum((o * g).sum() for o, g in zip(outs, gy)).backward()

            def gpu_ms(fn, only=None):
                fn()
                runs = [gpu_kernels(fn) for _ in range(5)]
                return statistics.median(sum(k[2] for k in ks if only is None or only in k[0]) / 1e3 for ks in runs)

            tf = gpu_ms(fwd)
            tb = gpu_ms(step)
            tk = gpu_ms(step, "_prep_bwd") if impl == "triton" else float("nan")
            outs, _ = qp.qkv_prep(p, convs, [None] * 3, HEADS, impl=impl)
            dp = torch.autograd.grad(sum((o * g).sum() for o, g in zip(outs, gy)), p)[0]
            if ref is None:
                ref, err = ([o.detach() for o in outs], dp), ""
            else:
                rel = lambda x, y: ((x - y).abs().max() / y.abs().max()).item()  # noqa: E731
                err = f"{max(rel(o, r) for o, r in zip(outs, ref[0])):.1e}, {rel(dp, ref[1]):.1e}"
            print(f"| {label} | {T} | {tf:.3f} | {tb:.3f} | {tk:.3f} | {err} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
