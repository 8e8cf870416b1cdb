"""CellFM normalisation of count rows (the one implementation used everywhere).

Per cell with counts ``c`` (all genes) and total ``T0 = sum(c)``:

1. cap the total at ``1e5`` by rounding: ``c <- round(c / max(1, T0 / 1e5))``
   (``numpy.round``: halves round to even);
2. ``x = log1p(c / T * 1e4)`` with ``T = sum(c)`` the capped total over all genes of the cell.

Genes whose capped count is 0 (possible only in cells above ``1e5`` counts) are not expressed
after capping and do not become tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MAX_TOTAL", "TARGET_SUM", "NormalizedRows", "cellfm_normalize"]

MAX_TOTAL = 1e5
TARGET_SUM = 1e4


@dataclass(frozen=True)
class NormalizedRows:
    """Normalised CSR rows (same sparsity pattern as the input).

    Attributes
    ----------
    counts
        Capped counts, float64 ``(nnz,)`` (may contain zeros after capping).
    values
        ``log1p(counts / totals[row] * 1e4)``, float32 ``(nnz,)`` (computed in float64).
    totals
        Capped per-cell totals ``T``, float64 ``(B,)``.
    raw_totals
        Per-cell totals before capping ``T0``, float64 ``(B,)``.
    row
        Row of every stored value, int64 ``(nnz,)``.
    """

    counts: np.ndarray
    values: np.ndarray
    totals: np.ndarray
    raw_totals: np.ndarray
    row: np.ndarray


def cellfm_normalize(
    data: np.ndarray,
    indptr: np.ndarray,
    *,
    max_total: float = MAX_TOTAL,
    target_sum: float = TARGET_SUM,
) -> NormalizedRows:
    """Cap and log-normalise CSR rows as CellFM does.

    Parameters
    ----------
    data
        Stored counts ``(nnz,)`` of ``B`` rows (every stored value of the row, i.e. all genes).
    indptr
        Row pointer ``(B + 1,)``.
    max_total
        Cap on the per-cell total (``1e5``).
    target_sum
        Scale of the normalised counts (``1e4``).

    Returns
    -------
    NormalizedRows
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    n_rows = indptr.size - 1
    c0 = np.asarray(data, dtype=np.float64)
    row = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(indptr))
    raw_totals = np.bincount(row, weights=c0, minlength=n_rows)
    factor = np.maximum(1.0, raw_totals / max_total)
    counts = np.round(c0 / factor[row])
    totals = np.bincount(row, weights=counts, minlength=n_rows)
    safe = np.where(totals > 0, totals, 1.0)
    values = np.log1p(counts / safe[row] * target_sum).astype(np.float32)
    return NormalizedRows(
        counts=counts, values=values, totals=totals, raw_totals=raw_totals, row=row
    )
