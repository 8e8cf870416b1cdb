"""A probe of pretraining: how well do the trunk's cell embeddings separate labelled cells?

:class:`EmbeddingProbe` embeds a few labelled cells with the trunk (the cls token, no masking)
and scores a simple classifier on the embeddings: k nearest neighbours (default) or logistic
regression, macro-F1 by stratified cross-validation over the probe cells, or trained on the
probe cells and scored on other cells (``test=``: another condition, donor group or lab).
:class:`~cellfm_sc.model.CellFMPretrainer` runs it before training and after every epoch
(``train(probe=...)``), so ``history["probe_macro_f1"]`` shows when pretraining starts to
help, next to the masked loss that says nothing about it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch

from cellfm_sc._constants import PROBE_METHODS
from cellfm_sc.data import check_counts, obs_column

__all__ = ["EmbeddingProbe", "probe_score"]


def _codes(labels: pd.Series, classes: list[str] | None) -> tuple[np.ndarray, list[str]]:
    text = labels.astype(object).where(labels.notna(), None)
    if classes is None:
        classes = sorted({str(v) for v in text if v is not None})
    lookup = {c: i for i, c in enumerate(classes)}
    codes = np.asarray([lookup.get(str(v), -1) if v is not None else -1 for v in text], np.int64)
    return codes, classes


def probe_score(
    fit_x: np.ndarray,
    fit_y: np.ndarray,
    test_x: np.ndarray | None = None,
    test_y: np.ndarray | None = None,
    *,
    method: str = "knn",
    n_neighbors: int = 15,
    folds: int = 5,
    seed: int = 0,
) -> float:
    """Macro-F1 of a kNN or logistic-regression probe on embeddings.

    Parameters
    ----------
    fit_x, fit_y
        ``(n, D)`` embeddings and ``(n,)`` class codes of the probe cells.
    test_x, test_y
        Cells to score (fit on all probe cells); default: stratified ``folds``-fold
        cross-validation over the probe cells.
    method
        ``"knn"`` (cosine distance, ``n_neighbors``) or ``"logreg"`` (standardised
        embeddings, L2-regularised logistic regression).

    Returns
    -------
    Macro-F1 over the classes of ``fit_y`` (:func:`cellfm_sc.metrics.macro_f1`).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from cellfm_sc.metrics import macro_f1

    if method not in PROBE_METHODS:
        raise ValueError(f"probe method must be one of {PROBE_METHODS}, got {method!r}")
    if not (np.isfinite(fit_x).all() and (test_x is None or np.isfinite(test_x).all())):
        return math.nan  # a diverged trunk: nothing to score

    def make(n_fit: int) -> Any:
        if method == "knn":
            k = max(1, min(int(n_neighbors), n_fit - 1))
            return KNeighborsClassifier(n_neighbors=k, metric="cosine")
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, C=1.0))

    labels = np.unique(fit_y).tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few cells of a class, convergence notes
        if test_x is not None:
            clf = make(len(fit_y)).fit(fit_x, fit_y)
            return macro_f1(test_y, clf.predict(test_x), labels=labels)
        counts = np.bincount(fit_y)
        n_splits = int(max(2, min(folds, counts[counts > 0].max())))
        pred = np.empty_like(fit_y)
        cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        for train, held in cv.split(fit_x, fit_y):
            pred[held] = make(len(train)).fit(fit_x[train], fit_y[train]).predict(fit_x[held])
    return macro_f1(fit_y, pred, labels=labels)


class EmbeddingProbe:
    """Labelled cells that score a trunk's cell embeddings (macro-F1 of a simple classifier).

    Parameters
    ----------
    adata
        AnnData with raw counts and labels (in memory or backed). Its genes are mapped onto
        the model's vocabulary as for inference (counts are read where the model's first
        corpus member has them, or with the AnnData's own ``setup_anndata`` settings).
    labels_key
        ``obs`` column with the labels (cells without a label are left out).
    test
        Optional second AnnData (same ``labels_key``): the probe is then trained on
        ``adata``'s cells and scored on ``test``'s, e.g. another condition or lab, so the
        curve shows whether pretraining helps across a shift. Default: stratified
        cross-validation within ``adata``.
    method
        ``"knn"`` (default: k nearest neighbours, cosine distance) or ``"logreg"``.
    n_neighbors, folds
        kNN neighbours; cross-validation folds.
    max_cells
        Most cells used from each AnnData (a random subset beyond; the probe runs after
        every epoch, so it should cost seconds).
    batch_size
        Cells per inference batch.
    seed
        Seed of the subset and of the folds.

    Examples
    --------
    >>> probe = EmbeddingProbe(labelled, "cell_type", max_cells=1000)  # doctest: +SKIP
    >>> pretrainer.train(max_epochs=10, probe=probe)  # doctest: +SKIP
    >>> pretrainer.history[["epoch", "validation_loss", "probe_macro_f1"]]  # doctest: +SKIP
    """

    def __init__(
        self,
        adata: Any,
        labels_key: str,
        test: Any = None,
        method: str = "knn",
        n_neighbors: int = 15,
        folds: int = 5,
        max_cells: int = 2000,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        if method not in PROBE_METHODS:
            raise ValueError(f"probe method must be one of {PROBE_METHODS}, got {method!r}")
        for name, value, low in (
            ("n_neighbors", n_neighbors, 1),
            ("folds", folds, 2),
            ("max_cells", max_cells, 2),
            ("batch_size", batch_size, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"probe {name} must be an integer >= {low}, got {value!r}")
        self.adata, self.test = adata, test
        self.labels_key = labels_key
        self.method = method
        self.n_neighbors, self.folds = int(n_neighbors), int(folds)
        self.max_cells, self.batch_size, self.seed = int(max_cells), int(batch_size), int(seed)
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, 0x9B0E])
        codes, self.classes = _codes(obs_column(adata, labels_key, keyword="labels_key"), None)
        if len(self.classes) < 2:
            raise ValueError(
                f"the probe needs at least 2 classes in obs[{labels_key!r}], found {self.classes}"
            )
        self.rows, self.codes = self._subset(codes, rng)
        self.test_rows = self.test_codes = None
        if test is not None:
            labels = obs_column(test, labels_key, keyword="labels_key")
            test_codes, _ = _codes(labels, self.classes)
            if (test_codes < 0).all():
                raise ValueError(
                    f"no cell of the probe's test data has a label of the probe's classes "
                    f"{self.classes} in obs[{labels_key!r}]"
                )
            self.test_rows, self.test_codes = self._subset(test_codes, rng)

    def _subset(self, codes: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        rows = np.flatnonzero(codes >= 0)
        if rows.size > self.max_cells:
            rows = np.sort(rng.choice(rows, self.max_cells, replace=False))
        return rows.astype(np.int64), codes[rows]

    def describe(self) -> dict[str, Any]:
        """The probe's settings (for ``train_settings_``)."""
        return {
            "labels_key": self.labels_key,
            "method": self.method,
            "n_neighbors": self.n_neighbors,
            "folds": None if self.test is not None else self.folds,
            "n_cells": int(self.rows.size),
            "n_test_cells": None if self.test_rows is None else int(self.test_rows.size),
            "classes": list(self.classes),
        }

    # -- binding to a model (gene ids, where the counts are)
    def bind(
        self,
        reading: Callable[[Any], dict[str, Any]],
        gene_id_map: Callable[[Any], np.ndarray | None],
        max_tokens: int,
        token_seed: int = 0,
    ) -> None:
        """Check the cells and fix how they are read: ``reading(adata)`` gives the loader's
        ``layer`` / ``use_raw``, ``gene_id_map(adata)`` the token ids of its genes; cells
        with more than ``max_tokens`` genes get the model's evaluation draw (``token_seed``),
        so the probe sees the embeddings inference gives."""
        self._sources = []
        for adata, rows in ((self.adata, self.rows), (self.test, self.test_rows)):
            if adata is None:
                continue
            kwargs = reading(adata)
            check_counts(adata, indices=rows, full=True, forbid_empty=True, **kwargs)
            self._sources.append((adata, rows, gene_id_map(adata), kwargs))
        self.max_tokens = int(max_tokens)
        self.token_seed = int(token_seed)

    @torch.no_grad()
    def _embed(
        self, trunk: torch.nn.Module, adata: Any, rows: np.ndarray, ids: Any, kwargs: dict
    ) -> np.ndarray:
        from cellfm_sc.model.base._inference import eval_loader

        device = next(trunk.parameters()).device
        out = np.full((rows.size, trunk.config.enc_dims), np.nan, np.float32)
        position = {int(r): i for i, r in enumerate(rows)}
        loader = eval_loader(
            adata, rows, self.batch_size, self.max_tokens, self.token_seed, ids, **kwargs
        )
        for batch in loader:
            batch = batch.to(device)
            cls = trunk(batch.values, batch.gene_ids, batch.valid).cls
            at = [position[int(r)] for r in batch.obs_index.tolist()]
            out[at] = cls.float().cpu().numpy()
        return out

    def score(self, trunk: torch.nn.Module) -> float:
        """Macro-F1 of the probe on ``trunk``'s embeddings (the trunk's mode is restored)."""
        if not getattr(self, "_sources", None):
            raise RuntimeError("EmbeddingProbe.score before bind(): pass it to train(probe=)")
        was_training = trunk.training
        trunk.eval()
        try:
            embs = [self._embed(trunk, a, r, ids, kw) for a, r, ids, kw in self._sources]
        finally:
            trunk.train(was_training)
        return probe_score(
            embs[0],
            self.codes,
            embs[1] if len(embs) > 1 else None,
            self.test_codes,
            method=self.method,
            n_neighbors=self.n_neighbors,
            folds=self.folds,
            seed=self.seed,
        )
