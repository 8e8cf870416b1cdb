"""Decoders of the masked-value objective (kept so checkpoints load whole)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CellwiseDecoder", "ValueDecoder"]


class ValueDecoder(nn.Module):
    """Per-token value decoder ``w2(LeakyReLU(w1 h))``.

    Shapes: ``h (B, L, D)`` -> ``(B, L)``. With ``zero_logit`` the module also holds the
    ``zero_logit`` MLP of ``add_zero`` checkpoints (``D -> D -> D -> 1``), returned as a
    probability ``(B, L)``.
    """

    def __init__(self, dim: int, leaky_slope: float = 0.2, zero_logit: bool = False) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, dim, bias=False)
        self.w2 = nn.Linear(dim, 1, bias=False)
        self.leaky_slope = leaky_slope
        self.zero_logit = (
            nn.Sequential(
                nn.Linear(dim, dim),
                nn.LeakyReLU(leaky_slope),
                nn.Linear(dim, dim),
                nn.LeakyReLU(leaky_slope),
                nn.Linear(dim, 1),
            )
            if zero_logit
            else None
        )

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor | None]:
        pred = self.w2(F.leaky_relu(self.w1(h), self.leaky_slope)).squeeze(-1)
        zero = None
        if self.zero_logit is not None:
            zero = torch.sigmoid(self.zero_logit(h)).squeeze(-1)
        return pred, zero


class CellwiseDecoder(nn.Module):
    """Cell-wise decoder ``sigmoid(map(gene_emb[g])) @ cls`` per token.

    Shapes: ``cls (B, D)``, ``gene_vectors (B, L, D)`` (raw rows of ``gene_emb``) -> ``(B, L)``.
    With ``zero_logit`` (``add_zero`` checkpoints) also the zero probability
    ``sigmoid(zero_logit(gene_emb[g]) @ cls)`` ``(B, L)``.
    """

    def __init__(self, dim: int, zero_logit: bool = False) -> None:
        super().__init__()
        self.map = nn.Linear(dim, dim, bias=False)
        self.zero_logit = nn.Linear(dim, dim) if zero_logit else None

    def forward(self, cls: Tensor, gene_vectors: Tensor) -> tuple[Tensor, Tensor | None]:
        query = torch.sigmoid(self.map(gene_vectors))
        pred = torch.einsum("bld,bd->bl", query, cls)
        zero = None
        if self.zero_logit is not None:
            zero = torch.sigmoid(torch.einsum("bld,bd->bl", self.zero_logit(gene_vectors), cls))
        return pred, zero
