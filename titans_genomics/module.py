"""The DNA sequence-classification network: embedding -> Titans backbone -> pooling -> head.

``TitansSequenceNetwork`` maps token ids ``[B, T]`` (right-padded, with an attention mask) to class
logits ``[B, C]``:

1. a token embedding (``NucleotideTokenizer`` ids; id 0 is ``[PAD]``);
2. a :class:`~titans_memory.TitansBackbone` of the chosen variant (``"lmm"``, the memory alone, is
   the paper's choice for DNA);
3. pooling over the real tokens only: masked mean (default), the last real token, or both
   concatenated (``"mean+last"``);
4. a two-layer classification head.

Padding never changes a prediction: the backbone is causal (output ``t`` sees inputs ``0..t``),
padding is on the right, and pooling ignores padded positions.

For every variant :meth:`TitansSequenceNetwork.features_stream` runs one sequence given in
pieces with the carried memory state, so a sequence of any length is pooled in constant memory;
the result equals the one-shot :meth:`features` (up to float rounding).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from titans_memory import TitansBackbone, TitansConfig
from titans_memory.errors import ConfigError, ShapeError

POOLINGS = ("mean", "last", "mean+last")


class TitansSequenceNetwork(nn.Module):
    """Token embedding, Titans backbone, masked pooling and a classification head.

    Args:
        config: the backbone's :class:`~titans_memory.TitansConfig`.
        n_classes: number of output classes (>= 2).
        vocab_size: tokenizer vocabulary size.
        pad_id: id of the padding token.
        pooling: ``"mean"``, ``"last"`` or ``"mean+last"``.
        head_dropout: dropout inside the head.
    """

    def __init__(
        self,
        config: TitansConfig,
        n_classes: int,
        vocab_size: int = 9,
        pad_id: int = 0,
        pooling: str = "mean",
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if n_classes < 2:
            raise ConfigError(f"n_classes must be >= 2, got {n_classes}")
        self.config = config
        self.n_classes = n_classes
        self.pad_id = pad_id
        self.pooling = pooling
        d = config.d_model
        self.embed = nn.Embedding(vocab_size, d, padding_idx=pad_id)
        nn.init.normal_(self.embed.weight, std=1.0)
        with torch.no_grad():
            self.embed.weight[pad_id].zero_()
        self.backbone = TitansBackbone(config)
        self.feature_dim = 2 * d if pooling == "mean+last" else d
        self.head = nn.Sequential(
            nn.Linear(self.feature_dim, d), nn.GELU(), nn.Dropout(head_dropout), nn.Linear(d, n_classes)
        )

    # ------------------------------------------------------------------------------------------
    def _check(self, input_ids: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
        if input_ids.dim() != 2:
            raise ShapeError(f"input_ids must be [batch, time], got {tuple(input_ids.shape)}")
        if attention_mask is None:
            return input_ids != self.pad_id
        if attention_mask.shape != input_ids.shape:
            raise ShapeError(
                f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
            )
        return attention_mask.bool()

    def hidden(self, input_ids: Tensor) -> Tensor:
        """Backbone outputs ``[B, T, D]`` for ids ``[B, T]``."""
        return self.backbone(self.embed(input_ids))

    def _pool(self, h: Tensor, mask: Tensor) -> Tensor:
        m = mask.unsqueeze(-1)
        parts = []
        if self.pooling in ("mean", "mean+last"):
            m = m.float()
            parts.append((h.float() * m).sum(1) / m.sum(1).clamp(min=1.0))
        if self.pooling in ("last", "mean+last"):
            last = (mask.long().sum(1) - 1).clamp(min=0)
            parts.append(h[torch.arange(h.shape[0], device=h.device), last].float())
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def features(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """Pooled sequence embeddings ``[B, feature_dim]`` (padding excluded)."""
        mask = self._check(input_ids, attention_mask)
        return self._pool(self.hidden(input_ids), mask)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """Class logits ``[B, n_classes]``."""
        return self.head(self.features(input_ids, attention_mask))

    # ------------------------------------------------------------------------------------------
    def features_stream(self, pieces: Iterable[Tensor]) -> Tensor:
        """Pooled embeddings of sequences given as consecutive pieces, in constant memory.

        ``pieces`` yields ids ``[B, t_i]`` (no padding; row ``b`` of every piece continues
        sequence ``b``). The memory state is carried between pieces, so the result equals
        :meth:`features` on the concatenated ids.
        Run it under ``torch.no_grad()`` / ``torch.inference_mode()``.
        """
        state = None
        total = None
        count = 0
        last = None
        for ids in pieces:
            if ids.dim() != 2 or ids.shape[1] == 0:
                raise ShapeError(f"each piece must be non-empty ids [batch, time], got {tuple(ids.shape)}")
            h, state = self.backbone(self.embed(ids), state, return_state=True)
            s = h.float().sum(1)
            total = s if total is None else total + s
            count += h.shape[1]
            last = h[:, -1]
        if total is None:
            raise ShapeError("features_stream got no pieces (an empty sequence)")
        parts = []
        if self.pooling in ("mean", "mean+last"):
            parts.append(total / count)
        if self.pooling in ("last", "mean+last"):
            parts.append(last.float())
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


__all__ = ["POOLINGS", "TitansSequenceNetwork"]
