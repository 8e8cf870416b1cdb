"""Donor aggregation: cell-level class probabilities to one prediction per donor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from cellfm_sc.metrics._cell import metric_set

__all__ = ["AggregationMethod", "aggregate_bag_logits", "aggregate_by_donor", "donor_metrics"]

AggregationMethod = Literal["mean_probability", "majority", "expected_rank"]
_AGG_METHODS = ("mean_probability", "majority", "expected_rank")


# --------------------------------------------------------------------------------------------
# donor aggregation
# --------------------------------------------------------------------------------------------


def _round_half_up(x: np.ndarray) -> np.ndarray:
    return np.floor(x + 0.5)


def aggregate_by_donor(
    probabilities: Any,
    donors: Any,
    method: AggregationMethod = "mean_probability",
    classes: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Aggregate cell-level class probabilities to one prediction per donor.

    Parameters
    ----------
    probabilities
        ``(n_cells, K)`` class probabilities (rows are cells).
    donors
        ``(n_cells,)`` donor id of each cell (any hashable values).
    method
        * ``"mean_probability"``: class columns are the mean probability over the donor's
          cells; ``predicted`` is their argmax.
        * ``"majority"``: each cell votes for its argmax class; class columns are the fraction
          of the donor's cells voting for each class; ``predicted`` is the most frequent
          class, ties going to the **lowest** class index.
        * ``"expected_rank"`` (ordinal labels): class columns are mean probabilities;
          ``predicted = floor(sum_k k * p_k + 0.5)`` (round half up), clipped to
          ``[0, K-1]``.

        Argmax ties (per cell or per donor) always go to the lowest class index.
    classes
        ``K`` class names. When given, they name the class columns and ``predicted`` holds
        names; otherwise the class columns are the integers ``0 .. K-1`` and ``predicted``
        holds codes.

    Returns
    -------
    pandas.DataFrame
        Indexed by donor (sorted, index name ``"donor"``); columns: one per class, then
        ``predicted`` and ``n_cells``.

    Examples
    --------
    >>> p = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8]])
    >>> agg = aggregate_by_donor(p, ["a", "a", "b"], classes=["x", "y"])
    >>> list(agg.columns), agg.index.tolist()
    (['x', 'y', 'predicted', 'n_cells'], ['a', 'b'])
    >>> agg["x"].round(2).tolist(), agg["predicted"].tolist(), agg["n_cells"].tolist()
    ([0.65, 0.2], ['x', 'y'], [2, 1])
    """
    prob = np.asarray(probabilities, dtype=float)
    if prob.ndim != 2:
        raise ValueError(f"probabilities must be (n_cells, K), got shape {prob.shape}")
    n, k = prob.shape
    donor_arr = np.asarray(donors)
    if donor_arr.shape != (n,):
        raise ValueError(
            f"donors must have one entry per cell: {donor_arr.shape} vs {n} probability rows"
        )
    if method not in _AGG_METHODS:
        raise ValueError(f"method must be one of {_AGG_METHODS}, got {method!r}")
    if classes is not None:
        classes = [str(c) for c in classes]
        if len(classes) != k:
            raise ValueError(f"{len(classes)} class names for {k} probability columns")
        clash = {"predicted", "n_cells"} & set(classes)
        if clash:
            raise ValueError(f"class names {sorted(clash)} clash with output column names")
    if pd.isna(donor_arr).any():
        raise ValueError("donors hold missing values; every cell needs a donor")

    codes, uniques = pd.factorize(donor_arr, sort=True)
    n_donors = len(uniques)
    counts = np.bincount(codes, minlength=n_donors)
    if method == "majority":
        votes = np.argmax(prob, axis=1)
        table = np.zeros((n_donors, k))
        np.add.at(table, (codes, votes), 1.0)
        table /= counts[:, None]
        pred = np.argmax(table, axis=1)
    else:
        table = np.zeros((n_donors, k))
        np.add.at(table, codes, prob)
        table /= counts[:, None]
        if method == "mean_probability":
            pred = np.argmax(table, axis=1)
        else:
            rank = table @ np.arange(k, dtype=float)
            pred = np.clip(_round_half_up(rank), 0, k - 1).astype(np.int64)

    columns: list[Any] = list(classes) if classes is not None else list(range(k))
    index = pd.Index(uniques, name="donor")
    out = pd.DataFrame(table, index=index, columns=columns)
    out["predicted"] = np.asarray(classes, dtype=object)[pred] if classes is not None else pred
    out["n_cells"] = counts.astype(np.int64)
    return out


def aggregate_bag_logits(
    logits: np.ndarray, donors: np.ndarray, n_cells: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Donor logits: the mean of the donor's bag logits weighted by the bags' cell counts.

    Parameters
    ----------
    logits
        ``(n_bags, n_out)``.
    donors
        ``(n_bags,)`` donor of each bag (codes or names).
    n_cells
        ``(n_bags,)`` cells per bag.

    Returns
    -------
    ``(donors (n_donors,) sorted, logits (n_donors, n_out) float64, cells (n_donors,))``.

    Examples
    --------
    >>> d, z, n = aggregate_bag_logits(np.array([[1.0], [4.0], [2.0]]), np.array([0, 0, 1]),
    ...                                np.array([2, 1, 5]))
    >>> d.tolist(), z[:, 0].tolist(), n.tolist()
    ([0, 1], [2.0, 2.0], [3, 5])
    """
    logits = np.asarray(logits, dtype=np.float64)
    codes, uniques = pd.factorize(np.asarray(donors), sort=True)
    w = np.asarray(n_cells, dtype=np.float64)
    total = np.bincount(codes, weights=w, minlength=len(uniques))
    out = np.zeros((len(uniques), logits.shape[1]))
    np.add.at(out, codes, logits * w[:, None])
    return np.asarray(uniques), out / total[:, None], total.astype(np.int64)


def donor_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, k: int, ordinal: bool
) -> dict[str, float]:
    """Donor-level metrics of true and predicted codes: ``accuracy``, ``balanced_accuracy``,
    ``macro_f1`` and (ordinal) ``qwk``, ``ordinal_mae``; plus ``n_donors``."""
    t = np.asarray(y_true, dtype=np.int64)
    out = metric_set(t, np.asarray(y_pred, dtype=np.int64), k, ordinal, full=False)
    out["n_donors"] = float(t.size)
    return out
