"""The data-module base every training run reads through."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

__all__ = ["CellFMDataModuleBase"]


class CellFMDataModuleBase(pl.LightningDataModule):
    """Train and validation loaders of one kind of batch (cells, bags, a corpus's cells).

    A subclass implements :meth:`loader`; this base gives it the trainer's rank and world
    size (:meth:`_rank`), the two Lightning loader hooks and the device transfer of a batch
    (its ``to``).
    """

    def _rank(self) -> tuple[int, int]:
        """``(rank, world size)`` of the trainer running the fit; ``(0, 1)`` outside one."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def loader(self, train: bool) -> Any:
        """The training (``train=True``) or validation loader of this process's share."""
        raise NotImplementedError

    def train_dataloader(self) -> Any:
        return self.loader(train=True)

    def val_dataloader(self) -> Any:
        return self.loader(train=False)

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        return batch.to(device, non_blocking=True) if hasattr(batch, "to") else batch
