"""The training plan base: optimizer, schedule, exact epoch metrics, history, resume state."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from cellfm_sc._constants import LR_SCHEDULES
from cellfm_sc.data import TokenBatch

__all__ = [
    "NonFiniteLossError",
    "StepOutput",
    "TrainingPlan",
    "loss_and_accuracy",
    "make_scheduler",
]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; training stopped at that step."""


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


def loss_and_accuracy(sums: Mapping[str, float]) -> dict[str, float]:
    """Epoch ``loss`` and ``acc`` from the sums ``"loss"``, ``"correct"`` and ``"n"`` (NaN
    when nothing was counted): the classifier's and the donor plan's epoch metrics."""
    n = sums.get("n", 0.0)
    if not n:
        return {"loss": float("nan"), "acc": float("nan")}
    return {"loss": sums["loss"] / n, "acc": sums["correct"] / n}


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

    #: a subclass's attributes that travel with a resume checkpoint (as ``cellfm_<name>``)
    _checkpointed: tuple[str, ...] = ()

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
        return self.metrics_from_sums(sums) if sums else {}

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
        for name in self._checkpointed:
            checkpoint[f"cellfm_{name}"] = getattr(self, name)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = [dict(r) for r in checkpoint.get("cellfm_history", [])]
        self.step_history = [dict(r) for r in checkpoint.get("cellfm_step_history", [])]
        self.last_validation = dict(checkpoint.get("cellfm_last_validation", {}))
        for name in self._checkpointed:
            setattr(self, name, checkpoint.get(f"cellfm_{name}"))
        rng = checkpoint.get("cellfm_rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
