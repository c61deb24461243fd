"""Does ``kernel_precision`` change what a model learns? Next-nucleotide training on a real genome.

The same model (an embedding, a stack of LMM blocks with the W1 memory: 8 heads x 64, depth 2,
expansion 4, chunk 64, and a linear head), the same initial weights and the same batches are
trained once per ``MemoryConfig.kernel_precision``; the table gives each run's training loss
(mean of the last 10 % of the steps), its held-out loss (the last 10 % of the genome, contiguous
windows) and its time per step. On CUDA ``impl="auto"`` runs the Triton kernels, so the
precisions differ there; on the CPU they all run the PyTorch path (the harness test).

    python benchmarks/precision_quality.py --data-dir ../shared/data            # GPU: the table
    python benchmarks/precision_quality.py --device cpu --steps 2 --length 128  # harness smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from titans_genomics.fasta import FastaGenome  # noqa: E402
from titans_genomics.tokenizer import NucleotideTokenizer  # noqa: E402
from titans_memory import MemoryConfig, TitansConfig  # noqa: E402
from titans_memory.backbone import TitansBackbone  # noqa: E402

PRECISIONS = ("tf32", "bf16-forward", "bf16")


class NextBaseModel(nn.Module):
    """Embedding, Titans backbone, linear head: logits of the next base at every position."""

    def __init__(self, vocab: int, config: TitansConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, config.d_model)
        self.backbone = TitansBackbone(config)
        self.head = nn.Linear(config.d_model, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(self.embed(ids)))


def genome_ids(path: Path) -> tuple:
    """Every record of the FASTA file, tokenized one base per token and concatenated; and the
    tokenizer's vocabulary size."""
    genome = FastaGenome(path)
    tok = NucleotideTokenizer()
    try:
        return np.concatenate([tok.encode(genome.fetch_record(name)) for name in genome.names]), tok.vocab_size
    finally:
        genome.close()


def model_config(args, precision: str) -> TitansConfig:
    theta_max = args.theta_max if args.theta_max is not None else MemoryConfig.theta_max
    memory = MemoryConfig(kernel_precision=precision, theta_max=theta_max,
                          theta_init=min(MemoryConfig.theta_init, theta_max / 2))
    return TitansConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, variant="lmm", memory=memory)


def train_one(ids: np.ndarray, vocab: int, precision: str, seed: int, args, device: torch.device) -> dict:
    """One training run; returns its losses and time per step."""
    n_hold = len(ids) // 10
    train, held = ids[:-n_hold], ids[-n_hold:]
    L = args.length
    if len(train) <= L + 1 or len(held) <= L + 1:
        raise SystemExit(f"the genome ({len(ids)} bases) is too short for windows of {L}")
    cfg = model_config(args, precision)
    torch.manual_seed(seed)
    model = NextBaseModel(vocab, cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    rng = np.random.default_rng(seed)  # the same batches for every precision
    loss_fn = nn.CrossEntropyLoss()
    losses: List[float] = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t_start = None
    for step in range(args.steps):
        if step == min(2, args.steps - 1):  # time the steps after the compilation / graph capture
            sync()
            t_start, n_timed = time.perf_counter(), args.steps - step
        starts = rng.integers(0, len(train) - L - 1, size=args.batch)
        batch = torch.as_tensor(np.stack([train[s:s + L + 1] for s in starts]), device=device)
        logits = model(batch[:, :-1])
        loss = loss_fn(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    sync()
    step_ms = (time.perf_counter() - t_start) / n_timed * 1e3
    if not all(np.isfinite(losses)):
        raise SystemExit(f"{precision} seed {seed}: non-finite training loss")
    model.eval()
    held_losses = []
    with torch.no_grad():
        for s in range(0, min(len(held) - L - 1, args.eval_windows * L), L):
            w = torch.as_tensor(held[s:s + L + 1], device=device)[None]
            logits = model(w[:, :-1])
            held_losses.append(float(loss_fn(logits[0], w[0, 1:])))
    tail = max(1, args.steps // 10)
    every = max(1, args.steps // 6)
    curve = [round(float(np.mean(losses[i:i + every])), 3) for i in range(0, args.steps, every)]
    return dict(precision=precision, seed=seed, train=float(np.mean(losses[-tail:])),
                held=float(np.mean(held_losses)), step_ms=step_ms, curve=curve, model=model)


def memories(model: nn.Module):
    from titans_memory.memory import NeuralMemory

    return [m for m in model.modules() if isinstance(m, NeuralMemory)]


def grad_check(model: nn.Module, batch: torch.Tensor, precisions: Sequence[str], label: str) -> List[str]:
    """Table rows: the loss and parameter gradients on ``batch`` of the PyTorch memory operator in
    fp32 (``impl="torch"``) and of each precision's kernels (``impl="auto"``), against the
    PyTorch operator in fp64 for the same weights (the model is cast back to fp32 after, exactly)."""
    loss_fn = nn.CrossEntropyLoss()
    saved = [(m.impl, m.config) for m in memories(model)]

    def grads(impl: str, precision: str, dtype=torch.float32):
        model.to(dtype)
        for m in memories(model):
            m.impl, m.config = impl, dataclasses.replace(m.config, kernel_precision=precision)
        model.zero_grad(set_to_none=True)
        logits = model(batch[:, :-1])
        loss = loss_fn(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        out = float(loss.detach()), {n: p.grad.detach().double() for n, p in model.named_parameters() if p.grad is not None}
        model.to(torch.float32)
        return out

    try:
        ref_loss, ref = grads("torch", "tf32", torch.float64)
        ref_norm = float(torch.cat([g.flatten() for g in ref.values()]).norm())
        rows = []
        for impl, p in [("torch", "fp32")] + [("auto", p) for p in precisions]:
            loss, g = grads(impl, "tf32" if impl == "torch" else p)
            dist = {n: float((g[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)) for n in ref}
            worst = max(dist, key=dist.get)
            total = float(torch.cat([(g[n] - ref[n]).flatten() for n in ref]).norm()) / ref_norm
            rows.append(f"| {label} | {ref_norm:.3g} | {impl} {p} | {abs(loss - ref_loss):.2e} | {total:.2e} | "
                        f"{dist[worst]:.2e} ({worst}) |")
        return rows
    finally:
        for m, (impl, cfg) in zip(memories(model), saved):
            m.impl, m.config = impl, cfg
        model.zero_grad(set_to_none=True)


def table(rows: Sequence[dict]) -> str:
    out = ["| kernel_precision | seed | train loss (last 10 %) | held-out loss | ms per step | training loss, sixths of the run |",
           "|---|---|---|---|---|---|"]
    out += [f"| {r['precision']} | {r['seed']} | {r['train']:.4f} | {r['held']:.4f} | {r['step_ms']:.1f} | "
            f"{' '.join(map(str, r['curve']))} |" for r in rows]
    out += ["", "| kernel_precision | mean held-out loss | spread over seeds (max - min) |", "|---|---|---|"]
    for p in dict.fromkeys(r["precision"] for r in rows):
        h = [r["held"] for r in rows if r["precision"] == p]
        out.append(f"| {p} | {np.mean(h):.4f} | {max(h) - min(h):.4f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("TITANS_DATA_DIR") or str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--fasta", default="fasta/pseudo_genome.fa", help="relative to --data-dir")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--theta-max", type=float, default=None,
                    help="MemoryConfig.theta_max (default: its default; theta_init is capped at half of it)")
    ap.add_argument("--grad-check", action="store_true",
                    help="also compare each precision's gradients with impl='torch' at the start and the end of "
                         "the first run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device(args.device)
    ids, vocab = genome_ids(Path(args.data_dir) / args.fasta)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"# next-base training, {len(ids)} bases of {args.fasta}, {args.layers} LMM layers, d_model {args.d_model}, "
          f"{args.heads} heads, batch {args.batch} x {args.length}, {args.steps} steps, lr {args.lr}, "
          f"theta_max {model_config(args, 'tf32').memory.theta_max}, {name}", flush=True)
    precisions = args.precisions.split(",")
    checks = []
    if args.grad_check:  # the untrained model of the first run, on a training batch
        cfg = model_config(args, precisions[0])
        torch.manual_seed(int(args.seeds.split(",")[0]))
        fresh = NextBaseModel(vocab, cfg).to(device)
        g = np.random.default_rng(123)
        starts = g.integers(0, len(ids) - args.length - 1, size=args.batch)
        check_batch = torch.as_tensor(np.stack([ids[s:s + args.length + 1] for s in starts]), device=device)
        checks += grad_check(fresh, check_batch, precisions, "initial weights")
        del fresh
    rows = []
    for p in precisions:
        for s in (int(x) for x in args.seeds.split(",")):
            rows.append(train_one(ids, vocab, p, s, args, device))
            if args.grad_check and len(rows) == 1:
                checks += grad_check(rows[0]["model"], check_batch, precisions, f"after {args.steps} steps ({p})")
            rows[-1].pop("model")
            print(rows[-1], flush=True)
    print(table(rows))
    if checks:
        print("\nAgainst impl='torch' in fp64 (gradient distance: norm of the difference over the fp64 gradient's "
              "norm):\n\n| weights | fp64 gradient norm | operator | loss difference | gradient distance, all parameters "
              "| largest per parameter |\n|---|---|---|---|---|---|")
        print("\n".join(checks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
