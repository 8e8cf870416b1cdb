"""Checks that a matrix holds raw counts, and access to ``adata.X`` / ``adata.layers[layer]``.

The matrix must hold non-negative integer counts. :func:`check_counts` looks at a sample of
rows (contiguous blocks, so backed files are read sequentially) before anything starts;
:func:`validate_count_values` is the cheap check every loader batch runs as it streams.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._rows import RowSource, element_path, layer_label

__all__ = [
    "MissingLayerError",
    "check_counts",
    "empty_cells",
    "get_matrix",
    "row_source",
    "validate_count_values",
]


class MissingLayerError(KeyError, ValueError):
    """``layer`` is not in ``adata.layers``; the message lists the layers that exist.

    Examples
    --------
    >>> get_matrix(adata, layer="counts")  # doctest: +SKIP
    MissingLayerError: layer 'counts' is not in adata.layers; layers: ['raw']
    """

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return str(self.args[0]) if self.args else ""


def get_matrix(adata: Any, layer: str | None = None) -> Any:
    """Return ``adata.X`` or ``adata.layers[layer]`` (scanpy's ``layer=`` convention).

    Parameters
    ----------
    adata
        An AnnData, in memory or backed.
    layer
        None for ``adata.X``, else a key of ``adata.layers``.

    Returns
    -------
    The matrix ``(n_obs, n_vars)``: scipy sparse, numpy, or a backed dataset.

    Raises
    ------
    MissingLayerError
        (a ``KeyError`` and a ``ValueError``) naming the missing layer and listing the layers.
    """
    if layer is None:
        if adata.X is None:
            raise MissingLayerError(
                "adata.X is None; pass layer= naming the layer with raw counts "
                f"(layers: {list(adata.layers.keys())})"
            )
        return adata.X
    if layer not in adata.layers:
        existing = list(adata.layers.keys())
        raise MissingLayerError(
            f"layer {layer!r} not found in adata.layers; existing layers: "
            f"{existing if existing else 'none'} (use layer=None for adata.X)"
        )
    return adata.layers[layer]


def row_source(adata: Any, layer: str | None = None) -> RowSource:
    """A :class:`RowSource` over the counts of ``adata`` (``X`` or ``layers[layer]``).

    A backed AnnData is read from its file (``adata.filename``), so the source pickles to a path
    and never loads the matrix; an in-memory matrix is read in place.

    Examples
    --------
    >>> source = row_source(adata, layer="counts")  # doctest: +SKIP
    >>> source.read(np.array([0, 5, 9])).shape  # doctest: +SKIP
    (3, 36601)
    """
    matrix = get_matrix(adata, layer)
    if getattr(adata, "isbacked", False):
        import h5py

        path = str(adata.filename)
        with h5py.File(path, "r") as f:
            in_file = element_path(layer) in f
        if in_file:
            return RowSource(path=path, element=element_path(layer))
    return RowSource(matrix)


def _obs_namer(adata: Any) -> Callable[[int], str]:
    names = adata.obs_names
    return lambda i: str(names[int(i)])


def validate_count_values(
    data: np.ndarray,
    indptr: np.ndarray,
    obs_index: np.ndarray,
    *,
    layer: str | None = None,
    obs_name: Callable[[int], str] | Sequence[str] | None = None,
) -> None:
    """Raise ``ValueError`` unless the stored values of CSR rows are non-negative integers.

    Parameters
    ----------
    data
        Stored values ``(nnz,)`` of the rows, in row order.
    indptr
        Row pointer ``(B + 1,)`` into ``data``.
    obs_index
        Int ``(B,)``: the AnnData row of each of the ``B`` rows (for the message).
    layer
        The layer being read (for the message).
    obs_name
        Maps an AnnData row to its obs name (callable or sequence), for the message.

    Raises
    ------
    ValueError
        Naming the layer, the first offending cell, and what is wrong (NaN, inf, negative,
        fractional; "looks log-normalised; pass layer='counts'" when values look like log1p data).
    """
    data = np.asarray(data)
    if data.size == 0:
        return
    if data.dtype.kind in "iu":
        bad = data < 0
    elif data.dtype.kind == "b":
        return
    else:
        finite = np.isfinite(data)
        bad = ~finite | (data < 0) | (data != np.floor(data))
    if not bad.any():
        return
    first = int(np.flatnonzero(bad)[0])
    row = int(np.searchsorted(np.asarray(indptr), first, side="right") - 1)
    cell = int(np.asarray(obs_index)[row])
    if obs_name is None:
        cell_desc = f"row {cell}"
    else:
        name = obs_name(cell) if callable(obs_name) else obs_name[cell]
        cell_desc = f"{name!r} (row {cell})"
    value = data[first]
    where = layer_label(layer)
    head = f"{where} must hold raw non-negative integer counts; first offending cell {cell_desc}"
    if np.isnan(value):
        raise ValueError(f"{head} has a NaN value")
    if np.isinf(value):
        raise ValueError(f"{head} has an infinite value ({value})")
    finite_data = data[np.isfinite(data)]
    if value < 0:
        hint = ""
        if (finite_data != np.floor(finite_data)).any():
            hint = " (values look scaled or centred, e.g. by sc.pp.scale)"
        raise ValueError(f"{head} has a negative value ({value}){hint}")
    hint = "; values are not integers"
    if finite_data.size and finite_data.min() >= 0 and finite_data.max() <= 30:
        hint = "; looks log-normalised; pass layer='counts'"
        if layer == "counts":
            hint = "; looks log-normalised; pass the layer that holds raw counts"
    else:
        hint += " (normalised?); pass the layer with raw counts, e.g. layer='counts'"
    raise ValueError(f"{head} has a fractional value ({value}){hint}")


def _sample_rows(n_obs: int, n_rows: int, seed: int, block: int = 64) -> np.ndarray:
    """Sorted rows in a few random contiguous blocks (sequential reads on backed files)."""
    if n_obs <= n_rows:
        return np.arange(n_obs, dtype=np.int64)
    rng = np.random.default_rng(seed)
    n_blocks = max(1, n_rows // block)
    starts = np.sort(rng.choice(max(n_obs - block, 1), size=n_blocks, replace=False))
    rows = np.unique((starts[:, None] + np.arange(block)[None, :]).ravel())
    return rows[rows < n_obs]


def check_counts(
    adata: Any,
    layer: str | None = None,
    n_rows: int = 2048,
    *,
    indices: np.ndarray | None = None,
    forbid_empty: bool = False,
    seed: int = 0,
) -> None:
    """Check that ``adata.X`` / ``adata.layers[layer]`` holds raw counts, quickly.

    Reads a sample of about ``n_rows`` rows (random contiguous blocks; every row when the data
    are smaller) and validates their stored values with :func:`validate_count_values`.
    With ``forbid_empty=True`` all rows in ``indices`` are scanned in chunks (values are
    validated on the way) and cells with no counts are an error.

    Parameters
    ----------
    adata
        AnnData, in memory or backed.
    layer
        None for ``adata.X``, else a key of ``adata.layers``.
    n_rows
        Size of the sample.
    indices
        Rows to consider (default all).
    forbid_empty
        Raise when a cell in ``indices`` has no counts (training refuses such cells).
    seed
        Seed of the sample.

    Raises
    ------
    MissingLayerError
        The layer does not exist.
    ValueError
        NaN, inf, negative or fractional values (naming the layer and the first offending
        cell), or empty cells when ``forbid_empty``.
    """
    source = row_source(adata, layer)
    namer = _obs_namer(adata)
    if indices is None:
        pool = None
        n = source.n_obs
    else:
        pool = np.sort(np.asarray(indices, dtype=np.int64))
        n = pool.size
    pos = _sample_rows(n, n_rows, seed)
    rows = pos if pool is None else pool[pos]
    for part in np.array_split(rows, max(1, rows.size // 64)):  # small reads: flat memory
        block = source.read(part)
        validate_count_values(block.data, block.indptr, part, layer=layer, obs_name=namer)
    if forbid_empty:
        empty = empty_cells(adata, layer, indices, _source=source, _validate=True)
        if empty.size:
            names = [str(adata.obs_names[i]) for i in empty[:5]]
            more = ", ..." if empty.size > 5 else ""
            raise ValueError(
                f"{empty.size} cell(s) have no counts in {layer_label(layer)}: "
                f"{', '.join(repr(s) for s in names)}{more} (rows {empty[:5].tolist()}{more}). "
                "A cell without counts has no tokens and cannot be trained on; remove them, "
                "e.g. sc.pp.filter_cells(adata, min_counts=1), or pass indices without them."
            )


def empty_cells(
    adata: Any,
    layer: str | None = None,
    indices: np.ndarray | None = None,
    *,
    _source: RowSource | None = None,
    _validate: bool = False,
) -> np.ndarray:
    """Rows whose total count is zero, scanned in chunks (never densifying the matrix).

    Parameters
    ----------
    adata
        AnnData, in memory or backed.
    layer
        None for ``adata.X``, else a key of ``adata.layers``.
    indices
        Rows to scan (default all).

    Returns
    -------
    Sorted int64 array of the AnnData rows with no counts.

    Notes
    -----
    In-memory matrices are scanned exactly (row sums, chunk by chunk). For a backed CSR file
    only ``indptr`` is read: rows with no stored value. A backed row whose stored values are
    all explicit zeros is reported by the training loader when its batch is read.

    At inference such cells are not an error: they give a row with ``n_tokens == 0`` and
    no valid token; the model layer decides what to output for them.
    """
    source = row_source(adata, layer) if _source is None else _source
    rows = np.arange(source.n_obs) if indices is None else np.asarray(indices, dtype=np.int64)
    if source.kind == "h5csr":
        # backed: rows without stored values, from indptr alone (no full read of the file);
        # stored explicit zeros are caught batch by batch while training
        return np.unique(rows[source.row_nnz()[rows] == 0])
    namer = _obs_namer(adata)
    out = []
    for chunk, block in source.iter_ranges(rows):
        if _validate:
            validate_count_values(block.data, block.indptr, chunk, layer=layer, obs_name=namer)
        totals = np.asarray(block.sum(axis=1)).ravel()
        out.append(chunk[totals == 0])
    return np.unique(np.concatenate(out)) if out else np.empty(0, dtype=np.int64)
