"""Training: the plans and the runner every model class shares (scvi-tools' ``train``).

One place owns how training runs, whatever the objective (scvi-tools' split of data splitter /
training plan / train runner; the data modules are in :mod:`cellfm_sc.dataloaders`):

* :class:`TrainingPlan` (``_plan``): a Lightning module base. It owns the optimizer (AdamW on
  the trainable parameters), the learning-rate schedule, exact cell-weighted metric sums
  reduced across processes, per-epoch ``history`` and per-validation ``step_history``, the
  non-finite-loss guard and the state that travels with a resume checkpoint. A model class
  subclasses it with :meth:`TrainingPlan.step` (loss + metric sums of one batch) and, when
  it needs per-cell outputs (donor metrics), :meth:`TrainingPlan.collected_metrics`. The
  three plans: :class:`ClassifierTrainingPlan`, :class:`DonorTrainingPlan`,
  :class:`PretrainingPlan`.
* :func:`fit` (``_runner``): the runner. It builds the Trainer (precision, devices, strategy,
  loggers, progress bar, early stopping, best-state keeping, epoch checkpoints), fits,
  restores the best weights, and returns a :class:`FitResult`.
* ``_callbacks``: :class:`BestStateCallback`, :class:`EpochCheckpoint`, the progress bar.
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
