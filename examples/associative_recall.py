"""Train a tiny Titans model on synthetic associative recall, on the CPU, and watch it learn.

Each sequence lists ``n_pairs`` random key -> value pairs, then asks for the value of one of the
keys: ``k1 v1 k2 v2 ... kn vn  ?  kj``  -> predict ``vj``. A model can only answer by storing the
pairs as it reads them, which is what the neural memory does (its weights are updated by gradient
descent on ||M(k) - v||^2 at test time).

    python examples/associative_recall.py --variant lmm --steps 300
"""

from __future__ import annotations

import argparse
import time
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from titans_memory import MemoryConfig, TitansBackbone, TitansConfig

N_KEYS = N_VALUES = 16
QUERY = N_KEYS + N_VALUES  # token id of the "?" marker
VOCAB = QUERY + 1


def make_batch(batch: int, n_pairs: int, generator: torch.Generator):
    """Returns ``(tokens [batch, 2 n_pairs + 2], target [batch])`` with target a value index."""
    keys = torch.stack([torch.randperm(N_KEYS, generator=generator)[:n_pairs] for _ in range(batch)])
    values = torch.randint(0, N_VALUES, (batch, n_pairs), generator=generator)
    pairs = torch.stack([keys, values + N_KEYS], dim=2).reshape(batch, -1)
    pick = torch.randint(0, n_pairs, (batch,), generator=generator)
    query = keys[torch.arange(batch), pick]
    tokens = torch.cat([pairs, torch.full((batch, 1), QUERY), query[:, None]], dim=1)
    return tokens, values[torch.arange(batch), pick]


class RecallModel(nn.Module):
    def __init__(self, variant: str = "lmm", d_model: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        cfg = TitansConfig(
            d_model=d_model, n_layers=2, n_heads=4, variant=variant,
            memory=MemoryConfig(depth=2, expansion=2, chunk_size=8), segment_size=16, window_size=16,
        )
        self.backbone = TitansBackbone(cfg)
        self.head = nn.Linear(d_model, N_VALUES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(self.embed(tokens))[:, -1])


def train(variant: str = "lmm", steps: int = 300, n_pairs: int = 6, batch: int = 64, seed: int = 0, log_every: int = 50) -> List[float]:
    """Train and return the loss of every step."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = RecallModel(variant)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    start = time.time()
    for step in range(1, steps + 1):
        tokens, target = make_batch(batch, n_pairs, gen)
        loss = F.cross_entropy(model(tokens), target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if log_every and step % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            print(f"step {step:4d}  loss {recent:.3f}  (chance {torch.log(torch.tensor(float(N_VALUES))):.3f})  {time.time() - start:.0f}s")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="lmm", choices=["lmm", "mac", "mag", "mal"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--pairs", type=int, default=6)
    args = parser.parse_args()
    losses = train(args.variant, args.steps, args.pairs)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"mean loss of the first 20 steps {first:.3f} -> last 20 steps {last:.3f}")
