"""How does the gradient of a Titans model grow with the sequence length on repetitive tokens?

A 1-layer LMM model (the DNA classifier's width by default: d_model 128, 4 heads x 32, depth-2
memory, expansion 4) with a next-token head, at its initial weights, on i.i.d. random tokens
drawn from ``--n-tokens`` values (4: one base per token, as DNA). For each case the table gives
the gradient norm of all parameters with the PyTorch memory operator in fp64, and the distance
of the same gradient in fp32 (norm of the difference over the fp64 norm). A norm that grows
exponentially with the length, and a distance near or above 1, mean the memory's chunk
recurrence is unstable in the backward (its forward stays bounded by the update clip), so no
fp32 implementation gives the gradient. A column gives the fp64 gradient's distance when the
embedding is scaled by 1 + 1e-9: small there, the function itself is smooth and the fp32 error
comes from rounding amplified by the backward. Runs on the CPU in a minute or two; ``--device
cuda --kernels`` adds the fp32 gradient of ``impl="auto"`` (the Triton kernels).

    python benchmarks/conditioning.py
    python benchmarks/conditioning.py --cases '[{"T": 8192, "chunk": 16}]'
    python benchmarks/conditioning.py --device cuda --kernels --cases '[{"d_model": 512, "heads": 8, "chunk": 64}]'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from titans_memory import MemoryConfig, TitansConfig  # noqa: E402
from titans_memory.backbone import TitansBackbone  # noqa: E402

# the length sweep, then the gates: momentum 0.5 or less, forgetting 0.1 or a clip of 0.1 at 4k and 8k
CASES = ([dict(T=T) for T in (512, 1024, 2048, 4096)] + [dict(T=T, theta_max=0.01) for T in (1024, 2048, 4096)]
         + [dict(T=T, chunk=16) for T in (2048, 8192)] + [dict(T=2048, n_tokens=256), dict(T=2048, chunk=64)]
         + [dict(T=4096, eta_init=0.01), dict(T=4096, alpha_init=0.1), dict(T=4096, clip=0.1)]
         + [dict(T=8192, eta_init=0.01), dict(T=8192, eta_init=0.5), dict(T=8192, alpha_init=0.1),
            dict(T=8192, alpha_init=0.01), dict(T=8192, clip=0.1)])
DEFAULTS = dict(T=2048, n_tokens=4, theta_max=0.1, clip=1.0, chunk=32, d_model=128, heads=4, batch=1, seed=0,
                eta_init=MemoryConfig.eta_init, alpha_init=MemoryConfig.alpha_init)


def conditioning(T, n_tokens, theta_max, clip, chunk, d_model, heads, batch, seed, eta_init, alpha_init,
                 device="cpu", kernels=False) -> dict:
    """The model of this module's docstring: its fp64 gradient norm (``norm``), and the distances
    from that gradient of the fp64 one with the embedding scaled by 1 + 1e-9 (``perturbed``: the
    function's own sensitivity), of the fp32 one (``fp32``) and, with ``kernels``, of the fp32 one
    with ``impl="auto"`` (the Triton kernels on CUDA, tf32 operands: ``kernels``)."""
    from titans_memory.memory import NeuralMemory

    mem = MemoryConfig(theta_max=theta_max, theta_init=min(MemoryConfig.theta_init, theta_max / 2),
                       max_update_norm=clip, chunk_size=chunk, impl="torch", eta_init=eta_init,
                       alpha_init=alpha_init)
    cfg = TitansConfig(d_model=d_model, n_layers=1, n_heads=heads, variant="lmm", memory=mem)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(n_tokens, d_model), TitansBackbone(cfg), nn.Linear(d_model, n_tokens))
    model.to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, n_tokens, (batch, T + 1), generator=gen).to(device)
    loss_fn = nn.CrossEntropyLoss()

    def grad(dtype, impl="torch", scale=1.0):
        model.to(dtype)
        for m in model.modules():
            if isinstance(m, NeuralMemory):
                m.impl = impl
        embed = model[0].weight
        saved = embed.detach().clone()
        with torch.no_grad():
            embed.mul_(scale)
        model.zero_grad(set_to_none=True)
        logits = model(ids[:, :-1])
        loss_fn(logits.reshape(-1, n_tokens).float(), ids[:, 1:].reshape(-1)).backward()
        g = torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])
        with torch.no_grad():
            embed.copy_(saved)
        model.to(torch.float32)
        return g

    ref = grad(torch.float64)
    dist = lambda g: float((g - ref).norm() / ref.norm())  # noqa: E731
    out = dict(norm=float(ref.norm()), perturbed=dist(grad(torch.float64, scale=1 + 1e-9)),
               fp32=dist(grad(torch.float32)))
    if kernels:
        out["kernels"] = dist(grad(torch.float32, impl="auto"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=None, help=f"JSON list of overrides of {DEFAULTS} (default: the sweep)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kernels", action="store_true", help='also the fp32 gradient with impl="auto" (CUDA: Triton)')
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for PyTorch's matmuls
    cases = json.loads(args.cases) if args.cases else CASES
    extra = " kernels (auto) |" if args.kernels else ""
    print("| T | chunk | d_model x heads, batch | theta_max | clip | eta_init | alpha_init | distinct tokens | "
          f"fp64 gradient norm | fp64, input x (1 + 1e-9) | fp32 |{extra} s |")
    print("|---" * (12 + bool(args.kernels)) + "|")
    for case in cases:
        c = dict(DEFAULTS, **case)
        t0 = time.perf_counter()
        r = conditioning(**c, device=args.device, kernels=args.kernels)
        cells = [c["T"], c["chunk"], f"{c['d_model']} x {c['heads']}, {c['batch']}", c["theta_max"], c["clip"],
                 c["eta_init"], c["alpha_init"], c["n_tokens"], f"{r['norm']:.3g}", f"{r['perturbed']:.2e}",
                 f"{r['fp32']:.2e}"] + ([f"{r['kernels']:.2e}"] if args.kernels else [])
        print("| " + " | ".join(map(str, cells)) + f" | {time.perf_counter() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
