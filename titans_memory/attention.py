"""Attention for the MAC / MAG / MAL variants, through ``scaled_dot_product_attention``.

Two masks are needed:

- sliding-window causal attention (MAG, MAL): query ``t`` sees keys ``t - w + 1 .. t``; computed
  block by block (queries in blocks of ``w`` see their own block and the previous one), so cost
  and memory are linear in the sequence length;
- MAC segment attention: queries of one segment see ``[persistent || retrieved h || segment]``
  with ``h_j`` and ``segment_j`` visible only for ``j <= t``.

Persistent-memory tokens (paper Eq. 19) enter as a key/value prefix visible to every query.
Rotary position embeddings encode relative positions inside a window.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rotary(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Apply rotary embeddings to ``x`` ``[..., T, d]`` at integer ``positions`` ``[T]`` (d even)."""
    d = x.shape[-1]
    half = d // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = positions.to(torch.float32)[:, None] * freqs[None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    rot = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([rot, x[..., 2 * half :]], dim=-1) if d % 2 else rot


class Attention(nn.Module):
    """Multi-head attention with the masks the Titans variants need.

    Args:
        d_model: model width D.
        n_heads: heads.
        head_dim: per-head width.
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.q = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.kv = nn.Linear(d_model, 2 * n_heads * head_dim, bias=False)
        self.out = nn.Linear(n_heads * head_dim, d_model, bias=False)

    def _split(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)

    def _merge(self, t: Tensor) -> Tensor:
        b, _, n, _ = t.shape
        return self.out(t.transpose(1, 2).reshape(b, n, -1))

    def _prefix_kv(self, prefix: Optional[Tensor], batch: int):
        if prefix is None or prefix.shape[0] == 0:
            return None, None
        k, v = self.kv(prefix).chunk(2, dim=-1)
        k = self._split(k.unsqueeze(0).expand(batch, -1, -1))
        v = self._split(v.unsqueeze(0).expand(batch, -1, -1))
        return k, v

    def sliding_window(self, x: Tensor, window: int, prefix: Optional[Tensor] = None, offset: int = 0) -> Tensor:
        """Causal sliding-window attention over ``x`` ``[B, T, D]`` with an always-visible prefix
        ``[P, D]``; ``offset`` is the position of ``x[:, 0]`` in the whole sequence (rotary
        positions). Returns ``[B, T, D]``."""
        b, n, _ = x.shape
        pos = torch.arange(offset, offset + n, device=x.device)
        q = rotary(self._split(self.q(x)), pos)
        k, v = self.kv(x).chunk(2, dim=-1)
        k, v = rotary(self._split(k), pos), self._split(v)
        pk, pv = self._prefix_kv(prefix, b)
        n_pre = 0 if pk is None else pk.shape[2]
        w = min(window, n)
        nb = -(-n // w)
        pad = nb * w - n
        if pad:
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        h, d = self.n_heads, self.head_dim
        qb = q.view(b, h, nb, w, d)
        kb, vb = k.view(b, h, nb, w, d), v.view(b, h, nb, w, d)
        # keys of block i: block i-1 then block i (block -1 is zeros and masked out)
        shift = lambda t: torch.cat([torch.zeros_like(t[:, :, :1]), t[:, :, :-1]], dim=2)  # noqa: E731
        keys = torch.cat([shift(kb), kb], dim=3)
        vals = torch.cat([shift(vb), vb], dim=3)
        qi = torch.arange(w, device=x.device)[:, None]
        kj = torch.arange(2 * w, device=x.device)[None, :] - w
        local = (kj <= qi) & (kj > qi - window)  # [w, 2w]
        first = local & (kj >= 0)
        mask = torch.stack([first] + [local] * (nb - 1))  # [nb, w, 2w]
        if n_pre:
            keys = torch.cat([pk[:, :, None].expand(-1, -1, nb, -1, -1), keys], dim=3)
            vals = torch.cat([pv[:, :, None].expand(-1, -1, nb, -1, -1), vals], dim=3)
            mask = torch.cat([mask.new_ones(nb, w, n_pre), mask], dim=2)
        fold = lambda t: t.permute(0, 2, 1, 3, 4).reshape(b * nb, h, t.shape[3], d)  # noqa: E731
        out = F.scaled_dot_product_attention(
            fold(qb), fold(keys), fold(vals), attn_mask=mask.repeat(b, 1, 1)[:, None]
        )
        out = out.view(b, nb, h, w, d).permute(0, 2, 1, 3, 4).reshape(b, h, nb * w, d)[:, :, :n]
        return self._merge(out)

    def segment(self, x: Tensor, retrieved: Tensor, prefix: Optional[Tensor] = None) -> Tensor:
        """MAC attention for one segment: queries ``x`` ``[B, C, D]`` over
        ``[prefix || retrieved || x]``, causal in the last two parts. Returns ``[B, C, D]``."""
        b, c, _ = x.shape
        pos = torch.arange(c, device=x.device)
        q = rotary(self._split(self.q(x)), pos)
        k, v = self.kv(torch.cat([retrieved, x], dim=1)).chunk(2, dim=-1)
        k = rotary(self._split(k), torch.cat([pos, pos]))
        v = self._split(v)
        causal = torch.tril(torch.ones(c, c, dtype=torch.bool, device=x.device))
        mask = torch.cat([causal, causal], dim=1)
        pk, pv = self._prefix_kv(prefix, b)
        if pk is not None:
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
            mask = torch.cat([mask.new_ones(c, pk.shape[2]), mask], dim=1)
        return self._merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
