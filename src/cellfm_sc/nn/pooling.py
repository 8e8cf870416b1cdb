"""Bag pooling: many cell embeddings of one bag -> one bag embedding (multiple-instance learning).

A batch of bags is given flat: cell embeddings ``h (n, D)`` and the bag of each cell
``bag (n,)`` (int64 in ``0 .. n_bags-1``), so bags of different sizes need no padding.
Every pooling returns the bag embeddings ``(n_bags, D)`` and each cell's weight ``(n,)``
within its bag (the weights of a bag sum to 1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "GatedAttentionPooling",
    "MeanPooling",
    "RunningStandardize",
    "segment_softmax",
    "segment_sum",
]


def segment_sum(x: Tensor, segment: Tensor, n_segments: int) -> Tensor:
    """Sum rows of ``x`` by segment.

    Parameters
    ----------
    x
        ``(n, ...)`` values.
    segment
        ``(n,)`` int64 segment of each row, in ``0 .. n_segments-1``.
    n_segments
        Number of segments (a segment without rows sums to 0).

    Returns
    -------
    ``(n_segments, ...)``.
    """
    out = x.new_zeros((n_segments, *x.shape[1:]))
    return out.index_add(0, segment, x)


def segment_softmax(scores: Tensor, segment: Tensor, n_segments: int) -> Tensor:
    """Softmax of ``scores`` within each segment.

    Parameters
    ----------
    scores
        ``(n,)`` float scores.
    segment
        ``(n,)`` int64 segment of each score.
    n_segments
        Number of segments.

    Returns
    -------
    ``(n,)`` weights, non-negative, summing to 1 over the rows of each segment (computed in
    float32 or wider, max-subtracted for stability).

    Examples
    --------
    >>> w = segment_softmax(torch.tensor([0.0, 0.0, 5.0]), torch.tensor([0, 0, 1]), 2)
    >>> w.tolist()
    [0.5, 0.5, 1.0]
    """
    s = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    top = s.new_full((n_segments,), float("-inf"))
    top = top.scatter_reduce(0, segment, s, reduce="amax", include_self=True)
    e = torch.exp(s - top[segment])
    total = segment_sum(e, segment, n_segments)
    return e / total[segment]


class RunningStandardize(nn.Module):
    """Feature-wise standardisation with running statistics only: ``(h - mean) / std``.

    Cell embeddings of a trunk vary little around a large common vector (the cls token
    after a LayerNorm), so a head on them learns slowly unless they are standardised. Batch
    statistics (BatchNorm) would be wrong here: a training step may hold the cells of a
    single donor, and normalising by that donor's own mean erases exactly the donor-level
    differences the model must learn. This layer therefore always normalises with running
    estimates; in training mode it first updates them from the batch (exponential average
    with ``momentum``; the first batch, or :meth:`reset_from`, sets them).

    Shapes: ``(n, D) -> (n, D)``.

    Examples
    --------
    >>> norm = RunningStandardize(2)
    >>> _ = norm.reset_from(torch.tensor([[1.0, 10.0], [3.0, 30.0]]))
    >>> norm.eval()(torch.tensor([[2.0, 20.0]])).tolist()
    [[0.0, 0.0]]
    """

    def __init__(self, dim: int, momentum: float = 0.05, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def reset_from(self, h: Tensor) -> RunningStandardize:
        """Set the statistics to those of ``h (n, D)`` (e.g. every cached training cell)."""
        h = h.to(self.mean.dtype)
        self.mean.copy_(h.mean(0))
        self.var.copy_(h.var(0, unbiased=False) if h.shape[0] > 1 else torch.ones_like(self.var))
        self.initialised.fill_(True)
        return self

    @torch.no_grad()
    def _update(self, h: Tensor) -> None:
        h = h.to(self.mean.dtype)
        if h.shape[0] < 2:
            return
        mean, var = h.mean(0), h.var(0, unbiased=False)
        # no host read of ``initialised`` (it would synchronise with the GPU every step)
        self.mean.copy_(torch.where(self.initialised, self.mean.lerp(mean, self.momentum), mean))
        self.var.copy_(torch.where(self.initialised, self.var.lerp(var, self.momentum), var))
        self.initialised.fill_(True)

    def forward(self, h: Tensor) -> Tensor:
        """Standardise ``h (n, D)`` -> ``(n, D)`` (statistics updated in training mode)."""
        if self.training:
            self._update(h.detach())
        scale = torch.rsqrt(self.var + self.eps)
        return (h - self.mean.to(h.dtype)) * scale.to(h.dtype)


class MeanPooling(nn.Module):
    """The mean of a bag's cell embeddings (every cell weighs ``1 / bag size``).

    Shapes: ``h (n, D)``, ``bag (n,)`` -> ``(n_bags, D)``, weights ``(n,)``.
    """

    def forward(self, h: Tensor, bag: Tensor, n_bags: int) -> tuple[Tensor, Tensor]:
        """Pool ``h (n, D)`` by ``bag (n,)`` -> ``(n_bags, D)`` and cell weights ``(n,)``."""
        ones = torch.ones_like(bag, dtype=h.dtype)
        size = segment_sum(ones, bag, n_bags)
        weight = ones / size[bag]
        return segment_sum(h * weight.unsqueeze(-1), bag, n_bags), weight


class GatedAttentionPooling(nn.Module):
    """Gated attention pooling (Ilse, Tomczak and Welling, ICML 2018).

    ``a_i = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i)))`` over the cells ``i`` of a bag;
    the bag embedding is ``sum_i a_i h_i``.

    Parameters
    ----------
    dim
        Width ``D`` of the cell embeddings.
    hidden
        Width of the attention network (``V``, ``U``: ``D -> hidden``; ``w``: ``hidden -> 1``).
    dropout
        Dropout on the attention network's hidden layer (training only).

    Shapes: ``h (n, D)``, ``bag (n,)`` -> ``(n_bags, D)``, weights ``(n,)``.

    Examples
    --------
    >>> pool = GatedAttentionPooling(8, hidden=4)
    >>> z, a = pool(torch.randn(5, 8), torch.tensor([0, 0, 1, 1, 1]), 2)
    >>> tuple(z.shape), [round(float(a[:2].sum()), 5), round(float(a[2:].sum()), 5)]
    ((2, 8), [1.0, 1.0])
    """

    def __init__(self, dim: int, hidden: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"attention hidden width must be >= 1, got {hidden}")
        self.V = nn.Linear(dim, hidden)
        self.U = nn.Linear(dim, hidden)
        self.w = nn.Linear(hidden, 1)
        self.dropout = nn.Dropout(dropout)

    def scores(self, h: Tensor) -> Tensor:
        """Unnormalised attention scores ``(n,)`` of cell embeddings ``h (n, D)``."""
        gate = torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))
        return self.w(self.dropout(gate)).squeeze(-1)

    def forward(self, h: Tensor, bag: Tensor, n_bags: int) -> tuple[Tensor, Tensor]:
        """Pool ``h (n, D)`` by ``bag (n,)`` -> ``(n_bags, D)`` and cell weights ``(n,)``."""
        weight = segment_softmax(self.scores(h), bag, n_bags)
        pooled = segment_sum(h * weight.unsqueeze(-1).to(h.dtype), bag, n_bags)
        return pooled, weight
