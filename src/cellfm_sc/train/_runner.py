"""The runner: :func:`fit` builds the Trainer (precision, devices, loggers, callbacks), fits,
restores the best weights and returns a :class:`FitResult`; the checks of its numbers."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping

from cellfm_sc._constants import LIBRARY_NOISE, LR_SCHEDULES, PRECISIONS
from cellfm_sc._hardware import check_accelerator
from cellfm_sc.train._callbacks import (
    BestStateCallback,
    EpochCheckpoint,
    ProgressBar,
    check_keep_checkpoints,
)
from cellfm_sc.train._plan import TrainingPlan

__all__ = [
    "FitResult",
    "check_training_numbers",
    "default_precision",
    "fit",
    "quiet_lightning",
]


def default_precision(accelerator: str = "auto") -> str:
    """``"bf16-mixed"`` on a CUDA GPU that supports it (unless ``accelerator="cpu"``), else
    ``"32-true"``."""
    if accelerator != "cpu" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def check_training_numbers(**values: Any) -> None:
    """Refuse bad numeric training arguments before any work starts.

    Keywords: ``max_epochs``, ``batch_size``, ``patience``, ``num_workers`` (integers; the
    first two >= 1, the others >= 0); ``lr`` (> 0, finite); ``weight_decay``,
    ``gradient_clip_val``, ``warmup_fraction`` (>= 0, finite; warm-up < 1); ``lr_gamma``
    (in (0, 1]); ``depth_augmentation`` (in [0, 1], or ``"auto"``). ``None`` skips a value; so does ``lr="auto"``. ``lr_schedule`` must be
    ``"warmup_cosine"``, ``"cosine"``, ``"step"`` or ``"constant"``. Raises ``ValueError``
    naming the argument.
    """
    if "lr_schedule" in values:
        schedule = values.pop("lr_schedule")
        if schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if values.get("depth_augmentation") == "auto":
        values["depth_augmentation"] = None
    if isinstance(values.get("lr"), str):
        if values["lr"] != "auto":
            raise ValueError(f"lr must be a number > 0 or 'auto', got {values['lr']!r}")
        values["lr"] = None
    rules: dict[str, tuple[type, float, bool, float | None]] = {
        # name: (kind, lower bound, bound is strict, upper bound)
        "max_epochs": (int, 1, False, None),
        "batch_size": (int, 1, False, None),
        "patience": (int, 0, False, None),
        "num_workers": (int, 0, False, None),
        "check_val_every_n_steps": (int, 1, False, None),
        "lr": (float, 0.0, True, None),
        "weight_decay": (float, 0.0, False, None),
        "gradient_clip_val": (float, 0.0, True, None),
        "warmup_fraction": (float, 0.0, False, 0.999),
        "lr_gamma": (float, 0.0, True, 1.0),
        "masked_value_weight": (float, 0.0, False, None),
        "depth_augmentation": (float, 0.0, False, 1.0),
    }
    for name, value in values.items():
        if value is None:
            continue
        kind, low, strict, high = rules[name]
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and kind is int:
            ok = float(value).is_integer()
        if ok:
            v = float(value)
            ok = math.isfinite(v) and (v > low if strict else v >= low)
            ok = ok and (high is None or v <= high)
        if not ok:
            what = "an integer" if kind is int else "a number"
            bound = f"> {low:g}" if strict else f">= {low:g}"
            if high is not None:
                bound += f" and <= {high:g}"
            raise ValueError(f"{name} must be {what} {bound}, got {value!r}")


#: Lightning's loggers, whose info lines (``GPU available: ...``, ``TPU available: ...``,
#: the LitLogger tip, ``Loading `train_dataloader` ...``) :func:`quiet_lightning` holds back
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning")


@contextlib.contextmanager
def quiet_lightning(verbose: bool = False) -> Any:
    """Within the block: Lightning's banners and tips silenced, and the third-party warnings
    of :data:`~cellfm_sc._constants.LIBRARY_NOISE` (torch's ``_pytree`` deprecation, ...)
    ignored. Warnings and errors of Lightning still show.

    With ``verbose=True``, or when the ``cellfm_sc`` logger is at ``DEBUG``
    (``logging.getLogger("cellfm_sc").setLevel(logging.DEBUG)``), Lightning's info lines
    show.
    """
    import logging

    saved: dict[str, int] = {}
    if not (verbose or logging.getLogger("cellfm_sc").isEnabledFor(logging.DEBUG)):
        for name in LIGHTNING_LOGGERS:
            log = logging.getLogger(name)
            if log.getEffectiveLevel() < logging.WARNING:
                saved[name] = log.level
                log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for pattern in LIBRARY_NOISE:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


@dataclass
class FitResult:
    """What :func:`fit` hands back to the model class."""

    history: list[dict[str, float]]
    step_history: list[dict[str, float]]
    best_epoch: int | None
    best_score: float | None
    world_size: int
    global_rank: int
    precision: str
    log_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _make_loggers(logger: Any, checkpoint_dir: str | os.PathLike[str] | None) -> Any:
    """Lightning logger(s) for ``train(logger=...)``.

    ``None`` (default): a CSV logger in ``checkpoint_dir/logs`` when ``checkpoint_dir`` is
    given, else none. ``False``: none. ``"csv"`` / ``"tensorboard"``: that logger under
    ``checkpoint_dir`` (or ``./cellfm_logs``). A Lightning logger or a list: used as given.
    """
    if logger is False:
        return False
    save_dir = Path(checkpoint_dir) / "logs" if checkpoint_dir is not None else None
    if logger is None:
        if save_dir is None:
            return False
        logger = "csv"
    if isinstance(logger, str):
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

        root = os.fspath(save_dir or Path("cellfm_logs"))
        if logger == "csv":
            return CSVLogger(root, name="", version="")
        if logger == "tensorboard":
            if not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
                raise ImportError("logger='tensorboard' needs TensorBoard: pip install tensorboard")
            return TensorBoardLogger(root, name="", version="")
        raise ValueError(
            f"logger must be None, False, 'csv', 'tensorboard' or a Lightning logger, got {logger!r}"
        )
    return logger


def fit(
    plan: TrainingPlan,
    datamodule: pl.LightningDataModule,
    *,
    max_epochs: int,
    monitor: str,
    mode: str,
    has_validation: bool,
    early_stopping: bool = False,
    patience: int = 3,
    check_val_every_n_steps: int | None = None,
    precision: str | int | None = None,
    accelerator: str = "auto",
    devices: int | str | Sequence[int] = "auto",
    strategy: Any = None,
    find_unused_parameters: bool = False,
    gradient_clip_val: float | None = 1.0,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume_from: str | os.PathLike[str] | None = None,
    logger: Any = None,
    enable_progress_bar: bool = True,
    keep_checkpoints: int = 1,
    verbose: bool = False,
    **trainer_kwargs: Any,
) -> FitResult:
    """Run a training plan to the end; the plan's module holds the best weights afterwards.

    Parameters
    ----------
    plan, datamodule
        What to train and on which cells.
    max_epochs
        Epochs in total (also when resuming).
    monitor, mode
        Validation metric (a key of the plan's validation metrics, e.g.
        ``"validation_loss"``) and ``"min"``/``"max"``: the best epoch's weights are
        restored at the end.
    has_validation
        Whether there are validation cells (without them, no validation runs and the last
        weights are kept).
    early_stopping, patience
        Stop after ``patience`` validation runs without improvement of ``monitor``.
    check_val_every_n_steps
        Validate every N training steps instead of once per epoch.
    precision, accelerator, devices, strategy
        Lightning settings; ``precision=None`` picks :func:`default_precision`.
        ``strategy="ddp"`` with ``find_unused_parameters`` lets trainable parameters that a
        step does not use exist under DDP.
    gradient_clip_val
        Gradient-norm clipping (None: off).
    checkpoint_dir, resume_from
        Write ``checkpoint_epoch_{n}.pth`` there after each epoch; continue from one.
    keep_checkpoints
        Epoch checkpoints kept in ``checkpoint_dir``: the newest ``keep_checkpoints``
        (default 1) and the best epoch's; -1 keeps all (see :class:`EpochCheckpoint`).
    logger
        See :func:`_make_loggers`.
    enable_progress_bar
        Show the progress bar (stderr).
    verbose
        Let Lightning's info lines through (see :func:`quiet_lightning`).
    **trainer_kwargs
        Passed to :class:`lightning.pytorch.Trainer` (``callbacks`` are added to ours).
    """
    check_accelerator(accelerator, devices)  # Lightning's own error comes late and raw
    check_keep_checkpoints(keep_checkpoints)
    precision = _precision(precision, accelerator)
    best = BestStateCallback(monitor=monitor, mode=mode)
    callbacks: list[Any] = [best, *trainer_kwargs.pop("callbacks", [])]
    if enable_progress_bar:
        callbacks.append(ProgressBar())
    if early_stopping and has_validation:
        stop = EarlyStopping(monitor, patience=patience, mode=mode, check_on_train_epoch_end=False)
        callbacks.append(stop)
    if checkpoint_dir is not None:
        callbacks.append(EpochCheckpoint(checkpoint_dir, keep=keep_checkpoints, best=best))
    loggers = _make_loggers(logger, checkpoint_dir)
    with tempfile.TemporaryDirectory(prefix="cellfm_sc_") as root, quiet_lightning(verbose):
        trainer = pl.Trainer(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            strategy=_strategy(strategy, find_unused_parameters),
            precision=precision,
            gradient_clip_val=gradient_clip_val,
            callbacks=callbacks,
            logger=loggers,
            enable_checkpointing=checkpoint_dir is not None,
            enable_progress_bar=enable_progress_bar,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            use_distributed_sampler=False,
            default_root_dir=root,
            **_validation_kwargs(has_validation, check_val_every_n_steps),
            **trainer_kwargs,
        )
        plan.module.train()  # Lightning keeps the module's mode
        try:
            trainer.fit(
                plan,
                datamodule=datamodule,
                ckpt_path=os.fspath(resume_from) if resume_from else None,
                weights_only=True,  # our checkpoints hold tensors and plain Python only
            )
        finally:
            plan.module.eval()
    best.restore(plan.module)
    log_dir = _log_dir(loggers)
    return FitResult(
        history=list(plan.history),
        step_history=list(plan.step_history),
        best_epoch=best.best_epoch,
        best_score=best.best_score,
        world_size=int(trainer.world_size),
        global_rank=int(trainer.global_rank),
        precision=str(precision),
        log_dir=None if log_dir is None else os.fspath(log_dir),
    )


def _precision(precision: str | int | None, accelerator: str) -> str | int:
    """``precision``, :func:`default_precision` for ``None``; refuses an unknown one."""
    if precision is None:
        precision = default_precision(accelerator)
    if str(precision) not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def _validation_kwargs(has_validation: bool, every_n_steps: int | None) -> dict[str, Any]:
    """The Trainer's validation settings: none without validation cells, else per epoch or
    every ``every_n_steps`` training steps."""
    if not has_validation:
        return {"limit_val_batches": 0}
    if every_n_steps is not None:
        return {"val_check_interval": int(every_n_steps), "check_val_every_n_epoch": None}
    return {}


def _log_dir(loggers: Any) -> str | None:
    """The folder of the first logger (``None`` without loggers)."""
    if not loggers:
        return None
    first = loggers[0] if isinstance(loggers, list | tuple) else loggers
    return getattr(first, "log_dir", None)


def _strategy(strategy: Any, find_unused_parameters: bool) -> Any:
    """Lightning's ``strategy``: DDP that allows unused parameters when asked, else as given."""
    if strategy in ("ddp", "ddp_spawn") and find_unused_parameters:
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(
            find_unused_parameters=True,
            start_method="spawn" if strategy == "ddp_spawn" else "popen",
        )
    return strategy or "auto"
