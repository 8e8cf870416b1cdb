"""The classifier's evaluation: cell and donor metrics on held-out cells, the report facts."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cellfm_sc.data import obs_column
from cellfm_sc.model.base import inference_args

__all__ = ["ClassifierEvaluationMixin"]


class ClassifierEvaluationMixin:
    """``evaluate``, ``report_info`` and ``summary`` of :class:`~cellfm_sc.model.CellFMClassifier`."""

    def evaluate(
        self,
        adata: Any | None = None,
        indices: Any = "test",
        batch_size: int = 64,
        donor_method: str = "mean_probability",
        device: str | torch.device | None = None,
        enable_progress_bar: bool = False,
        min_gene_coverage: float = 0.5,
        allow_untrained: bool = False,
        baseline: bool = True,
    ):
        """Cell- and donor-level metrics on held-out cells, beside the baselines.

        Parameters
        ----------
        adata
            Default: the model's AnnData. Other data are matched to the saved split by obs
            name (an error when the split's cells are not all there).
        indices
            ``"test"`` (default), ``"validation"``, ``"train"``, or cells (positions, a
            boolean mask or obs names). With no test cells, ``"test"`` is an error: the
            validation cells chose the model, so their score is optimistic; pass
            ``indices="validation"`` knowingly.
        batch_size, device, enable_progress_bar
            Inference settings (a progress bar over the cells on stderr).
        donor_method
            How a donor's cells are aggregated (see :func:`~cellfm_sc.metrics.aggregate_by_donor`).
        allow_untrained
            Score a model that was never trained (random predictions, e.g. as a floor);
            otherwise that is an :class:`~cellfm_sc.model.UntrainedModelError`, raised
            before anything else is checked.
        baseline
            Also fit the baselines on the model's training (+ validation) cells and score
            them on the same cells (``result.baseline``, printed as "model vs baseline"):
            logistic regression on log-normalised counts
            (:class:`~cellfm_sc.baselines.CellLogisticRegression`), and with donor-level labels
            pseudo-bulk logistic regression
            (:class:`~cellfm_sc.baselines.PseudobulkLogisticRegression`). Chunked reads, also
            of backed files; seconds to a few minutes on large data. ``False`` skips them.

        Returns
        -------
        EvaluationResult
            Accuracy, balanced accuracy, macro/weighted F1; QWK, ordinal MAE and Spearman
            for ordinal labels; the per-donor table when a ``donor_key`` was registered; the
            cells' embedding (``result.embedding``); the baselines (``result.baseline``).
            Cells whose label the model does not know (or is missing) are not scored;
            ``result.notes`` says how many.
        """
        from cellfm_sc.metrics import evaluate_predictions

        adata, idx, probs, emb = self._infer(adata, indices, **inference_args(locals()))
        all_codes = self._label_codes(adata, strict=False)
        codes = all_codes[idx]
        known = (codes >= 0) & ~np.isnan(probs[:, 0])
        notes = []
        if not known.all():
            labels = obs_column(adata, self.labels_key, keyword="labels_key", allow_missing=True)
            unknown = labels.iloc[idx[~known]].astype(str)
            counts = unknown.value_counts()
            shown = ", ".join(f"{k} ({v})" for k, v in counts.head(10).items())
            notes.append(
                f"{int((~known).sum())} cell(s) not scored: label unknown to the model, missing, "
                f"or no counts: {shown}"
            )
            if not known.any():
                raise ValueError(
                    f"none of the {len(idx)} cells has a label the model knows "
                    f"({self.classes_}): nothing to score"
                )
        donors = self._donors(adata)
        result = evaluate_predictions(
            probs[known],
            codes[known],
            list(self.classes_),
            obs_names=np.asarray(adata.obs_names[idx[known]]),
            donors=None if donors is None else donors[idx[known]],
            ordinal=bool(self.ordinal_),
            donor_method=donor_method,
        )
        result.notes.extend(notes)
        result.embedding = emb[known]
        result.evaluated_on = indices if isinstance(indices, str) else "cells"
        if baseline:
            from cellfm_sc.model._baseline import split_baseline

            result.baseline = split_baseline(
                self, adata, idx[known], all_codes, donors, cells=True, donor_method=donor_method
            )
        return result

    # ----------------------------------------------------------------- reporting
    def report_info(self) -> dict[str, Any]:
        """Run facts for :func:`cellfm_sc.report.write_report` (``info=``)."""
        report = self.pretrained_report_ or {}
        return self._report_facts(
            gene_embedding_shape=list(self.module.trunk.gene_emb.shape),
            checkpoint_variant=report.get("variant"),
            embedding_coverage=report.get("coverage"),
            best_validation_acc=self._history_at_best("validation_acc"),
        )

    def _history_at_best(self, column: str) -> float | None:
        hist = self.history_
        if hist is None or self.best_epoch_ is None or column not in hist:
            return None
        rows = hist.loc[hist["epoch"] == self.best_epoch_, column]
        return None if rows.empty else float(rows.iloc[-1])

    @property
    def summary(self) -> str:
        """A few lines on the model (pretrained or random trunk, gene coverage, what trains)."""
        rep = self.pretrained_report_
        lines = self._summary_lines("pretrained", "no pretrained weights")
        emb = tuple(self.module.trunk.gene_emb.shape)
        line = f"  vocabulary: {self.vocab.n_genes:,} genes, gene_emb {emb}, init '{self.embedding_init_}'"
        if rep is not None and rep.get("coverage") is not None:
            line += (
                f", coverage {rep['n_mapped']:,}/{self.vocab.n_genes:,} "
                f"({100 * rep['coverage']:.1f}%)"
            )
        lines.append(line)
        kind = "ordinal" if self.ordinal_ else "categorical"
        lines.append(f"  labels: {self.labels_key!r}, {len(self.classes_)} {kind} classes")
        if self.donor_key:
            lines.append(f"  donors: {self.donor_key!r}")
        lines.append(f"  {self.trainable_summary}")
        return "\n".join(lines)
