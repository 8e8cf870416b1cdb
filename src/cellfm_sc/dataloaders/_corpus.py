"""A pretraining corpus: several AnnData (files read in place) over one gene vocabulary, the
union of the members' gene names (:func:`union_genes`), read by :class:`CorpusDataModule`
member by member: nothing is concatenated or copied, memory holds the index arrays only."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cellfm_sc._constants import CORPUS_SAMPLING
from cellfm_sc.data import CellBatchSampler, CellDataset, TokenBatch, matrix_var_names
from cellfm_sc.dataloaders._base import CellFMDataModuleBase

__all__ = [
    "CorpusDataModule",
    "CorpusMember",
    "balanced_quotas",
    "looks_ensembl",
    "member_ensembl_ids",
    "member_gene_names",
    "union_genes",
]

_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


def looks_ensembl(names: Sequence[str] | np.ndarray) -> bool:
    """Whether most names (> 50%) are Ensembl gene ids (``ENSG00000141510``, ``ENSMUSG...``)."""
    names = [str(n) for n in names]
    if not names:
        return False
    hits = sum(bool(_ENSEMBL_RE.match(n)) for n in names)
    return hits > len(names) / 2


def member_gene_names(
    adata: Any, *, use_raw: bool = False, gene_symbols: str | None = None
) -> np.ndarray:
    """Vocabulary name of every column of ``adata``'s count matrix, unique, object ``(n_vars,)``.

    Parameters
    ----------
    adata
        AnnData (in memory or backed).
    use_raw
        The counts are in ``adata.raw.X`` (names from ``adata.raw.var``).
    gene_symbols
        ``var`` column holding gene symbols (e.g. ``"gene_names"`` when ``var_names`` are
        Ensembl ids). A column whose symbol is missing, empty, or repeats an earlier
        column's symbol keeps its ``var_name`` instead. Default: the ``var_names``.
    """
    var_names = np.asarray([str(v) for v in matrix_var_names(adata, use_raw=use_raw)], dtype=object)
    if gene_symbols is None:
        return var_names
    var = adata.raw.var if use_raw else adata.var
    symbols = var[gene_symbols]
    missing = symbols.isna().to_numpy()
    text = np.asarray([str(s).strip() for s in symbols], dtype=object)
    missing |= text == ""
    names = np.where(missing, var_names, text)
    repeated = pd.Index(names).duplicated(keep="first")
    names = np.where(repeated, var_names, names)
    # a var_name equal to another column's symbol would still collide: keep the first
    clash = pd.Index(names).duplicated(keep="first")
    if clash.any():
        names = np.where(clash, [f"{v}#{i}" for i, v in enumerate(var_names)], names)
    return names.astype(object)


#: ``var`` columns that commonly hold Ensembl ids beside symbol ``var_names`` (10x: gene_ids)
_ENSEMBL_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl_ids", "ensembl")


def member_ensembl_ids(
    adata: Any, *, use_raw: bool = False, gene_symbols: str | None = None
) -> np.ndarray | None:
    """Ensembl id of every column of ``adata``'s count matrix, or ``None`` when unknown.

    With ``gene_symbols`` the ``var_names`` are the ids if they look like Ensembl ids;
    otherwise the first of ``gene_ids``, ``gene_id``, ``ensembl_id``, ``ensembl_ids``,
    ``ensembl`` (``var`` columns) whose values look like Ensembl ids. Object array
    ``(n_vars,)`` (``None`` where an entry is missing).
    """
    var = adata.raw.var if use_raw else adata.var
    candidates = []
    if gene_symbols is not None:
        candidates.append(np.asarray(matrix_var_names(adata, use_raw=use_raw), dtype=object))
    candidates += [var[c].to_numpy(dtype=object) for c in _ENSEMBL_COLUMNS if c in var.columns]
    for values in candidates:
        text = np.asarray(["" if pd.isna(v) else str(v) for v in values], dtype=object)
        if looks_ensembl(text):
            return np.where(text == "", None, text)
    return None


def union_genes(name_lists: Sequence[np.ndarray]) -> list[str]:
    """The genes of every list, each once, in order of first appearance."""
    return list(dict.fromkeys(str(n) for names in name_lists for n in names))


@dataclass
class CorpusMember:
    """One AnnData of a corpus and how it is read.

    Attributes
    ----------
    adata
        The AnnData (in memory or backed); never modified.
    name
        How messages call it (its file name, or ``adata[i]``).
    layer, use_raw, gene_symbols
        Where its counts and gene symbols are (its ``setup_anndata`` arguments).
    gene_id_map
        int64 ``(n_vars,)``: token id in the corpus vocabulary of every matrix column.
    train, validation
        int64 obs rows of the member in each part of the split (set by ``train()``).
    """

    adata: Any
    name: str
    layer: str | None
    use_raw: bool
    gene_symbols: str | None
    gene_id_map: np.ndarray
    train: np.ndarray | None = None
    validation: np.ndarray | None = None

    @property
    def n_obs(self) -> int:
        return int(self.adata.n_obs)


class _CorpusDataset(Dataset):
    """``dataset[(member, epoch, rows, weight)] -> TokenBatch`` of that member's rows."""

    def __init__(self, datasets: Sequence[CellDataset]) -> None:
        self.datasets = list(datasets)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, request: tuple[int, int, np.ndarray, float]) -> TokenBatch:
        member, epoch, rows, weight = request
        return self.datasets[member][(epoch, rows, weight)]


class _CorpusSampler(Sampler):
    """Every member's batches (each member's own :class:`CellBatchSampler`), interleaved.

    Training: the batches of all members are permuted at random every epoch (seeded by
    ``(seed, epoch)``). With ``quotas`` (balanced sampling) member ``m`` contributes
    ``quotas[m]`` batches per epoch instead of all of its own: the first ones of its shuffled
    pass when that is fewer (other cells next epoch), or further passes (other shuffles and
    token draws) when more. Evaluation: member by member, in order, every batch once. Under
    distributed training each member's sampler gives every rank the same number of batches,
    so the ranks run the same number of steps.
    """

    def __init__(
        self,
        samplers: Sequence[CellBatchSampler],
        shuffle: bool,
        seed: int,
        quotas: Sequence[int] | None = None,
    ) -> None:
        self.samplers = list(samplers)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.quotas = None if quotas is None else [int(q) for q in quotas]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        for s in self.samplers:
            s.set_epoch(epoch)

    def __len__(self) -> int:
        if self.quotas is not None:
            return sum(self.quotas)
        return sum(len(s) for s in self.samplers)

    def _member_items(self, m: int) -> list[tuple[int, int, np.ndarray, float]]:
        s = self.samplers[m]
        if self.quotas is None:
            return [(m, self.epoch, rows, w) for rows, w in s.iter_weighted()]
        items: list[tuple[int, int, np.ndarray, float]] = []
        extra = 0
        while len(items) < self.quotas[m] and len(s):
            # pass 0 is this epoch's own; further passes use epochs no other pass uses
            key = self.epoch if extra == 0 else _PASS_KEYS + self.epoch * _MAX_PASSES + extra
            s.set_epoch(key)
            items.extend((m, key, rows, w) for rows, w in s.iter_weighted())
            extra += 1
        s.set_epoch(self.epoch)
        return items[: self.quotas[m]]

    def __iter__(self) -> Iterator[tuple[int, int, np.ndarray, float]]:
        items = [item for m in range(len(self.samplers)) for item in self._member_items(m)]
        if self.shuffle and items:
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, 0x636F])
            items = [items[i] for i in rng.permutation(len(items))]
        yield from items


#: epoch keys of a small member's further passes in a balanced epoch: beyond any real epoch
_PASS_KEYS = 1 << 40
_MAX_PASSES = 1 << 16


def balanced_quotas(n_batches: Sequence[int]) -> list[int]:
    """Batches per member and epoch when every member weighs the same: the epoch keeps its
    length (the sum of ``n_batches``), split evenly; members without cells get none.

    Examples
    --------
    >>> balanced_quotas([670, 112, 169])
    [317, 317, 317]
    """
    n = [int(b) for b in n_batches]
    active = [i for i, b in enumerate(n) if b > 0]
    base, rest = divmod(sum(n), max(len(active), 1))  # no active member: all 0
    out = [0] * len(n)
    for j, i in enumerate(active):
        out[i] = base + int(j < rest)
    return out


class CorpusDataModule(CellFMDataModuleBase):
    """Train/validation loaders over a corpus, built at fit time, sharded by rank.

    Parameters
    ----------
    members
        The corpus (each with ``train`` / ``validation`` rows and ``gene_id_map``).
    batch_size, max_tokens, seed
        As for :func:`~cellfm_sc.data.make_dataloader`. Member ``i`` draws its tokens with
        seed ``seed + i`` (distinct streams for equal row numbers in different files).
    num_workers
        DataLoader worker processes (backed files are reopened in each worker).
    sampling
        ``"proportional"`` (default): every training cell once per epoch, so members weigh
        by their size. ``"balanced"``: every member contributes the same number of batches
        per epoch (:func:`balanced_quotas`; small members are repeated with other token
        draws, large ones sub-sampled), so one big file does not dominate. Validation reads
        every cell once either way.
    depth_augmentation
        Chance that a training cell is thinned to a random depth
        (:class:`~cellfm_sc.data.CellDataset`); validation cells never are.
    """

    def __init__(
        self,
        members: Sequence[CorpusMember],
        *,
        batch_size: int,
        max_tokens: int,
        seed: int = 0,
        num_workers: int = 0,
        sampling: str = "proportional",
        depth_augmentation: float = 0.0,
    ) -> None:
        super().__init__()
        if sampling not in CORPUS_SAMPLING:
            raise ValueError(f"corpus sampling must be one of {CORPUS_SAMPLING}, got {sampling!r}")
        self.sampling = sampling
        self.members = list(members)
        self.batch_size = int(batch_size)
        self.max_tokens = int(max_tokens)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.depth_augmentation = float(depth_augmentation)

    def loader(self, train: bool) -> DataLoader:
        rank, world = self._rank()
        datasets, samplers = [], []
        for i, m in enumerate(self.members):
            rows = m.train if train else m.validation
            rows = np.zeros(0, dtype=np.int64) if rows is None else rows
            ds = CellDataset(
                m.adata,
                rows,
                layer=m.layer,
                use_raw=m.use_raw,
                max_tokens=self.max_tokens,
                train=train,
                seed=self.seed + i,
                gene_id_map=m.gene_id_map,
                depth_augmentation=self.depth_augmentation,
            )
            datasets.append(ds)
            samplers.append(
                CellBatchSampler(
                    ds.indices,
                    self.batch_size,
                    shuffle=train,
                    seed=self.seed + i,
                    lengths=ds.lengths(),
                    rank=rank,
                    world_size=world,
                    exact=not train,
                )
            )
        quotas = None
        if train and self.sampling == "balanced":
            quotas = balanced_quotas([len(s) for s in samplers])
        return DataLoader(
            _CorpusDataset(datasets),
            batch_size=None,
            sampler=_CorpusSampler(samplers, shuffle=train, seed=self.seed, quotas=quotas),
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )
