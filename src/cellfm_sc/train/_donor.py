"""The donor model's training plan: bag loss and donor-level validation metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from cellfm_sc.dataloaders._bags import BagBatch
from cellfm_sc.metrics._donor import aggregate_bag_logits, donor_metrics
from cellfm_sc.nn.ordinal import predict_classes
from cellfm_sc.train._plan import StepOutput, TrainingPlan, loss_and_accuracy

__all__ = ["DonorTrainingPlan"]


#: weight of the validation donor loss in ``validation_donor_score`` (only breaks ties of QWK
#: or balanced accuracy, which move in steps of about 1 / n_donors)
SCORE_LOSS_WEIGHT = 1e-3


class DonorTrainingPlan(TrainingPlan):
    """Bag loss and donor-level validation metrics.

    Training metrics come from sums over the epoch's bags (``train_loss``: mean bag loss,
    ``train_acc``: share of bags classified right). Validation gathers every validation bag's
    logits (across processes, each bag once), averages them per donor (weighted by the bags'
    cell counts, as :meth:`CellFMDonorClassifier.predict_donors` does) and reports
    ``validation_loss`` (per bag), ``validation_donor_loss``, ``validation_donor_acc``,
    ``validation_donor_balanced_acc``, for ordinal labels ``validation_donor_qwk``, and
    ``validation_donor_score``: the QWK (ordinal) or balanced accuracy minus ``1e-3`` times
    the donor loss, i.e. the main score with its ties broken by the loss (what
    ``monitor="auto"`` follows).

    Parameters
    ----------
    module
        The donor module.
    n_classes, ordinal
        Number of classes and whether they are ordered.
    chunk_size
        Cells per trunk chunk (trainable trunk).
    gradient_checkpointing
        Recompute each chunk's activations in the backward pass.
    cell_loss_weight
        Weight of an auxiliary cell-level loss (each cell classified by the same head with
        its donor's label, weighted by its attention within the bag; 0 = off).
    **kwargs
        :class:`~cellfm_sc.train.TrainingPlan` settings.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        n_classes: int,
        ordinal: bool,
        chunk_size: int = 32,
        gradient_checkpointing: bool = False,
        cell_loss_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(module, **kwargs)
        self.n_classes = int(n_classes)
        self.ordinal = bool(ordinal)
        self.chunk_size = int(chunk_size)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.cell_loss_weight = float(cell_loss_weight)

    def _embed(self, batch: BagBatch) -> torch.Tensor | None:
        if batch.emb is not None:
            return batch.emb
        c = batch.cells
        if c is None:
            return None
        return self.module.encode(
            c.values,
            c.gene_ids,
            c.valid,
            batch.chunk_lengths,
            self.chunk_size,
            self.gradient_checkpointing,
        )

    def step(self, batch: BagBatch, stage: str) -> StepOutput:
        train = stage == "train"
        emb = self._embed(batch)
        out = self.module(emb, batch.bag, batch.n_bags, batch.expr)
        w = batch.weight.float()
        objective, per_bag = self.module.loss(out.logits, batch.labels, w)
        loss = objective
        if train and self.cell_loss_weight > 0:
            # each cell predicts its donor's label, weighted by its attention in the bag (a
            # bag's weights sum to 1, so every bag counts once whatever its size)
            cell_logits = self.module.head.classify_cells(out.cells)
            cell_w = w[batch.bag] * out.attention.detach().float()
            cell_objective, _ = self.module.loss(cell_logits, batch.labels[batch.bag], cell_w)
            loss = loss + self.cell_loss_weight * cell_objective
        logits = out.logits.detach().float()
        pred = predict_classes(self.module.probabilities(logits), self.ordinal)
        sums = {
            "loss": (per_bag.detach() * w).sum(),
            "n": w.sum(),
            "correct": ((pred == batch.labels).float() * w).sum(),
        }
        collect = None
        if not train:
            keep = w > 0
            n_cells = torch.bincount(batch.bag, minlength=batch.n_bags)
            collect = {
                "donor": batch.donor[keep],
                "n_cells": n_cells[keep],
                "logits": logits[keep],
                "labels": batch.labels[keep],
            }
        return StepOutput(loss=loss, sums=sums, collect=collect)

    metrics_from_sums = staticmethod(loss_and_accuracy)

    def collected_metrics(self, collected: Mapping[str, np.ndarray]) -> dict[str, float]:
        donors, logits, _ = aggregate_bag_logits(
            collected["logits"], collected["donor"], collected["n_cells"]
        )
        label_of = dict(zip(collected["donor"].tolist(), collected["labels"].tolist()))
        y = torch.tensor([label_of[d] for d in donors.tolist()], dtype=torch.int64)
        z = torch.from_numpy(logits).float()
        _, per = self.module.loss(z, y)
        pred = predict_classes(self.module.probabilities(z), self.ordinal).numpy()
        m = donor_metrics(y.numpy(), pred, self.n_classes, self.ordinal)
        out = {
            "donor_loss": float(per.mean()),
            "donor_acc": m["accuracy"],
            "donor_balanced_acc": m["balanced_accuracy"],
            "n_donors": m["n_donors"],
        }
        if self.ordinal:
            out["donor_qwk"] = m["qwk"]
        main = m["qwk"] if self.ordinal else m["balanced_accuracy"]
        # model selection: the main score, ties (frequent with few donors) broken by the loss
        out["donor_score"] = (main if np.isfinite(main) else 0.0) - SCORE_LOSS_WEIGHT * out[
            "donor_loss"
        ]
        return out
