"""Bags of one donor's cells: partitions, batches, loaders (the data side of the donor model).

A **bag** is up to ``bag_size`` cells of one donor (:func:`partition_bags`): at random each
epoch in training, by a hash of the obs names in evaluation (so a donor's bags do not depend
on the order of the AnnData). A step holds ``bags_per_step`` bags, flat (:class:`BagBatch`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cellfm_sc.data import CellDataset, TokenBatch, name_keys, row_source
from cellfm_sc.data.loader import EpochRelay
from cellfm_sc.dataloaders._base import CellFMDataModuleBase

__all__ = [
    "Bag",
    "BagBatch",
    "BagDataset",
    "BagSampler",
    "DonorDataModule",
    "ExpressionRows",
    "eval_keys",
    "partition_bags",
]


@dataclass(frozen=True)
class Bag:
    """One bag: the donor's code and its cells (AnnData rows, int64 ``(m,)``)."""

    donor: int
    rows: np.ndarray


def partition_bags(
    rows: np.ndarray,
    donors: np.ndarray,
    bag_size: int,
    *,
    rng: np.random.Generator | None = None,
    keys: np.ndarray | None = None,
) -> list[Bag]:
    """Partition cells into bags of at most ``bag_size`` cells of one donor.

    Parameters
    ----------
    rows
        int64 ``(n,)`` AnnData rows of the cells.
    donors
        int ``(n,)`` donor code of each cell.
    bag_size
        Most cells per bag.
    rng
        Random partition (training): each donor's cells are shuffled by ``rng`` before they
        are cut into bags. Without it the cells are ordered by ``keys`` (or by row).
    keys
        ``(n,)`` sort keys of the deterministic partition (e.g. hashes of obs names).

    Returns
    -------
    The bags, donor by donor (ascending code); every cell is in exactly one bag, and a donor
    of ``m`` cells has ``ceil(m / bag_size)`` bags whose sizes differ by at most one.

    Examples
    --------
    >>> bags = partition_bags(np.arange(5), np.array([0, 0, 0, 1, 1]), bag_size=2)
    >>> [(b.donor, b.rows.tolist()) for b in bags]
    [(0, [0, 1]), (0, [2]), (1, [3, 4])]
    """
    if bag_size < 1:
        raise ValueError(f"bag_size must be >= 1, got {bag_size}")
    rows = np.asarray(rows, dtype=np.int64)
    donors = np.asarray(donors)
    if donors.shape != rows.shape:
        raise ValueError(f"donors has shape {donors.shape}, rows {rows.shape}")
    secondary = rows if keys is None else np.asarray(keys)
    order = np.lexsort((secondary, donors))
    rows, donors = rows[order], donors[order]
    starts = np.flatnonzero(np.r_[True, donors[1:] != donors[:-1]]) if rows.size else []
    ends = np.r_[starts[1:], rows.size] if rows.size else []
    out: list[Bag] = []
    for start, end in zip(starts, ends):
        cells = rows[start:end]
        if rng is not None:
            cells = rng.permutation(cells)
        n_bags = math.ceil(cells.size / bag_size)
        for part in np.array_split(cells, n_bags):
            out.append(Bag(int(donors[start]), np.sort(part)))
    return out


@dataclass
class BagBatch:
    """Several bags, flat.

    Attributes
    ----------
    bag
        int64 ``(n,)``: bag of each cell, in ``0 .. n_bags-1``.
    obs_index
        int64 ``(n,)``: AnnData row of each cell.
    labels
        int64 ``(n_bags,)`` label code of each bag's donor (-1 when unknown).
    donor
        int64 ``(n_bags,)`` donor code of each bag.
    weight
        float32 ``(n_bags,)``: 1 for real bags, 0 for the padding bags that even out
        distributed ranks in evaluation.
    cells
        The cells' tokens (:class:`~cellfm_sc.data.TokenBatch`, rows sorted by length), or
        None with cached embeddings.
    emb
        float32 ``(n, D)`` cached cell embeddings, or None.
    chunk_lengths
        Token length of each chunk of ``chunk_size`` consecutive cells (plain ints, so the
        trunk's input is trimmed without reading a GPU tensor).
    expr
        float32 ``(n, G)`` log-normalised counts of the expression view's genes (rows as
        the cells), or None without an expression view.
    """

    bag: torch.Tensor
    obs_index: torch.Tensor
    labels: torch.Tensor
    donor: torch.Tensor
    weight: torch.Tensor
    cells: TokenBatch | None = None
    emb: torch.Tensor | None = None
    chunk_lengths: tuple[int, ...] = ()
    expr: torch.Tensor | None = None

    @property
    def n_bags(self) -> int:
        return int(self.labels.shape[0])

    def __len__(self) -> int:
        return self.n_bags

    def _apply(self, fn: Any) -> BagBatch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        moved = {k: fn(v) for k, v in values.items() if isinstance(v, torch.Tensor | TokenBatch)}
        return BagBatch(**{**values, **moved})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> BagBatch:
        """A new batch with every tensor moved to ``device``."""
        return self._apply(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> BagBatch:
        """A new batch in pinned memory (``DataLoader(pin_memory=True)`` calls this)."""
        return self._apply(lambda t: t.pin_memory())


class ExpressionRows:
    """Reads the expression view's input: log-normalised counts of chosen genes, per cell.

    Parameters
    ----------
    adata
        AnnData with raw counts (in memory or backed; only the rows asked for are read).
    columns
        int64 ``(G,)``: the column of ``adata``'s count matrix of each view gene (-1: the
        gene is absent from these data and reads as 0, not expressed).
    layer, use_raw
        Where the counts are.

    Calling it with AnnData rows ``(m,)`` (any order) returns float32 ``(m, G)``. The row
    source pickles to a path for backed data, so DataLoader workers can hold it.
    """

    def __init__(
        self, adata: Any, columns: np.ndarray, *, layer: str | None = None, use_raw: bool = False
    ) -> None:
        self.source = row_source(adata, layer, use_raw=use_raw)
        self.columns = np.asarray(columns, dtype=np.int64)
        self.present = np.flatnonzero(self.columns >= 0)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        from cellfm_sc.baselines import log_normalized

        rows = np.asarray(rows, dtype=np.int64)
        out = np.zeros((rows.size, self.columns.size), dtype=np.float32)
        if rows.size == 0 or self.present.size == 0:
            return out
        block = log_normalized(sp.csr_matrix(self.source.read(rows)))
        out[:, self.present] = block[:, self.columns[self.present]].toarray()
        return out


class BagSampler(Sampler):
    """Yields, per step, ``(epoch, [(bag, weight), ...])``; one pass over the bags per epoch.

    Parameters
    ----------
    rows, donors
        Cells (AnnData rows) and their donor codes.
    bag_size
        Most cells per bag.
    bags_per_step
        Bags per step.
    train
        Random partition and order, fresh every epoch (seeded by ``(seed, epoch)``); else the
        deterministic partition (``keys``) in donor order.
    seed
        Seed of the training partitions.
    keys
        Sort keys of the deterministic partition.
    rank, world_size
        Distributed position: ranks take every ``world_size``-th step. Training evens out
        the ranks by repeating the epoch's first steps; evaluation with a padding step of
        one bag (the first bag's first cell) of weight 0, so every bag counts exactly once.
    """

    def __init__(
        self,
        rows: np.ndarray,
        donors: np.ndarray,
        bag_size: int,
        bags_per_step: int = 1,
        *,
        train: bool,
        seed: int = 0,
        keys: np.ndarray | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if bags_per_step < 1:
            raise ValueError(f"bags_per_step must be >= 1, got {bags_per_step}")
        self.rows = np.asarray(rows, dtype=np.int64)
        self.donors = np.asarray(donors)
        self.bag_size = int(bag_size)
        self.bags_per_step = int(bags_per_step)
        self.train = bool(train)
        self.seed = int(seed)
        self.keys = keys
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0
        self._fixed = (
            None if train else partition_bags(self.rows, self.donors, self.bag_size, keys=self.keys)
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def steps(self) -> list[list[Bag]]:
        """The bags of this epoch in steps, in the order they are stepped through (all ranks)."""
        bags = self._fixed
        if bags is None:
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch])
            bags = partition_bags(self.rows, self.donors, self.bag_size, rng=rng)
            bags = [bags[i] for i in rng.permutation(len(bags))]
        k = self.bags_per_step
        return [bags[i : i + k] for i in range(0, len(bags), k)]

    def __len__(self) -> int:
        if self._fixed is not None:
            n_bags = len(self._fixed)
        else:
            n_bags = sum(
                math.ceil(c / self.bag_size) for c in np.unique(self.donors, return_counts=True)[1]
            )
        n_steps = math.ceil(n_bags / self.bags_per_step)
        return math.ceil(n_steps / self.world_size)

    def __iter__(self) -> Iterator[tuple[int, list[tuple[Bag, float]]]]:
        steps = self.steps()
        for i in range(self.rank, len(self) * self.world_size, self.world_size):
            if i < len(steps) or self.train:
                yield self.epoch, [(b, 1.0) for b in steps[i % len(steps)]]
            else:
                first = steps[0][0]
                yield self.epoch, [(Bag(first.donor, first.rows[:1]), 0.0)]


class BagDataset(Dataset):
    """Builds a :class:`BagBatch` from ``(epoch, [(bag, weight), ...])``.

    Parameters
    ----------
    labels
        int64 ``(n_donors,)`` label code of each donor code (-1: unknown).
    cells
        A :class:`~cellfm_sc.data.CellDataset` to read and tokenise the cells (trainable
        trunk), or None.
    embeddings
        float32 ``(m, D)`` tensor of cached cell embeddings (frozen trunk), or None.
    emb_index
        int64 ``(n_obs,)``: row of ``embeddings`` of each AnnData row (-1: none).
    chunk_size
        Cells per trunk chunk (for ``chunk_lengths``).
    expression
        :class:`ExpressionRows` of the expression view, or None.

    Without ``cells`` and ``embeddings`` (a head on the expression view alone), a batch
    holds the bags' rows and ``expr`` only.
    """

    def __init__(
        self,
        labels: np.ndarray,
        *,
        cells: CellDataset | None = None,
        embeddings: torch.Tensor | None = None,
        emb_index: np.ndarray | None = None,
        chunk_size: int = 32,
        expression: ExpressionRows | None = None,
    ) -> None:
        if cells is not None and embeddings is not None:
            raise ValueError("give at most one of cells= or embeddings=")
        if cells is None and embeddings is None and expression is None:
            raise ValueError("give cells=, embeddings= or expression=")
        if embeddings is not None and emb_index is None:
            raise ValueError("embeddings= needs emb_index=")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.cells = cells
        self.embeddings = embeddings
        self.emb_index = None if emb_index is None else np.asarray(emb_index, dtype=np.int64)
        self.chunk_size = int(chunk_size)
        self.expression = expression

    def _expr(self, rows: np.ndarray) -> torch.Tensor | None:
        return None if self.expression is None else torch.from_numpy(self.expression(rows))

    def set_epoch(self, epoch: int) -> None:
        if self.cells is not None:
            self.cells.set_epoch(epoch)

    def __getitem__(self, request: tuple[int, Sequence[tuple[Bag, float]]]) -> BagBatch:
        epoch, items = request
        rows = np.concatenate([b.rows for b, _ in items])
        bag = np.concatenate(
            [np.full(b.rows.size, i, dtype=np.int64) for i, (b, _) in enumerate(items)]
        )
        donor = np.array([b.donor for b, _ in items], dtype=np.int64)
        common = {"labels": torch.from_numpy(self.labels[donor]), "donor": torch.from_numpy(donor)}
        common["weight"] = torch.tensor([w for _, w in items], dtype=torch.float32)
        if self.cells is None:
            emb = None
            if self.embeddings is not None:
                pos = self.emb_index[rows]
                if (pos < 0).any():
                    raise IndexError(
                        f"no cached embedding for AnnData rows {rows[pos < 0][:5].tolist()}"
                    )
                emb = self.embeddings[torch.from_numpy(pos)]
            return BagBatch(
                bag=torch.from_numpy(bag),
                obs_index=torch.from_numpy(rows),
                emb=emb,
                expr=self._expr(rows),
                **common,
            )
        tokens = self.cells[(epoch, rows)]
        order = torch.argsort(tokens.n_tokens, stable=True)
        tokens = tokens._apply(operator.itemgetter(order))
        n_tok = tokens.n_tokens.numpy()
        c = self.chunk_size
        lengths = tuple(int(n_tok[i : i + c].max()) for i in range(0, n_tok.size, c))
        return BagBatch(
            bag=torch.from_numpy(bag)[order],
            obs_index=tokens.obs_index,
            cells=tokens,
            chunk_lengths=lengths,
            expr=self._expr(tokens.obs_index.numpy()),
            **common,
        )


class DonorDataModule(CellFMDataModuleBase):
    """Training bags (random, fresh each epoch) and validation bags (fixed), by rank.

    Parameters
    ----------
    split_rows
        ``{"train": rows, "validation": rows}`` AnnData rows.
    donors
        int ``(n_obs,)`` donor code of every AnnData row.
    labels
        int64 ``(n_donors,)`` label code of each donor code.
    bag_size, bags_per_step, seed, chunk_size
        See :class:`BagSampler` and :class:`BagDataset`.
    eval_keys
        ``(n_obs,)`` sort keys of the deterministic validation partition.
    embeddings, emb_index
        Cached ``(m, D)`` cell embeddings (frozen trunk) and the row of each AnnData row in
        them, or None.
    cell_kwargs
        Without embeddings: keyword arguments of :class:`~cellfm_sc.data.CellDataset`
        (``adata``, ``layer``, ``use_raw``, ``max_tokens``, ``seed``, ``gene_id_map``);
        training reads with training draws, validation with evaluation draws. Neither this
        nor ``embeddings``: the head reads the expression view only.
    num_workers
        DataLoader workers.
    expression
        :class:`ExpressionRows` of the expression view, or None.
    """

    def __init__(
        self,
        split_rows: dict[str, np.ndarray],
        donors: np.ndarray,
        labels: np.ndarray,
        *,
        bag_size: int,
        bags_per_step: int,
        seed: int,
        eval_keys: np.ndarray,
        chunk_size: int = 32,
        embeddings: torch.Tensor | None = None,
        emb_index: np.ndarray | None = None,
        cell_kwargs: dict[str, Any] | None = None,
        num_workers: int = 0,
        expression: ExpressionRows | None = None,
    ) -> None:
        super().__init__()
        self.expression = expression
        self.split_rows = split_rows
        self.donors = np.asarray(donors)
        self.labels = labels
        self.bag_size = bag_size
        self.bags_per_step = bags_per_step
        self.seed = seed
        self.eval_keys = eval_keys
        self.chunk_size = chunk_size
        self.embeddings = embeddings
        self.emb_index = emb_index
        self.cell_kwargs = dict(cell_kwargs or {})
        self.num_workers = num_workers

    def loader(self, train: bool) -> DataLoader:
        rank, world = self._rank()
        rows = self.split_rows["train" if train else "validation"]
        cells = None
        if self.embeddings is None and self.cell_kwargs:
            kwargs = dict(self.cell_kwargs)
            cells = CellDataset(kwargs.pop("adata"), rows, train=train, check_values=True, **kwargs)
        dataset = BagDataset(
            self.labels,
            cells=cells,
            embeddings=self.embeddings,
            emb_index=self.emb_index,
            chunk_size=self.chunk_size,
            expression=self.expression,
        )
        sampler = BagSampler(
            rows,
            self.donors[rows],
            self.bag_size,
            self.bags_per_step,
            train=train,
            seed=self.seed,
            keys=None if train else self.eval_keys[rows],
            rank=rank,
            world_size=world,
        )
        return DataLoader(
            dataset,
            batch_size=None,
            sampler=EpochRelay(sampler, dataset),
            num_workers=self.num_workers if self.cell_kwargs else 0,
            pin_memory=torch.cuda.is_available(),
        )


def eval_keys(obs_names: Sequence[str] | np.ndarray, seed: int) -> np.ndarray:
    """uint64 ``(n,)`` keys of the deterministic partition: a stable hash of each obs name."""
    return name_keys(np.asarray(obs_names), seed)
