"""How well conditioned is a model's gradient? A 1-layer LMM model (W1 memory) on repetitive
token inputs (4 distinct tokens, as in DNA), at its initial weights, for several ``theta_max`` and
clip settings: the PyTorch operator in fp64 is the reference; rows give its gradient norm and the
distance (norm of the difference over the norm) of fp64 with the embedding scaled by 1 + 1e-9, of
the PyTorch operator in fp32 and of the Triton kernels (``impl="auto"``, tf32 operands).

    PYTHONPATH=$PWD python benchmarks/device/conditioning_check.py     # on the GPU machine
"""
import sys, torch
from torch import nn
sys.path.insert(0, "benchmarks")
from titans_memory import TitansConfig, MemoryConfig
from titans_memory.memory import NeuralMemory
import precision_quality as pq
torch.backends.cuda.matmul.allow_tf32 = False
dev = torch.device("cuda")
for theta_max, clip in [(0.1, 1.0), (0.02, 1.0), (0.1, None)]:
    cfg = TitansConfig(d_model=512, n_layers=1, n_heads=8, variant="lmm",
                       memory=MemoryConfig(theta_max=theta_max, theta_init=min(0.01, theta_max / 2), max_update_norm=clip))
    torch.manual_seed(0)
    m = pq.NextBaseModel(16, cfg).to(dev)
    batch = torch.randint(0, 4, (8, 2049), device=dev) + 5
    loss_fn = nn.CrossEntropyLoss()
    def grads(dtype, impl, pert=0.0):
        mm = m.to(dtype)
        for x in pq.memories(mm):
            x.impl = impl
        mm.zero_grad(set_to_none=True)
        if pert:
            with torch.no_grad():
                e = mm.embed.weight.clone(); mm.embed.weight.mul_(1 + pert)
        lg = mm(batch[:, :-1]); loss = loss_fn(lg.reshape(-1, lg.shape[-1]).float(), batch[:, 1:].reshape(-1)); loss.backward()
        if pert:
            with torch.no_grad():
                mm.embed.weight.copy_(e)
        return float(loss), {n: p.grad.double().clone() for n, p in mm.named_parameters() if p.grad is not None}
    l64, ref = grads(torch.float64, "torch")
    gn = torch.cat([g.flatten() for g in ref.values()]).norm().item()
    print(f"theta_max {theta_max} clip {clip}: fp64 loss {l64:.6f}, grad norm {gn:.3e}", flush=True)
    for label, dt, impl, pert in [("fp64 torch, embed x(1+1e-9)", torch.float64, "torch", 1e-9),
                                  ("fp32 torch", torch.float32, "torch", 0.0), ("fp32 auto (triton)", torch.float32, "auto", 0.0)]:
        l, g = grads(dt, impl, pert)
        tot = (torch.cat([(g[n] - ref[n]).flatten() for n in ref]).norm() / torch.cat([ref[n].flatten() for n in ref]).norm()).item()
        d = sorted(((((g[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)).item(), n) for n in ref), reverse=True)
        print(f"   {label}: loss diff {abs(l - l64):.2e}, all-grad distance {tot:.2e}; worst " + "; ".join(f"{n.replace('backbone.layers.', 'L')} {v:.1e}" for v, n in d[:3]), flush=True)
