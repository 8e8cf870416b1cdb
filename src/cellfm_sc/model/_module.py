"""The torch module of :class:`~cellfm_sc.CellFMClassifier`: trunk + head + loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cellfm_sc.data import TokenBatch
from cellfm_sc.nn import CellFMTrunk, ClassificationHead

__all__ = ["CellFMClassifierModule", "ClassifierOutput"]


@dataclass
class ClassifierOutput:
    """``logits (B, K)`` and the cell embedding ``cls (B, D)``."""

    logits: Tensor
    cls: Tensor


class CellFMClassifierModule(nn.Module):
    """CellFM trunk with a classification head on the cls embedding.

    Parameters
    ----------
    trunk
        The (pretrained or random) :class:`~cellfm_sc.nn.CellFMTrunk`.
    n_classes
        Number of label categories ``K``.
    head_hidden
        Width of the head's hidden layer (0 = a single linear layer).
    dropout
        Head dropout.
    class_weights
        Optional ``(K,)`` cross-entropy weights.
    """

    def __init__(
        self,
        trunk: CellFMTrunk,
        n_classes: int,
        head_hidden: int = 128,
        dropout: float = 0.1,
        class_weights: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = ClassificationHead(
            trunk.config.enc_dims,
            n_classes,
            hidden=head_hidden,
            dropout=dropout,
            leaky_slope=trunk.config.leaky_slope,
        )
        self.register_buffer(
            "class_weights",
            class_weights if class_weights is not None else torch.ones(n_classes),
            persistent=False,
        )

    def forward(self, batch: TokenBatch) -> ClassifierOutput:
        out = self.trunk(batch.values, batch.gene_ids, batch.valid)
        return ClassifierOutput(logits=self.head(out.cls), cls=out.cls)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Mean (class-weighted) cross-entropy. ``logits (B, K)``, ``labels (B,)`` -> scalar."""
        return F.cross_entropy(logits.float(), labels, weight=self.class_weights)
