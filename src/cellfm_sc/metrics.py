"""Cell- and donor-level evaluation metrics, donor aggregation and :class:`EvaluationResult`.

All metric functions take integer class **codes** (``0 .. K-1``), never class names, and are
exact over every cell given: nothing is averaged over batches and no cell is dropped.
They are implemented here with numpy (and :func:`scipy.stats.spearmanr`) so that
``import cellfm_sc.metrics`` stays light; the test-suite checks them against scikit-learn.

Conventions (the same as scikit-learn's defaults, unless stated):

* ``confusion_matrix`` rows are true classes, columns predicted classes.
* ``macro_f1`` / ``weighted_f1`` average over the classes present in ``y_true`` **or**
  ``y_pred`` (scikit-learn's default ``labels``); pass ``labels=range(K)`` to average over all
  ``K`` classes instead (a class absent from both then scores 0). A class with no true and no
  predicted cell has F1 = 0 (scikit-learn's ``zero_division=0``).
* ``balanced_accuracy`` is the mean recall over the classes present in ``y_true``.
* ``quadratic_weighted_kappa`` weighs disagreements by the squared **code** distance, with
  ``n_classes`` (default ``max(code) + 1``) ordinal positions; this equals
  ``sklearn.metrics.cohen_kappa_score(y_true, y_pred, weights="quadratic",
  labels=range(n_classes))``. It is ``nan`` where kappa is undefined (e.g. every true and
  predicted code is the same class), as scikit-learn returns.
* Empty inputs give ``nan``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from cellfm_sc._json import to_plain

__all__ = [
    "EvaluationResult",
    "accuracy",
    "aggregate_by_donor",
    "balanced_accuracy",
    "confusion_matrix",
    "evaluate_predictions",
    "macro_f1",
    "ordinal_mae",
    "quadratic_weighted_kappa",
    "spearman",
    "weighted_f1",
]

AggregationMethod = Literal["mean_probability", "majority", "expected_rank"]
_AGG_METHODS = ("mean_probability", "majority", "expected_rank")


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def _codes(y: Any, name: str) -> np.ndarray:
    """Return ``y`` as a 1-d int64 array of non-negative codes, or raise ``ValueError``."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-dimensional class codes, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must hold integer class codes, got non-integer floats")
    elif arr.dtype.kind not in "iub":
        raise ValueError(
            f"{name} must hold integer class codes (0..K-1), got dtype {arr.dtype}; "
            "map class names to codes first (e.g. pd.Categorical(...).codes)"
        )
    arr = arr.astype(np.int64)
    if arr.min() < 0:
        raise ValueError(f"{name} holds negative codes (min {arr.min()}); codes must be >= 0")
    return arr


def _pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t = _codes(y_true, "y_true")
    p = _codes(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.shape[0]} vs {p.shape[0]}")
    return t, p


def _n_classes(t: np.ndarray, p: np.ndarray, n_classes: int | None) -> int:
    observed = int(max(t.max(initial=-1), p.max(initial=-1))) + 1
    if n_classes is None:
        return observed
    if n_classes < observed:
        raise ValueError(f"n_classes={n_classes} but codes go up to {observed - 1}")
    return int(n_classes)


# --------------------------------------------------------------------------------------------
# metric functions
# --------------------------------------------------------------------------------------------


def confusion_matrix(y_true: Any, y_pred: Any, n_classes: int | None = None) -> np.ndarray:
    """Confusion matrix of integer codes.

    Parameters
    ----------
    y_true, y_pred
        Class codes, shape ``(n,)``.
    n_classes
        Number of classes ``K``; default ``max(code) + 1``. Classes absent from both inputs
        still get a row and a column.

    Returns
    -------
    numpy.ndarray
        ``(K, K)`` int64; entry ``[i, j]`` counts cells of true class ``i`` predicted ``j``.

    Examples
    --------
    >>> confusion_matrix([0, 1, 1], [0, 1, 0], n_classes=3)
    array([[1, 0, 0],
           [1, 1, 0],
           [0, 0, 0]])
    """
    t, p = _pair(y_true, y_pred)
    k = _n_classes(t, p, n_classes)
    cm = np.bincount(t * k + p, minlength=k * k).reshape(k, k)
    return cm.astype(np.int64)


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Fraction of cells whose predicted code equals the true code (exact, cell-weighted).

    Examples
    --------
    >>> accuracy([0, 1, 2, 2], [0, 1, 1, 2])
    0.75
    """
    t, p = _pair(y_true, y_pred)
    if t.size == 0:
        return math.nan
    return float(np.mean(t == p))


def balanced_accuracy(y_true: Any, y_pred: Any) -> float:
    """Mean per-class recall over the classes present in ``y_true``.

    Predicted classes absent from ``y_true`` count only as errors (as in scikit-learn).

    Examples
    --------
    >>> balanced_accuracy([0, 0, 0, 1], [0, 0, 1, 1])
    0.8333333333333333
    """
    t, p = _pair(y_true, y_pred)
    if t.size == 0:
        return math.nan
    cm = confusion_matrix(t, p)
    support = cm.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present]))


def _f1_per_class(
    t: np.ndarray, p: np.ndarray, labels: Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class F1 and true support for ``labels`` (default: classes in ``t`` or ``p``)."""
    k = _n_classes(t, p, None)
    if labels is None:
        lab = np.union1d(np.unique(t), np.unique(p)).astype(np.int64)
    else:
        lab = np.asarray(labels, dtype=np.int64).ravel()
        if lab.size and lab.min() < 0:
            raise ValueError("labels must be non-negative class codes")
    k = max(k, int(lab.max(initial=-1)) + 1)
    cm = confusion_matrix(t, p, n_classes=k)
    tp = np.diag(cm)[lab].astype(float)
    true_sum = cm.sum(axis=1)[lab].astype(float)
    pred_sum = cm.sum(axis=0)[lab].astype(float)
    denom = true_sum + pred_sum
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return f1, true_sum


def macro_f1(y_true: Any, y_pred: Any, labels: Sequence[int] | None = None) -> float:
    """Unweighted mean of per-class F1.

    Parameters
    ----------
    y_true, y_pred
        Class codes, shape ``(n,)``.
    labels
        Classes to average over. Default: classes present in ``y_true`` or ``y_pred``
        (scikit-learn's default). A listed class absent from both scores 0.

    Examples
    --------
    >>> round(macro_f1([0, 0, 1, 1], [0, 1, 1, 1]), 4)
    0.7333
    """
    t, p = _pair(y_true, y_pred)
    if t.size == 0:
        return math.nan
    f1, _ = _f1_per_class(t, p, labels)
    return float(np.mean(f1)) if f1.size else math.nan


def weighted_f1(y_true: Any, y_pred: Any, labels: Sequence[int] | None = None) -> float:
    """Mean per-class F1 weighted by each class's true support.

    ``labels`` as in :func:`macro_f1`; returns 0 when no listed class has support (as
    scikit-learn does).

    Examples
    --------
    >>> round(weighted_f1([0, 0, 0, 1], [0, 0, 1, 1]), 4)
    0.7667
    """
    t, p = _pair(y_true, y_pred)
    if t.size == 0:
        return math.nan
    f1, support = _f1_per_class(t, p, labels)
    if support.sum() == 0:
        return 0.0
    return float(np.sum(f1 * support) / support.sum())


def quadratic_weighted_kappa(y_true: Any, y_pred: Any, n_classes: int | None = None) -> float:
    """Quadratic weighted Cohen's kappa on ordinal codes (the SEA-AD DREAM challenge metric).

    ``1 - sum(W * O) / sum(W * E)`` with ``W[i, j] = (i - j)**2``, ``O`` the confusion
    matrix and ``E`` the outer product of its marginals divided by ``n``.

    Parameters
    ----------
    y_true, y_pred
        Ordinal codes, shape ``(n,)``.
    n_classes
        Number of ordinal levels; default ``max(code) + 1``. Weights use code distances,
        so a level absent from both inputs still counts in the distance between its
        neighbours.

    Returns
    -------
    float
        In ``[-1, 1]``; ``nan`` when undefined (e.g. all true and predicted codes equal one
        class), matching scikit-learn.

    Examples
    --------
    >>> quadratic_weighted_kappa([0, 1, 2, 3], [0, 1, 2, 3])
    1.0
    >>> round(quadratic_weighted_kappa([0, 1, 2, 3], [0, 2, 2, 3]), 4)
    0.9
    """
    t, p = _pair(y_true, y_pred)
    if t.size == 0:
        return math.nan
    k = _n_classes(t, p, n_classes)
    observed = confusion_matrix(t, p, n_classes=k).astype(float)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / observed.sum()
    idx = np.arange(k, dtype=float)
    weights = (idx[:, None] - idx[None, :]) ** 2
    denom = float(np.sum(weights * expected))
    if denom == 0.0:
        return math.nan
    return float(1.0 - np.sum(weights * observed) / denom)


def ordinal_mae(y_true: Any, y_pred: Any) -> float:
    """Mean absolute difference of ordinal codes, ``mean(|y_true - y_pred|)``.

    Examples
    --------
    >>> ordinal_mae([0, 1, 2, 3], [0, 2, 2, 1])
    0.75
    """
    t, p = _pair(y_true, y_pred)
    if t.size == 0:
        return math.nan
    return float(np.mean(np.abs(t - p)))


def spearman(y_true: Any, y_pred: Any) -> float:
    """Spearman rank correlation of two code vectors (:func:`scipy.stats.spearmanr`).

    ``nan`` when either input is constant or has fewer than 2 values.

    Examples
    --------
    >>> round(spearman([0, 1, 2, 3], [0, 2, 1, 3]), 4)
    0.8
    """
    t, p = _pair(y_true, y_pred)
    if t.size < 2 or np.all(t == t[0]) or np.all(p == p[0]):
        return math.nan
    from scipy.stats import spearmanr

    return float(spearmanr(t, p).statistic)


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


# --------------------------------------------------------------------------------------------
# evaluation of a whole prediction
# --------------------------------------------------------------------------------------------


def _metric_set(t: np.ndarray, p: np.ndarray, k: int, ordinal: bool) -> dict[str, float]:
    out = {
        "accuracy": accuracy(t, p),
        "balanced_accuracy": balanced_accuracy(t, p),
        "macro_f1": macro_f1(t, p),
        "weighted_f1": weighted_f1(t, p),
    }
    if ordinal:
        out["qwk"] = quadratic_weighted_kappa(t, p, n_classes=k)
        out["ordinal_mae"] = ordinal_mae(t, p)
        out["spearman"] = spearman(t, p)
    return out


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
    p = np.argmax(prob, axis=1).astype(np.int64) if n else np.zeros(0, dtype=np.int64)

    if obs_names is None:
        index = pd.Index([str(i) for i in range(n)], name="obs_name")
    else:
        index = pd.Index(np.asarray(obs_names).astype(str), name="obs_name")
        if len(index) != n:
            raise ValueError(f"obs_names has {len(index)} entries for {n} cells")

    def cat(codes: np.ndarray) -> pd.Categorical:
        return pd.Categorical.from_codes(codes, categories=classes, ordered=ordinal)

    pred_table = pd.DataFrame(index=index)
    if donors is not None:
        donor_arr = np.asarray(donors)
        if donor_arr.shape != (n,):
            raise ValueError(f"donors has shape {donor_arr.shape}, expected ({n},)")
        pred_table["donor"] = donor_arr
    pred_table["true"] = cat(t)
    pred_table["predicted"] = cat(p)
    pred_table["confidence"] = prob.max(axis=1) if n else np.zeros(0)
    prob_cols = [f"p_{c}" for c in classes]
    pred_table[prob_cols] = prob

    cell_metrics = _metric_set(t, p, k, ordinal)
    cell_metrics["n_cells"] = n
    notes: list[str] = []
    donor_metrics = None
    donor_table = None
    if donors is not None:
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
        donor_table[prob_cols] = agg[list(range(k))].to_numpy()
        donor_metrics = _metric_set(donor_true, donor_pred, k, ordinal)
        donor_metrics["n_donors"] = len(uniques)

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
