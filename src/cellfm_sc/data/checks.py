"""Checks that a matrix holds raw counts; access to ``adata.X`` / ``layers[layer]`` / ``raw.X``.

The matrix must hold non-negative integer counts. :func:`~cellfm_sc.data.check_counts` looks at a sample of
rows (contiguous blocks, so backed files are read sequentially) for a cheap set-up, or with
``full=True`` streams once over every cell that will be read (values and empty cells);
:func:`~cellfm_sc.data.validate_count_values` is the cheap check every loader batch runs as it streams.
All of them raise one error naming the matrix, the first bad cell(s), the problem and the fix
as keyword arguments (``layer="counts"``), see ``count_fix_hint``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cellfm_sc._errors import missing_column, missing_layer, missing_raw

from ._rows import RowSource, element_path, layer_label

__all__ = [
    "CountSummary",
    "MissingLayerError",
    "check_counts",
    "count_fix_hint",
    "empty_cells",
    "get_matrix",
    "matrix_var_names",
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


def check_count_source(layer: str | None, use_raw: bool | None) -> None:
    """Refuse ``layer`` and ``use_raw=True`` together: the counts are in one of them.

    Raises
    ------
    ValueError
        Naming both and what each reads.
    """
    if use_raw and layer is not None:
        raise ValueError(
            f"layer={layer!r} and use_raw=True both given; pass either layer={layer!r} or "
            f"use_raw=True: layer= reads adata.layers[{layer!r}], use_raw=True reads adata.raw.X"
        )


def get_matrix(adata: Any, layer: str | None = None, *, use_raw: bool = False) -> Any:
    """Return ``adata.X``, ``adata.layers[layer]`` or ``adata.raw.X`` (scanpy's conventions).

    Parameters
    ----------
    adata
        An AnnData, in memory or backed.
    layer
        None for ``adata.X``, else a key of ``adata.layers``.
    use_raw
        Read ``adata.raw.X`` (CELLxGENE layout: normalised values in ``X`` over a gene subset,
        raw counts in ``raw.X`` over all genes; its genes are :func:`matrix_var_names`).
        Cannot be combined with ``layer``.

    Returns
    -------
    The matrix ``(n_obs, n_vars)`` (``n_vars`` of ``adata.raw`` with ``use_raw``): scipy
    sparse, numpy, or a backed dataset; never a copy.

    Raises
    ------
    MissingLayerError
        (a ``KeyError`` and a ``ValueError``) naming the missing layer and listing the layers,
        or saying that ``adata.raw`` is None.
    ValueError
        ``layer`` and ``use_raw`` together.
    """
    check_count_source(layer, use_raw)
    if use_raw:
        if adata.raw is None:
            raise MissingLayerError(missing_raw(adata.layers.keys()))
        return adata.raw.X
    if layer is None:
        if adata.X is None:
            raise MissingLayerError(
                "adata.X is None; pass layer= naming the layer with raw counts "
                f"(layers: {list(adata.layers.keys())})"
            )
        return adata.X
    if layer not in adata.layers:
        raise MissingLayerError(missing_layer(layer, adata.layers.keys()))
    return adata.layers[layer]


def matrix_var_names(adata: Any, *, use_raw: bool = False) -> pd.Index:
    """Gene names of the columns of the count matrix in use (build the vocabulary from these).

    ``adata.raw.var_names`` with ``use_raw`` (``adata.raw`` may hold more genes than
    ``adata.var``), else ``adata.var_names`` (layers share ``adata.var``).

    Returns
    -------
    ``pandas.Index`` of ``n_vars`` names, in column order.

    Examples
    --------
    >>> vocab = GeneVocab.from_var_names(matrix_var_names(adata, use_raw=True))  # doctest: +SKIP
    """
    if use_raw:
        get_matrix(adata, use_raw=True)  # the error when adata.raw is None
        return adata.raw.var_names
    return adata.var_names


def matrix_gene_symbols(adata: Any, key: str, *, use_raw: bool = False) -> pd.Series:
    """Gene symbols of the columns of the count matrix in use, from the ``var`` column ``key``.

    With ``use_raw`` the column is read from ``adata.raw.var``; when ``adata.raw.var`` lacks
    it but ``adata.var`` has it for every gene of ``adata.raw`` (the CELLxGENE layout, where
    ``var`` and ``raw.var`` list the same genes), it is read from ``adata.var``, aligned to
    ``adata.raw.var_names``.

    Returns
    -------
    ``pandas.Series`` of ``n_vars`` symbols (strings), indexed by the matrix's gene names.

    Raises
    ------
    KeyError
        ``key`` is not a column where it is needed; the message names the columns there are.

    Examples
    --------
    >>> symbols = matrix_gene_symbols(adata, "feature_name", use_raw=True)  # doctest: +SKIP
    """
    names = matrix_var_names(adata, use_raw=use_raw)
    var = adata.raw.var if use_raw else adata.var
    if key in var.columns:
        return pd.Series(var[key].astype(str).to_numpy(), index=names)
    if use_raw and key in adata.var.columns and names.isin(adata.var_names).all():
        return pd.Series(adata.var[key].astype(str).reindex(names).to_numpy(), index=names)
    where = "adata.raw.var" if use_raw else "adata.var"
    hint = ""
    if use_raw and key in adata.var.columns:
        missing = int((~names.isin(adata.var_names)).sum())
        hint = (
            f"; adata.var has it, but not for {missing} of the {len(names)} genes of "
            "adata.raw (copy it into adata.raw.var before subsetting genes)"
        )
    raise KeyError(missing_column("gene_symbols", key, var.columns, where) + hint)


def row_source(adata: Any, layer: str | None = None, *, use_raw: bool = False) -> RowSource:
    """A row source (internal reader) over the counts of ``adata`` (``X``, ``layers[layer]`` or ``raw.X``).

    A backed AnnData is read from its file (``adata.filename``; ``raw/X`` for ``use_raw``), so
    the source pickles to a path and never loads the matrix; an in-memory matrix is read in
    place (no copy).

    Examples
    --------
    >>> source = row_source(adata, layer="counts")  # doctest: +SKIP
    >>> source.read(np.array([0, 5, 9])).shape  # doctest: +SKIP
    (3, 36601)
    """
    matrix = get_matrix(adata, layer, use_raw=use_raw)
    if getattr(adata, "isbacked", False):
        import h5py

        path = str(adata.filename)
        element = element_path(layer, use_raw)
        with h5py.File(path, "r") as f:
            in_file = element in f
        if in_file:
            return RowSource(path=path, element=element)
    return RowSource(matrix)


def _obs_namer(adata: Any) -> Callable[[int], str]:
    names = adata.obs_names
    return lambda i: str(names[int(i)])


def count_fix_hint(adata: Any = None, layer: str | None = None, use_raw: bool = False) -> str:
    """How to point the data path at raw counts, as keyword arguments (``layer="counts"``).

    Names what ``adata`` offers besides the matrix in use: its layers (``"counts"`` first)
    and ``use_raw=True`` when ``adata.raw`` exists. Without ``adata`` (or when it offers
    nothing else) a generic suggestion. Used at the end of the count-check errors; the command
    line translates ``layer="x"`` into ``--layer x`` (and ``use_raw=True`` into its flag).
    """
    options: list[str] = []
    if adata is not None:
        layers = [str(k) for k in adata.layers.keys() if use_raw or k != layer]
        layers.sort(key=lambda k: k != "counts")
        options += [f'layer="{k}"' for k in layers]
        if not use_raw and getattr(adata, "raw", None) is not None:
            options.insert(1 if layers and layers[0] == "counts" else 0, "use_raw=True")
    if options:
        return "pass the matrix that holds raw counts: " + " or ".join(options[:4])
    if layer == "counts":
        return 'pass the layer that holds raw counts (layer="...")'
    if use_raw:
        return 'pass the matrix that holds raw counts, e.g. layer="counts"'
    return 'pass the matrix that holds raw counts, e.g. layer="counts" or use_raw=True'


def _bad_values(data: np.ndarray) -> np.ndarray | None:
    """Mask ``(nnz,)`` of stored values that are not counts, or None when all are.

    Fast path: the minimum and maximum (NaN propagates) and one integrality comparison; the
    mask is built only when something is wrong.
    """
    if data.size == 0 or data.dtype.kind == "b":
        return None
    if data.dtype.kind in "iu":
        return (data < 0) if data.min() < 0 else None
    lo, hi = data.min(), data.max()
    if np.isfinite(lo) and np.isfinite(hi) and lo >= 0 and np.array_equal(np.floor(data), data):
        return None
    return ~np.isfinite(data) | (data < 0) | (data != np.floor(data))


def _raise_value_problem(
    data: np.ndarray,
    indptr: np.ndarray,
    obs_index: np.ndarray,
    bad: np.ndarray,
    *,
    layer: str | None,
    obs_name: Callable[[int], str] | Sequence[str] | None,
    fix: str | None,
    use_raw: bool = False,
) -> None:
    """Raise the one ``ValueError`` of the count checks for the bad values ``bad`` (a mask)."""
    indptr = np.asarray(indptr)
    obs_index = np.asarray(obs_index)
    bad_pos = np.flatnonzero(bad)
    first = int(bad_pos[0])
    bad_rows = np.unique(np.searchsorted(indptr, bad_pos, side="right") - 1)

    def describe(row: int) -> str:
        cell = int(obs_index[row])
        if obs_name is None:
            return f"row {cell}"
        name = obs_name(cell) if callable(obs_name) else obs_name[cell]
        return f"{name!r} (row {cell})"

    cell_desc = describe(int(bad_rows[0]))
    more = ""
    if bad_rows.size > 1:
        shown = ", ".join(describe(int(r)) for r in bad_rows[1:3])
        extra = ", ..." if bad_rows.size > 3 else ""
        more = (
            f" (and {bad_rows.size - 1} more cell(s) of the {obs_index.size} read: {shown}{extra})"
        )
    value = data[first]
    where = layer_label(layer, use_raw)
    head = f"{where} must hold raw non-negative integer counts; first offending cell {cell_desc}"
    fix = count_fix_hint(None, layer, use_raw) if fix is None else fix
    if np.isnan(value):
        raise ValueError(f"{head} has a NaN value{more}; {fix}")
    if np.isinf(value):
        raise ValueError(f"{head} has an infinite value ({value}){more}; {fix}")
    finite_data = data[np.isfinite(data)]
    if value < 0:
        hint = ""
        if (finite_data != np.floor(finite_data)).any():
            hint = "; values look scaled or centred (e.g. by sc.pp.scale)"
        raise ValueError(f"{head} has a negative value ({value}){more}{hint}; {fix}")
    if finite_data.size and finite_data.min() >= 0 and finite_data.max() <= 30:
        hint = "; looks log-normalised"
    else:
        hint = "; values are not integers (normalised?)"
    raise ValueError(f"{head} has a fractional value ({value}){more}{hint}; {fix}")


def validate_count_values(
    data: np.ndarray,
    indptr: np.ndarray,
    obs_index: np.ndarray,
    *,
    layer: str | None = None,
    obs_name: Callable[[int], str] | Sequence[str] | None = None,
    fix: str | None = None,
    use_raw: bool = False,
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
    layer, use_raw
        The matrix being read (for the message).
    obs_name
        Maps an AnnData row to its obs name (callable or sequence), for the message.
    fix
        The remedy that ends the message (default: ``count_fix_hint`` without an AnnData).

    Raises
    ------
    ValueError
        Naming the matrix, the first offending cell (and how many more of these rows), what
        is wrong (NaN, inf, negative, fractional; "looks log-normalised" when the values look
        like log1p data) and the fix as keyword arguments (``layer="counts"``).
    """
    data = np.asarray(data)
    bad = _bad_values(data)
    if bad is not None:
        _raise_value_problem(
            data, indptr, obs_index, bad, layer=layer, obs_name=obs_name, fix=fix, use_raw=use_raw
        )


def _sample_rows(n_obs: int, n_rows: int, seed: int, block: int = 64) -> np.ndarray:
    """Sorted rows in a few random contiguous blocks (sequential reads on backed files)."""
    if n_obs <= n_rows:
        return np.arange(n_obs, dtype=np.int64)
    rng = np.random.default_rng(seed)
    n_blocks = max(1, n_rows // block)
    starts = np.sort(rng.choice(max(n_obs - block, 1), size=n_blocks, replace=False))
    rows = np.unique((starts[:, None] + np.arange(block)[None, :]).ravel())
    return rows[rows < n_obs]


@dataclass(frozen=True)
class CountSummary:
    """What :func:`~cellfm_sc.data.check_counts` looked at.

    Attributes
    ----------
    n_cells
        Cells whose values were checked (the sample, or every cell of a full pass).
    n_values
        Stored values checked.
    full
        Whether every cell of ``indices`` was checked (``full=True``).
    empty
        Sorted int64 AnnData rows with no counts (all of ``indices``) when known: always after
        a full pass, else only with ``forbid_empty`` (then it is empty); None otherwise.
    """

    n_cells: int
    n_values: int
    full: bool
    empty: np.ndarray | None


def _empty_error(adata: Any, layer: str | None, use_raw: bool, empty: np.ndarray) -> ValueError:
    names = [str(adata.obs_names[i]) for i in empty[:5]]
    more = ", ..." if empty.size > 5 else ""
    return ValueError(
        f"{empty.size} cell(s) have no counts in {layer_label(layer, use_raw)}: "
        f"{', '.join(repr(s) for s in names)}{more} (rows {empty[:5].tolist()}{more}). "
        "A cell without counts has no tokens and cannot be trained on; remove them, "
        "e.g. sc.pp.filter_cells(adata, min_counts=1), or pass indices without them."
    )


def _scan(
    source: RowSource,
    rows: np.ndarray,
    *,
    validate: bool,
    layer: str | None = None,
    use_raw: bool = False,
    namer: Callable[[int], str] | None = None,
    fix: str | None = None,
    max_nnz: int = 4_000_000,
) -> tuple[np.ndarray, int]:
    """One streaming pass over ``rows``: validate values (optional) and find empty cells.

    Returns the sorted empty rows and the number of stored values read. Memory: one chunk of
    about ``max_nnz`` values at a time (:meth:`RowSource.iter_values`).
    """
    empty, n_values = [], 0
    for chunk, data, indptr in source.iter_values(rows, max_nnz=max_nnz):
        data = np.asarray(data)
        n_values += data.size
        if validate:
            bad = _bad_values(data)
            if bad is not None:
                _raise_value_problem(
                    data, indptr, chunk, bad, layer=layer, obs_name=namer, fix=fix, use_raw=use_raw
                )
        # a cell is empty when it stores nothing or only zeros (values are >= 0 here):
        # the row maximum, without a temporary the size of the chunk
        indptr = np.asarray(indptr, dtype=np.int64)
        stored = np.diff(indptr) > 0
        is_empty = ~stored
        if data.size:
            row_max = np.maximum.reduceat(data, indptr[:-1][stored])
            is_empty[stored] = ~(row_max > 0)
        empty.append(chunk[is_empty])
    out = np.unique(np.concatenate(empty)) if empty else np.empty(0, dtype=np.int64)
    return out, n_values


def check_counts(
    adata: Any,
    layer: str | None = None,
    n_rows: int = 2048,
    *,
    use_raw: bool = False,
    indices: np.ndarray | None = None,
    full: bool = False,
    forbid_empty: bool = False,
    seed: int = 0,
) -> CountSummary:
    """Check that ``adata.X`` / ``adata.layers[layer]`` / ``adata.raw.X`` holds raw counts.

    Two modes:

    - sample (default, cheap set-up): about ``n_rows`` rows in random contiguous blocks (every
      row when the data are smaller) are validated with :func:`~cellfm_sc.data.validate_count_values`;
    - ``full=True``: one streaming pass over every cell of ``indices`` (chunks of about 4M
      stored values in place, in memory or backed, never densified) checks
      every stored value (negative, NaN/inf, non-integer) and finds every cell with no counts
      (including backed rows whose stored values are all zero). Run it once before training
      or inference on the cells that will be read.

    Parameters
    ----------
    adata
        AnnData, in memory or backed.
    layer
        None for ``adata.X``, else a key of ``adata.layers``.
    use_raw
        Check ``adata.raw.X`` (see :func:`~cellfm_sc.data.get_matrix`).
    n_rows
        Size of the sample (ignored with ``full``).
    indices
        Rows to consider (default all).
    full
        Check every cell of ``indices`` (see above).
    forbid_empty
        Raise when a cell of ``indices`` has no counts (training refuses such cells). Without
        ``full`` they are found by :func:`~cellfm_sc.data.empty_cells`.
    seed
        Seed of the sample.

    Returns
    -------
    CountSummary
        Cells and values checked, and the empty cells when known.

    Raises
    ------
    MissingLayerError
        The layer does not exist, or ``adata.raw`` is None with ``use_raw``.
    ValueError
        ``layer`` together with ``use_raw``; a matrix with 0 cells or 0 genes. One error
        naming the matrix, the first offending cell(s) by obs name, the problem
        (NaN, inf, negative, fractional / log-normalised values, or cells without counts with
        ``forbid_empty``) and the fix as keyword arguments (``layer="counts"``).

    Examples
    --------
    >>> check_counts(adata, layer="counts", indices=train_idx, full=True,
    ...              forbid_empty=True)  # doctest: +SKIP
    CountSummary(n_cells=120000, n_values=180000000, full=True, empty=array([], dtype=int64))
    """
    source = row_source(adata, layer, use_raw=use_raw)
    if source.n_obs == 0 or source.n_vars == 0:
        raise ValueError(
            f"{layer_label(layer, use_raw)} has {source.n_obs} cells x {source.n_vars} genes: there is nothing to "
            "train on or predict; check the file (an empty subset?)"
        )
    namer = _obs_namer(adata)
    fix = count_fix_hint(adata, layer, use_raw)
    pool = None if indices is None else np.sort(np.asarray(indices, dtype=np.int64))
    if full:
        rows = np.arange(source.n_obs, dtype=np.int64) if pool is None else pool
        empty, n_values = _scan(
            source, rows, validate=True, layer=layer, use_raw=use_raw, namer=namer, fix=fix
        )
        if forbid_empty and empty.size:
            raise _empty_error(adata, layer, use_raw, empty)
        return CountSummary(int(rows.size), n_values, True, empty)
    n = source.n_obs if pool is None else pool.size
    pos = _sample_rows(n, n_rows, seed)
    rows = pos if pool is None else pool[pos]
    n_values = 0
    for part in np.array_split(rows, max(1, rows.size // 64)):  # small reads: flat memory
        block = source.read(part)
        n_values += block.nnz
        validate_count_values(
            block.data,
            block.indptr,
            part,
            layer=layer,
            use_raw=use_raw,
            obs_name=namer,
            fix=fix,
        )
    empty = None
    if forbid_empty:
        empty = empty_cells(adata, layer, indices, use_raw=use_raw, _source=source, _validate=True)
        if empty.size:
            raise _empty_error(adata, layer, use_raw, empty)
    return CountSummary(int(rows.size), n_values, False, empty)


def empty_cells(
    adata: Any,
    layer: str | None = None,
    indices: np.ndarray | None = None,
    *,
    use_raw: bool = False,
    exact: bool | None = None,
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
    use_raw
        Scan ``adata.raw.X`` (see :func:`~cellfm_sc.data.get_matrix`).
    exact
        Read the stored values (one streaming pass) rather than only a backed file's
        ``indptr``. Default: exact in memory, ``indptr`` only for a backed CSR file.

    Returns
    -------
    Sorted int64 array of the AnnData rows with no counts.

    Notes
    -----
    From ``indptr`` alone a backed row whose stored values are all explicit zeros is not seen;
    ``exact=True`` (or ``check_counts(..., full=True)``) finds it, and the training loader
    reports it when its batch is read.

    At inference such cells are not an error: they give a row with ``n_tokens == 0`` and
    no valid token; the model layer decides what to output for them.
    """
    source = row_source(adata, layer, use_raw=use_raw) if _source is None else _source
    rows = np.arange(source.n_obs) if indices is None else np.asarray(indices, dtype=np.int64)
    if exact is None:
        exact = source.kind != "h5csr"
    if not exact and source.kind in ("csr", "h5csr"):
        return np.unique(rows[source.row_nnz()[rows] == 0])
    fix = count_fix_hint(adata, layer, use_raw) if _validate else None
    empty, _ = _scan(
        source,
        np.sort(rows),
        validate=_validate,
        layer=layer,
        use_raw=use_raw,
        namer=_obs_namer(adata),
        fix=fix,
    )
    return empty
