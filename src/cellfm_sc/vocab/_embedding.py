"""The new gene-embedding table: :func:`build_gene_embedding`, and the check of a transfer."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from cellfm_sc.vocab._mapping import GeneMapping
from cellfm_sc.vocab._text import as_object_array
from cellfm_sc.vocab._vocabulary import GeneVocab

#: Valid ``init=`` values of :func:`build_gene_embedding`.
INIT_METHODS: tuple[str, ...] = ("random", "transfer")
#: ``embedding_init="transfer"`` warns when fewer than this fraction of dataset genes map.
TRANSFER_MIN_COVERAGE = 0.5
_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


def _ensembl_hint(names: np.ndarray) -> str:
    """A hint when most dataset gene names look like Ensembl gene ids (else ``""``)."""
    looks = [str(x) for x in names if isinstance(x, str) and _ENSEMBL_RE.match(x.strip())]
    if not names.size or len(looks) < 0.5 * names.size:
        return ""
    return (
        f"; the dataset's gene names look like Ensembl ids (e.g. {', '.join(looks[:3])}) while "
        "the vocabulary holds symbols: map by symbol with gene_symbols= (the adata.var column "
        "holding gene symbols, e.g. setup_anndata(..., gene_symbols='gene_symbols')), or pass "
        "the symbols as var_names and the ids as ensembl_ids="
    )


def check_transfer_mapping(mapping: GeneMapping, names: Iterable[Any]) -> None:
    """Refuse a ``"transfer"`` that would transfer nothing; warn when it transfers little.

    Parameters
    ----------
    mapping
        From :func:`~cellfm_sc.vocab.map_genes`, length ``n_dataset_genes``.
    names
        The dataset gene names that were mapped, shape ``(n_dataset_genes,)`` (for the hint
        given when they look like Ensembl ids).

    Raises
    ------
    ValueError
        When no dataset gene maps (naming the counts).

    Warns
    -----
    UserWarning
        When fewer than ``TRANSFER_MIN_COVERAGE`` (50%) of the dataset genes map, with the
        numbers.
    """
    arr = as_object_array(names)
    n, k = mapping.n_dataset, mapping.n_mapped
    if k == 0:
        examples = ", ".join(str(x) for x in arr[:3])
        raise ValueError(
            f"embedding_init='transfer' maps 0 of {n:,} dataset genes onto the pretrained "
            f"vocabulary, so no pretrained gene row would be used (dataset genes e.g. "
            f"{examples})" + (_ensembl_hint(arr) or "; are they gene symbols of the same species?")
        )
    if k < TRANSFER_MIN_COVERAGE * n:
        warnings.warn(
            f"embedding_init='transfer': only {k:,} of {n:,} dataset genes "
            f"({100 * k / n:.1f}%) map to the pretrained vocabulary; the other {n - k:,} get "
            f"random rows" + _ensembl_hint(arr),
            UserWarning,
            stacklevel=3,
        )


def build_gene_embedding(
    vocab: GeneVocab,
    pretrained: torch.Tensor | np.ndarray | None = None,
    mapping: GeneMapping | None = None,
    init: str = "random",
    seed: int = 0,
    dim: int | None = None,
) -> torch.Tensor:
    """Gene-embedding table for ``vocab``.

    ``"random"``: ``torch.nn.init.xavier_normal_`` on a ``(padded_size, D)`` float32 tensor with
    ``torch.Generator().manual_seed(seed)`` (std ``sqrt(2 / (D + padded_size))``), then row 0 and
    the padding rows ``n_genes + 1 ..`` set to zero. ``"transfer"``: the same table, then the row
    of every mapped dataset gene ``i`` (row ``i + 1``) replaced by
    ``pretrained[mapping.pretrained_ids[i]]``.

    Parameters
    ----------
    vocab
        The dataset vocabulary (``n_genes`` genes).
    pretrained
        Pretrained table, shape ``(P, D)`` (torch tensor or numpy array; cast to float32).
        Required for ``"transfer"``; for ``"random"`` it only gives ``D``.
    mapping
        From :func:`~cellfm_sc.vocab.map_genes`, length ``vocab.n_genes``. Required for ``"transfer"``.
    init
        ``"random"`` or ``"transfer"``.
    seed
        Seed of the random part.
    dim
        Embedding width ``D`` when ``pretrained`` is not given.

    Returns
    -------
    torch.Tensor
        float32, shape ``(vocab.padded_size, D)``.
    """
    if init not in INIT_METHODS:
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(map(repr, INIT_METHODS))}")
    table_pre: torch.Tensor | None = None
    if pretrained is not None:
        table_pre = torch.as_tensor(pretrained).detach().to(device="cpu", dtype=torch.float32)
        if table_pre.ndim != 2:
            raise ValueError(f"pretrained must be 2-D (P, D), got shape {tuple(table_pre.shape)}")
    if init == "transfer" and (table_pre is None or mapping is None):
        missing = [
            what
            for what, val in (("pretrained= (the (P, D) table)", table_pre), ("mapping=", mapping))
            if val is None
        ]
        raise ValueError(
            f"init='transfer' needs pretrained= (the pretrained (P, D) gene_emb table) and "
            f"mapping= (from map_genes); missing: {', '.join(missing)}"
        )
    if table_pre is not None:
        d = int(table_pre.shape[1])
        if dim is not None and dim != d:
            raise ValueError(f"dim={dim} disagrees with the pretrained table's width {d}")
    elif dim is not None:
        d = int(dim)
    else:
        raise ValueError("give dim= (embedding width) or pretrained= to set the table width")
    if d <= 0:
        raise ValueError(f"embedding width must be positive, got {d}")

    rows = vocab.padded_size
    gen = torch.Generator().manual_seed(int(seed))
    table = torch.empty(rows, d, dtype=torch.float32)
    torch.nn.init.xavier_normal_(table, generator=gen)
    table[0].zero_()
    table[vocab.n_genes + 1 :].zero_()

    if init == "transfer":
        assert mapping is not None and table_pre is not None
        pids = np.asarray(mapping.pretrained_ids, dtype=np.int64)
        if pids.shape != (vocab.n_genes,):
            raise ValueError(
                f"mapping covers {pids.shape[0]} dataset genes but the vocabulary has "
                f"{vocab.n_genes} genes"
            )
        if (pids < 0).any():
            raise ValueError("mapping.pretrained_ids holds negative ids")
        if pids.size and int(pids.max()) >= table_pre.shape[0]:
            raise ValueError(
                f"mapping points at pretrained id {int(pids.max())} but the pretrained table has "
                f"shape {tuple(table_pre.shape)} (the new table has shape {(rows, d)})"
            )
        mapped = np.flatnonzero(pids)
        if mapped.size:
            dst = torch.from_numpy(mapped + 1)
            src = torch.from_numpy(pids[mapped].copy())
            table.index_copy_(0, dst, table_pre.index_select(0, src))
    return table
