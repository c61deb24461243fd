#!/usr/bin/env python
"""GPU check of DistributedDataParallel with the CUDA-graph backward of the tiled memory kernels
(what ``impl="auto"`` trains with on CUDA at head dim 32-64, depth 2): the backward of a rank is
captured into a CUDA graph while DDP's gradient all-reduce runs on its own stream and thread.

One NeuralMemory layer at W1 dims (d_model 512, 8 heads x 64, depth 2, expansion 4, chunk 64),
T = 1024, global batch 2 x world size, split over the ranks. Three steps without an optimiser
(the first backward runs the walk eagerly, the second captures it, the third replays), each
checked against rank 0's single-process layer (no DDP) on the whole batch: the all-reduced
parameter gradients within 1e-4 relative (same kernels per head; only the order of the batch
sums differs), bitwise equal across ranks, and a graph captured on every rank.

    torchrun --nproc_per_node 2 benchmarks/device/ddp_graph_check.py
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import titans_memory.ops.triton_tiled as tt  # noqa: E402
from titans_memory.config import MemoryConfig  # noqa: E402
from titans_memory.memory import NeuralMemory  # noqa: E402

TOL = 1e-4


def main() -> int:
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(dev)
    torch.manual_seed(0)
    layer = NeuralMemory(512, 8, 64, MemoryConfig(depth=2, expansion=4, chunk_size=64)).to(dev)
    single = copy.deepcopy(layer) if rank == 0 else None
    ddp = torch.nn.parallel.DistributedDataParallel(layer, device_ids=[dev.index])
    per, T = 2, 1024
    ok = True
    for it in range(3):
        g = torch.Generator().manual_seed(100 + it)
        x = torch.randn(per * world, T, 512, generator=g).to(dev)
        gy = torch.randn(per * world, T, 512, generator=g).to(dev)
        mine = slice(rank * per, (rank + 1) * per)
        ddp.zero_grad(set_to_none=True)
        # mean over the local batch; DDP averages over the ranks -> the mean over the whole batch
        ((ddp(x[mine]) * gy[mine]).sum() / per).backward()
        grads = torch.cat([p.grad.reshape(-1) for p in layer.parameters()])
        everyone = [torch.empty_like(grads) for _ in range(world)]
        dist.all_gather(everyone, grads)
        graphs = torch.tensor([len(tt._GRAPHS)], device=dev)
        dist.all_reduce(graphs, op=dist.ReduceOp.MIN)
        if rank == 0:
            single.zero_grad(set_to_none=True)
            ((single(x) * gy).sum() / (per * world)).backward()
            ref = torch.cat([p.grad.reshape(-1) for p in single.parameters()])
            err = float((grads - ref).norm() / ref.norm())
            same = all(torch.equal(everyone[0], e) for e in everyone[1:])
            want_graphs = 0 if it == 0 else 1
            good = err <= TOL and same and int(graphs) >= want_graphs
            ok &= good
            print(f"| step {it} | rel err vs single process {err:.2e} (bound {TOL:g}) | ranks bitwise equal: "
                  f"{same} | graphs cached on every rank >= {want_graphs}: {int(graphs) >= want_graphs} | "
                  f"{'pass' if good else 'FAIL'} |", flush=True)
    flag = torch.tensor([int(ok)], device=dev)
    dist.broadcast(flag, 0)
    if rank == 0:
        print(f"DDP graph check ({world} ranks, {torch.cuda.get_device_name(dev)}):", "PASS" if ok else "FAIL")
    dist.destroy_process_group()
    return 0 if int(flag) else 1


if __name__ == "__main__":
    sys.exit(main())
