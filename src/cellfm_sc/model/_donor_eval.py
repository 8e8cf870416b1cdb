"""Donor-level results: bag-logit aggregation, metrics with bootstrap intervals, donor folds."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from cellfm_sc._json import to_plain
from cellfm_sc.metrics import EvaluationResult
from cellfm_sc.metrics._donor import aggregate_bag_logits, donor_metrics

__all__ = [
    "CrossValidationResult",
    "DonorEvaluationResult",
    "aggregate_bag_logits",
    "bootstrap_intervals",
    "donor_metrics",
    "stratified_donor_folds",
]


def bootstrap_intervals(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    k: int,
    ordinal: bool,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals over donors for every metric of :func:`donor_metrics`.

    Donors are resampled with replacement ``n_bootstrap`` times; a resample where a metric is
    undefined (e.g. QWK when every true and predicted stage is the same) is left out of that
    metric's interval. Returns ``{metric: [low, high]}`` (NaN when never defined; empty
    with ``n_bootstrap=0``).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if n_bootstrap == 0 or t.size == 0:
        return {}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_bootstrap):
        i = rng.integers(0, t.size, t.size)
        for key, value in donor_metrics(t[i], p[i], k, ordinal).items():
            if key != "n_donors":
                draws.setdefault(key, []).append(value)
    alpha = (1.0 - confidence) / 2.0
    out = {}
    for key, values in draws.items():
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        out[key] = (
            [float(np.quantile(v, alpha)), float(np.quantile(v, 1.0 - alpha))]
            if v.size
            else [math.nan, math.nan]
        )
    return out


def stratified_donor_folds(labels: Sequence[Any], k: int, seed: int = 0) -> np.ndarray:
    """Fold (``0 .. k-1``) of each donor, stratified by its label.

    Each label's donors are shuffled and dealt to the folds in turn, continuing where the
    previous label stopped, so folds differ by at most one donor overall and by at most one
    donor of each label.

    Examples
    --------
    >>> stratified_donor_folds(["a"] * 4 + ["b"] * 2, k=2).tolist().count(0)
    3
    """
    if not isinstance(k, int | np.integer) or k < 2:
        raise ValueError(f"k must be an integer >= 2, got {k!r}")
    labels = np.asarray(labels)
    if labels.size < k:
        raise ValueError(f"{labels.size} donors cannot be split into k={k} folds")
    rng = np.random.default_rng(seed)
    folds = np.empty(labels.size, dtype=np.int64)
    nxt = int(rng.integers(k))
    for value in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == value))
        folds[members] = (nxt + np.arange(members.size)) % k
        nxt = (nxt + members.size) % k
    return folds


@dataclasses.dataclass
class DonorEvaluationResult(EvaluationResult):
    """:class:`~cellfm_sc.metrics.EvaluationResult` of a donor model, with intervals.

    ``donor_metrics`` are the donor-level scores (``qwk``, ``accuracy``,
    ``balanced_accuracy``, ``macro_f1``, ``ordinal_mae``, ``n_donors``); ``intervals`` their
    bootstrap intervals over donors (``{metric: [low, high]}``). ``cell_metrics`` score each
    cell with its donor's prediction (donors weighted by their cell counts; for reference).
    ``predictions`` has one row per cell (``donor``, ``true``, ``predicted``: the donor's,
    ``confidence``, ``attention``, ``p_<class>``); ``donor_table`` one per donor.
    """

    intervals: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    confidence_level: float = 0.95
    n_bootstrap: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["donor_intervals"] = to_plain(self.intervals)
        out["confidence_level"] = self.confidence_level
        out["n_bootstrap"] = self.n_bootstrap
        return out

    def __str__(self) -> str:
        lines = [
            f"DonorEvaluationResult: {len(self.classes)} classes ({', '.join(self.classes)}), "
            f"{int((self.donor_metrics or {}).get('n_donors', 0))} donors"
        ]
        pct = round(100 * self.confidence_level)
        for key, value in (self.donor_metrics or {}).items():
            if key == "n_donors":
                continue
            ci = self.intervals.get(key)
            text = (
                f"  donor {key:<18} {value:.4f}"
                if math.isfinite(value)
                else f"  donor {key:<18} nan"
            )
            if ci is not None:
                text += f"  [{pct}% CI {ci[0]:.3f}, {ci[1]:.3f}]"
            lines.append(text)
        lines.extend(f"  note: {n}" for n in self.notes)
        lines.extend(self._baseline_lines())
        return "\n".join(lines)


@dataclasses.dataclass
class CrossValidationResult:
    """Donor-level cross-validation.

    Attributes
    ----------
    per_fold
        One row per fold: ``fold``, ``n_train`` / ``n_validation`` / ``n_test`` donors,
        ``best_epoch`` and the test donors' metrics.
    pooled
        Metrics of the out-of-fold predictions of every donor together.
    intervals
        Bootstrap intervals (over donors) of the pooled metrics.
    donor_table
        Out-of-fold prediction of every donor: ``fold``, ``true``, ``predicted``,
        ``n_cells``, ``p_<class>``.
    """

    per_fold: pd.DataFrame
    pooled: dict[str, float]
    intervals: dict[str, list[float]]
    donor_table: pd.DataFrame
    confidence_level: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (the per-fold rows, pooled metrics, intervals)."""
        return to_plain(
            {
                "per_fold": self.per_fold.to_dict(orient="records"),
                "pooled": dict(self.pooled),
                "intervals": dict(self.intervals),
                "confidence_level": self.confidence_level,
            }
        )

    def __str__(self) -> str:
        pct = round(100 * self.confidence_level)
        lines = [f"CrossValidationResult: {len(self.per_fold)} folds"]
        for key, value in self.pooled.items():
            if key == "n_donors":
                continue
            ci = self.intervals.get(key, [math.nan, math.nan])
            lines.append(f"  pooled {key:<18} {value:.4f}  [{pct}% CI {ci[0]:.3f}, {ci[1]:.3f}]")
        return "\n".join(lines)
