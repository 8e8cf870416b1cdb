"""Reading: pseudo-bulk sums, log-normalised rows and gene variances, in bounded chunks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellfm_sc.data import cellfm_normalize, row_source

#: stored values per chunk when the counts are read
_CHUNK_NNZ = 4_000_000


# --------------------------------------------------------------------------------------------
# reading: pseudo-bulk sums, log-normalised rows, gene variances
# --------------------------------------------------------------------------------------------


def pseudobulk(
    adata: Any,
    groups: Any,
    *,
    rows: np.ndarray | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    max_nnz: int = _CHUNK_NNZ,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed counts per group (e.g. donor), read in chunks.

    Parameters
    ----------
    adata
        AnnData with raw counts (in memory or backed).
    groups
        ``(n_obs,)`` group of every cell (donor ids).
    rows
        Cells to sum (default all).
    layer, use_raw
        Where the counts are (as in ``setup_anndata``).
    max_nnz
        Stored values read per chunk.

    Returns
    -------
    ``(names (n_groups,) sorted, sums (n_groups, n_genes) float64)``. Each chunk adds one
    sparse indicator product ``(n_groups, chunk) @ (chunk, n_genes)``; memory is that of the
    output plus one chunk.

    Examples
    --------
    >>> x = sp.csr_matrix(np.array([[1, 0], [2, 3], [0, 4]]))
    >>> names, sums = pseudobulk(ad.AnnData(x), ["b", "a", "b"])  # doctest: +SKIP
    >>> names.tolist(), sums.tolist()  # doctest: +SKIP
    (['a', 'b'], [[2.0, 3.0], [1.0, 4.0]])
    """
    source = row_source(adata, layer, use_raw=use_raw)
    groups = np.asarray(groups)
    if groups.shape != (source.n_obs,):
        raise ValueError(f"groups has shape {groups.shape}, expected ({source.n_obs},)")
    rows = np.arange(source.n_obs) if rows is None else np.sort(np.asarray(rows, np.int64))
    codes, names = pd.factorize(groups[rows], sort=True)
    code_of = np.full(source.n_obs, -1, np.int64)
    code_of[rows] = codes
    sums = np.zeros((len(names), source.n_vars), np.float64)
    for chunk, block in source.iter_ranges(rows, max_nnz):
        ind = sp.csr_matrix(
            (np.ones(chunk.size), (code_of[chunk], np.arange(chunk.size))),
            shape=(len(names), chunk.size),
        )
        part = (ind @ block.astype(np.float64)).tocoo()
        np.add.at(sums, (part.row, part.col), part.data)
    return np.asarray(names, dtype=object), sums


def log_cpm(sums: np.ndarray) -> np.ndarray:
    """``log1p`` of counts per million of each row of ``sums (n, G)`` -> ``(n, G)``."""
    s = np.asarray(sums, np.float64)
    total = s.sum(axis=1, keepdims=True)
    return np.log1p(s / np.where(total > 0, total, 1.0) * 1e6)


def log_normalized(block: sp.csr_matrix) -> sp.csr_matrix:
    """CellFM's normalisation (:func:`~cellfm_sc.data.cellfm_normalize`) of CSR count rows
    ``(n, G)``: the same sparsity pattern, float32 values."""
    norm = cellfm_normalize(block.data, block.indptr)
    return sp.csr_matrix((norm.values, block.indices, block.indptr), shape=block.shape)


def gene_moments(
    adata: Any,
    rows: np.ndarray,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    max_nnz: int = _CHUNK_NNZ,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance over ``rows`` of every gene's log-normalised value, float64
    ``(n_genes,)`` each (one chunked pass: sums and sums of squares)."""
    source = row_source(adata, layer, use_raw=use_raw)
    s1 = np.zeros(source.n_vars)
    s2 = np.zeros(source.n_vars)
    n = 0
    for chunk, block in source.iter_ranges(np.asarray(rows, np.int64), max_nnz):
        x = log_normalized(block)
        v = x.data.astype(np.float64)
        s1 += np.bincount(x.indices, weights=v, minlength=source.n_vars)
        s2 += np.bincount(x.indices, weights=v * v, minlength=source.n_vars)
        n += chunk.size
    if n == 0:
        return np.zeros(source.n_vars), np.zeros(source.n_vars)
    mean = s1 / n
    return mean, np.maximum(s2 / n - mean * mean, 0.0)


def gene_variances(
    adata: Any,
    rows: np.ndarray,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    max_nnz: int = _CHUNK_NNZ,
) -> np.ndarray:
    """Variance over ``rows`` of every gene's log-normalised value, float64 ``(n_genes,)``
    (:func:`~cellfm_sc.baselines.gene_moments`)."""
    return gene_moments(adata, rows, layer=layer, use_raw=use_raw, max_nnz=max_nnz)[1]


def top_variable_genes(
    adata: Any,
    rows: np.ndarray,
    n_top: int,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    max_cells: int = 20_000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``n_top`` genes of highest log-normalised variance over ``rows`` (at most
    ``max_cells`` of them, a seeded sample), sorted by column: ``(columns (n,), mean (n,),
    variance (n,))`` with ``n = min(n_top, n_genes)`` (ties, e.g. genes without variance,
    go to the lower column)."""
    rows = np.asarray(rows, np.int64)
    if rows.size > max_cells:
        rows = np.random.default_rng([seed, 7]).choice(rows, max_cells, replace=False)
    mean, var = gene_moments(adata, np.sort(rows), layer=layer, use_raw=use_raw)
    top = np.sort(np.argsort(-var, kind="stable")[: int(n_top)])
    return top, mean[top], var[top]


def _read_features(
    source: Any, rows: np.ndarray, genes: np.ndarray, max_nnz: int = _CHUNK_NNZ
) -> tuple[np.ndarray, sp.csr_matrix]:
    """Log-normalised values of ``genes`` at sorted ``rows``: float64 CSR
    ``(len(rows), len(genes))`` (the solver's results do not depend on the input's precision)."""
    parts, order = [], []
    for chunk, block in source.iter_ranges(np.asarray(rows, np.int64), max_nnz):
        parts.append(log_normalized(block)[:, genes].astype(np.float64))
        order.append(chunk)
    if not parts:
        return np.zeros(0, np.int64), sp.csr_matrix((0, len(genes)), dtype=np.float32)
    return np.concatenate(order), sp.vstack(parts, format="csr")
