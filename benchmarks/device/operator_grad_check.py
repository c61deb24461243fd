"""The memory operator's Triton path (``impl="auto"``) against ``impl="torch"`` at W1 head shapes
for several batch sizes, lengths, value scales (8: the update clip engages on most tokens) and
clip settings, three calls each (the first backward eager, then the captured graph, then its
replay): the output's and every gradient's distance (norm of the difference over the norm).

    PYTHONPATH=$PWD python benchmarks/device/operator_grad_check.py     # on the GPU machine
"""
import math

import numpy as np
import torch

from titans_memory.ops import neural_memory, layer_shapes
from titans_memory.ops.mlp import MemoryMLPSpec
from titans_memory.ops.triton_tiled import clear_backward_graphs
torch.backends.cuda.matmul.allow_tf32 = True
dev = torch.device("cuda")
SPEC = MemoryMLPSpec()

def inputs(B, H, T, d, vscale, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g)
    q, k = (rn(B, H, T, d) for _ in range(2))
    q, k = (t / t.norm(dim=-1, keepdim=True) for t in (q, k))
    v = rn(B, H, T, d) * vscale / math.sqrt(d)
    th = torch.rand(B, H, T, generator=g) * 0.02
    et = 0.8 + 0.2 * torch.rand(B, H, T, generator=g)
    al = torch.rand(B, H, T, generator=g) * 0.01
    W = [rn(B, H, a, b) / math.sqrt(a) for a, b in layer_shapes(d, 2, 4)]
    S = [0.01 * rn(*w.shape) for w in W]
    return [t.to(dev).requires_grad_() for t in (q, k, v, th, et, al, *W, *S)]

NAMES = ["q", "k", "v", "theta", "eta", "alpha", "W1", "W2", "S1", "S2"]
def run(x, impl, clip, cot):
    o, W, S = neural_memory(*x[:6], x[6:8], x[8:], SPEC, 64, clip, impl=impl)
    loss = (o * cot).sum() + sum((w * w).sum() * 1e-3 for w in W)
    g = torch.autograd.grad(loss, x)
    return o.detach(), g

print("| B | T | clip | v scale | call | out dist | worst grad dist (tensor) | all grads |")
for B, T, clip, vs in [(4, 2048, 1.0, 1.0), (8, 2048, 1.0, 1.0), (4, 2048, 1.0, 8.0), (4, 2048, None, 8.0),
                       (8, 2048, None, 1.0), (4, 1024, 1.0, 1.0), (4, 8192, 1.0, 1.0), (5, 2048, 1.0, 1.0)]:
    x = inputs(B, 8, T, 64, vs, 0)
    cot = torch.randn(B, 8, T, 64, device=dev)
    o_ref, g_ref = run(x, "torch", clip, cot)
    for call in range(3):
        o, g = run(x, "auto", clip, cot)
        od = ((o - o_ref).norm() / o_ref.norm()).item()
        d = [((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(g, g_ref)]
        i = int(np.argmax(d))
        print(f"| {B} | {T} | {clip} | {vs} | {call} | {od:.2e} | {d[i]:.2e} ({NAMES[i]}) | {' '.join(f'{v:.1e}' for v in d)} |", flush=True)
    clear_backward_graphs()
    del x, g, g_ref
    torch.cuda.empty_cache()

