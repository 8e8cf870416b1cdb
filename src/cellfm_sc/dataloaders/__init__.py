"""Data modules: what a training run reads, built at fit time and sharded by rank.

One base, :class:`CellFMDataModuleBase` (``_base``: the trainer's rank, the Lightning loader
hooks, the device transfer), with the three modules on it: :class:`CellFMDataModule`
(``_cells``: cells of one AnnData), :class:`DonorDataModule` (``_bags``: bags of one donor's
cells, with the bag sampler and batches) and :class:`CorpusDataModule` (``_corpus``: cells
of several files over one gene vocabulary).
"""

from cellfm_sc.dataloaders._bags import DonorDataModule
from cellfm_sc.dataloaders._base import CellFMDataModuleBase
from cellfm_sc.dataloaders._cells import CellFMDataModule
from cellfm_sc.dataloaders._corpus import CorpusDataModule

__all__ = ["CellFMDataModule", "CellFMDataModuleBase", "CorpusDataModule", "DonorDataModule"]
