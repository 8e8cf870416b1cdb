"""Cells of one AnnData: :class:`CellFMDataModule` (the classifier's and the pretrainer's)."""

from __future__ import annotations

from typing import Any

import torch

from cellfm_sc.data import DataSplit, make_dataloader
from cellfm_sc.dataloaders._base import CellFMDataModuleBase

__all__ = ["CellFMDataModule"]


class CellFMDataModule(CellFMDataModuleBase):
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

    def loader(self, train: bool) -> Any:
        rank, world = self._rank()
        return make_dataloader(
            self.adata,
            self.split.train if train else self.split.validation,
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
