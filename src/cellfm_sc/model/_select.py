"""``select_level``: which level learns a donor label best, decided on the training donors only.

For a label that belongs to donors (ADNC stage ...), three ways to predict it compete by an
inner cross-validation over the training donors (folds stratified by label; fold ``i`` tests,
fold ``i + 1`` validates, the others train, as in
:meth:`~cellfm_sc.model.CellFMDonorClassifier.cross_validate`):

* ``"donor"``: :class:`~cellfm_sc.model.CellFMDonorClassifier` (bags of cells);
* ``"cell"``: :class:`~cellfm_sc.model.CellFMClassifier` on cells carrying their donor's
  label, donors scored by the mean of their cells' probabilities;
* ``"pseudobulk"``: :class:`~cellfm_sc.baselines.PseudobulkLogisticRegression`.

Every training donor is predicted once, out of fold; the level with the best pooled score
(QWK for ordered labels, balanced accuracy otherwise) wins. Held-out (test) donors are never
read: pass the training + validation cells as ``indices``.
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

from cellfm_sc._json import to_plain
from cellfm_sc.data import DataSplit, obs_column

__all__ = ["LEVELS", "LevelSelection", "select_level"]

#: the levels :func:`~cellfm_sc.model.select_level` compares (ties go to the earlier one: the cheaper model)
LEVELS: tuple[str, ...] = ("pseudobulk", "donor", "cell")


@dataclasses.dataclass
class LevelSelection:
    """The result of :func:`~cellfm_sc.model.select_level`.

    Attributes
    ----------
    winner
        The level with the best pooled out-of-fold score.
    scores
        Pooled out-of-fold score of every level compared.
    metric
        ``"qwk"`` (ordered labels) or ``"balanced_accuracy"``.
    margin
        The winner's score minus the runner-up's (``nan`` with one level).
    per_fold
        One row per (level, fold): ``level``, ``fold``, ``n_test``, ``score``, ``seconds``.
    donor_table
        Out-of-fold predictions: index ``donor``; ``fold``, ``true``, then ``<level>`` (the
        predicted class code) per level.
    k, n_donors
        Folds and donors of the inner cross-validation.
    """

    winner: str
    scores: dict[str, float]
    metric: str
    margin: float
    per_fold: pd.DataFrame
    donor_table: pd.DataFrame
    k: int
    n_donors: int

    def best_of(self, levels: Sequence[str]) -> str:
        """The best of ``levels`` (e.g. the CellFM levels ``("donor", "cell")``)."""
        present = [lv for lv in LEVELS if lv in levels and lv in self.scores]
        if not present:
            raise ValueError(f"none of {list(levels)} was compared ({list(self.scores)})")
        return max(present, key=lambda lv: (_finite(self.scores[lv]), -present.index(lv)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (no donor table)."""
        return to_plain(
            {
                "winner": self.winner,
                "metric": self.metric,
                "scores": dict(self.scores),
                "margin": self.margin,
                "k": self.k,
                "n_donors": self.n_donors,
                "per_fold": self.per_fold.to_dict(orient="records"),
            }
        )

    def __str__(self) -> str:
        lines = [
            f"level selection: inner {self.k}-fold cross-validation on {self.n_donors} "
            f"training donors, pooled out-of-fold {self.metric}"
        ]
        for level, score in sorted(self.scores.items(), key=lambda kv: -_finite(kv[1])):
            mark = "  <- winner" if level == self.winner else ""
            lines.append(f"  {level:<11} {score:.4f}{mark}")
        if math.isfinite(self.margin):
            lines.append(f"  {self.winner} wins by {self.margin:.4f}")
        return "\n".join(lines)


def _finite(x: float) -> float:
    return x if x is not None and math.isfinite(x) else -math.inf


def _score(t: np.ndarray, p: np.ndarray, k: int, ordinal: bool) -> float:
    from cellfm_sc.metrics import balanced_accuracy, quadratic_weighted_kappa

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = quadratic_weighted_kappa(t, p, n_classes=k) if ordinal else balanced_accuracy(t, p)
    return float(s)


def select_level(
    adata: Any,
    labels_key: str,
    donor_key: str,
    *,
    label_order: Sequence[str] | None = None,
    indices: Any = None,
    levels: Sequence[str] = LEVELS,
    k: int = 5,
    layer: str | None = None,
    use_raw: bool = False,
    gene_symbols: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    donor_kwargs: dict[str, Any] | None = None,
    cell_kwargs: dict[str, Any] | None = None,
    train_kwargs: dict[str, Any] | None = None,
    donor_train_kwargs: dict[str, Any] | None = None,
    cell_train_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
) -> LevelSelection:
    """Compare the donor model, the cell classifier + mean aggregation and pseudo-bulk by an
    inner donor cross-validation, and name the winner.

    Parameters
    ----------
    adata
        AnnData with raw counts (in memory or backed). It is set up for the model classes
        (``setup_anndata``) as a side effect; nothing else is written into it.
    labels_key, donor_key, label_order
        The donor-level label, the donors, and the class order (ordered labels: QWK).
    indices
        Cells whose donors take part (positions or a boolean mask): the training +
        validation cells of the outer split. Default: every cell.
    levels
        Which of ``"pseudobulk"``, ``"donor"``, ``"cell"`` compete.
    k
        Inner folds (>= 3: one tests, one validates, the rest train).
    layer, use_raw, gene_symbols
        Where the counts are (as in ``setup_anndata``).
    model_kwargs
        Keywords of both model classes (``preset``, ``checkpoint``, ``max_tokens`` ...).
    donor_kwargs, cell_kwargs
        Keywords of :class:`~cellfm_sc.model.CellFMDonorClassifier` /
        :class:`~cellfm_sc.model.CellFMClassifier` only.
    train_kwargs, donor_train_kwargs, cell_train_kwargs
        ``train()`` keywords of both / of one model class (``max_epochs`` ...).
    seed
        Seed of the folds and the models.

    Returns
    -------
    LevelSelection

    Examples
    --------
    >>> sel = select_level(adata, "ADNC", "Donor ID", label_order=order,
    ...                    indices=train_and_validation, model_kwargs={"preset": "tiny"})  # doctest: +SKIP
    >>> sel.winner, sel.scores  # doctest: +SKIP
    """
    from cellfm_sc.model._classifier import CellFMClassifier
    from cellfm_sc.model._donor import CellFMDonorClassifier

    levels = list(dict.fromkeys(levels))
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad or not levels:
        raise ValueError(f"levels must be among {LEVELS}, got {list(levels)}")
    if not isinstance(k, int | np.integer) or isinstance(k, bool) or k < 3:
        raise ValueError(f"k must be an integer >= 3 (test, validation, train), got {k!r}")
    folds = _InnerFolds.build(adata, labels_key, donor_key, label_order, indices, int(k), seed)
    setup = {"layer": layer, "use_raw": use_raw, "gene_symbols": gene_symbols}
    fits = {
        "donor": (CellFMDonorClassifier, donor_kwargs, donor_train_kwargs),
        "cell": (CellFMClassifier, cell_kwargs, cell_train_kwargs),
    }
    base = {"seed": seed, **(model_kwargs or {})}
    train_base = {"enable_progress_bar": False, "logger": False, **(train_kwargs or {})}
    preds: dict[str, pd.Series] = {}
    rows_out = []
    for level in levels:
        if level in fits:
            fits[level][0].setup_anndata(
                adata, labels_key=labels_key, donor_key=donor_key, label_order=label_order, **setup
            )
        got = []
        for i in range(int(k)):
            split = folds.split(i, donor_key)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                if level == "pseudobulk":
                    table = folds.pseudobulk_table(adata, split, layer, use_raw)
                else:
                    cls, kwargs, train_extra = fits[level]
                    model = cls(adata, **base, **(kwargs or {}))
                    model.train(split=split, **train_base, **(train_extra or {}))
                    extra = {"n_bootstrap": 0} if level == "donor" else {}
                    table = model.evaluate(baseline=False, **extra).donor_table
            pred = pd.Series(table["predicted"].cat.codes.to_numpy(), index=table.index.astype(str))
            got.append(pred)
            rows_out.append(
                {
                    "level": level,
                    "fold": i,
                    "n_test": int(pred.size),
                    "score": folds.score(folds.per_donor.reindex(pred.index).to_numpy(), pred),
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            )
        preds[level] = pd.concat(got)
    return folds.selection(preds, levels, pd.DataFrame(rows_out))


@dataclasses.dataclass
class _InnerFolds:
    """The labelled donors of :func:`select_level` and their stratified inner folds."""

    rows: np.ndarray
    codes: np.ndarray
    donors: np.ndarray
    classes: list[str]
    ordinal: bool
    per_donor: pd.Series
    folds: pd.Series
    cell_fold: np.ndarray
    k: int

    @classmethod
    def build(
        cls,
        adata: Any,
        labels_key: str,
        donor_key: str,
        label_order: Sequence[str] | None,
        indices: Any,
        k: int,
        seed: int,
    ) -> _InnerFolds:
        from cellfm_sc.model._donor import check_donor_labels
        from cellfm_sc.model._donor_eval import stratified_donor_folds
        from cellfm_sc.model.base._model import _categories

        labels = obs_column(adata, labels_key, keyword="labels_key")
        donors = obs_column(adata, donor_key, keyword="donor_key").astype(str).to_numpy()
        check_donor_labels(pd.Series(donors), labels, labels_key=labels_key, donor_key=donor_key)
        classes, ordinal = _categories(labels, label_order)
        codes = pd.Categorical(labels.astype(str), categories=classes).codes.astype(np.int64)
        codes[labels.isna().to_numpy()] = -1
        if indices is None:
            rows = np.arange(adata.n_obs)
        else:
            idx = np.asarray(indices)
            rows = np.flatnonzero(idx) if idx.dtype == bool else np.sort(idx.astype(np.int64))
        rows = rows[codes[rows] >= 0]
        per_donor = pd.Series(codes[rows], index=donors[rows]).groupby(level=0).first()
        if len(per_donor) < k:
            raise ValueError(
                f"select_level needs at least k={k} labelled donors, got {len(per_donor)}"
            )
        folds = pd.Series(
            stratified_donor_folds(per_donor.to_numpy(), k, seed), index=per_donor.index
        )
        cell_fold = folds.reindex(donors[rows]).to_numpy()
        return cls(
            rows, codes, donors, list(classes), bool(ordinal), per_donor, folds, cell_fold, k
        )

    def split(self, i: int, donor_key: str) -> DataSplit:
        """Fold ``i`` tests, fold ``i + 1`` validates, the rest train."""
        nxt = (i + 1) % self.k
        return DataSplit(
            train=self.rows[(self.cell_fold != i) & (self.cell_fold != nxt)],
            validation=self.rows[self.cell_fold == nxt],
            test=self.rows[self.cell_fold == i],
            donor_key=donor_key,
        )

    def pseudobulk_table(
        self, adata: Any, split: DataSplit, layer: str | None, use_raw: bool
    ) -> pd.DataFrame:
        from cellfm_sc.baselines import pseudobulk_baseline

        return pseudobulk_baseline(
            adata, self.codes, self.donors, train=split.train, validation=split.validation,
            test=split.test, classes=self.classes, ordered=self.ordinal, layer=layer,
            use_raw=use_raw,
        ).donor_table  # fmt: skip

    def score(self, truth: np.ndarray, pred: pd.Series | np.ndarray) -> float:
        return _score(truth, np.asarray(pred), len(self.classes), self.ordinal)

    def selection(
        self, preds: dict[str, pd.Series], levels: list[str], per_fold: pd.DataFrame
    ) -> LevelSelection:
        """Pooled out-of-fold scores, the winner and its margin."""
        table = pd.DataFrame({"fold": self.folds, "true": self.per_donor})
        table.index.name = "donor"
        scores = {}
        for level, pred in preds.items():
            table[level] = pred.reindex(table.index)
            ok = table[level].notna().to_numpy()
            scores[level] = self.score(
                table["true"].to_numpy()[ok], table[level].to_numpy()[ok].astype(np.int64)
            )
        order = sorted(levels, key=lambda lv: (-_finite(scores[lv]), LEVELS.index(lv)))
        winner = order[0]
        margin = (
            _finite(scores[winner]) - _finite(scores[order[1]]) if len(order) > 1 else float("nan")
        )
        return LevelSelection(
            winner=winner,
            scores=scores,
            metric="qwk" if self.ordinal else "balanced_accuracy",
            margin=float(margin) if math.isfinite(margin) else float("nan"),
            per_fold=per_fold,
            donor_table=table,
            k=self.k,
            n_donors=len(self.per_donor),
        )
