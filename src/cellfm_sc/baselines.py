"""Baselines a careful analyst would run on the same cells (one home for all of them).

A model that loses to these has no reason to exist, so every evaluation reports them on the
same split (``evaluate(baseline=True)``, the CLI report's "model vs baseline"):

* **cells**: :class:`CellLogisticRegression`, logistic regression on log-normalised counts
  (CellFM's normalisation, :func:`~cellfm_sc.data.cellfm_normalize`: ``log1p(c / T * 1e4)``)
  of the ``n_top_genes`` most variable genes of the training cells; ``C`` chosen on the
  validation cells. At most ``max_cells`` training cells are read (a seeded sample), so
  memory does not grow with the data set.
* **donors**: :class:`PseudobulkLogisticRegression`, per-donor summed counts -> CPM ->
  ``log1p``, genes kept whose mean CPM over the fitting donors is at least ``min_cpm``
  (optionally only the ``n_top_genes`` most variable of them), logistic regression with
  ``C`` chosen on the validation donors and refit on training + validation donors. For
  ordered labels ``ordinal=True`` fits the ordinal variant (Frank and Hall 2001: one binary
  logistic regression per threshold ``y > k``; the prediction is the median class).

Both read in-memory or backed (``backed="r"``) AnnData through the data path's row reader,
in chunks of bounded size: the pseudo-bulk sums are one sparse indicator product per chunk
(``(n_donors, chunk) @ (chunk, n_genes)``) and the cells x genes matrix is never densified.

:func:`pseudobulk_baseline` and :func:`cell_baseline` fit and score one baseline on the
parts of a split; they return a :class:`BaselineResult`. :func:`compare_on_split` fits those
that match a model and returns a :class:`BaselineComparison`, which the models'
``evaluate(baseline=True)`` attach to their result (``result.baseline``).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellfm_sc._json import to_plain
from cellfm_sc.data import cellfm_normalize, row_source
from cellfm_sc.metrics import (
    _metric_set,
    aggregate_by_donor,
    balanced_accuracy,
    quadratic_weighted_kappa,
)

__all__ = [
    "DEFAULT_CS",
    "BaselineComparison",
    "BaselineResult",
    "CellLogisticRegression",
    "PseudobulkLogisticRegression",
    "cell_baseline",
    "compare_on_split",
    "gene_moments",
    "gene_variances",
    "log_cpm",
    "log_normalized",
    "pseudobulk",
    "pseudobulk_baseline",
    "top_variable_genes",
]

#: inverse regularisation strengths tried on the validation cells / donors
DEFAULT_CS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
#: stored values per chunk when the counts are read
_CHUNK_NNZ = 4_000_000


# --------------------------------------------------------------------------------------------
# reading: pseudo-bulk sums, log-normalised rows, gene variances
# --------------------------------------------------------------------------------------------


def pseudobulk(
    adata: Any,
    groups: Any,
    *,
    rows: np.ndarray | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    max_nnz: int = _CHUNK_NNZ,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed counts per group (e.g. donor), read in chunks.

    Parameters
    ----------
    adata
        AnnData with raw counts (in memory or backed).
    groups
        ``(n_obs,)`` group of every cell (donor ids).
    rows
        Cells to sum (default all).
    layer, use_raw
        Where the counts are (as in ``setup_anndata``).
    max_nnz
        Stored values read per chunk.

    Returns
    -------
    ``(names (n_groups,) sorted, sums (n_groups, n_genes) float64)``. Each chunk adds one
    sparse indicator product ``(n_groups, chunk) @ (chunk, n_genes)``; memory is that of the
    output plus one chunk.

    Examples
    --------
    >>> x = sp.csr_matrix(np.array([[1, 0], [2, 3], [0, 4]]))
    >>> names, sums = pseudobulk(ad.AnnData(x), ["b", "a", "b"])  # doctest: +SKIP
    >>> names.tolist(), sums.tolist()  # doctest: +SKIP
    (['a', 'b'], [[2.0, 3.0], [1.0, 4.0]])
    """
    source = row_source(adata, layer, use_raw=use_raw)
    groups = np.asarray(groups)
    if groups.shape != (source.n_obs,):
        raise ValueError(f"groups has shape {groups.shape}, expected ({source.n_obs},)")
    rows = np.arange(source.n_obs) if rows is None else np.sort(np.asarray(rows, np.int64))
    codes, names = pd.factorize(groups[rows], sort=True)
    code_of = np.full(source.n_obs, -1, np.int64)
    code_of[rows] = codes
    sums = np.zeros((len(names), source.n_vars), np.float64)
    for chunk, block in source.iter_ranges(rows, max_nnz):
        ind = sp.csr_matrix(
            (np.ones(chunk.size), (code_of[chunk], np.arange(chunk.size))),
            shape=(len(names), chunk.size),
        )
        part = (ind @ block.astype(np.float64)).tocoo()
        np.add.at(sums, (part.row, part.col), part.data)
    return np.asarray(names, dtype=object), sums


def log_cpm(sums: np.ndarray) -> np.ndarray:
    """``log1p`` of counts per million of each row of ``sums (n, G)`` -> ``(n, G)``."""
    s = np.asarray(sums, np.float64)
    total = s.sum(axis=1, keepdims=True)
    return np.log1p(s / np.where(total > 0, total, 1.0) * 1e6)


def log_normalized(block: sp.csr_matrix) -> sp.csr_matrix:
    """CellFM's normalisation (:func:`~cellfm_sc.data.cellfm_normalize`) of CSR count rows
    ``(n, G)``: the same sparsity pattern, float32 values."""
    norm = cellfm_normalize(block.data, block.indptr)
    return sp.csr_matrix((norm.values, block.indices, block.indptr), shape=block.shape)


def gene_moments(
    adata: Any,
    rows: np.ndarray,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    max_nnz: int = _CHUNK_NNZ,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance over ``rows`` of every gene's log-normalised value, float64
    ``(n_genes,)`` each (one chunked pass: sums and sums of squares)."""
    source = row_source(adata, layer, use_raw=use_raw)
    s1 = np.zeros(source.n_vars)
    s2 = np.zeros(source.n_vars)
    n = 0
    for chunk, block in source.iter_ranges(np.asarray(rows, np.int64), max_nnz):
        x = log_normalized(block)
        v = x.data.astype(np.float64)
        s1 += np.bincount(x.indices, weights=v, minlength=source.n_vars)
        s2 += np.bincount(x.indices, weights=v * v, minlength=source.n_vars)
        n += chunk.size
    if n == 0:
        return np.zeros(source.n_vars), np.zeros(source.n_vars)
    mean = s1 / n
    return mean, np.maximum(s2 / n - mean * mean, 0.0)


def gene_variances(
    adata: Any,
    rows: np.ndarray,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    max_nnz: int = _CHUNK_NNZ,
) -> np.ndarray:
    """Variance over ``rows`` of every gene's log-normalised value, float64 ``(n_genes,)``
    (:func:`gene_moments`)."""
    return gene_moments(adata, rows, layer=layer, use_raw=use_raw, max_nnz=max_nnz)[1]


def top_variable_genes(
    adata: Any,
    rows: np.ndarray,
    n_top: int,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    max_cells: int = 20_000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``n_top`` genes of highest log-normalised variance over ``rows`` (at most
    ``max_cells`` of them, a seeded sample), sorted by column: ``(columns (n,), mean (n,),
    variance (n,))`` with ``n = min(n_top, n_genes)`` (ties, e.g. genes without variance,
    go to the lower column)."""
    rows = np.asarray(rows, np.int64)
    if rows.size > max_cells:
        rows = np.random.default_rng([seed, 7]).choice(rows, max_cells, replace=False)
    mean, var = gene_moments(adata, np.sort(rows), layer=layer, use_raw=use_raw)
    top = np.sort(np.argsort(-var, kind="stable")[: int(n_top)])
    return top, mean[top], var[top]


def _read_features(
    source: Any, rows: np.ndarray, genes: np.ndarray, max_nnz: int = _CHUNK_NNZ
) -> tuple[np.ndarray, sp.csr_matrix]:
    """Log-normalised values of ``genes`` at sorted ``rows``: float64 CSR
    ``(len(rows), len(genes))`` (the solver's results do not depend on the input's precision)."""
    parts, order = [], []
    for chunk, block in source.iter_ranges(np.asarray(rows, np.int64), max_nnz):
        parts.append(log_normalized(block)[:, genes].astype(np.float64))
        order.append(chunk)
    if not parts:
        return np.zeros(0, np.int64), sp.csr_matrix((0, len(genes)), dtype=np.float32)
    return np.concatenate(order), sp.vstack(parts, format="csr")


# --------------------------------------------------------------------------------------------
# estimators
# --------------------------------------------------------------------------------------------


def _selection_score(y: np.ndarray, proba: np.ndarray, n_classes: int, ordered: bool) -> float:
    """QWK (ordered labels) or balanced accuracy of the predictions, minus 1e-3 x the log loss
    (ties, frequent with few validation donors, go to the better-calibrated fit)."""
    pred = _predict_from_proba(proba, ordered)
    main = (
        quadratic_weighted_kappa(y, pred, n_classes=n_classes)
        if ordered
        else balanced_accuracy(y, pred)
    )
    main = main if math.isfinite(main) else 0.0
    p = np.clip(proba[np.arange(y.size), y], 1e-12, 1.0)
    return float(main - 1e-3 * float(-np.log(p).mean()))


def _predict_from_proba(proba: np.ndarray, ordered: bool) -> np.ndarray:
    """Median class (ordered) or most probable class (ties to the lowest code)."""
    if not ordered:
        return np.argmax(proba, axis=1).astype(np.int64)
    tail = np.cumsum(proba[:, ::-1], axis=1)[:, ::-1][:, 1:]  # P(y > k)
    return (tail > 0.5).sum(axis=1).astype(np.int64)


class _Logistic:
    """Multinomial (``ordinal=False``) or Frank-Hall ordinal logistic regression with ``K``
    fixed output columns (classes missing from the training labels get probability 0)."""

    def __init__(self, C: float, n_classes: int, ordinal: bool, max_iter: int, seed: int):
        self.C, self.k, self.ordinal = float(C), int(n_classes), bool(ordinal)
        self.max_iter, self.seed = int(max_iter), int(seed)

    def _lr(self) -> Any:
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.seed)

    def fit(self, x: Any, y: np.ndarray) -> _Logistic:
        y = np.asarray(y, np.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning on separable donor data
            if self.ordinal:
                # one binary task per threshold: P(y > k); constant where one side is empty
                self.tasks_ = []
                for k in range(self.k - 1):
                    t = (y > k).astype(np.int64)
                    self.tasks_.append(float(t[0]) if t.min() == t.max() else self._lr().fit(x, t))
            else:
                self.classes_ = np.unique(y)
                self.lr_ = None if self.classes_.size < 2 else self._lr().fit(x, y)
        return self

    def predict_proba(self, x: Any) -> np.ndarray:
        n = x.shape[0]
        if self.ordinal:
            cols = [
                np.full(n, t) if isinstance(t, float) else t.predict_proba(x)[:, 1]
                for t in self.tasks_
            ]
            gt = np.minimum.accumulate(np.stack(cols, axis=1), axis=1)  # monotone P(y > k)
            upper = np.concatenate([np.ones((n, 1)), gt], axis=1)
            lower = np.concatenate([gt, np.zeros((n, 1))], axis=1)
            return np.clip(upper - lower, 0.0, 1.0)
        out = np.zeros((n, self.k))
        if self.lr_ is None:
            out[:, self.classes_[0]] = 1.0
        else:
            out[:, self.classes_] = self.lr_.predict_proba(x)
        return out


@dataclasses.dataclass
class _Selection:
    C: float
    scores: dict[float, float]


def _choose_c(
    make: Any,
    x_tr: Any,
    y_tr: np.ndarray,
    x_va: Any,
    y_va: np.ndarray,
    Cs: Sequence[float],
    n_classes: int,
    ordered: bool,
) -> _Selection:
    """The ``C`` of ``Cs`` with the best validation score (ties: the smaller ``C``)."""
    if x_va is None or len(y_va) == 0:
        return _Selection(float(Cs[0]) if len(Cs) == 1 else 1.0, {})
    if len(Cs) == 1:
        return _Selection(float(Cs[0]), {})
    scores = {}
    for c in Cs:
        scores[float(c)] = _selection_score(
            y_va, make(c).fit(x_tr, y_tr).predict_proba(x_va), n_classes, ordered
        )
    best = max(scores.values())
    return _Selection(min(c for c, s in scores.items() if s == best), scores)


class PseudobulkLogisticRegression:
    """Pseudo-bulk logistic regression of donors (see the module docstring).

    Parameters
    ----------
    n_classes
        ``K``; labels are codes ``0 .. K-1``.
    ordered
        The labels are ordered: ``C`` is chosen by QWK and predictions are the median class
        (else balanced accuracy and the most probable class).
    ordinal
        Fit the ordinal variant (one binary regression per threshold); needs ``ordered``.
    Cs
        Inverse regularisation strengths tried on the validation donors.
    min_cpm
        Keep genes whose mean CPM over the fitting donors is at least this (low counts are
        noise that swamps a linear model of a few dozen donors).
    n_top_genes
        Of those, keep only the most variable (log CPM over the fitting donors); None: all.
    max_iter, seed
        Solver settings.

    Examples
    --------
    >>> names, sums = pseudobulk(adata, adata.obs["donor"])  # doctest: +SKIP
    >>> clf = PseudobulkLogisticRegression(4, ordered=True).fit(sums[tr], y[tr], sums[va], y[va])  # doctest: +SKIP
    >>> clf.predict(sums[te]), clf.C_  # doctest: +SKIP
    """

    def __init__(
        self,
        n_classes: int,
        *,
        ordered: bool = False,
        ordinal: bool = False,
        Cs: Sequence[float] = DEFAULT_CS,
        min_cpm: float = 10.0,
        n_top_genes: int | None = None,
        max_iter: int = 5000,
        seed: int = 0,
    ) -> None:
        if ordinal and not ordered:
            raise ValueError("ordinal=True needs ordered labels (ordered=True)")
        if not Cs or any(not c > 0 for c in Cs):
            raise ValueError(f"Cs must be positive numbers, got {list(Cs)}")
        if not min_cpm >= 0:
            raise ValueError(f"min_cpm must be >= 0, got {min_cpm!r}")
        if n_top_genes is not None and n_top_genes < 1:
            raise ValueError(f"n_top_genes must be >= 1 or None, got {n_top_genes!r}")
        self.n_classes, self.ordered, self.ordinal = int(n_classes), bool(ordered), bool(ordinal)
        self.Cs, self.min_cpm, self.n_top_genes = tuple(float(c) for c in Cs), min_cpm, n_top_genes
        self.max_iter, self.seed = max_iter, seed

    def _make(self, c: float) -> _Logistic:
        return _Logistic(c, self.n_classes, self.ordinal, self.max_iter, self.seed)

    def features(self, sums: np.ndarray) -> np.ndarray:
        """``log1p(CPM)`` of the kept genes ``(n_donors, n_kept)`` of summed counts."""
        return log_cpm(sums)[:, self.genes_]

    def fit(
        self,
        sums: np.ndarray,
        y: np.ndarray,
        sums_validation: np.ndarray | None = None,
        y_validation: np.ndarray | None = None,
    ) -> PseudobulkLogisticRegression:
        """Fit on training donors (``sums (n, G)``, codes ``y``); choose ``C`` on the
        validation donors, then refit on both. Without validation donors ``C`` is the only
        value of ``Cs``, or 1 when there are several."""
        sums = np.asarray(sums, np.float64)
        y = np.asarray(y, np.int64)
        has_val = sums_validation is not None and len(y_validation) > 0
        both = np.vstack([sums, sums_validation]) if has_val else sums
        y_both = np.concatenate([y, np.asarray(y_validation, np.int64)]) if has_val else y
        total = both.sum(axis=1, keepdims=True)
        cpm = both / np.where(total > 0, total, 1.0) * 1e6
        keep = np.flatnonzero(cpm.mean(axis=0) >= self.min_cpm)
        if keep.size == 0:
            raise ValueError(
                f"no gene has a mean CPM >= min_cpm={self.min_cpm} over the fitting donors"
            )
        if self.n_top_genes is not None and keep.size > self.n_top_genes:
            var = np.log1p(cpm[:, keep]).var(axis=0)
            keep = np.sort(keep[np.argsort(-var, kind="stable")[: self.n_top_genes]])
        self.genes_ = keep
        x_both = self.features(both)
        x_tr, x_va = x_both[: len(y)], x_both[len(y) :] if has_val else None
        sel = _choose_c(
            self._make,
            x_tr,
            y,
            x_va,
            y_validation if has_val else None,
            self.Cs,
            self.n_classes,
            self.ordered,
        )
        self.C_, self.validation_scores_ = sel.C, sel.scores
        self.model_ = self._make(sel.C).fit(x_both, y_both)
        return self

    def predict_proba(self, sums: np.ndarray) -> np.ndarray:
        """``(n_donors, K)`` class probabilities of summed counts."""
        return self.model_.predict_proba(self.features(sums))

    def predict(self, sums: np.ndarray) -> np.ndarray:
        """``(n_donors,)`` predicted codes (median class for ordered labels)."""
        return _predict_from_proba(self.predict_proba(sums), self.ordered)


class CellLogisticRegression:
    """Logistic regression of cells on log-normalised counts (see the module docstring).

    Parameters
    ----------
    n_classes, ordered, Cs, max_iter, seed
        As for :class:`PseudobulkLogisticRegression` (``C`` chosen by validation QWK for
        ordered labels, balanced accuracy otherwise; predictions are the most probable class).
    n_top_genes
        Genes used: the most variable (log-normalised) over the training cells read.
    max_cells
        Most training cells read (a seeded random sample); validation cells: a quarter of it.
    """

    def __init__(
        self,
        n_classes: int,
        *,
        ordered: bool = False,
        Cs: Sequence[float] = DEFAULT_CS,
        n_top_genes: int = 2000,
        max_cells: int = 20_000,
        max_iter: int = 1000,
        seed: int = 0,
    ) -> None:
        if not Cs or any(not c > 0 for c in Cs):
            raise ValueError(f"Cs must be positive numbers, got {list(Cs)}")
        for name, value in (("n_top_genes", n_top_genes), ("max_cells", max_cells)):
            if not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.n_classes, self.ordered = int(n_classes), bool(ordered)
        self.Cs, self.n_top_genes, self.max_cells = (
            tuple(float(c) for c in Cs),
            n_top_genes,
            max_cells,
        )
        self.max_iter, self.seed = max_iter, seed

    def _make(self, c: float) -> _Logistic:
        return _Logistic(c, self.n_classes, False, self.max_iter, self.seed)

    def _sample(self, rows: np.ndarray, y: np.ndarray, n: int, salt: int) -> tuple[Any, Any]:
        rows = np.asarray(rows, np.int64)
        y = np.asarray(y, np.int64)
        if rows.size > n:
            pick = np.random.default_rng([self.seed, salt]).choice(rows.size, n, replace=False)
            rows, y = rows[pick], y[pick]
        order = np.argsort(rows, kind="stable")
        return rows[order], y[order]

    def fit(
        self,
        adata: Any,
        rows: np.ndarray,
        y: np.ndarray,
        validation_rows: np.ndarray | None = None,
        y_validation: np.ndarray | None = None,
        *,
        layer: str | None = None,
        use_raw: bool = False,
    ) -> CellLogisticRegression:
        """Fit on the cells ``rows`` of ``adata`` with label codes ``y``; choose ``C`` on the
        validation cells (without them ``C`` is the only value of ``Cs``, or 1)."""
        self.layer, self.use_raw = layer, use_raw
        rows, y = self._sample(rows, y, self.max_cells, 0)
        if rows.size == 0:
            raise ValueError("no training cells for the cell baseline")
        var = gene_variances(adata, rows, layer=layer, use_raw=use_raw)
        n_top = min(self.n_top_genes, int((var > 0).sum()) or var.size)
        self.genes_ = np.sort(np.argsort(-var, kind="stable")[:n_top])
        source = row_source(adata, layer, use_raw=use_raw)
        _, x_tr = _read_features(source, rows, self.genes_)
        x_va, y_va = None, None
        if validation_rows is not None and len(validation_rows):
            vrows, y_va = self._sample(
                validation_rows, y_validation, max(1, self.max_cells // 4), 1
            )
            _, x_va = _read_features(source, vrows, self.genes_)
        sel = _choose_c(
            self._make,
            x_tr,
            y,
            x_va,
            y_va,
            self.Cs,
            self.n_classes,
            self.ordered,
        )
        self.C_, self.validation_scores_ = sel.C, sel.scores
        self.model_ = self._make(sel.C).fit(x_tr, y)
        self.n_train_cells_ = int(rows.size)
        return self

    def predict_proba(self, adata: Any, rows: np.ndarray) -> np.ndarray:
        """``(len(rows), K)`` class probabilities of the cells ``rows`` (any order), read in
        chunks."""
        rows = np.asarray(rows, np.int64)
        source = row_source(adata, self.layer, use_raw=self.use_raw)
        out = np.zeros((rows.size, self.n_classes))
        order = np.argsort(rows, kind="stable")
        done = 0
        for chunk, block in source.iter_ranges(rows[order], _CHUNK_NNZ):
            x = log_normalized(block)[:, self.genes_].astype(np.float64)
            out[order[done : done + chunk.size]] = self.model_.predict_proba(x)
            done += chunk.size
        return out


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
    metrics = _metric_set(y[te], pred, len(classes), ordered)
    metrics["n_donors"] = int(te.sum())
    kind = "ordinal (Frank-Hall) " if clf.ordinal else ""
    return BaselineResult(
        name="pseudobulk",
        description=(
            f"pseudo-bulk {kind}logistic regression: per-donor summed counts -> CPM -> log1p, "
            f"{clf.genes_.size} genes with mean CPM >= {clf.min_cpm:g}, C={clf.C_:g} chosen on "
            f"{int(va.sum())} validation donors, fit on {int((tr | va).sum())} donors"
        ),
        cell_metrics=None,
        donor_metrics=metrics,
        donor_table=_table(names[te], y[te], proba, pred, classes, ordered),
        settings={
            "C": clf.C_,
            "validation_scores": {str(k): v for k, v in clf.validation_scores_.items()},
            "n_genes": int(clf.genes_.size),
            "min_cpm": clf.min_cpm,
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
    cell_m = _metric_set(t, pred, len(classes), ordered)
    cell_m["n_cells"] = int(ev.size)
    donor_m, table = None, None
    if donors is not None:
        d = np.asarray(donors).astype(str)[ev]
        agg = aggregate_by_donor(proba, d, method=donor_method)
        truth = _donor_truth(t, d).reindex(agg.index).to_numpy()
        dpred = agg["predicted"].to_numpy().astype(np.int64)
        donor_m = _metric_set(truth, dpred, len(classes), ordered)
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


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------

#: metrics shown in "model vs baseline" (those present in both)
_SHOWN = ("qwk", "accuracy", "balanced_accuracy", "macro_f1")


def _fmt(v: Any) -> str:
    return "nan" if v is None or not math.isfinite(v) else f"{v:.4f}"


@dataclasses.dataclass
class BaselineComparison:
    """The baselines of one evaluation (``evaluate(baseline=True)``), held by
    :class:`~cellfm_sc.metrics.EvaluationResult` as ``result.baseline``.

    Attributes
    ----------
    results
        ``{name: BaselineResult}``: ``"pseudobulk"`` (donor labels) and / or
        ``"cell_logistic_regression"`` (cell classifiers).
    notes
        Why a baseline was skipped or what limits it.
    """

    results: dict[str, BaselineResult] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def rows(self, model_metrics: dict[str, dict[str, float] | None]) -> list[dict[str, Any]]:
        """One row per (baseline, level, metric) scored by both: ``baseline``, ``level``,
        ``metric``, ``model``, ``baseline_value``, ``difference`` (model - baseline)."""
        out = []
        for name, res in self.results.items():
            for level, theirs in (("cell", res.cell_metrics), ("donor", res.donor_metrics)):
                ours = model_metrics.get(level)
                if not theirs or not ours:
                    continue
                for m in _SHOWN:
                    if m not in theirs or m not in ours:
                        continue
                    a, b = ours[m], theirs[m]
                    both = a is not None and b is not None and math.isfinite(a) and math.isfinite(b)
                    out.append(
                        {
                            "baseline": name,
                            "level": level,
                            "metric": m,
                            "model": a,
                            "baseline_value": b,
                            "difference": a - b if both else None,
                        }
                    )
        return out

    def to_dict(self, model_metrics: dict[str, dict[str, float] | None]) -> dict[str, Any]:
        """The ``baseline`` block of ``training_results.json``: ``results`` (each baseline's
        :meth:`BaselineResult.to_dict`), ``comparison`` (:meth:`rows`), ``notes``."""
        return to_plain(
            {
                "results": {k: v.to_dict() for k, v in self.results.items()},
                "comparison": self.rows(model_metrics),
                "notes": list(self.notes),
            }
        )

    def lines(self, model_metrics: dict[str, dict[str, float] | None]) -> list[str]:
        """The "model vs baseline" table, as lines of text."""
        lines: list[str] = []
        if self.results:
            lines.append("  model vs baseline (same split):")
        shown = self.rows(model_metrics)
        for name, res in self.results.items():
            lines.append(f"    {name}: {res.description}")
            for r in (r for r in shown if r["baseline"] == name):
                diff = "" if r["difference"] is None else f"  {r['difference']:+.4f}"
                lines.append(
                    f"      {r['level']} {r['metric']:<18} model {_fmt(r['model'])}  "
                    f"baseline {_fmt(r['baseline_value'])}{diff}"
                )
        lines.extend(f"  baseline: {n}" for n in self.notes)
        return lines


def _part(rows: np.ndarray, donors: np.ndarray | None, exclude: set[str]) -> np.ndarray:
    rows = np.asarray(rows, np.int64)
    if donors is None or not exclude:
        return rows
    return rows[~np.isin(donors[rows], list(exclude))]


def compare_on_split(
    adata: Any,
    labels: np.ndarray,
    *,
    train: np.ndarray,
    validation: np.ndarray,
    evaluate: np.ndarray,
    classes: Sequence[str],
    ordered: bool,
    donors: np.ndarray | None = None,
    cells: bool = True,
    layer: str | None = None,
    use_raw: bool = False,
    donor_method: str = "mean_probability",
    seed: int = 0,
) -> BaselineComparison:
    """Fit the baselines that match a model on its training (+ validation) cells and score
    them on the cells the model is scored on.

    ``cells=True`` (a cell classifier): :func:`cell_baseline`, with its donors scored as the
    model's are (``donor_method``) when ``donors`` are given. With ``donors`` and labels that
    are constant within every donor (donor-level labels such as ADNC), also
    :func:`pseudobulk_baseline`. Donors of the evaluated cells are left out of the fitting
    parts, so that a baseline never sees a scored donor. A baseline that cannot be fitted
    (a single class, no labelled cells ...) is skipped with a note.

    Parameters
    ----------
    adata
        AnnData holding every cell named by the parts (raw counts; in memory or backed).
    labels
        ``(n_obs,)`` label codes (-1: missing or unknown).
    train, validation, evaluate
        Cells of the model's split parts and the cells it was scored on.
    classes, ordered
        Class names and whether they are ordered.
    donors
        ``(n_obs,)`` donor of every cell, or None.
    cells
        Fit the cell baseline (False for a donor model: pseudo-bulk only).
    layer, use_raw
        Where the counts are.
    donor_method
        Aggregation of the cell baseline's cells to donors.
    seed
        Seed of the cell baseline's training-cell sample.
    """
    labels = np.asarray(labels, np.int64)
    d = None if donors is None else np.asarray(donors).astype(str)
    evaluate = np.asarray(evaluate, np.int64)
    exclude = set() if d is None else set(np.unique(d[evaluate]).tolist())
    train = _part(train, d, exclude)
    validation = _part(validation, d, exclude)
    out = BaselineComparison()
    where = {"layer": layer, "use_raw": use_raw}
    if cells:
        try:
            out.results["cell_logistic_regression"] = cell_baseline(
                adata,
                labels,
                train=train,
                validation=validation,
                evaluate=evaluate,
                classes=classes,
                ordered=ordered,
                donors=d,
                donor_method=donor_method,
                seed=seed,
                **where,
            )
        except ValueError as exc:
            out.notes.append(f"cell baseline skipped: {exc}")
    if d is not None:
        rows = np.concatenate([train, validation, evaluate])
        frame = pd.DataFrame({"d": d[rows], "y": labels[rows]})
        frame = frame[frame["y"] >= 0]
        constant = bool((frame.groupby("d")["y"].nunique() <= 1).all())
        if not constant:
            out.notes.append(
                "pseudo-bulk baseline skipped: the labels are not constant within donors"
            )
        else:
            try:
                out.results["pseudobulk"] = pseudobulk_baseline(
                    adata,
                    labels,
                    d,
                    train=train,
                    validation=validation,
                    test=evaluate,
                    classes=classes,
                    ordered=ordered,
                    ordinal=False,
                    **where,
                )
            except ValueError as exc:
                out.notes.append(f"pseudo-bulk baseline skipped: {exc}")
    return out
