"""The callbacks of a run: best-state keeping, epoch checkpoints, the progress bar."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint, TQDMProgressBar

from cellfm_sc._checkpoints import epoch_checkpoint_name, epoch_checkpoints
from cellfm_sc.train._plan import TrainingPlan

__all__ = [
    "BestStateCallback",
    "EpochCheckpoint",
    "ProgressBar",
    "check_keep_checkpoints",
    "check_resume_file",
]


class BestStateCallback(pl.Callback):
    """Keeps a CPU copy of the weights at the best validation score; restores them at the end.

    Only trainable parameters and buffers are copied (frozen ones never change).
    """

    _state = ("best_score", "best_epoch", "best_state")

    def __init__(self, monitor: str, mode: str = "max") -> None:
        self.monitor = monitor
        self.mode = mode
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def _better(self, score: float) -> bool:
        if math.isnan(score):
            return False
        if self.best_score is None:
            return True
        return score > self.best_score if self.mode == "max" else score < self.best_score

    @staticmethod
    def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        keep = {n for n, p in module.named_parameters() if p.requires_grad}
        keep |= {n for n, _ in module.named_buffers()}
        return {
            k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items() if k in keep
        }

    def on_validation_end(self, trainer: pl.Trainer, pl_module: TrainingPlan) -> None:
        if trainer.sanity_checking or not pl_module.last_validation:
            return
        if self.monitor not in pl_module.last_validation:
            raise KeyError(
                f"monitor={self.monitor!r} is not a validation metric of this model; it "
                f"reports {sorted(k for k in pl_module.last_validation if k.startswith('validation_'))}"
            )
        score = float(pl_module.last_validation[self.monitor])
        if self._better(score):
            self.best_score = score
            self.best_epoch = int(pl_module.last_validation["epoch"]) + 1
            self.best_state = self._snapshot(pl_module.module)

    def restore(self, module: torch.nn.Module) -> bool:
        """Load the best weights into ``module``; False when no validation ever ran."""
        if self.best_state is None:
            return False
        own = module.state_dict()
        unknown = sorted(set(self.best_state) - set(own))
        if unknown:
            raise RuntimeError(f"the best state has entries the module lacks: {unknown[:5]}")
        with torch.no_grad():
            for key, value in self.best_state.items():
                own[key].copy_(value)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self._state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in self._state:
            setattr(self, key, state_dict.get(key))


def check_resume_file(path: str | os.PathLike[str]) -> None:
    """Refuse a missing, empty, truncated, corrupt or foreign resume file before any work.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    CheckpointError
        Unreadable, holding non-finite or huge values, or not written by
        :class:`EpochCheckpoint` (no training state and history).
    """
    from cellfm_sc.io import CheckpointError, load_torch_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"resume_from={os.fspath(path)!r} does not exist")
    state = load_torch_file(path, what="resume checkpoint")
    if "state_dict" not in state or "cellfm_history" not in state:
        raise CheckpointError("not an epoch checkpoint of cellfm-sc's training", path)


def check_keep_checkpoints(keep: Any) -> int:
    """``keep_checkpoints`` as an int: -1 (keep all) or >= 1; otherwise a ``ValueError``."""
    ok = isinstance(keep, int) and not isinstance(keep, bool) and (keep == -1 or keep >= 1)
    if not ok:
        raise ValueError(
            f"keep_checkpoints must be -1 (keep every epoch's) or an integer >= 1, got {keep!r}"
        )
    return int(keep)


class EpochCheckpoint(Checkpoint):
    """Writes ``checkpoint_epoch_{n}.pth`` (a full, resumable Lightning checkpoint) each epoch.

    A :class:`~lightning.pytorch.callbacks.Checkpoint` subclass, so Lightning calls its
    ``on_train_epoch_end`` after the training plan's (the epoch's history row is in the
    file). The file holds model, optimizer, scheduler, epoch counter, callbacks' state,
    history and RNG state, and is written atomically (temporary name, rename).

    Parameters
    ----------
    dirpath
        Folder of the files.
    keep
        How many of the newest epoch checkpoints stay (default 1: the newest, which
        ``resume_from`` / ``--resume`` continue from), besides the best epoch's; -1 keeps
        every one. Older ones are deleted once the new one is in place; files of epochs after
        the current one (an earlier run's) are left alone.
    best
        The run's :class:`BestStateCallback`, whose ``best_epoch``'s file is kept.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        keep: int = 1,
        best: BestStateCallback | None = None,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.keep = check_keep_checkpoints(keep)
        self.best = best

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from cellfm_sc._atomic import default_mode

        epoch = int(trainer.current_epoch) + 1
        self.dirpath.mkdir(parents=True, exist_ok=True)
        final = self.dirpath / epoch_checkpoint_name(epoch)
        tmp = self.dirpath / f".{final.name}.tmp"
        trainer.save_checkpoint(tmp, weights_only=False)  # full state, resumable
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            os.chmod(tmp, default_mode())
            os.replace(tmp, final)
            self._prune(epoch)

    def _prune(self, epoch: int) -> None:
        """Delete the epoch checkpoints up to ``epoch`` that are neither among the newest
        ``keep`` nor the best epoch's."""
        if self.keep < 0:
            return
        best = None if self.best is None else self.best.best_epoch
        for n, path in epoch_checkpoints(self.dirpath):
            if n <= epoch - self.keep and n != best:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def _on_stderr(init: Any) -> Any:
    """A bar factory of ``TQDMProgressBar`` that draws on stderr."""

    def on_stderr(self: TQDMProgressBar) -> Any:
        with contextlib.redirect_stdout(sys.stderr):
            return init(self)

    return on_stderr


class ProgressBar(TQDMProgressBar):
    """Lightning's bar on stderr (stdout carries results only), epochs counted from 1."""

    init_sanity_tqdm = _on_stderr(TQDMProgressBar.init_sanity_tqdm)
    init_train_tqdm = _on_stderr(TQDMProgressBar.init_train_tqdm)
    init_validation_tqdm = _on_stderr(TQDMProgressBar.init_validation_tqdm)
    init_predict_tqdm = _on_stderr(TQDMProgressBar.init_predict_tqdm)
    init_test_tqdm = _on_stderr(TQDMProgressBar.init_test_tqdm)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        epoch = trainer.current_epoch + 1
        self.train_progress_bar.set_description(
            f"Epoch {epoch}/{total}" if total else f"Epoch {epoch}"
        )
