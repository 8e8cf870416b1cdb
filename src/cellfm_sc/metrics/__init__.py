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

The modules: ``_cell`` (the metric functions), ``_donor`` (:func:`aggregate_by_donor`) and
``_evaluation`` (:func:`evaluate_predictions`, :class:`EvaluationResult`); import the names
from ``cellfm_sc.metrics``.
"""

from cellfm_sc.metrics._cell import (
    accuracy,
    balanced_accuracy,
    confusion_matrix,
    macro_f1,
    ordinal_mae,
    quadratic_weighted_kappa,
    spearman,
    weighted_f1,
)
from cellfm_sc.metrics._donor import aggregate_by_donor
from cellfm_sc.metrics._evaluation import EvaluationResult, evaluate_predictions

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
