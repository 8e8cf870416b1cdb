"""Fit-and-score one baseline on the parts of a model's split."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from cellfm_sc._json import to_plain
from cellfm_sc.baselines._estimators import (
    CellLogisticRegression,
    PseudobulkLogisticRegression,
    _predict_from_proba,
)
from cellfm_sc.baselines._read import (
    pseudobulk,
)
from cellfm_sc.metrics import aggregate_by_donor
from cellfm_sc.metrics._cell import metric_set

# --------------------------------------------------------------------------------------------
# fit-and-score on a split
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BaselineResult:
    """A baseline fitted on a split's training (+ validation) part and scored on its cells.

    Attributes
    ----------
    name
        ``"pseudobulk"`` or ``"cell_logistic_regression"``.
    description
        One line: what was fitted.
    cell_metrics, donor_metrics
        The same metric sets as :class:`~cellfm_sc.metrics.EvaluationResult` (``None`` where
        not defined: a pseudo-bulk has no cell predictions).
    donor_table
        One row per scored donor (``true``, ``predicted``, ``p_<class>``), or None.
    settings
        ``C`` and the scores of every ``C`` tried, genes used, cells / donors fitted.
    seconds
        Wall time of fit + prediction.
    """

    name: str
    description: str
    cell_metrics: dict[str, float] | None
    donor_metrics: dict[str, float] | None
    donor_table: pd.DataFrame | None = None
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (no tables)."""
        return to_plain(
            {
                "name": self.name,
                "description": self.description,
                "cell_metrics": self.cell_metrics,
                "donor_metrics": self.donor_metrics,
                "settings": self.settings,
                "seconds": round(self.seconds, 2),
            }
        )


def _donor_truth(labels: np.ndarray, donors: np.ndarray) -> pd.Series:
    """Label code of each donor (the most frequent code of its cells; ties: the lowest)."""
    frame = pd.DataFrame({"d": donors, "y": labels})
    frame = frame[frame["y"] >= 0]
    counts = frame.groupby(["d", "y"]).size().unstack(fill_value=0)
    return (
        pd.Series(counts.to_numpy().argmax(axis=1), index=counts.index)
        .map(dict(enumerate(counts.columns)))
        .astype(np.int64)
    )


def _table(
    names: np.ndarray,
    truth: np.ndarray,
    proba: np.ndarray,
    pred: np.ndarray,
    classes: Sequence[str],
    ordered: bool,
) -> pd.DataFrame:
    cat = lambda c: pd.Categorical.from_codes(c, categories=list(classes), ordered=ordered)  # noqa: E731
    out = pd.DataFrame(index=pd.Index(names, name="donor"))
    out["true"] = cat(truth)
    out["predicted"] = cat(pred)
    for j, c in enumerate(classes):
        out[f"p_{c}"] = proba[:, j]
    return out


def pseudobulk_baseline(
    adata: Any,
    labels: np.ndarray,
    donors: np.ndarray,
    *,
    train: np.ndarray,
    validation: np.ndarray,
    test: np.ndarray,
    classes: Sequence[str],
    ordered: bool,
    layer: str | None = None,
    use_raw: bool = False,
    **kwargs: Any,
) -> BaselineResult:
    """Pseudo-bulk logistic regression fitted on the donors of ``train`` (``C`` chosen on
    those of ``validation``) and scored on the donors of ``test``.

    Parameters
    ----------
    adata
        AnnData with raw counts (in memory or backed).
    labels
        ``(n_obs,)`` label code of every cell (-1: missing); a donor's label is its cells'
        most frequent code.
    donors
        ``(n_obs,)`` donor of every cell.
    train, validation, test
        Cells of each part (each donor's cells in one part; a donor's test cells are summed).
    classes, ordered
        Class names and whether they are ordered.
    layer, use_raw
        Where the counts are.
    **kwargs
        :class:`PseudobulkLogisticRegression` settings (``ordinal``, ``Cs``, ``min_cpm``,
        ``n_top_genes``).
    """
    t0 = time.perf_counter()
    labels = np.asarray(labels, np.int64)
    donors = np.asarray(donors).astype(str)
    parts = {"train": train, "validation": validation, "test": test}
    rows = np.concatenate([np.asarray(v, np.int64) for v in parts.values()])
    names, sums = pseudobulk(adata, donors, rows=rows, layer=layer, use_raw=use_raw)
    truth = _donor_truth(labels[rows], donors[rows]).reindex(names).fillna(-1).astype(np.int64)
    member = {
        k: np.isin(names, np.unique(donors[np.asarray(v, np.int64)])) & (truth.to_numpy() >= 0)
        for k, v in parts.items()
    }
    tr, va, te = member["train"], member["validation"], member["test"]
    if not tr.any() or not te.any():
        raise ValueError("the pseudo-bulk baseline needs training and test donors with labels")
    y = truth.to_numpy()
    clf = PseudobulkLogisticRegression(len(classes), ordered=ordered, **kwargs)
    clf.fit(sums[tr], y[tr], sums[va] if va.any() else None, y[va] if va.any() else None)
    proba = clf.predict_proba(sums[te])
    pred = _predict_from_proba(proba, ordered)
    metrics = metric_set(y[te], pred, len(classes), ordered)
    metrics["n_donors"] = int(te.sum())
    kind = "ordinal (Frank-Hall) " if clf.ordinal else ""
    return BaselineResult(
        name="pseudobulk",
        description=(
            f"pseudo-bulk {kind}logistic regression: per-donor summed counts -> CPM -> log1p, "
            f"{clf.genes_.size} genes with mean CPM >= {clf.min_cpm_:g}, C={clf.C_:g} chosen on "
            f"{int(va.sum())} validation donors, fit on {int((tr | va).sum())} donors"
        ),
        cell_metrics=None,
        donor_metrics=metrics,
        donor_table=_table(names[te], y[te], proba, pred, classes, ordered),
        settings={
            "C": clf.C_,
            "validation_scores": {str(k): v for k, v in clf.validation_scores_.items()},
            "n_genes": int(clf.genes_.size),
            "min_cpm": clf.min_cpm_,
            "min_cpm_scores": {str(k): v for k, v in clf.min_cpm_scores_.items()},
            "n_top_genes": clf.n_top_genes,
            "ordinal": clf.ordinal,
            "n_train_donors": int(tr.sum()),
            "n_validation_donors": int(va.sum()),
        },
        seconds=time.perf_counter() - t0,
    )


def cell_baseline(
    adata: Any,
    labels: np.ndarray,
    *,
    train: np.ndarray,
    validation: np.ndarray,
    evaluate: np.ndarray,
    classes: Sequence[str],
    ordered: bool,
    donors: np.ndarray | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    donor_method: str = "mean_probability",
    eval_adata: Any = None,
    eval_labels: np.ndarray | None = None,
    **kwargs: Any,
) -> BaselineResult:
    """Cell logistic regression fitted on ``train`` cells (``C`` chosen on ``validation``)
    and scored on the ``evaluate`` cells; with ``donors``, the donors are scored too (their
    cells' probabilities aggregated by ``donor_method``, as the models do).

    Parameters
    ----------
    adata
        AnnData of the training and validation cells (raw counts, in memory or backed).
    labels
        ``(n_obs,)`` label codes of ``adata``'s cells (-1: missing; not fitted, not scored).
    train, validation, evaluate
        Cells of each part (``evaluate``: rows of ``eval_adata``).
    classes, ordered
        Class names and whether they are ordered.
    donors
        ``(n_obs,)`` donor of every cell of ``eval_adata``, or None.
    layer, use_raw
        Where the counts are (the same in both AnnData).
    donor_method
        Aggregation of cells to donors (:func:`~cellfm_sc.metrics.aggregate_by_donor`).
    eval_adata, eval_labels
        AnnData of the ``evaluate`` cells (same genes in the same order) and its label codes;
        default ``adata`` and ``labels``.
    **kwargs
        :class:`CellLogisticRegression` settings.
    """
    t0 = time.perf_counter()
    fit_labels = np.asarray(labels, np.int64)
    eval_labels = fit_labels if eval_labels is None else np.asarray(eval_labels, np.int64)
    target = adata if eval_adata is None else eval_adata
    train = np.asarray(train, np.int64)
    validation = np.asarray(validation, np.int64)
    train = train[fit_labels[train] >= 0]
    validation = validation[fit_labels[validation] >= 0]
    ev = np.asarray(evaluate, np.int64)
    ev = ev[eval_labels[ev] >= 0]
    if train.size == 0 or ev.size == 0:
        raise ValueError("the cell baseline needs labelled training and evaluation cells")
    clf = CellLogisticRegression(len(classes), ordered=ordered, **kwargs)
    clf.fit(
        adata,
        train,
        fit_labels[train],
        validation,
        fit_labels[validation],
        layer=layer,
        use_raw=use_raw,
    )
    proba = clf.predict_proba(target, ev)
    t = eval_labels[ev]
    pred = np.argmax(proba, axis=1)
    cell_m = metric_set(t, pred, len(classes), ordered)
    cell_m["n_cells"] = int(ev.size)
    donor_m, table = None, None
    if donors is not None:
        d = np.asarray(donors).astype(str)[ev]
        agg = aggregate_by_donor(proba, d, method=donor_method)
        truth = _donor_truth(t, d).reindex(agg.index).to_numpy()
        dpred = agg["predicted"].to_numpy().astype(np.int64)
        donor_m = metric_set(truth, dpred, len(classes), ordered)
        donor_m["n_donors"] = len(agg)
        table = _table(
            np.asarray(agg.index),
            truth,
            agg[list(range(len(classes)))].to_numpy(),
            dpred,
            classes,
            ordered,
        )
    return BaselineResult(
        name="cell_logistic_regression",
        description=(
            f"logistic regression on log-normalised counts of {clf.genes_.size} highly "
            f"variable genes, {clf.n_train_cells_} training cells, C={clf.C_:g} chosen on the "
            "validation cells"
            + (f"; donors: {donor_method} of their cells" if donors is not None else "")
        ),
        cell_metrics=cell_m,
        donor_metrics=donor_m,
        donor_table=table,
        settings={
            "C": clf.C_,
            "validation_scores": {str(k): v for k, v in clf.validation_scores_.items()},
            "n_genes": int(clf.genes_.size),
            "n_train_cells": clf.n_train_cells_,
            "max_cells": clf.max_cells,
        },
        seconds=time.perf_counter() - t0,
    )
