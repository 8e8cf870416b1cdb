"""The torch module of :class:`~cellfm_sc.model.CellFMClassifier`: trunk + head + loss."""

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
    """``logits (B, K)``, the cell embedding ``cls (B, D)`` and gene outputs ``hidden (B, L, D)``."""

    logits: Tensor
    cls: Tensor
    hidden: Tensor | None = None


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
        Optional ``(K,)`` cross-entropy weights (a buffer that is not saved: it belongs to
        one ``train()`` call).
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

    def forward(
        self, batch: TokenBatch, unmask: Tensor | None = None, return_hidden: bool = False
    ) -> ClassifierOutput:
        """Logits and cls embedding of ``batch``; the gene outputs only with ``return_hidden``
        (the trunk then runs its last layer at every position, not at the cls row alone)."""
        out = self.trunk(
            batch.values, batch.gene_ids, batch.valid, unmask, return_hidden=return_hidden
        )
        return ClassifierOutput(logits=self.head(out.cls), cls=out.cls, hidden=out.hidden)

    def masked_value_loss(
        self, batch: TokenBatch, mask_ratio: float = 0.15
    ) -> tuple[ClassifierOutput, Tensor]:
        """Forward with a random ``mask_ratio`` of each cell's tokens' values hidden.

        The value decoder predicts the hidden values from the gene positions' outputs; returns
        the classifier output (of the masked input) and the mean squared error over the
        hidden tokens (CellFM's masked-value pretraining objective, value decoder part).
        """
        if not hasattr(self.trunk, "value_dec"):
            raise ValueError(
                "the masked-value objective needs the value decoder, which this trunk lacks "
                "(an annotation-Backbone checkpoint, variant A'); use masked_value_weight=0"
            )
        hide = (torch.rand(batch.valid.shape, device=batch.valid.device) < mask_ratio) & batch.valid
        out = self(batch, unmask=(~hide).to(batch.values.dtype), return_hidden=True)
        pred, _ = self.trunk.value_dec(out.hidden)
        err = (pred.float() - batch.values.float()) ** 2 * hide
        return out, err.sum() / hide.sum().clamp(min=1)

    def forward_frozen_trunk(self, batch: TokenBatch) -> ClassifierOutput:
        """Logits and cls embedding of ``batch`` with the trunk run without gradients (its
        features frozen: a fine-tuning recipe's head phase)."""
        with torch.no_grad():
            trunk = self.trunk(batch.values, batch.gene_ids, batch.valid)
        return ClassifierOutput(logits=self.head(trunk.cls), cls=trunk.cls)

    def cell_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Per-cell cross-entropy times the class weight of the cell's label.

        ``logits (B, K)``, ``labels (B,)`` -> ``(B,)`` (float32). The class weights average
        1 over the training cells (or are all 1), so the mean is the usual loss.
        """
        ce = F.cross_entropy(logits.float(), labels, reduction="none")
        return ce * self.class_weights[labels]
