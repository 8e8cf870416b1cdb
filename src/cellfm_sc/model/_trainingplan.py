"""Lightning training plan and callbacks of :class:`~cellfm_sc.CellFMClassifier`."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint

from cellfm_sc.data import TokenBatch, make_dataloader
from cellfm_sc.model._module import CellFMClassifierModule

__all__ = ["BestStateCallback", "CellFMDataModule", "CellFMTrainingPlan", "EpochCheckpoint"]

LR_SCHEDULES = ("step", "cosine", "constant")


class CellFMTrainingPlan(pl.LightningModule):
    """Trains the classifier: AdamW on trainable parameters, step/cosine LR per epoch.

    Cell-weighted train/validation loss and accuracy are accumulated as sums and reduced
    across processes, so they are exact (no average of batch averages, no dropped cells).
    ``history`` holds one row per epoch; ``step_history`` one row per validation run.
    """

    def __init__(
        self,
        module: CellFMClassifierModule,
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        lr_schedule: str = "step",
        lr_gamma: float = 0.95,
        max_epochs: int = 5,
        masked_value_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.module = module
        self.lr = lr
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule
        self.lr_gamma = lr_gamma
        self.max_epochs = max_epochs
        self.masked_value_weight = masked_value_weight
        self.history: list[dict[str, float]] = []
        self.step_history: list[dict[str, float]] = []
        self.last_validation: dict[str, float] = {}
        self._train_sums = torch.zeros(3, dtype=torch.float64)
        self._val_sums = torch.zeros(3, dtype=torch.float64)

    # -- steps
    def _step(self, batch: TokenBatch, train: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if train and self.masked_value_weight > 0:
            out, mv_loss = self.module.masked_value_loss(batch)
            loss = self.module.loss(out.logits, batch.labels)
            self.log("train_masked_value_loss", mv_loss.detach(), batch_size=len(batch))
            total = loss + self.masked_value_weight * mv_loss
        else:
            out = self.module(batch)
            loss = total = self.module.loss(out.logits, batch.labels)
        n = len(batch)
        correct = (out.logits.argmax(-1) == batch.labels).sum()
        sums = torch.stack(
            [
                loss.detach().double() * n,
                correct.double(),
                torch.tensor(float(n), dtype=torch.float64, device=loss.device),
            ]
        )
        return total, sums

    def training_step(self, batch: TokenBatch, batch_idx: int) -> torch.Tensor:
        loss, sums = self._step(batch, train=True)
        self._train_sums = self._train_sums.to(sums.device) + sums
        self.log("train_loss", loss.detach(), prog_bar=True, batch_size=len(batch))
        return loss

    def validation_step(self, batch: TokenBatch, batch_idx: int) -> None:
        _, sums = self._step(batch)
        self._val_sums = self._val_sums.to(sums.device) + sums

    def _reduce(self, sums: torch.Tensor) -> tuple[float, float, float]:
        total = self.trainer.strategy.reduce(sums.clone(), reduce_op="sum")
        loss_sum, correct, n = (float(x) for x in total)
        if n == 0:
            return math.nan, math.nan, 0.0
        return loss_sum / n, correct / n, n

    # -- epoch ends
    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(3, dtype=torch.float64, device=self.device)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        loss, acc, n = self._reduce(self._val_sums)
        train_loss, train_acc, _ = self._reduce(self._train_sums)  # epoch to date
        self.last_validation = {
            "epoch": int(self.current_epoch),
            "step": int(self.global_step),
            "train_loss": train_loss,
            "train_acc": train_acc,
            "validation_loss": loss,
            "validation_acc": acc,
            "n_validation": n,
        }
        self.step_history.append(dict(self.last_validation))
        # identical on every rank (already reduced), so no further sync is needed
        self.log("validation_loss", loss, prog_bar=True, sync_dist=False)
        self.log("validation_acc", acc, prog_bar=True, sync_dist=False)

    def on_train_epoch_start(self) -> None:
        self._train_sums = torch.zeros(3, dtype=torch.float64, device=self.device)

    def on_train_epoch_end(self) -> None:
        loss, acc, _ = self._reduce(self._train_sums)
        row = {
            "epoch": int(self.current_epoch) + 1,
            "train_loss": loss,
            "train_acc": acc,
            "validation_loss": math.nan,
            "validation_acc": math.nan,
            "lr": float(self.trainer.optimizers[0].param_groups[0]["lr"]),
        }
        if self.last_validation.get("epoch") == int(self.current_epoch):
            row["validation_loss"] = self.last_validation["validation_loss"]
            row["validation_acc"] = self.last_validation["validation_acc"]
        self.history.append(row)
        self.log("train_acc", acc, sync_dist=False)

    # -- optimisation
    def configure_optimizers(self) -> Any:
        params = [p for p in self.module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_schedule == "constant":
            return optimizer
        if self.lr_schedule == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=self.lr_gamma)
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=max(self.max_epochs, 1)
            )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }

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


class CellFMDataModule(pl.LightningDataModule):
    """Train/validation loaders built at fit time, sharded by the trainer's rank."""

    def __init__(
        self,
        adata: Any,
        train_indices: np.ndarray,
        validation_indices: np.ndarray,
        labels: np.ndarray,
        *,
        batch_size: int,
        layer: str | None,
        max_tokens: int,
        seed: int,
        num_workers: int = 0,
        gene_id_map: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.adata = adata
        self.train_indices = train_indices
        self.validation_indices = validation_indices
        self.kw = dict(
            batch_size=batch_size,
            layer=layer,
            max_tokens=max_tokens,
            seed=seed,
            labels=labels,
            gene_id_map=gene_id_map,
            num_workers=num_workers,
            persistent_workers=False,
            check=True,
        )

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, indices: np.ndarray, train: bool):
        rank, world = self._rank()
        return make_dataloader(
            self.adata,
            indices,
            train=train,
            shuffle=train,
            bucket=train,  # length bucketing cuts padding; evaluation keeps the order
            rank=rank,
            world_size=world,
            pin_memory=torch.cuda.is_available(),
            **self.kw,
        )

    def train_dataloader(self):
        return self._loader(self.train_indices, train=True)

    def val_dataloader(self):
        return self._loader(self.validation_indices, train=False)

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        return batch.to(device, non_blocking=True) if isinstance(batch, TokenBatch) else batch


class BestStateCallback(pl.Callback):
    """Keeps a CPU copy of the weights at the best validation score; restores them at the end.

    Only trainable parameters and buffers are copied (frozen ones never change).
    """

    def __init__(self, monitor: str = "validation_acc", mode: str = "max") -> None:
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

    def on_validation_end(self, trainer: pl.Trainer, pl_module: CellFMTrainingPlan) -> None:
        if trainer.sanity_checking or not pl_module.last_validation:
            return
        score = float(pl_module.last_validation[self.monitor])
        if self._better(score):
            self.best_score = score
            self.best_epoch = int(pl_module.last_validation["epoch"]) + 1
            self.best_state = self._snapshot(pl_module.module)

    def restore(self, module: torch.nn.Module) -> bool:
        if self.best_state is None:
            return False
        missing = set(self.best_state) - set(module.state_dict())
        if missing:
            raise RuntimeError(f"best state has unknown entries {sorted(missing)[:5]}")
        module.load_state_dict(self.best_state, strict=False)  # a subset by construction
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


class EpochCheckpoint(Checkpoint):
    """Writes ``checkpoint_epoch_{n}.pth`` (a full, resumable Lightning checkpoint) each epoch.

    A :class:`~lightning.pytorch.callbacks.Checkpoint` subclass, so Lightning calls its
    ``on_train_epoch_end`` after the training plan's (the epoch's history row is in the
    file). The checkpoint holds model, optimizer, scheduler, epoch counter, callbacks'
    state, history and RNG state; files are written atomically (temporary name, rename).
    """

    def __init__(self, dirpath: str | os.PathLike[str]) -> None:
        self.dirpath = Path(dirpath)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = int(trainer.current_epoch) + 1
        self.dirpath.mkdir(parents=True, exist_ok=True)
        final = self.dirpath / f"checkpoint_epoch_{epoch}.pth"
        tmp = self.dirpath / f".checkpoint_epoch_{epoch}.pth.tmp"
        trainer.save_checkpoint(tmp, weights_only=False)  # full state, resumable
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            os.replace(tmp, final)
