"""Training: the plans and the runner every model class shares (scvi-tools' split of data
splitter / training plan / train runner; the data modules are in :mod:`cellfm_sc.dataloaders`).

* :class:`TrainingPlan` (``_plan``): the Lightning module base (optimizer, schedule, exact
  epoch metrics, history, resume state); a model class's plan adds its loss
  (:meth:`TrainingPlan.step`): :class:`ClassifierTrainingPlan`, :class:`DonorTrainingPlan`,
  :class:`PretrainingPlan`.
* :func:`fit` (``_runner``): builds the Trainer, fits, restores the best weights, returns a
  :class:`FitResult`; ``_callbacks``: :class:`BestStateCallback`, :class:`EpochCheckpoint`,
  the progress bar.
"""

from cellfm_sc.train._callbacks import (
    BestStateCallback,
    EpochCheckpoint,
    ProgressBar,
    check_keep_checkpoints,
    check_resume_file,
)
from cellfm_sc.train._classifier import ClassifierTrainingPlan
from cellfm_sc.train._donor import DonorTrainingPlan
from cellfm_sc.train._plan import NonFiniteLossError, StepOutput, TrainingPlan, make_scheduler
from cellfm_sc.train._pretrain import PretrainingPlan
from cellfm_sc.train._runner import (
    FitResult,
    check_training_numbers,
    default_precision,
    fit,
    quiet_lightning,
)

__all__ = [
    "BestStateCallback",
    "ClassifierTrainingPlan",
    "DonorTrainingPlan",
    "EpochCheckpoint",
    "FitResult",
    "NonFiniteLossError",
    "PretrainingPlan",
    "ProgressBar",
    "StepOutput",
    "TrainingPlan",
    "check_keep_checkpoints",
    "check_resume_file",
    "check_training_numbers",
    "default_precision",
    "fit",
    "make_scheduler",
    "quiet_lightning",
]
