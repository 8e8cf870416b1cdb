"""The dataset: reads, checks and tokenises the rows of one batch of cells."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ._rows import RowSource, element_path, layer_label
from .augment import thin_depth
from .checks import count_fix_hint, get_matrix, row_source, validate_count_values
from .tokenize import DEFAULT_MAX_TOKENS, TokenBatch, name_keys, tokenize

__all__ = ["CellDataset"]


class CellDataset(Dataset):
    """Reads and tokenises batches of cells; ``dataset[obs_indices] -> TokenBatch``.

    Parameters
    ----------
    adata
        AnnData (in memory or backed), or the path of an ``.h5ad`` file (read backed).
    indices
        Int ``(n,)`` obs rows this dataset serves (default all); ``len(dataset) = n``.
    layer
        None for ``adata.X``, else the layer with raw counts.
    use_raw
        Read the counts from ``adata.raw.X`` (backed: the file's ``raw/X``); its columns are
        ``adata.raw.var_names`` (:func:`~cellfm_sc.data.matrix_var_names`), which
        ``gene_id_map`` then follows. Cannot be combined with ``layer``.
    max_tokens
        Most tokens per cell.
    train
        Training draws (fresh each epoch) and empty cells are an error; otherwise evaluation
        draws keyed by obs name, and an empty cell gives a row with ``n_tokens == 0``.
    seed
        Seed of the draws.
    labels
        Int label codes ``(n_obs,)`` (one per AnnData row), or None.
    gene_id_map
        int64 ``(n_vars,)``: gene id of each column; default ``column + 1``; 0 drops the
        column (a gene the model does not know), see :func:`~cellfm_sc.data.align_genes`.
    check_values
        Validate the stored values of every batch (cheap: the data array of its rows).
    depth_augmentation
        Training only: the chance that a cell's counts are thinned to a random depth
        (:func:`~cellfm_sc.data.thin_depth`) before it is tokenised; 0 reads cells as they are.

    Notes
    -----
    ``dataset[request]`` accepts an int array of obs rows, ``(epoch, rows)`` or
    ``(epoch, rows, weight)`` (what :func:`make_dataloader` sends, so persistent workers see the
    epoch; ``weight`` fills :attr:`TokenBatch.weight`). The batch keeps the order of the request.
    For length bucketing, :meth:`lengths` gives the per-cell lengths a
    :class:`CellBatchSampler` sorts by.
    """

    def __init__(
        self,
        adata: Any,
        indices: np.ndarray | None = None,
        *,
        layer: str | None = None,
        use_raw: bool = False,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        train: bool = False,
        seed: int = 0,
        labels: np.ndarray | None = None,
        gene_id_map: np.ndarray | None = None,
        check_values: bool = True,
        depth_augmentation: float = 0.0,
    ):
        if isinstance(adata, str | Path):
            import anndata

            path = str(adata)
            backed = anndata.read_h5ad(path, backed="r")
            try:
                get_matrix(backed, layer, use_raw=use_raw)  # the errors that name the matrix
                obs_names = backed.obs_names
                self._fix = count_fix_hint(backed, layer, use_raw)
                self.source = RowSource(path=path, element=element_path(layer, use_raw))
            finally:
                backed.file.close()
        else:
            obs_names = adata.obs_names
            self.source = row_source(adata, layer, use_raw=use_raw)
            self._fix = count_fix_hint(adata, layer, use_raw)
        self.layer = layer
        self.use_raw = bool(use_raw)
        self.n_obs, self.n_vars = self.source.n_obs, self.source.n_vars
        self.indices = (
            np.arange(self.n_obs, dtype=np.int64)
            if indices is None
            else np.asarray(indices, dtype=np.int64).ravel()
        )
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= self.n_obs):
            raise IndexError(f"indices out of range for an AnnData with {self.n_obs} cells")
        self.max_tokens = int(max_tokens)
        self.train = bool(train)
        self.seed = int(seed)
        self.epoch = 0
        self.check_values = check_values
        if not 0.0 <= float(depth_augmentation) <= 1.0:
            raise ValueError(f"depth_augmentation must be in [0, 1], got {depth_augmentation!r}")
        self.depth_augmentation = float(depth_augmentation) if self.train else 0.0
        self.obs_names = obs_names
        self.labels = None
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (self.n_obs,):
                raise ValueError(
                    f"labels has shape {labels.shape}, expected ({self.n_obs},): one code per "
                    "AnnData row"
                )
            self.labels = labels.astype(np.int64)
        if gene_id_map is not None:
            gene_id_map = np.asarray(gene_id_map, dtype=np.int64)
            if gene_id_map.shape != (self.n_vars,):
                raise ValueError(
                    f"gene_id_map has shape {gene_id_map.shape}, expected ({self.n_vars},): "
                    f"one gene id per column of {layer_label(layer, use_raw)}"
                )
            if gene_id_map.size and gene_id_map.min() < 0:
                raise ValueError("gene_id_map holds negative ids (0 = a gene without a token)")
        self.gene_id_map = gene_id_map
        # evaluation keys depend on (seed, obs name) only: one uint64 per cell
        self._eval_keys = None if self.train else name_keys(np.asarray(obs_names), self.seed)

    def __len__(self) -> int:
        return int(self.indices.size)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the training draws."""
        self.epoch = int(epoch)

    def lengths(self) -> np.ndarray:
        """Bucketing lengths: stored values per cell of ``indices``, capped at ``max_tokens``.

        int64 ``(n,)``, from ``indptr`` alone (no value is read), so it counts columns that give
        no token (explicit zeros, genes with gene id 0) too: an upper bound of ``n_tokens``
        that sorts cells well enough for bucketing.
        """
        return np.minimum(self.source.row_nnz()[self.indices], self.max_tokens)

    def __getitem__(self, request: Any) -> TokenBatch:
        weight = 1.0
        if isinstance(request, tuple):
            epoch, rows, *rest = request
            if rest:
                weight = float(rest[0])
        else:
            epoch, rows = self.epoch, request
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        block = self.source.read(rows)
        if self.check_values:
            validate_count_values(
                block.data,
                block.indptr,
                rows,
                layer=self.layer,
                use_raw=self.use_raw,
                obs_name=self.obs_names,
                fix=self._fix,
            )
        if self.depth_augmentation:
            block = thin_depth(
                block, rows, probability=self.depth_augmentation, seed=self.seed, epoch=int(epoch)
            )
        batch = tokenize(
            block,
            rows,
            max_tokens=self.max_tokens,
            train=self.train,
            seed=self.seed,
            epoch=int(epoch),
            cell_keys=None if self._eval_keys is None else self._eval_keys[rows],
            labels=None if self.labels is None else self.labels[rows],
            gene_id_map=self.gene_id_map,
        )
        if self.train:
            empty = rows[batch.n_tokens.numpy() == 0]
            if empty.size:
                names = [str(self.obs_names[i]) for i in empty[:5]]
                raise ValueError(
                    f"{empty.size} cell(s) of this training batch have no counts in "
                    f"{layer_label(self.layer, self.use_raw)}: {names}; remove cells without "
                    "counts before "
                    "training (see cellfm_sc.data.empty_cells)"
                )
        if weight != 1.0:
            batch.weight = torch.full((len(rows),), weight, dtype=torch.float32)
        return batch
