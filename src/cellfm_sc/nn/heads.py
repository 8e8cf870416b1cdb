"""Classification heads on the cell embedding."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ClassificationHead"]


class ClassificationHead(nn.Module):
    """``Linear(D, hidden) -> BatchNorm1d -> LeakyReLU -> Dropout -> Linear(hidden, K)``.

    ``hidden=0`` gives a single linear layer. Shapes: ``(B, D) -> (B, K)`` logits.

    A training batch of one cell (the last, short batch of an epoch) has no batch statistics:
    its BatchNorm then uses the running statistics (and does not update them) instead of
    failing.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: int = 128,
        dropout: float = 0.1,
        leaky_slope: float = 0.2,
    ) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")
        if hidden:
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden),
                nn.BatchNorm1d(hidden),
                nn.LeakyReLU(leaky_slope),
                nn.Dropout(dropout),
                nn.Linear(hidden, n_classes),
            )
        else:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, n_classes))

    def forward(self, cls: Tensor) -> Tensor:
        """Class logits ``(B, n_classes)`` of cls embeddings ``(B, in_dim)``.

        A training batch of one cell uses the running BatchNorm statistics (batch
        statistics of a single sample are undefined).
        """
        if not (self.training and cls.shape[0] == 1 and len(self.net) == 5):
            return self.net(cls)
        linear, norm, act, drop, out = self.net
        h = linear(cls)
        h = F.batch_norm(
            h, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps
        )
        return out(drop(act(h)))
