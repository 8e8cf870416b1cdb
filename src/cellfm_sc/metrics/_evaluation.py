"""The evaluation of a whole prediction, per cell and per donor: :class:`EvaluationResult`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from cellfm_sc._json import to_plain
from cellfm_sc.metrics._cell import _codes, confusion_matrix, metric_set
from cellfm_sc.metrics._donor import AggregationMethod, aggregate_by_donor

__all__ = ["EvaluationResult", "evaluate_predictions"]


@dataclasses.dataclass
class EvaluationResult:
    """Cell- and donor-level evaluation of one set of predictions.

    Attributes
    ----------
    cell_metrics
        ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``weighted_f1``, ``n_cells``;
        plus ``qwk``, ``ordinal_mae``, ``spearman`` when ``ordinal``.
    donor_metrics
        The same metrics on the donor table (key ``n_donors`` instead of ``n_cells``), or
        ``None`` without donors.
    donor_table
        Index ``donor`` (sorted); columns ``true``, ``predicted`` (categoricals of class
        names), ``n_cells``, then ``p_<class>`` per class: the donor-level score of
        :func:`aggregate_by_donor` (mean probability, or for ``"majority"`` the fraction of
        cells voting for the class). ``None`` without donors.
    confusion
        ``(K, K)`` cell-level confusion matrix (rows true, columns predicted).
    classes
        The ``K`` class names, in code order.
    ordinal
        Whether the classes are ordered (enables QWK, MAE, Spearman).
    predictions
        Index ``obs_name``; columns ``donor`` (when donors were given), ``true``,
        ``predicted`` (categoricals of class names), ``confidence`` (max probability), then
        ``p_<class>`` per class.
    donor_method
        The aggregation method used for the donor table.
    notes
        Remarks worth reading (e.g. donors whose cells carry different labels).
    evaluated_on
        Which cells were scored: ``"test"``, ``"validation"``, ``"train"``, ``"cells"``
        (chosen by the caller) or ``None`` (unknown).
    embedding
        ``(n_cells, D)`` cell embedding of the scored cells (rows as ``predictions``), when
        the model computed it in the same pass; used for the report's UMAP.
    baseline
        The baselines fitted on the same split and scored on the same cells / donors
        (:class:`cellfm_sc.baselines.BaselineComparison`; ``evaluate(baseline=True)``), or
        ``None``. ``str(result)`` then ends with the "model vs baseline" table and
        :meth:`to_dict` has a ``baseline`` block.
    """

    cell_metrics: dict[str, float]
    donor_metrics: dict[str, float] | None
    donor_table: pd.DataFrame | None
    confusion: np.ndarray
    classes: list[str]
    ordinal: bool
    predictions: pd.DataFrame
    donor_method: str = "mean_probability"
    notes: list[str] = dataclasses.field(default_factory=list)
    evaluated_on: str | None = None
    embedding: np.ndarray | None = dataclasses.field(default=None, repr=False)
    baseline: Any = dataclasses.field(default=None, repr=False)

    def _baseline_dict(self) -> dict[str, Any] | None:
        if self.baseline is None:
            return None
        return self.baseline.to_dict({"cell": self.cell_metrics, "donor": self.donor_metrics})

    def _baseline_lines(self) -> list[str]:
        if self.baseline is None:
            return []
        return self.baseline.lines({"cell": self.cell_metrics, "donor": self.donor_metrics})

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (metrics, confusion matrix, classes; ``nan`` -> ``None``).

        The per-cell and per-donor tables are not included (write them as CSV).
        """
        return to_plain(
            {
                "classes": list(self.classes),
                "ordinal": bool(self.ordinal),
                "cell_metrics": dict(self.cell_metrics),
                "donor_metrics": None if self.donor_metrics is None else dict(self.donor_metrics),
                "donor_method": self.donor_method if self.donor_metrics is not None else None,
                "evaluated_on": self.evaluated_on,
                "confusion_matrix": np.asarray(self.confusion).tolist(),
                "notes": list(self.notes),
                "baseline": self._baseline_dict(),
            }
        )

    def __str__(self) -> str:
        names = list(self.cell_metrics)
        if self.donor_metrics:
            names += [m for m in self.donor_metrics if m not in names]

        def fmt(d: dict[str, float] | None, key: str) -> str:
            if d is None or key not in d:
                return ""
            v = d[key]
            if key in ("n_cells", "n_donors"):
                return f"{int(v)}"
            return "nan" if v is None or not math.isfinite(v) else f"{v:.4f}"

        width = max(len(n) for n in names)
        lines = [f"EvaluationResult: {len(self.classes)} classes ({', '.join(self.classes)})"]
        header = f"  {'metric':<{width}}  {'cell':>10}"
        if self.donor_metrics is not None:
            header += f"  {'donor':>10}"
        lines.append(header)
        for name in names:
            row = f"  {name:<{width}}  {fmt(self.cell_metrics, name):>10}"
            if self.donor_metrics is not None:
                row += f"  {fmt(self.donor_metrics, name):>10}"
            lines.append(row)
        lines.extend(f"  note: {n}" for n in self.notes)
        lines.extend(self._baseline_lines())
        return "\n".join(lines)


def evaluate_predictions(
    probabilities: Any,
    y_true: Any,
    classes: Sequence[str],
    *,
    obs_names: Sequence[str] | None = None,
    donors: Any = None,
    ordinal: bool = False,
    donor_method: AggregationMethod = "mean_probability",
) -> EvaluationResult:
    """Evaluate class probabilities against true codes, per cell and (optionally) per donor.

    Every cell is counted exactly once; cell predictions are the argmax of each row (ties ->
    lowest code).

    Parameters
    ----------
    probabilities
        ``(n_cells, K)`` class probabilities, columns in the order of ``classes``.
    y_true
        ``(n_cells,)`` true class codes in ``0 .. K-1``.
    classes
        ``K`` class names (for ordinal labels, in increasing order).
    obs_names
        ``(n_cells,)`` cell names for the predictions table; default ``"0" .. "n-1"``.
    donors
        ``(n_cells,)`` donor ids. When given, the donor table and donor-level metrics are
        computed; a donor's true label is its cells' label (the majority label, ties to the
        lowest code, when they differ, which is recorded in ``notes``).
    ordinal
        Compute ``qwk``, ``ordinal_mae`` and ``spearman`` as well.
    donor_method
        How cells are aggregated per donor, see :func:`aggregate_by_donor`.

    Returns
    -------
    EvaluationResult

    Examples
    --------
    >>> p = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    >>> res = evaluate_predictions(p, [0, 1, 1], ["a", "b"], donors=["d1", "d2", "d2"])
    >>> res.cell_metrics["accuracy"], res.donor_metrics["accuracy"]
    (0.6666666666666666, 1.0)
    """
    prob = np.asarray(probabilities, dtype=float)
    classes = [str(c) for c in classes]
    t = _check_predictions(prob, y_true, classes)
    n, k = prob.shape[0], len(classes)
    p = np.argmax(prob, axis=1).astype(np.int64) if n else np.zeros(0, dtype=np.int64)

    def cat(codes: np.ndarray) -> pd.Categorical:
        return pd.Categorical.from_codes(codes, categories=classes, ordered=ordinal)

    donor_arr = None if donors is None else np.asarray(donors)
    pred_table = _prediction_table(prob, t, p, obs_names, donor_arr, classes, cat)
    cell_metrics = metric_set(t, p, k, ordinal)
    cell_metrics["n_cells"] = n
    notes: list[str] = []
    donor_metrics = None
    donor_table = None
    if donor_arr is not None:
        donor_table, donor_metrics = _donor_part(
            prob, t, donor_arr, classes, ordinal, donor_method, cat, notes
        )

    return EvaluationResult(
        cell_metrics=cell_metrics,
        donor_metrics=donor_metrics,
        donor_table=donor_table,
        confusion=confusion_matrix(t, p, n_classes=k),
        classes=classes,
        ordinal=ordinal,
        predictions=pred_table,
        donor_method=donor_method,
        notes=notes,
    )


def _check_predictions(prob: np.ndarray, y_true: Any, classes: list[str]) -> np.ndarray:
    """The true codes, after checking them and ``prob`` ``(n_cells, K)`` against each other."""
    k = len(classes)
    if prob.ndim != 2 or prob.shape[1] != k:
        raise ValueError(f"probabilities must be (n_cells, {k}) for {k} classes, got {prob.shape}")
    if len(set(classes)) != k:
        raise ValueError(f"class names must be unique, got {classes}")
    if not np.all(np.isfinite(prob)):
        raise ValueError("probabilities hold non-finite values")
    n = prob.shape[0]
    t = _codes(y_true, "y_true")
    if t.shape[0] != n:
        raise ValueError(f"y_true has {t.shape[0]} entries for {n} probability rows")
    if n and t.max() >= k:
        raise ValueError(f"y_true holds code {t.max()} but there are only {k} classes")
    return t


def _prediction_table(
    prob: np.ndarray,
    t: np.ndarray,
    p: np.ndarray,
    obs_names: Sequence[str] | None,
    donor_arr: np.ndarray | None,
    classes: list[str],
    cat: Any,
) -> pd.DataFrame:
    """:attr:`EvaluationResult.predictions`: one row per cell."""
    n = prob.shape[0]
    if obs_names is None:
        index = pd.Index([str(i) for i in range(n)], name="obs_name")
    else:
        index = pd.Index(np.asarray(obs_names).astype(str), name="obs_name")
        if len(index) != n:
            raise ValueError(f"obs_names has {len(index)} entries for {n} cells")
    pred_table = pd.DataFrame(index=index)
    if donor_arr is not None:
        if donor_arr.shape != (n,):
            raise ValueError(f"donors has shape {donor_arr.shape}, expected ({n},)")
        pred_table["donor"] = donor_arr
    pred_table["true"] = cat(t)
    pred_table["predicted"] = cat(p)
    pred_table["confidence"] = prob.max(axis=1) if n else np.zeros(0)
    pred_table[[f"p_{c}" for c in classes]] = prob
    return pred_table


def _donor_part(
    prob: np.ndarray,
    t: np.ndarray,
    donor_arr: np.ndarray,
    classes: list[str],
    ordinal: bool,
    donor_method: AggregationMethod,
    cat: Any,
    notes: list[str],
) -> tuple[pd.DataFrame, dict[str, float]]:
    """The donor table and donor metrics (a note in ``notes`` for donors of mixed labels)."""
    k = len(classes)
    agg = aggregate_by_donor(prob, donor_arr, method=donor_method)
    dcodes, uniques = pd.factorize(donor_arr, sort=True)
    label_counts = np.zeros((len(uniques), k), dtype=np.int64)
    np.add.at(label_counts, (dcodes, t), 1)
    donor_true = np.argmax(label_counts, axis=1)
    mixed = np.flatnonzero((label_counts > 0).sum(axis=1) > 1)
    if mixed.size:
        shown = ", ".join(str(uniques[i]) for i in mixed[:10])
        more = f" (+{mixed.size - 10} more)" if mixed.size > 10 else ""
        notes.append(
            f"{mixed.size} donor(s) have cells with different labels ({shown}{more}); "
            "their donor label is the majority label"
        )
    donor_pred = agg["predicted"].to_numpy().astype(np.int64)
    donor_table = pd.DataFrame(index=agg.index)
    donor_table["true"] = cat(donor_true)
    donor_table["predicted"] = cat(donor_pred)
    donor_table["n_cells"] = agg["n_cells"].to_numpy()
    donor_table[[f"p_{c}" for c in classes]] = agg[list(range(k))].to_numpy()
    donor_metrics = metric_set(donor_true, donor_pred, k, ordinal)
    donor_metrics["n_donors"] = len(uniques)
    return donor_table, donor_metrics
