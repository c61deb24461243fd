"""How does the gradient of a Titans model grow with the sequence length on repetitive tokens?

A 1-layer LMM model (the DNA classifier's width by default: d_model 128, 4 heads x 32, depth-2
memory, expansion 4) with a next-token head, at its initial weights, on i.i.d. random tokens
drawn from ``--n-tokens`` values (4: one base per token, as DNA). For each case the table gives
the gradient norm of all parameters with the PyTorch memory operator in fp64, and the distance
of the same gradient in fp32 (norm of the difference over the fp64 norm). A norm that grows
exponentially with the length, and a distance near or above 1, mean the memory's chunk
recurrence is unstable in the backward (its forward stays bounded by the update clip), so no
fp32 implementation gives the gradient. Runs on the CPU in about a minute.

    python benchmarks/conditioning.py
    python benchmarks/conditioning.py --cases '[{"T": 8192, "chunk": 16}]'
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

CASES = ([dict(T=T) for T in (512, 1024, 2048, 4096)] + [dict(T=T, theta_max=0.01) for T in (1024, 2048, 4096)]
         + [dict(T=T, chunk=16) for T in (2048, 8192)] + [dict(T=2048, n_tokens=256), dict(T=2048, chunk=64)])
DEFAULTS = dict(T=2048, n_tokens=4, theta_max=0.1, clip=1.0, chunk=32, d_model=128, heads=4, batch=1, seed=0,
                eta_init=MemoryConfig.eta_init, alpha_init=MemoryConfig.alpha_init)


def gradient_norm_and_fp32_distance(T, n_tokens, theta_max, clip, chunk, d_model, heads, batch, seed, eta_init,
                                    alpha_init):
    """(fp64 gradient norm, fp32 distance) of the model of this module's docstring."""
    mem = MemoryConfig(theta_max=theta_max, theta_init=min(MemoryConfig.theta_init, theta_max / 2),
                       max_update_norm=clip, chunk_size=chunk, impl="torch", eta_init=eta_init,
                       alpha_init=alpha_init)
    cfg = TitansConfig(d_model=d_model, n_layers=1, n_heads=heads, variant="lmm", memory=mem)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(n_tokens, d_model), TitansBackbone(cfg), nn.Linear(d_model, n_tokens))
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, n_tokens, (batch, T + 1), generator=gen)
    loss_fn = nn.CrossEntropyLoss()

    def grad(dtype):
        model.to(dtype)
        model.zero_grad(set_to_none=True)
        logits = model(ids[:, :-1])
        loss_fn(logits.reshape(-1, n_tokens).float(), ids[:, 1:].reshape(-1)).backward()
        g = torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])
        model.to(torch.float32)
        return g

    ref = grad(torch.float64)
    return float(ref.norm()), float((grad(torch.float32) - ref).norm() / ref.norm())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=None, help=f"JSON list of overrides of {DEFAULTS} (default: the sweep)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = json.loads(args.cases) if args.cases else CASES
    print("| T | chunk | theta_max | clip | eta_init | alpha_init | distinct tokens | fp64 gradient norm | fp32 distance | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case in cases:
        c = dict(DEFAULTS, **case)
        t0 = time.perf_counter()
        norm, dist = gradient_norm_and_fp32_distance(**c)
        print(f"| {c['T']} | {c['chunk']} | {c['theta_max']} | {c['clip']} | {c['eta_init']} | {c['alpha_init']} | "
              f"{c['n_tokens']} | {norm:.3g} | "
              f"{dist:.2e} | {time.perf_counter() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
