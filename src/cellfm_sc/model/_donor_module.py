"""The torch module of :class:`~cellfm_sc.model.CellFMDonorClassifier`: trunk + bag pooling + head.

``cells (n cells of some bags) -> [trunk cls (n, D) standardised | expression view (n, E)]
-> pooling per bag -> (n_bags, W) -> MLP -> logits`` (``K`` for cross-entropy, ``K - 1`` for
the ordinal losses, see :mod:`cellfm_sc.nn.ordinal`). The expression view is a learned map of
each cell's log-normalised counts over ``G`` highly variable genes (:class:`ExpressionView`),
so that the pooled model sees at least what a pseudo-bulk sees, at cell resolution. The
views, the pooling and the MLP live under ``head.`` so that the freezing policies of
:func:`~cellfm_sc.nn.apply_trainable` apply (``trainable="head"`` trains them on a frozen
trunk).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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

__all__ = ["CELL_VIEWS", "CellFMDonorModule", "DonorHead", "DonorOutput", "ExpressionView"]

#: what represents a cell: the trunk's cls embedding, the expression view, or both
CELL_VIEWS = ("both", "trunk", "expression")


@dataclass
class DonorOutput:
    """``logits (n_bags, n_out)``, ``attention (n,)`` (each cell's weight in its bag), the
    bag embeddings ``pooled (n_bags, W)`` and the cell representations ``cells (n, W)``
    (standardised trunk embedding and / or expression view)."""

    logits: Tensor
    attention: Tensor
    pooled: Tensor
    cells: Tensor


class ExpressionView(nn.Module):
    """A learned map of a cell's log-normalised counts over ``G`` chosen genes.

    ``x (n, G) -> standardise (buffers mean, scale; clipped to +-10) -> Dropout ->
    Linear(G, dim) -> GELU -> (n, dim)``. The genes (buffer ``genes``: positions in the
    model's gene vocabulary, 0-based) and their statistics are set once from the training
    cells (:meth:`set_genes`) and saved with the weights.

    Parameters
    ----------
    n_genes
        ``G``.
    dim
        Output width.
    dropout
        Dropout on the standardised input.
    """

    def __init__(self, n_genes: int, dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.register_buffer("genes", torch.arange(n_genes, dtype=torch.int64))
        self.register_buffer("mean", torch.zeros(n_genes))
        self.register_buffer("scale", torch.ones(n_genes))
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(n_genes, dim)

    @property
    def n_genes(self) -> int:
        return int(self.genes.shape[0])

    @torch.no_grad()
    def set_genes(self, genes: Tensor, mean: Tensor, var: Tensor) -> ExpressionView:
        """Set the genes ``(G,)`` (int64 vocabulary positions) and their log-normalised mean
        and variance ``(G,)`` over the training cells."""
        if genes.shape != self.genes.shape:
            raise ValueError(f"{genes.shape[0]} genes for a view of {self.n_genes}")
        self.genes.copy_(genes)
        self.mean.copy_(mean)
        self.scale.copy_(torch.rsqrt(var.to(self.scale.dtype) + 1e-2))
        return self

    def forward(self, x: Tensor) -> Tensor:
        """``(n, G)`` log-normalised values -> ``(n, dim)``."""
        z = ((x - self.mean.to(x.dtype)) * self.scale.to(x.dtype)).clamp(-10.0, 10.0)
        return nn.functional.gelu(self.proj(self.drop(z)))


class DonorHead(nn.Module):
    """Cell views -> bag pooling -> ``Linear(W, hidden) -> GELU -> Dropout -> output``.

    A cell is represented by its standardised trunk embedding (``view="trunk"``), its
    :class:`ExpressionView` (``"expression"``) or both side by side (``"both"``, width
    ``W = D + expression_dim``).

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
        ``"gated_attention"``, ``"mean"`` or ``"attention+mean"`` (both bag embeddings side
        by side; the attention weights are reported).
    attention_hidden
        Width of the attention network.
    hidden
        Width of the MLP's hidden layer (0: the output layer acts on the bag embedding).
    dropout
        Dropout of the MLP, the attention network and the expression view's input.
    view
        ``"both"``, ``"trunk"`` or ``"expression"``.
    expression_genes, expression_dim
        ``G`` and the width of the expression view (``view`` ``"both"`` / ``"expression"``).
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
        view: str = "trunk",
        expression_genes: int = 0,
        expression_dim: int = 64,
    ) -> None:
        super().__init__()
        if view not in CELL_VIEWS:
            raise ValueError(f"view must be one of {CELL_VIEWS}, got {view!r}")
        if view != "trunk" and expression_genes < 1:
            raise ValueError(f"view={view!r} needs expression_genes >= 1, got {expression_genes}")
        n_out = n_outputs(loss, n_classes)
        self.view = view
        self.norm = RunningStandardize(dim)
        self.expr: ExpressionView | None = (
            ExpressionView(expression_genes, expression_dim, dropout) if view != "trunk" else None
        )
        cell_width = (dim if view != "expression" else 0) + (
            expression_dim if view != "trunk" else 0
        )
        self.cell_width = cell_width
        self.pooling = pooling
        if pooling in ("gated_attention", "attention+mean"):
            self.pool: nn.Module = GatedAttentionPooling(cell_width, attention_hidden, dropout)
        elif pooling == "mean":
            self.pool = MeanPooling()
        else:
            raise ValueError(
                f"pooling must be 'gated_attention', 'mean' or 'attention+mean', got {pooling!r}"
            )
        pooled_width = 2 * cell_width if pooling == "attention+mean" else cell_width
        self.mlp: nn.Module = (
            nn.Sequential(nn.Linear(pooled_width, hidden), nn.GELU(), nn.Dropout(dropout))
            if hidden
            else nn.Dropout(dropout)
        )
        width = hidden or pooled_width
        self.out: nn.Module = (
            CumulativeLinkOutput(width, n_classes)
            if loss == "cumulative_link"
            else nn.Linear(width, n_out)
        )

    def classify(self, x: Tensor) -> Tensor:
        """Logits of bag embeddings ``(B, pooled width)`` -> ``(B, n_out)``."""
        return self.out(self.mlp(x))

    def classify_cells(self, cells: Tensor) -> Tensor:
        """Logits of single cells ``(n, W)`` (each cell as a bag of one) -> ``(n, n_out)``."""
        if self.pooling == "attention+mean":
            cells = torch.cat([cells, cells], dim=-1)
        return self.classify(cells)

    def cell_views(self, emb: Tensor | None, expr: Tensor | None) -> Tensor:
        """The cell representations ``(n, W)`` of trunk embeddings ``emb (n, D)`` and
        log-normalised expression ``expr (n, G)`` (each may be None when not used)."""
        parts = []
        if self.view != "expression":
            if emb is None:
                raise ValueError("this donor head needs the trunk's cell embeddings")
            parts.append(self.norm(emb))
        if self.expr is not None:
            if expr is None:
                raise ValueError("this donor head needs the cells' expression (expr=)")
            parts.append(self.expr(expr.to(parts[0].dtype) if parts else expr))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def forward(
        self, emb: Tensor | None, bag: Tensor, n_bags: int, expr: Tensor | None = None
    ) -> DonorOutput:
        cells = self.cell_views(emb, expr)
        pooled, attention = self.pool(cells, bag, n_bags)
        if self.pooling == "attention+mean":
            mean, _ = MeanPooling()(cells, bag, n_bags)
            pooled = torch.cat([pooled, mean], dim=-1)
        return DonorOutput(
            logits=self.classify(pooled), attention=attention, pooled=pooled, cells=cells
        )


class CellFMDonorModule(nn.Module):
    """CellFM trunk + :class:`DonorHead`.

    Parameters
    ----------
    trunk
        The :class:`~cellfm_sc.nn.CellFMTrunk`.
    n_classes, loss
        See :class:`DonorHead`.
    **head
        The head's other settings (``pooling``, ``attention_hidden``, ``hidden``,
        ``dropout``, ``view``, ``expression_genes``, ``expression_dim``): see
        :class:`DonorHead`.
    """

    def __init__(self, trunk: CellFMTrunk, n_classes: int, loss: str, **head: Any) -> None:
        super().__init__()
        self.trunk = trunk
        self.loss_kind = loss
        self.n_classes = int(n_classes)
        self.head = DonorHead(trunk.config.enc_dims, n_classes, loss, **head)

    @property
    def uses_trunk(self) -> bool:
        """Whether the head reads the trunk's embeddings (``view`` is not ``"expression"``)."""
        return self.head.view != "expression"

    @property
    def expression_view(self) -> ExpressionView | None:
        return self.head.expr

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

    def forward(
        self, emb: Tensor | None, bag: Tensor, n_bags: int, expr: Tensor | None = None
    ) -> DonorOutput:
        """Pool the cells (trunk embeddings ``emb (n, D)``, expression ``expr (n, G)``) by
        ``bag (n,)`` into ``n_bags`` bags."""
        return self.head(emb, bag, n_bags, expr)

    def loss(
        self, logits: Tensor, labels: Tensor, weight: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(objective, per-example loss (B,))`` of logits ``(B, n_out)`` and labels
        ``(B,)`` (see :func:`cellfm_sc.nn.ordinal.ordinal_loss`)."""
        return ordinal_loss(self.loss_kind, logits, labels, weight)

    def probabilities(self, logits: Tensor) -> Tensor:
        """``(B, K)`` class probabilities of logits ``(B, n_out)``."""
        return class_probabilities(self.loss_kind, logits)
