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
  ``min_cpm`` (10 or 100) and ``C`` chosen on the validation donors and refit on training +
  validation donors. For
  ordered labels ``ordinal=True`` fits the ordinal variant (Frank and Hall 2001: one binary
  logistic regression per threshold ``y > k``; the prediction is the median class).

Both read in-memory or backed (``backed="r"``) AnnData through the data path's row reader,
in chunks of bounded size: the pseudo-bulk sums are one sparse indicator product per chunk
(``(n_donors, chunk) @ (chunk, n_genes)``) and the cells x genes matrix is never densified.

:func:`pseudobulk_baseline` and :func:`cell_baseline` fit and score one baseline on the
parts of a split; they return a :class:`BaselineResult`. :func:`compare_on_split` fits those
that match a model and returns a :class:`BaselineComparison`, which the models'
``evaluate(baseline=True)`` attach to their result (``result.baseline``).

The modules: ``_read`` (sums, normalisation, gene variances), ``_estimators`` (the two
logistic regressions), ``_split`` (fit and score one baseline on a split) and ``_report``
(:func:`compare_on_split`, :class:`BaselineComparison`); import the names from
``cellfm_sc.baselines``.
"""

from cellfm_sc.baselines._estimators import (
    DEFAULT_CS,
    CellLogisticRegression,
    PseudobulkLogisticRegression,
)
from cellfm_sc.baselines._read import (
    gene_moments,
    gene_variances,
    log_cpm,
    log_normalized,
    pseudobulk,
    top_variable_genes,
)
from cellfm_sc.baselines._report import BaselineComparison, compare_on_split
from cellfm_sc.baselines._split import BaselineResult, cell_baseline, pseudobulk_baseline

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
