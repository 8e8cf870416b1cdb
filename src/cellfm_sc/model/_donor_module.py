"""The torch module of :class:`~cellfm_sc.model.CellFMDonorClassifier`: trunk + bag pooling + head.

``cells (n cells of some bags) -> trunk -> cls (n, D) -> pooling per bag -> (n_bags, D) ->
MLP -> logits`` (``K`` for cross-entropy, ``K - 1`` for the ordinal losses, see
:mod:`cellfm_sc.nn.ordinal`). The pooling and the MLP live under ``head.`` so that the
freezing policies of :func:`~cellfm_sc.nn.apply_trainable` apply (``trainable="head"`` trains
pooling + MLP on a frozen trunk).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cellfm_sc.nn import CellFMTrunk
from cellfm_sc.nn.ordinal import (
    CumulativeLinkOutput,
    class_probabilities,
    n_outputs,
    ordinal_loss,
)
from cellfm_sc.nn.pooling import GatedAttentionPooling, MeanPooling, RunningStandardize

__all__ = ["CellFMDonorModule", "DonorHead", "DonorOutput"]


@dataclass
class DonorOutput:
    """``logits (n_bags, n_out)``, ``attention (n,)`` (each cell's weight in its bag), the
    bag embeddings ``pooled (n_bags, D)`` and the standardised cell embeddings
    ``cells (n, D)``."""

    logits: Tensor
    attention: Tensor
    pooled: Tensor
    cells: Tensor


class DonorHead(nn.Module):
    """Standardised cell embeddings -> bag pooling -> ``Linear(D, hidden) -> GELU -> Dropout
    -> output``.

    The cell embeddings are standardised feature-wise with running statistics
    (:class:`~cellfm_sc.nn.pooling.RunningStandardize`): a trunk's cls embeddings vary little
    around a large common vector, and a head on the raw vectors barely moves in a few hundred
    steps.

    Parameters
    ----------
    dim
        Cell-embedding width ``D``.
    n_classes
        ``K``.
    loss
        ``"cross_entropy"``, ``"cumulative_link"`` or ``"corn"`` (sets the output layer:
        ``K`` logits, a score with ``K - 1`` ordered thresholds, or ``K - 1`` conditional
        logits).
    pooling
        ``"gated_attention"`` or ``"mean"``.
    attention_hidden
        Width of the attention network.
    hidden
        Width of the MLP's hidden layer (0: the output layer acts on the bag embedding).
    dropout
        Dropout of the MLP and the attention network.
    """

    def __init__(
        self,
        dim: int,
        n_classes: int,
        loss: str,
        pooling: str = "gated_attention",
        attention_hidden: int = 128,
        hidden: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        n_out = n_outputs(loss, n_classes)
        self.norm = RunningStandardize(dim)
        if pooling == "gated_attention":
            self.pool: nn.Module = GatedAttentionPooling(dim, attention_hidden, dropout)
        elif pooling == "mean":
            self.pool = MeanPooling()
        else:
            raise ValueError(f"pooling must be 'gated_attention' or 'mean', got {pooling!r}")
        self.mlp: nn.Module = (
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout))
            if hidden
            else nn.Dropout(dropout)
        )
        width = hidden or dim
        self.out: nn.Module = (
            CumulativeLinkOutput(width, n_classes)
            if loss == "cumulative_link"
            else nn.Linear(width, n_out)
        )

    def classify(self, x: Tensor) -> Tensor:
        """Logits of standardised embeddings ``(B, D)`` (bags, or single cells) ->
        ``(B, n_out)``."""
        return self.out(self.mlp(x))

    def forward(self, emb: Tensor, bag: Tensor, n_bags: int) -> DonorOutput:
        cells = self.norm(emb)
        pooled, attention = self.pool(cells, bag, n_bags)
        return DonorOutput(
            logits=self.classify(pooled), attention=attention, pooled=pooled, cells=cells
        )


class CellFMDonorModule(nn.Module):
    """CellFM trunk + :class:`DonorHead`.

    Parameters
    ----------
    trunk
        The :class:`~cellfm_sc.nn.CellFMTrunk`.
    n_classes, loss, pooling, attention_hidden, head_hidden, dropout
        See :class:`DonorHead`.
    """

    def __init__(
        self,
        trunk: CellFMTrunk,
        n_classes: int,
        loss: str,
        pooling: str = "gated_attention",
        attention_hidden: int = 128,
        head_hidden: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.loss_kind = loss
        self.n_classes = int(n_classes)
        self.head = DonorHead(
            trunk.config.enc_dims,
            n_classes,
            loss,
            pooling=pooling,
            attention_hidden=attention_hidden,
            hidden=head_hidden,
            dropout=dropout,
        )

    def _trunk_cls(self, values: Tensor, gene_ids: Tensor, valid: Tensor) -> Tensor:
        return self.trunk(values, gene_ids, valid, return_hidden=False).cls

    def encode(
        self,
        values: Tensor,
        gene_ids: Tensor,
        valid: Tensor,
        chunk_lengths: Sequence[int],
        chunk_size: int,
        gradient_checkpointing: bool = False,
    ) -> Tensor:
        """Cell embeddings ``(n, D)`` of ``(n, L)`` tokens, ``chunk_size`` cells at a time.

        Chunk ``i`` (rows ``i * chunk_size ...``) is trimmed to ``chunk_lengths[i]`` tokens
        (cells sorted by length pad little). With ``gradient_checkpointing`` (and gradients
        on) a chunk's activations are recomputed in the backward pass, so only the ``(n, D)``
        cell embeddings of a bag stay in memory, whatever the bag size.
        """
        n = values.shape[0]
        expected = -(-n // chunk_size) if n else 0
        if len(chunk_lengths) != expected:
            raise ValueError(
                f"{len(chunk_lengths)} chunk lengths for {n} cells in chunks of {chunk_size}"
            )
        parts = []
        use_ckpt = gradient_checkpointing and torch.is_grad_enabled() and self.training
        for i, length in enumerate(chunk_lengths):
            sl = slice(i * chunk_size, (i + 1) * chunk_size)
            args = (values[sl, :length], gene_ids[sl, :length], valid[sl, :length])
            if use_ckpt:
                parts.append(checkpoint(self._trunk_cls, *args, use_reentrant=False))
            else:
                parts.append(self._trunk_cls(*args))
        return torch.cat(parts) if parts else values.new_zeros(0, self.trunk.config.enc_dims)

    def forward(self, emb: Tensor, bag: Tensor, n_bags: int) -> DonorOutput:
        """Pool cell embeddings ``emb (n, D)`` by ``bag (n,)`` into ``n_bags`` bags."""
        return self.head(emb, bag, n_bags)

    def loss(
        self, logits: Tensor, labels: Tensor, weight: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(objective, per-example loss (B,))`` of logits ``(B, n_out)`` and labels
        ``(B,)`` (see :func:`cellfm_sc.nn.ordinal.ordinal_loss`)."""
        return ordinal_loss(self.loss_kind, logits, labels, weight)

    def probabilities(self, logits: Tensor) -> Tensor:
        """``(B, K)`` class probabilities of logits ``(B, n_out)``."""
        return class_probabilities(self.loss_kind, logits)
