"""Ordinal outputs and losses: a cumulative-link model and CORN, plus plain cross-entropy.

For ``K`` ordered classes ``0 < 1 < ... < K-1`` both ordinal outputs are ``K - 1`` logits:

* **cumulative link** (proportional odds, McCullagh 1980): one score ``s`` per example and
  ordered thresholds ``t_0 < ... < t_{K-2}``; logit ``k`` is ``s - t_k`` and
  ``P(y > k) = sigmoid(s - t_k)``. The loss is the negative log-likelihood of
  ``P(y = k) = P(y > k-1) - P(y > k)``.
* **CORN** (Shi, Cao and Raschka 2023): logit ``k`` is the conditional
  ``logit P(y > k | y > k-1)``, so ``P(y > k) = prod_{j <= k} sigmoid(z_j)``; task ``k`` is
  a binary cross-entropy over the examples with ``y > k-1`` only, and the loss is the sum over
  tasks divided by the number of (example, task) pairs.

Both give ``P(y > k)`` that never increases with ``k``; the ordinal prediction is the median
class, ``#{k : P(y > k) > 0.5}``. Averaging logits over bags (what a donor model does) keeps
this: averaged cumulative-link logits are ``mean(s) - t_k``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cellfm_sc._constants import DONOR_LOSSES as _CHOICES

__all__ = [
    "DONOR_LOSSES",
    "CumulativeLinkOutput",
    "class_probabilities",
    "corn_loss",
    "corn_probabilities",
    "cumulative_link_log_probabilities",
    "cumulative_link_loss",
    "exceedance_probabilities",
    "n_outputs",
    "ordinal_loss",
    "predict_classes",
]

#: losses of a (donor-level) classifier: cross-entropy, or one of the two ordinal models
DONOR_LOSSES: tuple[str, ...] = tuple(c for c in _CHOICES if c != "auto")


def n_outputs(loss: str, n_classes: int) -> int:
    """Logits per example: ``K`` for cross-entropy, ``K - 1`` for the ordinal losses."""
    if loss not in DONOR_LOSSES:
        raise ValueError(f"loss must be one of {DONOR_LOSSES}, got {loss!r}")
    if n_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")
    return n_classes if loss == "cross_entropy" else n_classes - 1


class CumulativeLinkOutput(nn.Module):
    """Linear score and ordered thresholds: ``(B, in_dim) -> (B, K-1)`` logits ``s - t_k``.

    The thresholds are ``t_0`` and positive gaps (``softplus`` of free parameters plus
    ``1e-3``), so they stay strictly increasing.

    Parameters
    ----------
    in_dim
        Input width.
    n_classes
        ``K`` (>= 2).

    Examples
    --------
    >>> out = CumulativeLinkOutput(4, 3)
    >>> z = out(torch.randn(5, 4))
    >>> tuple(z.shape), bool((z[:, 0] > z[:, 1]).all())
    ((5, 2), True)
    """

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")
        self.score = nn.Linear(in_dim, 1)
        self.first = nn.Parameter(torch.tensor(-0.5 * (n_classes - 2)))
        # softplus(0.5413) + 1e-3 ~= 1: thresholds start one unit apart, centred on 0
        self.gaps = nn.Parameter(torch.full((n_classes - 2,), 0.5413))

    def thresholds(self) -> Tensor:
        """The ``(K-1,)`` increasing thresholds."""
        steps = F.softplus(self.gaps) + 1e-3
        return torch.cat([self.first.view(1), self.first + torch.cumsum(steps, 0)])

    def forward(self, x: Tensor) -> Tensor:
        """Cumulative logits ``x (B, in_dim)`` -> ``(B, K-1)``: one score minus each threshold."""
        return self.score(x) - self.thresholds().to(x.dtype)


def cumulative_link_log_probabilities(logits: Tensor) -> Tensor:
    """``log P(y = k)`` of cumulative-link logits.

    Parameters
    ----------
    logits
        ``(B, K-1)`` logits ``z_k = logit P(y > k)``, decreasing in ``k``.

    Returns
    -------
    ``(B, K)`` float32 log-probabilities. For a middle class,
    ``P(y = k) = sigmoid(z_{k-1}) - sigmoid(z_k)``
    ``= sigmoid(z_{k-1}) sigmoid(-z_k) (1 - exp(z_k - z_{k-1}))``, computed in log space.
    """
    z = logits.float()
    first = F.logsigmoid(-z[:, :1])
    last = F.logsigmoid(z[:, -1:])
    hi, lo = z[:, :-1], z[:, 1:]
    gap = (hi - lo).clamp_min(1e-12)
    middle = F.logsigmoid(hi) + F.logsigmoid(-lo) + torch.log(-torch.expm1(-gap))
    return torch.cat([first, middle, last], dim=1)


def cumulative_link_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-example negative log-likelihood ``(B,)`` of a cumulative-link model.

    ``logits (B, K-1)`` (see :func:`cumulative_link_log_probabilities`), ``labels (B,)``
    int64 in ``0 .. K-1``.
    """
    logp = cumulative_link_log_probabilities(logits)
    return -logp.gather(1, labels.view(-1, 1)).squeeze(1)


def _corn_terms(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example CORN loss summed over the example's tasks ``(B,)`` and its task count."""
    z = logits.float()
    k = torch.arange(z.shape[1], device=z.device)
    y = labels.view(-1, 1)
    included = (y >= k).to(z.dtype)  # task k uses examples with y > k - 1
    target = y > k
    bce = torch.where(target, -F.logsigmoid(z), -F.logsigmoid(-z))
    return (bce * included).sum(1), included.sum(1)


def corn_loss(logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
    """The CORN loss (a scalar): binary cross-entropies summed over tasks and the examples
    each task uses, divided by the number of (example, task) pairs.

    Parameters
    ----------
    logits
        ``(B, K-1)`` conditional logits.
    labels
        ``(B,)`` int64 in ``0 .. K-1``.
    weight
        Optional ``(B,)`` example weights (both the sum and the pair count are weighted).
    """
    terms, count = _corn_terms(logits, labels)
    if weight is not None:
        w = weight.to(terms.dtype)
        terms, count = terms * w, count * w
    return terms.sum() / count.sum().clamp_min(1e-12)


def ordinal_loss(
    loss: str, logits: Tensor, labels: Tensor, weight: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The objective of a batch and each example's loss.

    Parameters
    ----------
    loss
        One of :data:`DONOR_LOSSES`.
    logits
        ``(B, K)`` (cross-entropy) or ``(B, K-1)`` (ordinal).
    labels
        ``(B,)`` int64 codes.
    weight
        Optional ``(B,)`` weights (0 leaves an example out).

    Returns
    -------
    ``(objective, per_example)``: the weighted mean loss (CORN: per (example, task) pair)
    and the ``(B,)`` float32 loss of each example (CORN: summed over its tasks).
    """
    w = torch.ones_like(labels, dtype=torch.float32) if weight is None else weight.float()
    if loss == "corn":
        terms, _ = _corn_terms(logits, labels)
        return corn_loss(logits, labels, w), terms
    if loss == "cumulative_link":
        per = cumulative_link_loss(logits, labels)
    elif loss == "cross_entropy":
        per = F.cross_entropy(logits.float(), labels, reduction="none")
    else:
        raise ValueError(f"loss must be one of {DONOR_LOSSES}, got {loss!r}")
    return (per * w).sum() / w.sum().clamp_min(1e-12), per


def corn_probabilities(logits: Tensor) -> Tensor:
    """``(B, K)`` class probabilities of CORN logits ``(B, K-1)``."""
    return _from_exceedance(torch.cumprod(torch.sigmoid(logits.float()), dim=1))


def _from_exceedance(gt: Tensor) -> Tensor:
    ones = gt.new_ones(gt.shape[0], 1)
    zeros = gt.new_zeros(gt.shape[0], 1)
    upper = torch.cat([ones, gt], dim=1)
    lower = torch.cat([gt, zeros], dim=1)
    return (upper - lower).clamp_min(0.0)


def class_probabilities(loss: str, logits: Tensor) -> Tensor:
    """``(B, K)`` float32 class probabilities of the logits of ``loss``."""
    if loss == "cross_entropy":
        return torch.softmax(logits.float(), dim=-1)
    if loss == "cumulative_link":
        return cumulative_link_log_probabilities(logits).exp()
    if loss == "corn":
        return corn_probabilities(logits)
    raise ValueError(f"loss must be one of {DONOR_LOSSES}, got {loss!r}")


def exceedance_probabilities(probabilities: Tensor) -> Tensor:
    """``P(y > k)`` for ``k = 0 .. K-2`` from class probabilities ``(B, K)`` -> ``(B, K-1)``."""
    tail = torch.flip(torch.cumsum(torch.flip(probabilities, [1]), 1), [1])
    return tail[:, 1:]


def predict_classes(probabilities: Tensor, ordinal: bool) -> Tensor:
    """``(B,)`` int64 predicted class: the median class ``#{k : P(y > k) > 0.5}`` when
    ``ordinal``, else the most probable class (ties to the lowest code).

    Examples
    --------
    >>> p = torch.tensor([[0.4, 0.2, 0.4]])
    >>> predict_classes(p, ordinal=True).item(), predict_classes(p, ordinal=False).item()
    (1, 0)
    """
    if not ordinal:
        return probabilities.argmax(dim=-1)
    return (exceedance_probabilities(probabilities) > 0.5).sum(dim=1)
