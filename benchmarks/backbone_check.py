"""Forward + backward of every Titans variant on the available device, and the chunked memory
against the token-by-token reference there.

    python benchmarks/backbone_check.py            # prints a table; exit code 1 on any failure

Checks, per variant (lmm, mac, mag, mal): a bf16-autocast forward and backward of a 2-layer
backbone on [4, 1024, 256] runs, the loss and every gradient are finite; plus the chunked
memory operator vs the recurrent reference in fp32 on the device (max abs error, tolerance 1e-4).
"""

from __future__ import annotations

import sys
import time

import torch

from titans_memory import MemoryConfig, TitansBackbone, TitansConfig
from titans_memory.ops import layer_shapes, neural_memory_chunked, neural_memory_recurrent


def main() -> int:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}")
    ok = True
    print("| variant | fwd+bwd ms | peak GiB | finite |")
    print("|---|---|---|---|")
    for variant in ("lmm", "mac", "mag", "mal"):
        torch.manual_seed(0)
        cfg = TitansConfig(d_model=256, n_layers=2, n_heads=4, variant=variant,
                           memory=MemoryConfig(chunk_size=64), segment_size=128, window_size=128)
        model = TitansBackbone(cfg).to(dev)
        x = torch.randn(4, 1024, 256, device=dev, requires_grad=True)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for rep in range(2):
            model.zero_grad()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = model(x).float().pow(2).mean()
            loss.backward()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t) * 1e3
        finite = bool(torch.isfinite(loss)) and all(
            p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
        ok &= finite
        print(f"| {variant} | {ms:.1f} | {peak:.2f} | {finite} |")

    torch.manual_seed(0)
    B, H, T, d = 2, 4, 200, 32
    q, k, v = (torch.nn.functional.normalize(torch.randn(B, H, T, d, device=dev), dim=-1) for _ in range(3))
    th = torch.rand(B, H, T, device=dev) * 0.1
    eta = torch.rand(B, H, T, device=dev)
    al = torch.rand(B, H, T, device=dev) * 0.01
    W = [torch.randn(B, H, a, b, device=dev) / a**0.5 for a, b in layer_shapes(d, 2, 4)]
    torch.backends.cuda.matmul.allow_tf32 = False
    o1, _, _ = neural_memory_recurrent(q, k, v, th, eta, al, W, chunk_size=16)
    o2, _, _ = neural_memory_chunked(q, k, v, th, eta, al, W, chunk_size=16)
    err = (o1 - o2).abs().max().item()
    ok &= err < 1e-4
    print(f"chunked vs recurrent on {dev.type} (fp32, T={T}, chunk 16): max abs error {err:.2e} (tol 1e-4)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
