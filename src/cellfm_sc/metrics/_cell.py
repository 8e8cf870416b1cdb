"""Cell-level metrics of class codes: accuracy, balanced accuracy, F1, QWK, MAE, Spearman."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "accuracy",
    "balanced_accuracy",
    "confusion_matrix",
    "macro_f1",
    "ordinal_mae",
    "quadratic_weighted_kappa",
    "spearman",
    "weighted_f1",
]


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


def metric_set(
    y_true: np.ndarray, y_pred: np.ndarray, k: int, ordinal: bool, full: bool = True
) -> dict[str, float]:
    """``accuracy``, ``balanced_accuracy``, ``macro_f1`` (and ``weighted_f1`` if ``full``) of
    integer codes ``(n,)``; with ``ordinal`` also ``qwk`` (``k`` classes), ``ordinal_mae`` (and
    ``spearman`` if ``full``)."""
    t, p = y_true, y_pred
    out = {"accuracy": accuracy(t, p), "balanced_accuracy": balanced_accuracy(t, p)}
    out["macro_f1"] = macro_f1(t, p)
    if full:
        out["weighted_f1"] = weighted_f1(t, p)
    if ordinal:
        out["qwk"] = quadratic_weighted_kappa(t, p, n_classes=k)
        out["ordinal_mae"] = ordinal_mae(t, p)
        if full:
            out["spearman"] = spearman(t, p)
    return out
