"""The training core shared by every model class.

One place owns how training runs, whatever the objective (scvi-tools' split of data splitter /
training plan / train runner):

* :class:`CellFMDataModule`: train and validation loaders over a :class:`~cellfm_sc.data.DataSplit`,
  sharded by the trainer's rank, built at fit time.
* :class:`TrainingPlan`: a Lightning module base. It owns the optimizer (AdamW on the
  trainable parameters), the learning-rate schedule, exact cell-weighted metric sums reduced
  across processes, per-epoch ``history`` and per-validation ``step_history``, the
  non-finite-loss guard and the state that travels with a resume checkpoint. A model class
  subclasses it with :meth:`TrainingPlan.step` (loss + metric sums of one batch) and, when
  it needs per-cell outputs (donor metrics), :meth:`TrainingPlan.collected_metrics`.
* :func:`fit`: the runner. It builds the Trainer (precision, devices, strategy, loggers,
  progress bar, early stopping, best-state keeping, epoch checkpoints), fits, restores the
  best weights, and returns a :class:`FitResult`.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint, TQDMProgressBar

from cellfm_sc._checkpoints import epoch_checkpoint_name, epoch_checkpoints
from cellfm_sc._constants import LIBRARY_NOISE, LR_SCHEDULES, PRECISIONS
from cellfm_sc._hardware import check_accelerator
from cellfm_sc.data import DataSplit, TokenBatch, make_dataloader

__all__ = [
    "BestStateCallback",
    "CellFMDataModule",
    "EpochCheckpoint",
    "FitResult",
    "NonFiniteLossError",
    "StepOutput",
    "TrainingPlan",
    "check_keep_checkpoints",
    "check_training_numbers",
    "default_precision",
    "fit",
    "make_scheduler",
]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; training stopped at that step."""


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
    (in (0, 1]). ``None`` skips a value; so does ``lr="auto"``. ``lr_schedule`` must be
    ``"warmup_cosine"``, ``"cosine"``, ``"step"`` or ``"constant"``. Raises ``ValueError``
    naming the argument.
    """
    if "lr_schedule" in values:
        schedule = values.pop("lr_schedule")
        if schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
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


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


class CellFMDataModule(pl.LightningDataModule):
    """Train/validation loaders over a split, built at fit time, sharded by rank.

    Parameters
    ----------
    adata
        The AnnData (in memory or backed).
    split
        Which cells train and which validate.
    loader_kwargs
        Passed to :func:`~cellfm_sc.data.make_dataloader` for both loaders (``batch_size``,
        ``layer``, ``max_tokens``, ``seed``, ``labels``, ``gene_id_map``, ``num_workers``,
        ...). Training loaders shuffle and bucket by length; validation keeps every cell
        exactly once.
    """

    def __init__(self, adata: Any, split: DataSplit, **loader_kwargs: Any) -> None:
        super().__init__()
        self.adata = adata
        self.split = split
        self.loader_kwargs = dict(loader_kwargs)

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, indices: np.ndarray, train: bool) -> Any:
        rank, world = self._rank()
        return make_dataloader(
            self.adata,
            indices,
            train=train,
            shuffle=train,
            bucket=True,
            rank=rank,
            world_size=world,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            check=False,  # the model class checked every cell before training
            **self.loader_kwargs,
        )

    def train_dataloader(self) -> Any:
        return self._loader(self.split.train, train=True)

    def val_dataloader(self) -> Any:
        return self._loader(self.split.validation, train=False)

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        return batch.to(device, non_blocking=True) if hasattr(batch, "to") else batch


# --------------------------------------------------------------------------------------------
# training plan
# --------------------------------------------------------------------------------------------


@dataclass
class StepOutput:
    """What one batch contributes.

    Attributes
    ----------
    loss
        Scalar tensor to back-propagate (training) or to report.
    sums
        Scalar tensors summed over the epoch and across processes: at least ``"loss"`` (the
        loss times the number of cells counted) and ``"n"`` (cells counted); anything else
        a model class turns into metrics (e.g. ``"correct"``).
    collect
        Per-cell tensors (same first dimension; cells counted only) gathered over the whole
        validation run, for metrics that need every cell (donor-level scores).
    """

    loss: torch.Tensor
    sums: dict[str, torch.Tensor]
    collect: dict[str, torch.Tensor] | None = None


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    *,
    total_steps: int,
    max_epochs: int,
    warmup_fraction: float = 0.05,
    gamma: float = 0.95,
    group_starts: Sequence[int] | None = None,
) -> dict[str, Any] | None:
    """The Lightning ``lr_scheduler`` entry of a schedule name (``None`` for constant).

    ``"warmup_cosine"``: linear warm-up over the first ``warmup_fraction`` of the optimizer
    steps, then cosine decay to 0 at ``total_steps``, stepped per optimizer step.
    ``"cosine"``: cosine over ``max_epochs``, per epoch. ``"step"``: times ``gamma`` after
    every epoch (the original scripts). ``"constant"``: no schedule.

    ``group_starts``: per parameter group, the optimizer step it starts training at (a
    fine-tuning recipe's later phase). Under ``"warmup_cosine"`` and ``"constant"`` such a
    group has rate 0 before its start and then its own warm-up and cosine over the steps
    left; other schedules ignore the starts.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    starts = [int(s) for s in group_starts] if group_starts is not None else []
    staged = any(s > 0 for s in starts)
    if schedule == "constant" and not staged:
        return None
    if schedule == "step":
        sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=gamma)
        return {"scheduler": sched, "interval": "epoch"}
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(max_epochs, 1))
        return {"scheduler": sched, "interval": "epoch"}
    total = max(int(total_steps), 1)

    def factor_from(start: int) -> Any:
        steps = max(total - start, 1)
        warm = round(warmup_fraction * steps)

        def factor(step: int) -> float:
            step -= start
            if step < 0:
                return 0.0
            if schedule == "constant":
                return 1.0
            if step < warm:
                return (step + 1) / (warm + 1)
            progress = (step - warm) / max(steps - warm, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

        return factor

    lambdas: Any = [factor_from(s) for s in starts] if staged else factor_from(0)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    return {"scheduler": sched, "interval": "step"}


def _gather_objects(obj: Any) -> list[Any]:
    """``[obj]`` in one process; every rank's ``obj`` under ``torch.distributed``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class TrainingPlan(pl.LightningModule):
    """Base training plan: optimizer, schedule, exact epoch metrics, history, resume state.

    Subclasses implement :meth:`step` and may extend :meth:`metrics_from_sums` and
    :meth:`collected_metrics`. Metrics are computed from sums over every counted cell of
    the epoch (reduced across processes), never from an average of batch averages.

    Parameters
    ----------
    module
        The torch module being trained.
    lr, weight_decay
        AdamW settings.
    lr_schedule
        One of :data:`~cellfm_sc._constants.LR_SCHEDULES` (see :func:`make_scheduler`).
    max_epochs
        Epochs of the run (for epoch-wise schedules).
    warmup_fraction, lr_gamma
        Schedule settings.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        lr: float,
        weight_decay: float = 1e-5,
        lr_schedule: str = "warmup_cosine",
        max_epochs: int = 5,
        warmup_fraction: float = 0.05,
        lr_gamma: float = 0.95,
    ) -> None:
        super().__init__()
        self.module = module
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.lr_schedule = lr_schedule
        self.max_epochs = int(max_epochs)
        self.warmup_fraction = float(warmup_fraction)
        self.lr_gamma = float(lr_gamma)
        self.history: list[dict[str, float]] = []
        self.step_history: list[dict[str, float]] = []
        self.last_validation: dict[str, float] = {}
        self._sums: dict[str, dict[str, torch.Tensor]] = {"train": {}, "validation": {}}
        self._collected: list[dict[str, np.ndarray]] = []

    # -- for subclasses
    def step(self, batch: TokenBatch, stage: str) -> StepOutput:
        """Loss and metric sums of one batch; ``stage`` is ``"train"`` or ``"validation"``."""
        raise NotImplementedError

    def metrics_from_sums(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Epoch metrics from the reduced sums (default: the cell-weighted mean loss)."""
        n = sums.get("n", 0.0)
        return {"loss": sums["loss"] / n if n else math.nan}

    def collected_metrics(self, collected: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Validation metrics from every counted cell's collected outputs (default: none)."""
        return {}

    # -- accumulation
    def _add(self, stage: str, sums: Mapping[str, torch.Tensor]) -> None:
        acc = self._sums[stage]
        for key, value in sums.items():
            value = value.detach().to(torch.float64)
            acc[key] = acc[key] + value if key in acc else value

    def _reduce(self, stage: str) -> dict[str, float]:
        acc = self._sums[stage]
        if not acc:
            return {}
        keys = sorted(acc)
        stacked = torch.stack([acc[k].reshape(()) for k in keys])
        total = self.trainer.strategy.reduce(stacked, reduce_op="sum")
        return {k: float(v) for k, v in zip(keys, total.tolist())}

    def _metrics(self, stage: str) -> dict[str, float]:
        sums = self._reduce(stage)
        if not sums:
            return {}
        return self.metrics_from_sums(sums)

    # -- steps
    def training_step(self, batch: TokenBatch, batch_idx: int) -> torch.Tensor:
        out = self.step(batch, "train")
        if not bool(torch.isfinite(out.loss.detach())):
            lr = float(self.trainer.optimizers[0].param_groups[0]["lr"])
            raise NonFiniteLossError(
                f"the training loss became {float(out.loss.detach())} at step "
                f"{self.global_step + 1} (epoch {self.current_epoch + 1}) with learning rate "
                f"{lr:.3g}; training stopped. Likely causes: a learning rate too high for this "
                "model (try a 3-10x smaller lr), or corrupt or unsuitable pretrained weights "
                "(check the checkpoint with 'cellfm-sc inspect')"
            )
        self._add("train", out.sums)
        self.log("train_loss_step", out.loss.detach(), prog_bar=True, batch_size=len(batch))
        return out.loss

    def validation_step(self, batch: TokenBatch, batch_idx: int) -> None:
        out = self.step(batch, "validation")
        self._add("validation", out.sums)
        if out.collect:
            self._collected.append({k: v.detach().cpu().numpy() for k, v in out.collect.items()})

    # -- epoch ends
    def on_train_epoch_start(self) -> None:
        self._sums["train"] = {}

    def on_validation_epoch_start(self) -> None:
        self._sums["validation"] = {}
        self._collected = []

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        metrics = {f"validation_{k}": v for k, v in self._metrics("validation").items()}
        parts = [p for rank_parts in _gather_objects(self._collected) for p in rank_parts]
        if parts:
            collected = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            metrics.update(
                {f"validation_{k}": v for k, v in self.collected_metrics(collected).items()}
            )
        self._collected = []
        train = {f"train_{k}": v for k, v in self._metrics("train").items()}  # epoch to date
        self.last_validation = {
            "epoch": int(self.current_epoch),
            "step": int(self.global_step),
            **train,
            **metrics,
        }
        self.step_history.append(dict(self.last_validation))
        # already reduced and identical on every rank: no further sync
        for key, value in metrics.items():
            self.log(key, value, prog_bar=key in ("validation_loss", "validation_acc"))

    def on_train_epoch_end(self) -> None:
        row: dict[str, float] = {"epoch": int(self.current_epoch) + 1}
        row.update({f"train_{k}": v for k, v in self._metrics("train").items()})
        if self.last_validation.get("epoch") == int(self.current_epoch):
            row.update(
                {k: v for k, v in self.last_validation.items() if k.startswith("validation_")}
            )
        groups = self.trainer.optimizers[0].param_groups
        row["lr"] = float(groups[0]["lr"])
        for g in groups[1:]:  # a recipe's other groups (named), e.g. lr_encoder.1
            if "name" in g:
                row[f"lr_{g['name']}"] = float(g["lr"])
        self.history.append(row)
        for key, value in row.items():
            if key.startswith("train_"):  # exact epoch values (reduced sums)
                self.log(key, value)

    # -- optimisation
    def optimizer_groups(self, total_steps: int) -> list[dict[str, Any]]:
        """AdamW parameter groups: dicts with ``params``, ``lr`` and optionally ``name`` and
        ``start_step`` (the step the group starts training at; see :func:`make_scheduler`).
        Default: one group of every trainable parameter at ``lr``."""
        return [{"params": [p for p in self.module.parameters() if p.requires_grad], "lr": self.lr}]

    def configure_optimizers(self) -> Any:
        total = int(self.trainer.estimated_stepping_batches) if self.trainer else 1
        groups = [g for g in self.optimizer_groups(total) if g["params"]]
        if not groups:
            raise ValueError("nothing to train: every parameter is frozen (see trainable=)")
        starts = [int(g.pop("start_step", 0)) for g in groups]
        params = [p for g in groups for p in g["params"]]
        optimizer = torch.optim.AdamW(
            groups, lr=self.lr, weight_decay=self.weight_decay, **self._adamw_kernel(params)
        )
        sched = make_scheduler(
            optimizer,
            self.lr_schedule,
            total_steps=total,
            max_epochs=self.max_epochs,
            warmup_fraction=self.warmup_fraction,
            gamma=self.lr_gamma,
            group_starts=starts,
        )
        if sched is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": sched}

    def _adamw_kernel(self, params: list[torch.Tensor]) -> dict[str, bool]:
        """AdamW's implementation: the fused kernel (one pass over each parameter; on CPU
        several times faster than the per-tensor loop torch picks there, which matters for
        a trained gene-embedding table of millions of entries), also for ``"bf16-mixed"``
        (no gradient scaler: :meth:`configure_gradient_clipping` clips); the multi-tensor
        kernel for ``"16-mixed"``, whose scaler unscales inside a fused step, so that
        Lightning's clipping would refuse it."""
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        devices = {p.device.type for p in params}
        if not devices <= {"cpu", "cuda"}:
            return {}
        return {"foreach": True} if precision == "16-mixed" else {"fused": True}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip the gradients (Lightning hook).

        Under ``"bf16-mixed"`` there is no gradient scaler, so the gradients are the true
        ones and clipping them before a fused AdamW step is exact; Lightning's mixed
        precision plugin refuses any fused optimizer there all the same (because of
        ``"16-mixed"``), so this clips directly. Every other precision goes through
        Lightning.
        """
        plugin = self.trainer.precision_plugin
        if (
            gradient_clip_val
            and getattr(plugin, "scaler", "absent") is None
            and getattr(optimizer, "_step_supports_amp_scaling", False)
        ):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm in (None, "norm"):
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- resume: history and RNG travel with the checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cellfm_history"] = [dict(r) for r in self.history]
        checkpoint["cellfm_step_history"] = [dict(r) for r in self.step_history]
        checkpoint["cellfm_last_validation"] = dict(self.last_validation)
        checkpoint["cellfm_rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["cellfm_rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = [dict(r) for r in checkpoint.get("cellfm_history", [])]
        self.step_history = [dict(r) for r in checkpoint.get("cellfm_step_history", [])]
        self.last_validation = dict(checkpoint.get("cellfm_last_validation", {}))
        rng = checkpoint.get("cellfm_rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])


# --------------------------------------------------------------------------------------------
# callbacks
# --------------------------------------------------------------------------------------------


class BestStateCallback(pl.Callback):
    """Keeps a CPU copy of the weights at the best validation score; restores them at the end.

    Only trainable parameters and buffers are copied (frozen ones never change).
    """

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
        return {
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score = state_dict.get("best_score")
        self.best_epoch = state_dict.get("best_epoch")
        self.best_state = state_dict.get("best_state")


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


class ProgressBar(TQDMProgressBar):
    """Lightning's bar on stderr (stdout carries results only), epochs counted from 1."""

    def init_sanity_tqdm(self) -> Any:
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_sanity_tqdm()

    def init_train_tqdm(self) -> Any:
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_train_tqdm()

    def init_validation_tqdm(self) -> Any:
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_validation_tqdm()

    def init_predict_tqdm(self) -> Any:
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_predict_tqdm()

    def init_test_tqdm(self) -> Any:
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_test_tqdm()

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        epoch = trainer.current_epoch + 1
        self.train_progress_bar.set_description(
            f"Epoch {epoch}/{total}" if total else f"Epoch {epoch}"
        )


# --------------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------------

#: Lightning's loggers, whose info lines (``GPU available: ...``, ``TPU available: ...``,
#: the LitLogger tip, ``Loading `train_dataloader` ...``) :func:`quiet_lightning` holds back
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning")


@contextlib.contextmanager
def quiet_lightning() -> Any:
    """Within the block: Lightning's banners and tips silenced, and the third-party warnings
    of :data:`~cellfm_sc._constants.LIBRARY_NOISE` (torch's ``_pytree`` deprecation, ...)
    ignored. Warnings and errors of Lightning still show.

    Lightning's info lines show again when the ``cellfm_sc`` logger is at ``DEBUG``
    (``logging.getLogger("cellfm_sc").setLevel(logging.DEBUG)``).
    """
    import logging

    saved: dict[str, int] = {}
    if not logging.getLogger("cellfm_sc").isEnabledFor(logging.DEBUG):
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
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                try:
                    import tensorboardX  # noqa: F401
                except ImportError as err:
                    raise ImportError(
                        "logger='tensorboard' needs TensorBoard: pip install tensorboard"
                    ) from err
            return TensorBoardLogger(root, name="", version="")
        raise ValueError(
            f"logger must be None, False, 'csv', 'tensorboard' or a Lightning logger, got {logger!r}"
        )
    return logger


def fit(
    plan: TrainingPlan,
    datamodule: CellFMDataModule,
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
    **trainer_kwargs
        Passed to :class:`lightning.pytorch.Trainer` (``callbacks`` are added to ours).
    """
    from lightning.pytorch.callbacks import EarlyStopping

    check_accelerator(accelerator, devices)  # Lightning's own error comes late and raw
    check_keep_checkpoints(keep_checkpoints)
    if precision is None:
        precision = default_precision(accelerator)
    if str(precision) not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    best = BestStateCallback(monitor=monitor, mode=mode)
    callbacks: list[Any] = [best, *trainer_kwargs.pop("callbacks", [])]
    if enable_progress_bar:
        callbacks.append(ProgressBar())
    if early_stopping and has_validation:
        callbacks.append(
            EarlyStopping(
                monitor=monitor, mode=mode, patience=patience, check_on_train_epoch_end=False
            )
        )
    if checkpoint_dir is not None:
        callbacks.append(EpochCheckpoint(checkpoint_dir, keep=keep_checkpoints, best=best))
    val_kwargs: dict[str, Any] = {}
    if not has_validation:
        val_kwargs["limit_val_batches"] = 0
    elif check_val_every_n_steps is not None:
        val_kwargs.update(
            val_check_interval=int(check_val_every_n_steps), check_val_every_n_epoch=None
        )
    if strategy in ("ddp", "ddp_spawn") and find_unused_parameters:
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(
            find_unused_parameters=True,
            start_method="spawn" if strategy == "ddp_spawn" else "popen",
        )
    loggers = _make_loggers(logger, checkpoint_dir)
    with tempfile.TemporaryDirectory(prefix="cellfm_sc_") as root, quiet_lightning():
        trainer = pl.Trainer(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            strategy=strategy or "auto",
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
            **val_kwargs,
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
    log_dir = None
    if loggers:
        first = loggers[0] if isinstance(loggers, list | tuple) else loggers
        log_dir = getattr(first, "log_dir", None)
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
