"""Training-time augmentation of count rows: binomial depth thinning.

Cells measured by another lab or chemistry differ first of all in depth (counts per cell) and
so in which genes are detected at all; CellFM's tokens are the detected genes, so a model fit
on deep cells sees a different token set on shallow ones. :func:`thin_depth` shows the model
shallower copies of its training cells: with probability ``probability`` a cell's counts are
thinned binomially, ``c' ~ Binomial(c, r)``, at a rate ``r ~ U(min_rate, 1)`` drawn per cell.
That is exactly what a lower capture efficiency does to a cell's molecules, so it needs no
assumption about the target data beyond "it may be shallower".

The draws are a function of ``(seed, epoch, obs index)`` of each cell alone (a counter-based
key per cell and gene, as the token draws of :mod:`.tokenize`; the binomial by its inverse
distribution function), so a cell's thinned counts do not depend on its batch, its order or the
worker that reads it; a fresh draw every epoch.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .tokenize import _mix, _uniform, train_keys

__all__ = ["DEPTH_MIN_RATE", "thin_depth"]

#: lowest thinning rate of :func:`thin_depth` (a thinned cell keeps 25-100% of its counts)
DEPTH_MIN_RATE = 0.25
_AUG_DOMAIN = np.uint64(0x6175_6700_0000_0003)


def _unit(keys: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) float64 from uint64 keys (53 high bits)."""
    return (keys >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def thin_depth(
    rows: sp.csr_matrix,
    obs_index: np.ndarray,
    *,
    probability: float,
    seed: int = 0,
    epoch: int = 0,
    min_rate: float = DEPTH_MIN_RATE,
) -> sp.csr_matrix:
    """Binomially thinned copy of count rows (a random depth per cell), for training.

    Parameters
    ----------
    rows
        CSR ``(B, n_vars)`` of non-negative integer counts; not modified.
    obs_index
        Int ``(B,)``: AnnData row of each cell (with ``seed`` and ``epoch`` its draw key).
    probability
        Chance in [0, 1] that a cell is thinned; the others are returned as they are.
    seed, epoch
        Seeds of the draws (a fresh draw every epoch).
    min_rate
        Each thinned cell keeps a share ``r ~ U(min_rate, 1)`` of its molecules in expectation.

    Returns
    -------
    CSR ``(B, n_vars)`` with the same sparsity structure (thinned-out entries are explicit
    zeros). A cell that would lose every count keeps its original counts, so a training cell
    never becomes empty.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"depth augmentation probability must be in [0, 1], got {probability}")
    if not 0.0 < min_rate <= 1.0:
        raise ValueError(f"min_rate must be in (0, 1], got {min_rate}")
    obs_index = np.asarray(obs_index, dtype=np.int64)
    n = rows.shape[0]
    if obs_index.shape != (n,):
        raise ValueError(f"obs_index has shape {obs_index.shape}, expected ({n},)")
    if probability == 0.0 or rows.nnz == 0:
        return rows
    from scipy.stats import binom  # lazy: scipy.stats is slow to import

    keys = _mix(train_keys(obs_index, seed, epoch) ^ _AUG_DOMAIN)
    chosen = _unit(keys) < probability
    rate = min_rate + (1.0 - min_rate) * _unit(_mix(keys))
    per_row = np.diff(rows.indptr)
    thin = np.repeat(chosen, per_row)
    counts = np.rint(rows.data).astype(np.int64)
    data = counts.copy()
    u = _uniform(np.repeat(keys, per_row)[thin], rows.indices[thin].astype(np.int64))
    data[thin] = binom.ppf(u, counts[thin], np.repeat(rate, per_row)[thin]).astype(np.int64)
    totals = np.diff(np.concatenate([[0], np.cumsum(data)])[rows.indptr])
    empty = np.flatnonzero((per_row > 0) & (totals == 0))
    for i in empty:  # rare: a cell of a handful of counts thinned to nothing keeps them
        a, b = rows.indptr[i], rows.indptr[i + 1]
        data[a:b] = counts[a:b]
    return sp.csr_matrix(
        (data.astype(rows.data.dtype, copy=False), rows.indices, rows.indptr), shape=rows.shape
    )
