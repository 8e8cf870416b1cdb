"""The classifier's training plan: cross-entropy, the fine-tuning recipe, cell metrics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from cellfm_sc.data import TokenBatch
from cellfm_sc.nn import FinetuneRecipe
from cellfm_sc.nn.trainable import RowRateScaler, recipe_param_groups, shrink_towards_fresh
from cellfm_sc.train._plan import StepOutput, TrainingPlan, loss_and_accuracy

__all__ = ["ClassifierTrainingPlan"]


class ClassifierTrainingPlan(TrainingPlan):
    """Cross-entropy on labelled cells; exact accuracy, macro-F1 and donor-level metrics.

    Training metrics (``train_loss``, ``train_acc``) come from sums over every training
    cell of the epoch. Validation metrics come from every validation cell's probabilities,
    gathered across processes, each cell counted once: ``validation_loss``,
    ``validation_acc``, ``validation_macro_f1``, ``validation_balanced_acc``, and with donors
    ``validation_donor_acc``, ``validation_donor_balanced_acc`` and (ordinal labels)
    ``validation_donor_qwk`` from the donors' mean probabilities.

    Parameters
    ----------
    module
        The classifier module.
    classes, ordinal
        Class names (in code order) and whether they are ordered.
    donors
        ``(n_obs,)`` donor id of every AnnData row, or None.
    labels
        ``(n_obs,)`` label code of every AnnData row.
    sample_weight
        ``(n_obs,)`` per-cell loss weight for training (``class_weights="balanced_donors"``),
        or None.
    masked_value_weight
        Weight of the auxiliary masked-value loss (0 = off).
    recipe
        The fine-tuning recipe (:class:`~cellfm_sc.nn.FinetuneRecipe`): parameter groups
        with their rates, and a head phase during which the trunk runs without gradients
        (its features frozen; the auxiliary loss is off then). None: one group at ``lr``.
    transferred_rows
        Gene-embedding rows that came from the checkpoint (the recipe's
        ``transferred_rows_lr`` applies to them).
    **kwargs
        :class:`~cellfm_sc.train.TrainingPlan` settings (lr, schedule, ...).
    """

    _checkpointed = ("interpolation_start",)

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        classes: Sequence[str],
        ordinal: bool,
        labels: np.ndarray,
        donors: np.ndarray | None = None,
        sample_weight: np.ndarray | None = None,
        masked_value_weight: float = 0.0,
        recipe: FinetuneRecipe | None = None,
        transferred_rows: np.ndarray | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(module, **kwargs)
        self.recipe = recipe
        self.transferred_rows = transferred_rows
        #: optimizer steps of the head phase (set when the optimizer is built)
        self.head_steps = 0
        self._row_hooks: list[Any] = []
        self._row_scalers: list[RowRateScaler] = []
        #: the trainable weights when the head phase ends (weight-space interpolation)
        self.interpolation_start: dict[str, torch.Tensor] | None = None
        self.classes = list(classes)
        self.ordinal = bool(ordinal)
        self.labels = labels
        self.donors = donors
        self.masked_value_weight = float(masked_value_weight)
        self.register_buffer(
            "sample_weight",
            None if sample_weight is None else torch.as_tensor(sample_weight, dtype=torch.float32),
            persistent=False,
        )

    # -- the recipe: groups, rates, head phase
    def optimizer_groups(self, total_steps: int) -> list[dict[str, Any]]:
        if self.recipe is None:
            return super().optimizer_groups(total_steps)
        groups = recipe_param_groups(
            self.module,
            self.recipe,
            n_layers=self.module.trunk.config.n_layers,
            transferred_rows=self.transferred_rows,
        )
        self.head_steps = round(self.recipe.head_phase * total_steps)
        for hook in self._row_hooks:
            hook.remove()
        self._row_hooks, self._row_scalers = [], []
        out = []
        for g in groups:
            if g.rows is not None and g.rows_scale != 1.0:
                self._row_scalers.append(RowRateScaler(g.params[0], g.rows, g.rows_scale))
            out.append(
                {
                    "params": g.params,
                    "lr": self.lr * g.lr_scale,
                    "name": g.name,
                    "start_step": self.head_steps if g.phase else 0,
                }
            )
        return out

    def configure_optimizers(self) -> Any:
        config = super().configure_optimizers()
        optimizer = config["optimizer"] if isinstance(config, dict) else config
        for scaler in self._row_scalers:
            self._row_hooks.extend(scaler.attach(optimizer))
        return config

    def in_head_phase(self) -> bool:
        """Whether the current training step belongs to the recipe's head phase."""
        return self.head_steps > 0 and self.global_step < self.head_steps

    def on_train_start(self) -> None:
        # the recipe's shrink-and-perturb start, once, before the first step (not on resume)
        if self.recipe is not None and self.recipe.shrink < 1 and self.global_step == 0:
            shrink_towards_fresh(self.module.trunk, self.recipe.shrink)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # the start of weight-space interpolation: the weights when the head phase ends
        wise = self.recipe is not None and self.recipe.interpolate < 1
        at_end = self.head_steps and self.global_step == self.head_steps
        if wise and at_end and self.interpolation_start is None:
            self.interpolation_start = {
                n: p.detach().to("cpu", copy=True)
                for n, p in self.module.named_parameters()
                if p.requires_grad
            }

    def interpolate_weights(self) -> bool:
        """Set the module's trainable weights to ``interpolate * now + (1 - interpolate) *
        start`` (the recipe's weight-space ensemble); False when there is nothing to do."""
        start = self.interpolation_start
        if self.recipe is None or self.recipe.interpolate >= 1 or start is None:
            return False
        a = float(self.recipe.interpolate)
        with torch.no_grad():
            for n, p in self.module.named_parameters():
                if n in start:
                    p.copy_(a * p + (1.0 - a) * start[n].to(p.device, p.dtype))
        return True

    def step(self, batch: TokenBatch, stage: str) -> StepOutput:
        train = stage == "train"
        if train and self.in_head_phase():  # features frozen: no gradient through the trunk
            out = self.module.forward_frozen_trunk(batch)
            mv_loss = None
        elif train and self.masked_value_weight > 0:
            out, mv_loss = self.module.masked_value_loss(batch)
            self.log("train_masked_value_loss", mv_loss.detach(), batch_size=len(batch))
        else:
            out, mv_loss = self.module(batch), None
        ce = self.module.cell_loss(out.logits, batch.labels)
        weight = getattr(batch, "weight", None)
        count = torch.ones_like(ce) if weight is None else weight.to(ce.dtype)
        n = count.sum()
        objective = count
        if train and self.sample_weight is not None:
            objective = count * self.sample_weight[batch.obs_index]
        loss = (ce * objective).sum() / n.clamp(min=1.0)
        if mv_loss is not None:
            loss = loss + self.masked_value_weight * mv_loss
        pred = out.logits.argmax(-1)
        sums = {
            "loss": (ce.detach() * count).sum(),
            "n": n,
            "correct": ((pred == batch.labels).to(ce.dtype) * count).sum(),
        }
        collect = None
        if not train:
            keep = count > 0
            collect = {
                "obs_index": batch.obs_index[keep],
                "probs": torch.softmax(out.logits.detach().float(), -1)[keep],
            }
        return StepOutput(loss=loss, sums=sums, collect=collect)

    metrics_from_sums = staticmethod(loss_and_accuracy)

    def collected_metrics(self, collected: Mapping[str, np.ndarray]) -> dict[str, float]:
        from cellfm_sc.metrics import evaluate_predictions

        idx = collected["obs_index"].astype(np.int64)
        result = evaluate_predictions(
            collected["probs"],
            self.labels[idx],
            self.classes,
            donors=None if self.donors is None else self.donors[idx],
            ordinal=self.ordinal,
        )
        cell = result.cell_metrics
        out = {
            "macro_f1": cell["macro_f1"],
            "balanced_acc": cell["balanced_accuracy"],
            "n_cells": float(cell["n_cells"]),
        }
        if result.donor_metrics is not None:
            donor = result.donor_metrics
            out["donor_acc"] = donor["accuracy"]
            out["donor_balanced_acc"] = donor["balanced_accuracy"]
            if self.ordinal:
                out["donor_qwk"] = donor["qwk"]
        return out


def _class_weights(
    spec: Any, codes: np.ndarray, n_classes: int, donors: np.ndarray | None
) -> tuple[torch.Tensor, np.ndarray | None]:
    """``(K,)`` class weights and an optional per-training-cell weight from ``class_weights``.

    ``None``: all 1. ``"balanced"``: ``n / (K * n_k)`` (mean 1 over the training cells).
    ``"balanced_donors"``: each training donor weighs the same (per-cell weights, mean 1).
    A sequence: one weight per class.
    """
    ones = torch.ones(n_classes)
    if spec is None:
        return ones, None
    if isinstance(spec, str):
        if spec == "balanced":
            counts = np.bincount(codes, minlength=n_classes).astype(np.float64)
            w = np.where(counts > 0, len(codes) / (n_classes * np.maximum(counts, 1)), 0.0)
            return torch.tensor(w, dtype=torch.float32), None
        if spec == "balanced_donors":
            if donors is None:
                raise ValueError(
                    "class_weights='balanced_donors' needs donors: pass donor_key= to setup_anndata"
                )
            _, inverse, counts = np.unique(donors, return_inverse=True, return_counts=True)
            per_cell = len(donors) / (len(counts) * counts[inverse])
            return ones, per_cell.astype(np.float32)
        raise ValueError(
            "class_weights must be None, 'balanced', 'balanced_donors' or one weight per "
            f"class, got {spec!r}"
        )
    weights = np.asarray(spec, dtype=np.float32)
    if weights.shape != (n_classes,):
        raise ValueError(
            f"class_weights has shape {weights.shape}; expected ({n_classes},) (one per class)"
        )
    if not np.all(np.isfinite(weights)) or (weights < 0).any():
        raise ValueError(f"class_weights must be finite and >= 0, got {weights.tolist()}")
    return torch.from_numpy(weights), None
