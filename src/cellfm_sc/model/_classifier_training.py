"""The classifier's steps of the training template: split, monitor, class weights, recipe, plan."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cellfm_sc._constants import MONITORS
from cellfm_sc.data import (
    DataSplit,
    check_donors_disjoint,
    split_by_donor,
    split_stratified,
)
from cellfm_sc.model.base import TrainingRun
from cellfm_sc.nn.trainable import resolve_recipe
from cellfm_sc.train import ClassifierTrainingPlan
from cellfm_sc.train._classifier import _class_weights

#: early_stopping="auto" turns early stopping on from this many validation cells ...
EARLY_STOPPING_MIN_CELLS = 1000


#: ... or, for donor labels, from this many validation donors
EARLY_STOPPING_MIN_DONORS = 10


__all__ = ["TRAIN_DOC", "ClassifierTrainingMixin"]


#: the docstring of :meth:`CellFMClassifier.train <cellfm_sc.model.CellFMClassifier.train>`
TRAIN_DOC = """Fine-tune: AdamW on the trainable parameters, the best validation weights kept.

Parameters
----------
max_epochs
    Epochs (total, also when resuming). Default 20: with ~200 labelled cells
    (pbmc3k, 10% of the labels) 10 epochs left a random tiny trunk under-trained
    (held-out macro-F1 0.58 vs 0.71 with 20; ``benchmarks/learning_curves.py``);
    with early stopping on (large validation sets) training usually ends sooner.
batch_size
    Cells per batch (per device).
lr
    AdamW learning rate; ``"auto"`` (default) follows :func:`~cellfm_sc.model.auto_lr`:
    1e-3 for a random trunk, for a pretrained one 1e-4 at the released width (1536)
    and 1e-3 for narrower trunks.
weight_decay
    AdamW weight decay.
validation_size, test_size
    Fractions (or counts) of donors (with ``donor_key``) or cells (stratified by
    label) held out for validation (model selection) and test (:meth:`evaluate`).
split
    Explicit :class:`~cellfm_sc.data.DataSplit` (``split_from_obs``,
    ``split_from_json``, ``split_by_donor``); overrides the sizes.
recipe
    How the trunk is fine-tuned (which parameters train in which phase, at which
    rate; ``lr`` is the head's): ``"auto"`` (default; see
    :func:`~cellfm_sc.nn.resolve_recipe`), ``"full"`` (everything at
    ``lr`` from the first step), ``"lp-ft"`` (the head alone on frozen features for
    the first quarter of the steps, then everything, the trunk at 0.3 ``lr``),
    ``"llrd"`` (trunk at 0.3 ``lr``, x0.7 per layer towards the input),
    ``"lp-ft+llrd"``, ``"frozen-rows"`` (the gene-embedding rows transferred from
    the checkpoint frozen), ``"shrink-perturb"`` (everything at ``lr`` from
    weights halfway between the pretrained and a fresh trunk; the best with
    thousands of labels on shifted cells), or a :class:`~cellfm_sc.nn.FinetuneRecipe` of your
    own. The head and re-initialised gene rows always train at ``lr``. The
    pretraining page of the documentation shows what each scored on shifted data.
early_stopping, patience
    Stop after ``patience`` validations without improvement of ``monitor``.
    ``"auto"`` (default): on when the validation set is large enough for its score
    to mean something (at least 1,000 cells, or 10 donors when labels belong to
    donors), off otherwise; the best validation weights are kept either way. On
    pbmc3k, patience 3 on 22 or 217 validation cells stopped runs after 3-6 of 20
    epochs and cost 0.12-0.19 held-out macro-F1.
monitor
    What model selection (and early stopping) follow: ``"auto"`` (default) is the
    validation donors' QWK (ordinal) or balanced accuracy when labels belong to
    donors, else the validation loss. Also ``"validation_loss"``,
    ``"validation_acc"``, ``"validation_macro_f1"``, ``"validation_donor_qwk"``,
    ``"validation_donor_balanced_acc"``.
check_val_every_n_steps
    Validate every N training steps instead of every epoch.
class_weights
    ``None``, ``"balanced"`` (classes weigh the same), ``"balanced_donors"``
    (donors weigh the same) or one weight per class. They hold for this call only.
lr_schedule
    ``"warmup_cosine"`` (default: linear warm-up over ``warmup_fraction`` of the
    steps, then cosine to 0, per step), ``"cosine"`` (per epoch), ``"step"`` (x0.95
    per epoch, as the original scripts) or ``"constant"``.
warmup_fraction
    Share of the optimizer steps spent warming up (``"warmup_cosine"``).
precision
    Lightning precision; default ``"bf16-mixed"`` on a GPU that supports it, 32 else.
accelerator, devices, strategy
    Lightning settings; ``devices=N, strategy="ddp"`` trains on N processes (run it
    as a script; see the multi-GPU docs).
gradient_clip_val
    Gradient-norm clipping.
masked_value_weight
    Weight of an auxiliary masked-value loss (CellFM's pretraining objective, value
    decoder part) added to the cross-entropy; 0 (default) turns it off.
depth_augmentation
    Chance in [0, 1] that a training cell is shown at a random lower depth each epoch (its
    counts thinned binomially to 25-100%, :func:`~cellfm_sc.data.thin_depth`), so that
    the model meets shallower cells (another lab, chemistry or sample) as it will at
    prediction time; 0 reads every cell as it is. Validation cells are never thinned.
    ``"auto"``: 1 after a checkpoint, 0 for a random trunk. Measured on the shift
    benchmark's development cells (PBMC 3k, 3 seeds; shifted: an interferon program and a
    half-depth capture), macro-F1 at 1% / 10% / 100% labels:

    - pretrained start, shifted cells: 0.345 / 0.676 / 0.808 off, 0.630 / 0.750 / 0.895
      at 1; unshifted cells: 0.555 / 0.824 / 0.895 off, 0.653 / 0.783 / 0.902 at 1;
    - random start, shifted cells: 0.363 / 0.653 / 0.855 off, 0.433 / 0.706 / 0.875 at
      1; unshifted cells: 0.394 / 0.658 / 0.857 off, 0.386 / 0.738 / 0.869 at 1; but on
      the demo's cells (5 epochs, 3 seeds) accuracy 0.931 off, 0.921 at 1 and macro-F1
      0.902 off, 0.883 at 1, so a random trunk keeps it off unless asked.
num_workers
    DataLoader worker processes.
checkpoint_dir
    Where ``checkpoint_epoch_{n}.pth`` (resumable) is written after every epoch,
    and the CSV log (``logs/metrics.csv``).
keep_checkpoints
    Epoch checkpoints kept there: the newest ``keep_checkpoints`` (default 1, what
    ``resume_from`` needs) plus the best epoch's; -1 keeps every epoch's (each holds
    the model and the optimizer state: about 3x the model's size).
resume_from
    A ``checkpoint_epoch_{n}.pth`` to continue from (model, optimizer, scheduler,
    epoch, history, RNG state).
logger
    Lightning logger(s): ``None`` (default: CSV under ``checkpoint_dir`` when given),
    ``False``, ``"csv"``, ``"tensorboard"``, or logger objects.
enable_progress_bar
    Show the progress bar (on stderr).
verbose
    Show Lightning's own info lines ("GPU available: ...", tips, "Loading
    `train_dataloader` ..."); off by default, as are they when the ``cellfm_sc`` logger
    is below ``DEBUG``.
gradient_checkpointing
    Recompute layer activations in the backward pass: much less GPU memory for deep
    trunks (800M preset) for about one extra forward pass of time.
**trainer_kwargs
    Passed to :class:`lightning.pytorch.Trainer`.

Notes
-----
Afterwards ``model.history`` has one row per epoch (``epoch``, ``train_loss``,
``train_acc``, the validation metrics, ``lr``; over all cells, each counted once),
``model.step_history`` one row per validation run, ``model.best_epoch`` the epoch
whose weights the model holds, and ``model.train_indices`` /
``validation_indices`` / ``test_indices`` the split (kept by obs name).
"""


class ClassifierTrainingMixin:
    """The steps of :meth:`~cellfm_sc.model.base.CellFMModel._train` for the classifier."""

    # ----------------------------------------------------------------- training
    def _make_split(
        self, adata: Any, split: DataSplit | None, validation_size: float, test_size: float
    ) -> DataSplit:
        if split is None:
            if self.donor_key is not None:
                split = split_by_donor(
                    adata, self.donor_key, self.labels_key, test_size, validation_size, self.seed
                )
            else:
                split = split_stratified(
                    adata, self.labels_key, test_size, validation_size, self.seed
                )
        elif self.donor_key is not None:
            check_donors_disjoint(split, self._donors(adata))
        if len(split.train) == 0:
            raise ValueError("the training split is empty")
        return split

    def _resolve_monitor(self, monitor: str, adata: Any) -> tuple[str, str]:
        if monitor not in MONITORS:
            raise ValueError(f"monitor must be one of {MONITORS}, got {monitor!r}")
        if monitor == "auto":
            if self._donor_level_labels(adata):
                monitor = (
                    "validation_donor_qwk" if self.ordinal_ else "validation_donor_balanced_acc"
                )
            else:
                monitor = "validation_loss"
        if monitor.startswith("validation_donor") and self.donor_key is None:
            raise ValueError(f"monitor={monitor!r} needs donor_key= in setup_anndata")
        if monitor == "validation_donor_qwk" and not self.ordinal_:
            raise ValueError(
                "monitor='validation_donor_qwk' needs ordinal labels (label_order= in "
                "setup_anndata)"
            )
        return monitor, "min" if monitor == "validation_loss" else "max"

    def _check_train(self, run: TrainingRun) -> None:
        run.data["recipe"] = resolve_recipe(run["recipe"], self.pretrained)
        if run["early_stopping"] not in (True, False, "auto"):
            raise ValueError(
                f"early_stopping must be True, False or 'auto', got {run['early_stopping']!r}"
            )
        if run["masked_value_weight"] > 0 and not hasattr(self.module.trunk, "value_dec"):
            raise ValueError(
                "masked_value_weight > 0 needs the value decoder, which this trunk lacks "
                "(annotation-Backbone checkpoint, variant A'); use masked_value_weight=0"
            )

    def _prepare_training(self, run: TrainingRun) -> None:
        adata = run.adata = self._training_adata()
        run.data["gene_id_map"] = self._gene_id_map(adata, strict=True)
        codes = run.data["labels"] = self._label_codes(adata)
        donors = run.data["donors"] = self._donors(adata)
        split = run.split = self._make_split(
            adata, run["split"], run["validation_size"], run["test_size"]
        )
        run.monitor, run.mode = self._resolve_monitor(run["monitor"], adata)
        self._check_cells(adata, np.concatenate([split.train, split.validation, split.test]))
        class_w, per_cell = _class_weights(
            run["class_weights"],
            codes[split.train],
            len(self.classes_),
            None if donors is None else donors[split.train],
        )
        sample_weight = None
        if per_cell is not None:
            sample_weight = np.zeros(adata.n_obs, dtype=np.float32)
            sample_weight[split.train] = per_cell
        run.data["sample_weight"] = sample_weight
        self.module.class_weights = class_w  # this call's weights only
        early_stopping = run["early_stopping"]
        if early_stopping == "auto":
            if self._donor_level_labels(adata):
                n_val_donors = len(np.unique(donors[split.validation]))
                early_stopping = n_val_donors >= EARLY_STOPPING_MIN_DONORS
            else:
                early_stopping = len(split.validation) >= EARLY_STOPPING_MIN_CELLS
        run.early_stopping = bool(early_stopping)
        if run.data["recipe"].head_phase > 0:  # under DDP the trunk is unused then
            run.find_unused_parameters = True

    def _training_plan(self, run: TrainingRun, **plan_kwargs: Any) -> ClassifierTrainingPlan:
        objective_params: tuple[str, ...] = ()
        if run["masked_value_weight"] > 0:  # the auxiliary objective trains its decoder too
            objective_params = ("value_dec.", "value_enc.mask_emb")
        run.data["trained_before"] = {
            n for n, p in self.module.named_parameters() if p.requires_grad
        }
        for name, p in self.module.trunk.named_parameters():
            if name.startswith(objective_params):
                p.requires_grad_(True)
        plan = ClassifierTrainingPlan(
            self.module,
            classes=self.classes_,
            ordinal=self.ordinal_,
            labels=run.data["labels"],
            donors=run.data["donors"],
            sample_weight=run.data["sample_weight"],
            masked_value_weight=run["masked_value_weight"],
            recipe=run.data["recipe"],
            transferred_rows=self.transferred_rows_,
            **plan_kwargs,
        )
        self.module.trunk.gradient_checkpointing = run["gradient_checkpointing"]
        return plan

    def _train_settings(self, run: TrainingRun) -> dict[str, Any]:
        class_weights = run["class_weights"]
        return {
            "class_weights": class_weights
            if isinstance(class_weights, str | None)
            else list(class_weights),
            "monitor": run.monitor,
            "gradient_checkpointing": run["gradient_checkpointing"],
            "masked_value_weight": run["masked_value_weight"],
            "depth_augmentation": run["depth_augmentation"],
            "recipe": run.data["recipe"].to_dict(),
        }

    def _run_fit(self, run: TrainingRun, plan: Any, datamodule: Any, settings: dict) -> None:
        try:
            super()._run_fit(run, plan, datamodule, settings)
            plan.interpolate_weights()
        finally:
            self.module.class_weights = torch.ones(len(self.classes_))
            for name, p in self.module.named_parameters():
                p.requires_grad_(name in run.data["trained_before"])
