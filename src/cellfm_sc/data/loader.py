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

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Sampler

from ._dataset import CellDataset
from ._sampler import BUCKET_BATCHES, CellBatchSampler
from .checks import check_counts
from .tokenize import DEFAULT_MAX_TOKENS, TokenBatch

__all__ = ["BUCKET_BATCHES", "CellBatchSampler", "CellDataset", "batches", "make_dataloader"]


class EpochRelay(Sampler):
    """Wraps a batch sampler so that Lightning's ``set_epoch`` reaches it and the dataset."""

    def __init__(self, sampler: Any, dataset: Any) -> None:
        self.sampler = sampler
        self.dataset = dataset

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.sampler)


class _EpochTagged(EpochRelay):
    """Sends ``(epoch, rows, weight)`` of a :class:`CellBatchSampler` to the dataset."""

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, float]]:
        epoch = self.sampler.epoch
        for rows, weight in self.sampler.iter_weighted():
            yield epoch, rows, weight


#: arguments of :func:`make_dataloader` that go to the ``DataLoader``, not to :func:`_prepare`
_LOADER_ONLY = ("num_workers", "pin_memory", "persistent_workers")


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
    depth_augmentation: float,
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
        depth_augmentation=depth_augmentation,
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
    depth_augmentation: float = 0.0,
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
    layer, use_raw, max_tokens, train, seed, labels, gene_id_map, depth_augmentation
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
    args = {k: v for k, v in locals().items() if k not in _LOADER_ONLY}
    args["shuffle"] = train if shuffle is None else shuffle
    dataset, sampler = _prepare(**args)
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
    depth_augmentation: float = 0.0,
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
    args = {k: v for k, v in locals().items() if k != "epoch"}
    dataset, sampler = _prepare(**args, rank=0, world_size=1, drop_last=False)
    sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)
    for rows in sampler:
        yield dataset[(epoch, rows)]
