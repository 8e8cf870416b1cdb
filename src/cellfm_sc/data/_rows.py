"""Row access to a count matrix, in memory or in a backed ``.h5ad`` file.

Internal: every reader of the data path goes through :class:`RowSource`, so that in-memory
CSR/CSC/dense matrices and backed files behave the same and backed reads stay sequential.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = ["RowSource", "element_path", "layer_label"]

# Rows closer than this are read together in one slice (the rows in between are discarded).
_MAX_GAP = 8
# Backed CSR: rows whose stored values are closer than this are read in one slice.
_MAX_GAP_VALUES = 16_384


def layer_label(layer: str | None, use_raw: bool = False) -> str:
    """How a matrix is named in messages: ``adata.X``, ``adata.layers['counts']`` or
    ``adata.raw.X``."""
    if use_raw:
        return "adata.raw.X"
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def element_path(layer: str | None, use_raw: bool = False) -> str:
    """Path of the matrix inside an ``.h5ad`` file (``X``, ``layers/<name>`` or ``raw/X``)."""
    if use_raw:
        return "raw/X"
    return "X" if layer is None else f"layers/{layer}"


def _runs(rows: np.ndarray, max_gap: int = _MAX_GAP) -> list[tuple[int, int]]:
    """Split sorted unique ``rows`` into ``[start, stop)`` ranges that are read in one slice."""
    if rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) > max_gap) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [rows.size]])
    return [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, stops)]


class RowSource:
    """Reads rows of a count matrix as CSR.

    Parameters
    ----------
    matrix
        An in-memory matrix (scipy sparse CSR/CSC, numpy array), an h5py dataset or group,
        or None when ``path`` is given.
    path
        A ``.h5ad`` file; the matrix at ``element`` is opened lazily (and reopened after
        unpickling, so the source is safe to send to DataLoader workers).
    element
        Path of the matrix in the file (``"X"``, ``"layers/<name>"`` or ``"raw/X"``).
    """

    def __init__(self, matrix: Any = None, *, path: str | None = None, element: str = "X"):
        self.path = None if path is None else str(path)
        self.element = element
        self._file: Any = None
        self._node: Any = None
        self._indptr: np.ndarray | None = None  # backed CSR: read once (an index array)
        self._pid = os.getpid()
        if self.path is not None:
            self._open()
        else:
            if sp.issparse(matrix) and matrix.format == "csc":
                warnings.warn(
                    "the count matrix is CSC; it is converted to CSR once for row access, "
                    "which copies it in memory. Store counts as CSR to avoid the copy.",
                    UserWarning,
                    stacklevel=3,
                )
                matrix = sp.csr_matrix(matrix)
            elif sp.issparse(matrix) and matrix.format != "csr":
                matrix = sp.csr_matrix(matrix)
            elif sp.issparse(matrix):
                matrix = sp.csr_matrix(matrix, copy=False)
                if not matrix.has_sorted_indices:
                    matrix = matrix.sorted_indices()
            elif isinstance(matrix, np.matrix):
                matrix = np.asarray(matrix)
            self._matrix = matrix
        shape = self._shape()
        self.n_obs, self.n_vars = int(shape[0]), int(shape[1])

    # -- opening -----------------------------------------------------------------------------
    def _open(self) -> None:
        import h5py

        self._file = h5py.File(self.path, "r")
        self._pid = os.getpid()
        if self.element not in self._file:
            raise KeyError(f"{self.element!r} not found in {self.path}")
        node = self._file[self.element]
        if isinstance(node, h5py.Group):
            enc = node.attrs.get("encoding-type", "")
            enc = enc.decode() if isinstance(enc, bytes) else str(enc)
            if enc == "csc_matrix":
                raise ValueError(
                    f"{self.element!r} in {self.path} is stored as CSC; reading rows of a backed "
                    "CSC matrix reads the whole matrix for every batch. Rewrite it as CSR "
                    "(e.g. adata.X = adata.X.tocsr(); adata.write_h5ad(...))."
                )
            if enc != "csr_matrix":
                raise ValueError(
                    f"{self.element!r} in {self.path} has unsupported encoding {enc!r}"
                )
            self._kind = "h5csr"
            self._data = node["data"]
            self._indices = node["indices"]
        else:
            self._kind = "h5dense"
        self._node = node

    @property
    def kind(self) -> str:
        """``"csr"``, ``"dense"``, ``"h5csr"`` or ``"h5dense"``."""
        if self.path is not None:
            return self._kind
        return "csr" if sp.issparse(self._matrix) else "dense"

    def _shape(self) -> tuple[int, int]:
        if self.path is None:
            return tuple(self._matrix.shape)  # type: ignore[return-value]
        if self._kind == "h5csr":
            return tuple(int(s) for s in self._node.attrs["shape"])  # type: ignore[return-value]
        return tuple(self._node.shape)  # type: ignore[return-value]

    def _ensure_open(self) -> None:
        if self.path is None:
            return
        if self._node is not None and self._pid != os.getpid():
            # a forked DataLoader worker: leave the parent's handle alone, open our own
            self._file = self._node = self._data = self._indices = None
        if self._node is None:
            self._open()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self.path is not None:  # workers reopen the file instead of pickling a handle
            for key in ("_file", "_node", "_data", "_indices"):
                state[key] = None
        return state

    def close(self) -> None:
        """Close the file handle (it is reopened on the next read)."""
        if self._file is not None:
            self._file.close()
        self._file = None
        self._node = None
        self._data = None
        self._indices = None

    def indptr(self) -> np.ndarray:
        """Row pointer of a backed CSR matrix, int64 ``(n_obs + 1,)``, read once and kept."""
        self._ensure_open()
        if self._indptr is None:
            self._indptr = np.asarray(self._node["indptr"][:], dtype=np.int64)
        return self._indptr

    def _h5csr_spans(self, uniq: np.ndarray, datasets: list[Any]) -> tuple[list, np.ndarray]:
        """Read ``datasets`` (``data``/``indices``) at sorted unique rows of a backed CSR
        matrix, one slice per run of nearby rows; returns the arrays and the row pointer."""
        ptr = self.indptr()
        s, e = ptr[uniq], ptr[uniq + 1]
        lens = e - s
        breaks = np.flatnonzero(s[1:] - e[:-1] > _MAX_GAP_VALUES) + 1
        bounds = np.concatenate([[0], breaks, [uniq.size]])
        parts: list[list[np.ndarray]] = [[] for _ in datasets]
        for a, b in itertools.pairwise(bounds):
            p0, p1 = int(s[a]), int(e[b - 1])
            if p1 <= p0:
                continue
            n_want = int(lens[a:b].sum())
            sel = None
            if n_want != p1 - p0:  # skip the rows between the wanted ones
                run_lens = lens[a:b]
                first = np.zeros(run_lens.size, dtype=np.int64)
                np.cumsum(run_lens[:-1], out=first[1:])
                sel = np.repeat(s[a:b] - p0 - first, run_lens) + np.arange(n_want)
            for out, ds in zip(parts, datasets):
                block = ds[p0:p1]
                out.append(block if sel is None else block[sel])
        out_ptr = np.zeros(uniq.size + 1, dtype=np.int64)
        np.cumsum(lens, out=out_ptr[1:])
        arrays = [
            np.concatenate(p) if p else np.zeros(0, ds.dtype) for p, ds in zip(parts, datasets)
        ]
        return arrays, out_ptr

    def _read_h5csr_values(self, uniq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stored values ``(nnz,)`` and row pointer ``(n + 1,)`` of sorted unique backed rows."""
        self._ensure_open()
        (data,), out_ptr = self._h5csr_spans(uniq, [self._data])
        return data, out_ptr

    def _read_h5csr(self, uniq: np.ndarray) -> sp.csr_matrix:
        """Sorted unique rows of a backed CSR matrix: one slice per run of nearby rows."""
        self._ensure_open()
        (data, indices), out_ptr = self._h5csr_spans(uniq, [self._data, self._indices])
        out = sp.csr_matrix((data, indices, out_ptr), shape=(uniq.size, self.n_vars))
        if not out.has_sorted_indices:  # checked once; files written by anndata are sorted
            out.sort_indices()
        return out

    # -- reading -----------------------------------------------------------------------------
    def _read_range(self, start: int, stop: int) -> sp.csr_matrix:
        """Dense rows ``start:stop`` as CSR, shape ``(stop-start, n_vars)``."""
        self._ensure_open()
        kind = self.kind
        if kind == "csr":
            return self._matrix[start:stop]
        if kind == "dense":
            return sp.csr_matrix(np.asarray(self._matrix[start:stop]))
        return sp.csr_matrix(self._node[start:stop])  # h5dense

    def read(self, rows: np.ndarray) -> sp.csr_matrix:
        """Read ``rows`` (any order, repeats allowed) as CSR, in that order.

        Parameters
        ----------
        rows
            Int array ``(B,)`` of row positions.

        Returns
        -------
        CSR matrix ``(B, n_vars)`` with sorted column indices; row ``i`` is matrix row ``rows[i]``.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_obs):
            raise IndexError(f"row index out of range for a matrix with {self.n_obs} rows")
        uniq, inverse = np.unique(rows, return_inverse=True)
        if self.kind == "csr":
            sub = self._matrix[uniq]
        elif self.kind == "h5csr":
            sub = self._read_h5csr(uniq)
        else:
            parts = []
            for a, b in _runs(uniq):
                block = self._read_range(a, b)
                want = uniq[(uniq >= a) & (uniq < b)] - a
                parts.append(block if want.size == b - a else block[want])
            if parts:
                sub = sp.vstack(parts, format="csr")
            else:
                sub = sp.csr_matrix((0, self.n_vars))
        if uniq.size != rows.size or not np.array_equal(uniq, rows):
            sub = sub[inverse]
        if not sub.has_sorted_indices:
            sub.sort_indices()
        return sub

    def _chunks(self, rows: np.ndarray, max_nnz: int) -> Iterator[np.ndarray]:
        """Cut sorted ``rows`` into consecutive pieces of at most about ``max_nnz`` values.

        Sparse sources are cut exactly from the row lengths (``indptr``); dense sources by
        ``max_nnz / n_vars`` rows. A piece always holds at least one row.
        """
        if rows.size == 0:
            return
        if self.kind in ("csr", "h5csr"):
            cum = np.cumsum(self.row_nnz()[rows])
            i = 0
            while i < rows.size:
                before = int(cum[i - 1]) if i else 0
                j = max(int(np.searchsorted(cum, before + max_nnz, side="right")), i + 1)
                yield rows[i:j]
                i = j
        else:
            step = max(1, max_nnz // max(self.n_vars, 1))
            for i in range(0, rows.size, step):
                yield rows[i : i + step]

    def iter_ranges(self, rows: np.ndarray, max_nnz: int = 4_000_000):
        """Yield ``(row_positions, csr)`` for sorted ``rows`` in chunks of bounded size.

        Used by full scans. Chunks hold at most about ``max_nnz`` stored values (a dense source:
        ``max_nnz`` entries), never the whole matrix.
        """
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        for chunk in self._chunks(rows, max_nnz):
            yield chunk, self.read(chunk)

    def iter_values(self, rows: np.ndarray, max_nnz: int = 4_000_000):
        """Yield ``(row_positions, data, indptr)`` for sorted ``rows``: stored values only.

        Like :meth:`iter_ranges` but without the column indices (half the reads of a backed
        CSR file) and without copies where the rows are contiguous (an in-memory CSR chunk
        is a view of its ``data``). ``data`` is ``(nnz,)``, ``indptr`` ``(n + 1,)`` from 0.
        """
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        for chunk in self._chunks(rows, max_nnz):
            contiguous = int(chunk[-1]) - int(chunk[0]) + 1 == chunk.size
            kind = self.kind
            if kind in ("csr", "h5csr") and contiguous:
                self._ensure_open()
                ptr = self._matrix.indptr if kind == "csr" else self.indptr()
                a, b = int(chunk[0]), int(chunk[-1]) + 1
                p0, p1 = int(ptr[a]), int(ptr[b])
                data = self._matrix.data[p0:p1] if kind == "csr" else self._data[p0:p1]
                yield chunk, data, np.asarray(ptr[a : b + 1], dtype=np.int64) - p0
            elif kind == "h5csr":
                data, indptr = self._read_h5csr_values(chunk)
                yield chunk, data, indptr
            else:
                block = self.read(chunk)
                yield chunk, block.data, block.indptr

    def row_nnz(self) -> np.ndarray:
        """Stored values per row, int64 ``(n_obs,)``; reads only ``indptr`` for sparse data."""
        self._ensure_open()
        kind = self.kind
        if kind == "csr":
            return np.diff(self._matrix.indptr).astype(np.int64)
        if kind == "h5csr":
            return np.diff(self.indptr())
        out = np.empty(self.n_obs, dtype=np.int64)
        for start in range(0, self.n_obs, 1024):
            stop = min(start + 1024, self.n_obs)
            block = np.asarray(
                self._matrix[start:stop] if kind == "dense" else self._node[start:stop]
            )
            out[start:stop] = np.count_nonzero(block, axis=1)
        return out
