#!/usr/bin/env python
"""Diagnosis of a GPU failure, for ``compute-sanitizer --tool memcheck``: one small forward +
backward of the persistent tiled kernels with a configuration the driver refuses on CUDA (bf16
operands in the persistent backward, or more than 8 backward warps, both of which stopped with
"illegal memory access" on an H200; bf16 in the segment walk, the default backward, ran clean
there on 2026-12-02), built from the driver's parts so the refusal is bypassed. Out-of-bounds accesses by
our index arithmetic show up in the sanitizer's report with the kernel's name; none there points
at the compiler.

    compute-sanitizer --tool memcheck python benchmarks/device/memcheck_tiled_bwd.py bf16 8
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import _inputs  # noqa: E402
from titans_memory.ops.mlp import MemoryMLPSpec  # noqa: E402
from titans_memory.ops.triton_tiled import TiledTritonMemory, _TrainCfg  # noqa: E402


def main(prec: str = "bf16", bwd_warps: int = 8, T: int = 256) -> None:
    Bq, H, d, E = 1, 2, 64, 4
    args, W, S = _inputs(Bq, H, T, d, 2, E, torch.device("cuda"), seed=0)
    BH = Bq * H
    xs = [t.float().reshape(BH, T, d).contiguous().requires_grad_() for t in args[:3]]
    gates = [t.float().reshape(BH, T).contiguous().requires_grad_() for t in args[3:]]
    st = [t.float().reshape(BH, *t.shape[2:]).contiguous().requires_grad_() for t in (W[0], S[0], W[1], S[1])]
    cfg = _TrainCfg(BH, T, d, d * E, MemoryMLPSpec("silu", residual=True), 64, 4, 1.0, None, prec,
                    persistent=True, check=True, bwd_tiles=4, num_warps=(8, bwd_warps), stash=True)
    o, *state = TiledTritonMemory.apply(cfg, *xs, *gates, *st)
    torch.autograd.grad([o, *state], xs + gates + st, [torch.randn_like(t) for t in (o, *state)])
    torch.cuda.synchronize()
    print(f"memcheck run done: precision {prec}, {bwd_warps} backward warps, T {T}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bf16", int(sys.argv[2]) if len(sys.argv) > 2 else 8)
