"""Loaders: AnnData rows -> :class:`~cellfm_sc.data.TokenBatch` batches.

Design (Lightning-friendly): a batch sampler (:class:`CellBatchSampler`) yields arrays of obs
indices, one per batch; :class:`CellDataset` reads those rows (sorted, contiguous where
possible for backed files), checks their values, and tokenises them vectorised.
:func:`make_dataloader` wires both into a ``torch.utils.data.DataLoader`` with
``batch_size=None``; :func:`batches` is the simple in-process generator.

Memory does not grow with the number of cells beyond index arrays (indices, per-cell lengths,
evaluation keys) and ``obs``: rows are read per batch and the matrix is never densified or
copied (except an in-memory CSC matrix, converted to CSR once, with a warning).

Multi-process use: a backed dataset stores the file name and reopens it in each worker.
With ``world_size > 1`` every rank gets the same number of batches and otherwise disjoint
cells: training pads the global batch list by repeating its first batches; evaluation pads with
one-cell batches of weight 0 (:attr:`TokenBatch.weight`), so weighted metrics count every cell
exactly once. Under Lightning, pass
``use_distributed_sampler=False`` to the Trainer and ``rank``/``world_size`` here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ._rows import RowSource, element_path, layer_label
from .checks import (
    check_counts,
    count_fix_hint,
    get_matrix,
    row_source,
    validate_count_values,
)
from .tokenize import DEFAULT_MAX_TOKENS, TokenBatch, name_keys, tokenize

__all__ = ["BUCKET_BATCHES", "CellBatchSampler", "CellDataset", "batches", "make_dataloader"]


#: Default bucketing window, in batches: ``bucket_size = BUCKET_BATCHES * batch_size`` cells.
BUCKET_BATCHES = 32


class CellBatchSampler(Sampler):
    """Yields batches of obs indices (int64 arrays), one per batch; one pass per epoch.

    Without shuffling, batches follow the order of ``indices``. With shuffling (per epoch,
    seeded by ``(seed, epoch)``): the indices are sorted, cut into chunks of ``chunk_size``
    consecutive rows, the chunks are permuted, and rows are permuted within consecutive buffers
    of ``buffer_size`` rows; so a batch comes from a few chunks and backed reads stay mostly
    sequential.

    Length bucketing (``lengths`` given): the stream of cells is cut into windows of
    ``bucket_size`` cells, the cells of each window are sorted by length (token count), and the
    batches are cut from the sorted windows, so a batch holds cells of similar length and is
    padded little. When shuffling, the batches of the epoch are then permuted (across and
    within windows), so batch lengths do not follow a pattern. Without shuffling (evaluation)
    the order is deterministic but no longer that of ``indices``: write results back through
    each batch's ``obs_index``.

    Parameters
    ----------
    indices
        Int ``(n,)`` obs rows to draw from.
    batch_size
        Cells per batch (the last batch may be smaller unless ``drop_last``).
    shuffle
        Shuffle every epoch.
    seed
        Seed of the shuffle.
    chunk_size, buffer_size
        Shuffle granularity (rows), see above.
    lengths
        Optional ``(n,)`` per-cell token counts (or nnz) aligned with ``indices``; enables
        length bucketing.
    bucket_size
        Cells per bucketing window, rounded up to a multiple of ``batch_size``. Default
        ``BUCKET_BATCHES * batch_size`` (32 batches): the padding left inside a batch falls
        like ``batch_size / bucket_size`` of the spread of lengths, so 32 batches per window
        leave a few percent, while a window stays a small, re-drawn slice of the epoch (batch
        mates change every epoch). See ``benchmarks/RESULTS.md`` for measured waste.
    rank, world_size
        Distributed position; every rank gets ``len(self)`` batches, and the ranks' cells are
        disjoint apart from the padding that evens out the batch counts (see ``exact``).
    drop_last
        Drop the last incomplete batch (and, distributed, the batches that do not fill a round).
    exact
        Evaluation mode (every cell counts exactly once): ranks are evened out with one-cell
        padding batches of weight 0 instead of repeats of real batches (see
        :meth:`iter_weighted`); needs ``drop_last=False``. Without it (training), padding
        repeats the epoch's first batches with weight 1, as ``DistributedSampler`` does.
    """

    def __init__(
        self,
        indices: np.ndarray,
        batch_size: int = 16,
        shuffle: bool = False,
        seed: int = 0,
        chunk_size: int = 64,
        buffer_size: int = 2048,
        lengths: np.ndarray | None = None,
        bucket_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        exact: bool = False,
    ):
        self.indices = np.asarray(indices, dtype=np.int64).ravel()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if exact and drop_last:
            raise ValueError(
                "exact=True (evaluation: every cell counted once) cannot drop cells; "
                "use drop_last=False"
            )
        if lengths is not None:
            lengths = np.asarray(lengths).ravel()
            if lengths.shape != self.indices.shape:
                raise ValueError(
                    f"lengths has shape {lengths.shape}, expected {self.indices.shape} "
                    "(one per index)"
                )
        if bucket_size is None:
            bucket_size = BUCKET_BATCHES * batch_size
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
        self.lengths = lengths
        self.batch_size = int(batch_size)
        self.bucket_size = math.ceil(int(bucket_size) / self.batch_size) * self.batch_size
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.chunk_size = max(1, int(chunk_size))
        self.buffer_size = max(1, int(buffer_size))
        self.rank, self.world_size = int(rank), int(world_size)
        self.drop_last = bool(drop_last)
        self.exact = bool(exact)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (changes the shuffle)."""
        self.epoch = int(epoch)

    def _n_global(self) -> int:
        n = self.indices.size
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        nb = self._n_global()
        if self.world_size == 1:
            return nb
        return nb // self.world_size if self.drop_last else math.ceil(nb / self.world_size)

    def global_batches(self) -> list[np.ndarray]:
        """All batches of this epoch, before the split across ranks (positions as obs rows)."""
        n = self.indices.size
        pos = np.arange(n, dtype=np.int64)
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch])
        if self.shuffle and n:
            order = np.argsort(self.indices, kind="stable")
            chunk_of = pos // self.chunk_size
            chunk_rank = np.argsort(rng.permutation(int(chunk_of[-1]) + 1))
            stream = order[np.argsort(chunk_rank[chunk_of], kind="stable")]
            stream = stream[np.lexsort((rng.random(n), pos // self.buffer_size))]
        else:
            stream = pos
        if self.lengths is not None and n:
            # sort by length inside each window (ties keep the stream order)
            stream = stream[np.lexsort((self.lengths[stream], pos // self.bucket_size))]
        n_b = self._n_global()
        out = [
            self.indices[stream[i * self.batch_size : (i + 1) * self.batch_size]]
            for i in range(n_b)
        ]
        if self.shuffle and self.lengths is not None and n_b:
            out = [out[i] for i in rng.permutation(n_b)]
        return out

    def iter_weighted(self) -> Iterator[tuple[np.ndarray, float]]:
        """Yield ``(rows, weight)`` for this rank: ``weight`` is 1.0 for real batches, 0.0 for
        the padding batches of ``exact`` mode (a copy of one cell, to be left out of metrics;
        the shortest non-empty cell when ``lengths`` are known).
        """
        batches_ = self.global_batches()
        if self.world_size == 1:
            for rows in batches_:
                yield rows, 1.0
            return
        n_b = len(batches_)
        total = len(self) * self.world_size
        for i in range(self.rank, total, self.world_size):
            if i < n_b:
                yield batches_[i], 1.0
            elif self.exact:
                yield self._padding_cell(batches_), 0.0
            else:
                yield batches_[i % n_b], 1.0

    def _padding_cell(self, batches_: list[np.ndarray]) -> np.ndarray:
        """The one cell of an ``exact`` padding batch: the shortest cell with a token when
        lengths are known (cheapest to run, and never a cell without counts), else the first."""
        if self.lengths is not None:
            pos = np.flatnonzero(self.lengths > 0)
            if pos.size:
                return self.indices[[pos[np.argmin(self.lengths[pos])]]]
        return batches_[0][:1]

    def __iter__(self) -> Iterator[np.ndarray]:
        for rows, _ in self.iter_weighted():
            yield rows


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


class _EpochTagged(Sampler):
    """Wraps a :class:`CellBatchSampler` to send ``(epoch, rows, weight)`` to the dataset."""

    def __init__(self, sampler: CellBatchSampler, dataset: CellDataset):
        self.sampler = sampler
        self.dataset = dataset

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, float]]:
        epoch = self.sampler.epoch
        for rows, weight in self.sampler.iter_weighted():
            yield epoch, rows, weight


def _prepare(
    adata: Any,
    indices: np.ndarray | None,
    batch_size: int,
    *,
    layer: str | None,
    use_raw: bool,
    max_tokens: int,
    train: bool,
    shuffle: bool,
    seed: int,
    labels: np.ndarray | None,
    gene_id_map: np.ndarray | None,
    rank: int,
    world_size: int,
    bucket: bool,
    bucket_size: int | None,
    drop_last: bool,
    chunk_size: int,
    buffer_size: int,
    check: bool | str,
) -> tuple[CellDataset, CellBatchSampler]:
    mode = {True: "sample", False: "none"}.get(check, check)  # type: ignore[call-overload]
    if mode not in ("sample", "full", "none"):
        raise ValueError(f"check must be True, False, 'sample', 'full' or 'none', got {check!r}")
    if mode != "none" and not isinstance(adata, str | Path):
        check_counts(
            adata,
            layer,
            use_raw=use_raw,
            indices=indices,
            full=mode == "full",
            forbid_empty=train,
        )
    dataset = CellDataset(
        adata,
        indices,
        layer=layer,
        use_raw=use_raw,
        max_tokens=max_tokens,
        train=train,
        seed=seed,
        labels=labels,
        gene_id_map=gene_id_map,
    )
    sampler = CellBatchSampler(
        dataset.indices,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        chunk_size=chunk_size,
        buffer_size=buffer_size,
        lengths=dataset.lengths() if bucket else None,
        bucket_size=bucket_size,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
        exact=not train,
    )
    return dataset, sampler


def make_dataloader(
    adata: Any,
    indices: np.ndarray | None = None,
    batch_size: int = 16,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    train: bool = False,
    shuffle: bool | None = None,
    seed: int = 0,
    labels: np.ndarray | None = None,
    gene_id_map: np.ndarray | None = None,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    bucket: bool = False,
    bucket_size: int | None = None,
    pin_memory: bool = False,
    drop_last: bool = False,
    chunk_size: int = 64,
    buffer_size: int = 2048,
    persistent_workers: bool = False,
    check: bool | str = True,
) -> DataLoader:
    """A ``DataLoader`` of :class:`~cellfm_sc.data.TokenBatch` over cells ``indices`` of ``adata``.

    Parameters
    ----------
    adata
        AnnData (in memory or backed) or an ``.h5ad`` path (read backed).
    indices
        Obs rows to load (default all).
    batch_size
        Cells per batch.
    layer, use_raw, max_tokens, train, seed, labels, gene_id_map
        See :class:`CellDataset` (``use_raw``: counts from ``adata.raw.X``).
    shuffle
        Default: ``train``.
    num_workers, pin_memory, persistent_workers
        Passed to ``DataLoader``; workers reopen backed files.
    rank, world_size, drop_last, chunk_size, buffer_size
        See :class:`CellBatchSampler`. An evaluation loader (``train=False``) counts every
        cell exactly once over the ranks: the batches that even out the ranks carry
        :attr:`TokenBatch.weight` 0 (``drop_last`` must then be False).
    bucket, bucket_size
        Length bucketing (per-cell lengths from ``indptr``, capped at ``max_tokens``), for
        training and evaluation: batches of cells of similar length, ``bucket_size`` cells per
        sorted window (default 32 batches), see :class:`CellBatchSampler`. The batch order then
        differs from ``indices``: results go back through ``batch.obs_index``.
    check
        :func:`~cellfm_sc.data.check_counts` before the first batch: ``True``/``"sample"`` (a sample of rows;
        with ``train``, also cells without counts), ``"full"`` (one streaming pass over every
        cell of ``indices``: all values, and empty cells), ``False``/``"none"``. Every batch's
        values are validated as it is read in any case.

    Returns
    -------
    DataLoader whose ``sampler`` has ``set_epoch`` (Lightning calls it each epoch); each item
    is a :class:`~cellfm_sc.data.TokenBatch` with ``values``/``gene_ids``/``valid`` of shape ``(B, L)``.

    Examples
    --------
    >>> loader = make_dataloader(adata, train_idx, batch_size=16, train=True,
    ...                          labels=codes, num_workers=2, bucket=True)  # doctest: +SKIP
    >>> next(iter(loader)).values.shape  # doctest: +SKIP
    torch.Size([16, 1873])
    """
    dataset, sampler = _prepare(
        adata,
        indices,
        batch_size,
        layer=layer,
        use_raw=use_raw,
        max_tokens=max_tokens,
        train=train,
        shuffle=train if shuffle is None else shuffle,
        seed=seed,
        labels=labels,
        gene_id_map=gene_id_map,
        rank=rank,
        world_size=world_size,
        bucket=bucket,
        bucket_size=bucket_size,
        drop_last=drop_last,
        chunk_size=chunk_size,
        buffer_size=buffer_size,
        check=check,
    )
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=_EpochTagged(sampler, dataset),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
    )


def batches(
    adata: Any,
    batch_size: int = 16,
    layer: str | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    train: bool = False,
    shuffle: bool = False,
    seed: int = 0,
    indices: np.ndarray | None = None,
    *,
    use_raw: bool = False,
    epoch: int = 0,
    labels: np.ndarray | None = None,
    gene_id_map: np.ndarray | None = None,
    bucket: bool = False,
    bucket_size: int | None = None,
    chunk_size: int = 64,
    buffer_size: int = 2048,
    check: bool | str = True,
) -> Iterator[TokenBatch]:
    """Yield :class:`~cellfm_sc.data.TokenBatch` es over ``adata`` in this process (one epoch).

    Parameters are those of :func:`make_dataloader`; ``epoch`` selects the training draw and
    the shuffle. Checks run before the first batch is yielded. Each batch holds ``(B, L)``
    tensors, ``L`` = the longest cell of the batch (at most ``max_tokens``). With ``bucket``
    the batches come in length-bucketed order; ``batch.obs_index`` says where each row goes.

    Examples
    --------
    >>> import cellfm_sc
    >>> adata = cellfm_sc.datasets.pbmc3k()
    >>> batch = next(cellfm_sc.data.batches(adata, batch_size=8, max_tokens=256))
    >>> tuple(batch.values.shape)
    (8, 256)
    """
    dataset, sampler = _prepare(
        adata,
        indices,
        batch_size,
        layer=layer,
        use_raw=use_raw,
        max_tokens=max_tokens,
        train=train,
        shuffle=shuffle,
        seed=seed,
        labels=labels,
        gene_id_map=gene_id_map,
        rank=0,
        world_size=1,
        bucket=bucket,
        bucket_size=bucket_size,
        drop_last=False,
        chunk_size=chunk_size,
        buffer_size=buffer_size,
        check=check,
    )
    sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)
    for rows in sampler:
        yield dataset[(epoch, rows)]
