"""The one training template every model class runs (``train`` calls :meth:`_train`), its
steps the hooks of :class:`TrainingMixin`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from cellfm_sc._hardware import check_accelerator
from cellfm_sc.data import DataSplit
from cellfm_sc.nn import CellFMConfig

logger = logging.getLogger(__name__)

__all__ = ["TrainingMixin", "TrainingRun", "auto_lr", "train_doc"]

#: ``train()`` arguments :func:`~cellfm_sc.train.check_training_numbers` checks (those a
#: class's ``train`` has), in the order it checks them
NUMBER_ARGS = (
    "max_epochs",
    "batch_size",
    "lr",
    "lr_schedule",
    "weight_decay",
    "patience",
    "num_workers",
    "check_val_every_n_steps",
    "gradient_clip_val",
    "warmup_fraction",
    "masked_value_weight",
    "depth_augmentation",
)
#: ``train()`` arguments every model class passes through to the runner unchanged
RUNNER_ARGS = (
    "precision",
    "accelerator",
    "devices",
    "strategy",
    "gradient_clip_val",
    "checkpoint_dir",
    "keep_checkpoints",
    "resume_from",
    "logger",
    "enable_progress_bar",
)


#: learning rate of ``lr="auto"`` for a randomly initialised trunk (measured: see docs)
LR_RANDOM = 1e-3
#: ``lr="auto"`` for a pretrained trunk of the released width (1536; the original scripts')
LR_PRETRAINED_WIDE = 1e-4
#: ``lr="auto"`` for a pretrained trunk narrower than :data:`WIDE` (the rate that kept the
#: pretraining gain in ``benchmarks/pretraining_transfer.py``; see :func:`auto_lr`)
LR_PRETRAINED_NARROW = 1e-3
WIDE = 1024


def auto_lr(pretrained: bool, config: CellFMConfig) -> float:
    """The learning rate ``lr="auto"`` resolves to.

    A randomly initialised trunk: 1e-3. A pretrained trunk: 1e-4 when
    it is as wide as the released CellFM models (``enc_dims >= 1024``: the original scripts'
    rate for the 80M model), 1e-3 for narrower trunks.

    The narrow rate is the fine-tuning recipe that kept the gain of masked-value pretraining
    (:class:`~cellfm_sc.model.CellFMPretrainer`, ``benchmarks/pretraining_transfer.py``): a tiny
    trunk pretrained on ~15k unlabelled cells, fine-tuned on 23 / 217 labelled PBMC cells
    with everything trainable, scored 0.06 / 0.25 macro-F1 at 1e-4, 0.31 / 0.39 at 3e-4,
    0.44 / 0.67 at 1e-3, 0.43 / 0.59 at 2e-3 and 0.34 / 0.58 at 3e-3; a 10x lower rate
    for the trunk than for the head, training the head first, or freezing the gene
    embedding and value encoder were no better than 1e-3 for everything. With few labels
    a small rate leaves the new head untrained within the few optimizer steps there are.

    Examples
    --------
    >>> auto_lr(True, CellFMConfig.from_preset("80M")), auto_lr(False, CellFMConfig.from_preset("80M"))
    (0.0001, 0.001)
    """
    if not pretrained:
        return LR_RANDOM
    return LR_PRETRAINED_WIDE if config.enc_dims >= WIDE else LR_PRETRAINED_NARROW


def train_doc(doc: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give the decorated ``train`` the docstring ``doc`` (one that, with the signature,
    would make the function longer than the size rule allows)."""

    def document(func: Callable[..., Any]) -> Callable[..., Any]:
        func.__doc__ = doc
        return func

    return document


@dataclass
class TrainingRun:
    """What one ``train()`` call resolves, step by step.

    Attributes
    ----------
    args
        The call's arguments (``train``'s ``locals()`` without ``self``; the Trainer's
        keywords are in ``trainer_kwargs``).
    adata, split
        The AnnData trained on and its split (:meth:`TrainingMixin._prepare_training`).
    monitor, mode
        What selects the kept weights, ``"min"`` or ``"max"``.
    early_stopping
        Whether training stops early.
    lr
        The learning rate (``lr="auto"`` resolved).
    has_validation
        Whether validation runs (default: the split has validation cells).
    find_unused_parameters
        Under DDP, let a step leave trainable parameters unused (default: when everything
        trains).
    data
        The class's own values between the steps (label codes, donors, ...).
    """

    args: dict[str, Any]
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    adata: Any = None
    split: DataSplit | None = None
    monitor: str = "validation_loss"
    mode: str = "min"
    early_stopping: bool = False
    lr: float = 0.0
    has_validation: bool | None = None
    find_unused_parameters: bool | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.args[key]


class TrainingMixin:
    """The training template (:meth:`_train`) and what a run leaves on the model."""

    def _train(self, args: dict[str, Any]) -> None:
        """Train with ``args``, a ``train()`` call's ``locals()``: checks -> data, split and
        monitor -> data module -> plan -> settings -> fit."""
        from cellfm_sc.train import check_resume_file, check_training_numbers

        args = {k: v for k, v in args.items() if k not in ("self", "__class__")}
        run = TrainingRun(args, trainer_kwargs=args.pop("trainer_kwargs", {}))
        check_training_numbers(**{k: args[k] for k in NUMBER_ARGS if k in args})
        check_accelerator(args["accelerator"], args["devices"])  # before any work: one line
        self._check_train(run)
        if args["resume_from"] is not None:
            check_resume_file(args["resume_from"])
        self._prepare_training(run)
        if run.has_validation is None:
            run.has_validation = len(run.split.validation) > 0
        run.lr = self._auto_lr() if args["lr"] == "auto" else float(args["lr"])
        if args.get("depth_augmentation") == "auto":
            args["depth_augmentation"] = self._auto_depth_augmentation()
        datamodule = self._datamodule(run)
        schedule = {k: args[k] for k in ("weight_decay", "lr_schedule", "warmup_fraction")}
        plan = self._training_plan(run, lr=run.lr, max_epochs=args["max_epochs"], **schedule)
        settings = {
            "max_epochs": args["max_epochs"],
            "batch_size": args["batch_size"],
            "lr": run.lr,
            "lr_requested": args["lr"],
            **schedule,
            "early_stopping": bool(run.early_stopping),
            "patience": args["patience"],
            "trainable": self.trainable_,
            **self._train_settings(run),
        }
        self._run_fit(run, plan, datamodule, settings)

    # -- the steps a class provides or overrides
    def _check_train(self, run: TrainingRun) -> None:
        """The class's own argument checks, before any work (default: ``early_stopping``
        is True or False)."""
        if run["early_stopping"] not in (True, False):
            raise ValueError(f"early_stopping must be True or False, got {run['early_stopping']!r}")
        run.early_stopping = bool(run["early_stopping"])

    def _training_adata(self) -> Any:
        """The model's AnnData, set up for training (or a clear error)."""
        if self.adata_manager is None:
            raise ValueError(
                "this model's AnnData is not set up for training: call "
                f"{type(self).__name__}.setup_anndata(adata, ...) and create the model on it"
            )
        return self.adata

    def _prepare_training(self, run: TrainingRun) -> None:
        """Set ``run.adata``, ``run.split``, ``run.monitor`` / ``run.mode``; check every cell
        that training reads."""
        raise NotImplementedError

    def _auto_depth_augmentation(self) -> float:
        """The chance of ``depth_augmentation="auto"``: 1 for a pretrained trunk, 0 for a
        random one (measured: see ``CellFMClassifier.train``)."""
        return 1.0 if self.pretrained else 0.0

    def _auto_lr(self) -> float:
        """The rate of ``lr="auto"`` (:func:`~cellfm_sc.model.auto_lr`)."""
        return auto_lr(self.pretrained, self.module.trunk.config)

    def _datamodule(self, run: TrainingRun) -> Any:
        """The data module of the run (default: cells of ``run.adata`` over ``run.split``,
        with ``run.data["labels"]`` as the batches' labels when set)."""
        from cellfm_sc.dataloaders import CellFMDataModule

        args = run.args
        return CellFMDataModule(
            run.adata,
            run.split,
            batch_size=args["batch_size"],
            max_tokens=self.max_tokens,
            seed=self.seed,
            **({"labels": run.data["labels"]} if "labels" in run.data else {}),
            gene_id_map=run.data.get("gene_id_map"),
            num_workers=args["num_workers"],
            depth_augmentation=args.get("depth_augmentation", 0.0),
            **self._data_kwargs(),
        )

    def _training_plan(self, run: TrainingRun, **plan_kwargs: Any) -> Any:
        """The class's training plan; ``plan_kwargs`` are the base plan's settings."""
        raise NotImplementedError

    def _train_settings(self, run: TrainingRun) -> dict[str, Any]:
        """The class's entries of ``train_settings_`` beside the shared ones."""
        return {}

    def _run_fit(self, run: TrainingRun, plan: Any, datamodule: Any, settings: dict) -> None:
        """Fit ``plan`` through the runner, then keep what the run tells."""
        from cellfm_sc.train import fit

        args = run.args
        runner = {key: args[key] for key in RUNNER_ARGS}
        runner["verbose"] = bool(args.get("verbose", False))  # a class may not offer it
        runner["find_unused_parameters"] = (
            self.trainable_ == "all"
            if run.find_unused_parameters is None
            else run.find_unused_parameters
        )
        logger.info("%s", self.trainable_summary)
        result = fit(
            plan,
            datamodule,
            has_validation=run.has_validation,
            max_epochs=args["max_epochs"],
            monitor=run.monitor,
            mode=run.mode,
            early_stopping=bool(run.early_stopping),
            patience=args["patience"],
            check_val_every_n_steps=args.get("check_val_every_n_steps"),
            **runner,
            **run.trainer_kwargs,
        )
        self._after_fit(run, plan, settings)
        # what the run tells: history, best epoch, the settings; trained from now on
        self.history_ = pd.DataFrame(result.history)
        self.step_history_ = pd.DataFrame(result.step_history)
        self.best_epoch_ = result.best_epoch
        self.best_score_ = result.best_score
        self.train_settings_ = {
            **settings,
            "epochs_run": len(result.history),
            "best_epoch": result.best_epoch,
            "best_score": result.best_score,
            "precision": result.precision,
            "world_size": result.world_size,
            "log_dir": result.log_dir,
        }
        self.global_rank_ = result.global_rank
        self.is_trained_ = True

    def _after_fit(self, run: TrainingRun, plan: Any, settings: dict[str, Any]) -> None:
        """After the fit, before it is recorded (default: keep the split)."""
        self._set_split(run.adata, run.split)
