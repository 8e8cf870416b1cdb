"""The donor model's evaluation: donor metrics with bootstrap intervals, cross-validation, the report."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pandas as pd
import torch

from cellfm_sc.data import DataSplit
from cellfm_sc.metrics._donor import donor_metrics
from cellfm_sc.model._donor_eval import (
    CrossValidationResult,
    DonorEvaluationResult,
    bootstrap_intervals,
    stratified_donor_folds,
)
from cellfm_sc.model.base import inference_args

__all__ = ["DonorEvaluationMixin"]


class DonorEvaluationMixin:
    """``evaluate``, ``cross_validate`` and the report facts of the donor model."""

    def evaluate(
        self,
        adata: Any | None = None,
        indices: Any = "test",
        n_bootstrap: int = 1000,
        confidence: float = 0.95,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        enable_progress_bar: bool = False,
        min_gene_coverage: float = 0.5,
        allow_untrained: bool = False,
        baseline: bool = True,
    ) -> DonorEvaluationResult:
        """Donor-level scores of held-out donors with bootstrap intervals over donors, beside
        the pseudo-bulk baseline.

        Parameters
        ----------
        adata
            Default: the model's AnnData (other data: matched to the split by obs name).
        indices
            ``"test"`` (default), ``"validation"``, ``"train"`` or cells; the donors of
            these cells are scored from these cells.
        n_bootstrap, confidence
            Donor resamples and the level of the percentile intervals (0: no intervals).
        allow_untrained
            Score a model never trained (random predictions); otherwise that is an
            :class:`~cellfm_sc.model.UntrainedModelError`, raised before anything else.
        baseline
            Also fit pseudo-bulk logistic regression
            (:class:`~cellfm_sc.baselines.PseudobulkLogisticRegression`: per-donor summed
            counts -> CPM -> log1p, ``C`` chosen on the validation donors) on the model's
            training + validation donors and score it on the same donors
            (``result.baseline``, printed as "model vs baseline"). One chunked pass over the
            cells, also of backed files. ``False`` skips it.

        Returns
        -------
        DonorEvaluationResult
            ``donor_metrics``: ``qwk`` and ``ordinal_mae`` (ordinal labels), ``accuracy``,
            ``balanced_accuracy``, ``macro_f1``, ``n_donors``; ``intervals`` per metric;
            ``donor_table``; per-cell ``predictions`` (with ``attention``); the cells'
            ``embedding``. Donors whose label the model does not know are not scored
            (``notes`` says which).
        """
        adata, res = self._infer(adata, indices, **inference_args(locals()))
        truth = self._donor_label_codes(adata, res.idx).reindex(res.donors).to_numpy()
        scored = (truth >= 0) & (res.pred >= 0)
        notes = []
        if not scored.all():
            notes.append(
                f"{int((~scored).sum())} donor(s) not scored (label unknown to the model or "
                f"missing, or no cell with counts): {res.donors[~scored][:10].tolist()}"
            )
        if not scored.any():
            raise ValueError("no donor with a known label and cells with counts: nothing to score")
        k = len(self.classes_)
        t, p = truth[scored], res.pred[scored]
        metrics = donor_metrics(t, p, k, self.ordinal_)
        intervals = bootstrap_intervals(t, p, k, self.ordinal_, n_bootstrap, confidence, self.seed)
        table = self._donor_frame(res)[scored]
        table.insert(0, "true", self._categorical(t))
        table = table[["true", "predicted", "n_cells", *[f"p_{c}" for c in self.classes_]]]
        # cells: each cell carries its donor's prediction
        where = pd.Index(res.donors).get_indexer(res.cell_donor)
        cell_ok = scored[where] & ~np.isnan(res.attention)
        cw = where[cell_ok]
        cells = pd.DataFrame(
            index=pd.Index(np.asarray(adata.obs_names)[res.idx[cell_ok]], name="obs_name")
        )
        cells["donor"] = res.cell_donor[cell_ok]
        cells["true"] = self._categorical(truth[cw])
        cells["predicted"] = self._categorical(res.pred[cw])
        cells["confidence"] = res.probs[cw].max(axis=1)
        cells["attention"] = res.attention[cell_ok]
        for j, c in enumerate(self.classes_):
            cells[f"p_{c}"] = res.probs[cw, j]
        cell_m = donor_metrics(truth[cw], res.pred[cw], k, self.ordinal_)
        cell_m["n_cells"] = cell_m.pop("n_donors")
        from cellfm_sc.metrics import confusion_matrix

        result = DonorEvaluationResult(
            cell_metrics=cell_m,
            donor_metrics=metrics,
            donor_table=table,
            confusion=confusion_matrix(truth[cw], res.pred[cw], n_classes=k),
            classes=list(self.classes_),
            ordinal=bool(self.ordinal_),
            predictions=cells,
            donor_method="mean_bag_logits",
            notes=notes,
            evaluated_on=indices if isinstance(indices, str) else "cells",
            embedding=res.emb[cell_ok],
            intervals=intervals,
            confidence_level=float(confidence),
            n_bootstrap=int(n_bootstrap),
        )
        if baseline:
            from cellfm_sc.model._baseline import split_baseline

            donors = self._donors(adata)
            label_of = self._donor_label_codes(adata, np.arange(adata.n_obs))
            codes = label_of.reindex(donors).fillna(-1).to_numpy().astype(np.int64)
            result.baseline = split_baseline(
                self, adata, res.idx[cell_ok], codes, donors, cells=False
            )
        return result

    def cross_validate(
        self,
        k: int = 5,
        n_bootstrap: int = 1000,
        confidence: float = 0.95,
        batch_size: int = 64,
        **train_kwargs: Any,
    ) -> CrossValidationResult:
        """Donor-level ``k``-fold cross-validation, folds stratified by label.

        Fold ``i``'s donors are the test donors of round ``i``; fold ``i + 1``'s donors
        validate (model selection), the others train. Every round starts from the model's
        current weights, and the model gets them back at the end (it is left as it was).

        Parameters
        ----------
        k
            Folds (>= 3: one tests, one validates, the rest train).
        n_bootstrap, confidence
            Bootstrap intervals of the pooled metrics.
        batch_size
            Inference batch size.
        **train_kwargs
            Passed to :meth:`train` (``max_epochs``, ``lr``, ...; not ``split``).

        Returns
        -------
        CrossValidationResult
            ``per_fold`` metrics, ``pooled`` metrics of all out-of-fold predictions with
            ``intervals``, and the out-of-fold ``donor_table``.
        """
        if "split" in train_kwargs:
            raise ValueError("cross_validate makes its own splits; do not pass split=")
        if not isinstance(k, int | np.integer) or k < 3:
            raise ValueError(f"k must be an integer >= 3 (test, validation, train), got {k!r}")
        adata = self.adata
        if adata is None or self.adata_manager is None:
            raise ValueError("cross_validate needs the model's set-up AnnData")
        all_idx = np.arange(adata.n_obs)
        per_donor = self._donor_label_codes(adata, all_idx)
        folds = stratified_donor_folds(per_donor.to_numpy(), int(k), self.seed)
        fold_of = pd.Series(folds, index=per_donor.index)
        cell_fold = fold_of.reindex(self._donors(adata)).to_numpy()
        saved = self._snapshot()
        rows, tables = [], []
        try:
            for i in range(int(k)):
                split = DataSplit(
                    train=np.flatnonzero((cell_fold != i) & (cell_fold != (i + 1) % k)),
                    validation=np.flatnonzero(cell_fold == (i + 1) % k),
                    test=np.flatnonzero(cell_fold == i),
                    donor_key=self.donor_key,
                )
                self._restore(saved, weights_only=True)
                self.train(split=split, **train_kwargs)
                res = self.evaluate(
                    indices="test", n_bootstrap=0, batch_size=batch_size, baseline=False
                )
                row = {
                    "fold": i,
                    "n_train": int((folds != i).sum() - (folds == (i + 1) % k).sum()),
                    "n_validation": int((folds == (i + 1) % k).sum()),
                    "n_test": int((folds == i).sum()),
                    "best_epoch": self.best_epoch_,
                    **{m: v for m, v in res.donor_metrics.items() if m != "n_donors"},
                }
                rows.append(row)
                table = res.donor_table.copy()
                table.insert(0, "fold", i)
                tables.append(table)
        finally:
            self._restore(saved, weights_only=False)
        donor_table = pd.concat(tables).sort_index()
        t = donor_table["true"].cat.codes.to_numpy()
        p = donor_table["predicted"].cat.codes.to_numpy()
        n_classes = len(self.classes_)
        return CrossValidationResult(
            per_fold=pd.DataFrame(rows),
            pooled=donor_metrics(t, p, n_classes, self.ordinal_),
            intervals=bootstrap_intervals(
                t, p, n_classes, self.ordinal_, n_bootstrap, confidence, self.seed
            ),
            donor_table=donor_table,
            confidence_level=float(confidence),
        )

    def _snapshot(self) -> dict[str, Any]:
        return {
            "state": {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()},
            "attrs": {
                name: copy.deepcopy(getattr(self, name, None))
                for name in (
                    "history_",
                    "step_history_",
                    "best_epoch_",
                    "best_score_",
                    "train_settings_",
                    "split_",
                    "split_names_",
                    "is_trained_",
                )
            },
            "indices": {
                name: getattr(self, name, None)
                for name in ("train_indices_", "validation_indices_", "test_indices_")
            },
        }

    def _restore(self, saved: dict[str, Any], weights_only: bool) -> None:
        with torch.no_grad():
            for key, value in self.module.state_dict().items():
                value.copy_(saved["state"][key])
        if weights_only:
            return
        for name, value in {**saved["attrs"], **saved["indices"]}.items():
            setattr(self, name, value)

    # ----------------------------------------------------------------- reporting
    def report_info(self) -> dict[str, Any]:
        """Run facts for :func:`cellfm_sc.report.write_report` (``info=``)."""
        return {
            "level": "donor",
            **self._report_facts(
                bag_size=self.bag_size,
                pooling=self.pooling_,
                loss=self.loss_,
                cell_view=self.cell_view_,
                expression_genes=self.expression_genes_,
            ),
        }

    @property
    def summary(self) -> str:
        lines = self._summary_lines("pretrained", "no pretrained weights")
        kind = "ordinal" if self.ordinal_ else "categorical"
        lines.append(
            f"  labels: {self.labels_key!r} ({len(self.classes_)} {kind} classes), donors: "
            f"{self.donor_key!r}"
        )
        view = {
            "both": f"trunk embedding + expression view of {self.expression_genes_} genes",
            "trunk": "trunk embedding",
            "expression": f"expression view of {self.expression_genes_} genes (no trunk)",
        }[self.cell_view_]
        lines.append(
            f"  bags of <= {self.bag_size} cells ({view}), {self.pooling_} pooling, "
            f"loss {self.loss_}"
        )
        lines.append(f"  {self.trainable_summary}")
        return "\n".join(lines)
