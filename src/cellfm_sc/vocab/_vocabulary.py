"""The gene vocabulary: :class:`GeneVocab` (token id = position + 1, id 0 = padding)."""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from cellfm_sc._atomic import atomic_write
from cellfm_sc.nn.config import padded_rows
from cellfm_sc.vocab._text import (
    as_object_array,
    format_examples,
    is_missing,
    read_text,
    text_lines,
    validate_names,
)

#: Header of CellFM's ``expand_gene_info.csv`` (:meth:`GeneVocab.save_cellfm_file` writes it).
CELLFM_VOCAB_COLUMNS: tuple[str, ...] = (
    "HGNC_gene",
    "h5_sample_frequency",
    "biotype",
    "gene_length",
    "exon_count",
    "exon_length_total",
    "unique_exon_count",
    "unique_exon_length_total",
    "feature",
)
#: Rows of an embedding table are padded to a multiple of this.
ROW_MULTIPLE = 8
# columns of a CellFM vocabulary CSV that may hold Ensembl gene ids (compared lower-case)
_ENSEMBL_COLUMNS = (
    "ensembl",
    "ensembl_id",
    "ensembl_ids",
    "ensembl_gene_id",
    "gene_id",
    "gene_ids",
)


#: Rows of an embedding table for ``n_genes`` genes (:func:`cellfm_sc.nn.padded_rows`).
padded_table_size = padded_rows


class GeneVocab:
    """An immutable gene vocabulary: token id = position + 1, id 0 = padding.

    Build one with :meth:`from_var_names` (a dataset's genes; names must be unique),
    :meth:`from_cellfm_file` (CellFM's ``expand_gene_info.csv`` or a one-symbol-per-line file) or
    :meth:`load` (a file written by :meth:`save`).

    Parameters
    ----------
    names
        Gene symbols, shape ``(n_genes,)``. Missing (None/NaN), empty or non-string names raise
        ``ValueError`` naming them.
    ensembl_ids
        Optional Ensembl gene ids aligned with ``names`` (missing entries allowed).
    allow_duplicates
        Accept repeated symbols (a pretrained vocabulary's rows cannot be dropped: each owns a
        checkpoint row). The first occurrence wins in :meth:`ids`. Default ``False``: duplicates
        raise ``ValueError`` naming them and their positions.

    Notes
    -----
    Equality compares the symbols (in order) only, not the Ensembl ids.
    """

    __slots__ = ("_ensembl", "_hash", "_index", "_index_ids", "_names")

    def __init__(
        self,
        names: Iterable[str],
        *,
        ensembl_ids: Iterable[Any] | None = None,
        allow_duplicates: bool = False,
    ) -> None:
        arr = as_object_array(names)
        validate_names(arr, what="the gene names", allow_duplicates=allow_duplicates)
        arr.setflags(write=False)
        ens = None
        if ensembl_ids is not None:
            ens = np.asarray(list(ensembl_ids), dtype=object)
            if ens.shape != arr.shape:
                raise ValueError(
                    f"ensembl_ids has {ens.shape[0]} entries but there are {arr.shape[0]} genes"
                )
            ens = np.array([None if is_missing(x) else str(x) for x in ens], dtype=object)
            ens.setflags(write=False)
        first = ~pd.Index(arr).duplicated(keep="first")
        index = pd.Index(arr[first], dtype=object)
        index_ids = (np.flatnonzero(first) + 1).astype(np.int64)
        object.__setattr__(self, "_names", arr)
        object.__setattr__(self, "_ensembl", ens)
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_index_ids", index_ids)
        object.__setattr__(self, "_hash", None)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"GeneVocab is immutable (cannot set {name!r})")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_var_names(
        cls, names: Iterable[str], *, ensembl_ids: Iterable[Any] | None = None
    ) -> GeneVocab:
        """Vocabulary of a dataset's genes, e.g. ``adata.var_names`` (must be unique).

        Parameters
        ----------
        names
            Gene names, shape ``(n_genes,)``; gene ``i`` gets token id ``i + 1``.
        ensembl_ids
            Optional Ensembl ids aligned with ``names`` (e.g. ``adata.var["gene_ids"]``).
        """
        return cls(names, ensembl_ids=ensembl_ids, allow_duplicates=False)

    @classmethod
    def from_cellfm_file(cls, path: str | os.PathLike[str]) -> GeneVocab:
        """Read a pretrained vocabulary file.

        Two formats are recognised:

        * CellFM's ``expand_gene_info.csv`` (and what :meth:`save_cellfm_file` writes): a
          ``.csv`` whose first line contains a comma is read as CSV with a header; the first
          column holds the symbols (token id = data row + 1). A column named
          ``ensembl``/``ensembl_id``/``ensembl_gene_id``/``gene_id``/``gene_ids`` (any case) is
          kept as :attr:`ensembl_ids`. (CellFM's public 80M file has no such column.)
        * anything else: one symbol per line, no header (blank trailing lines ignored).

        Repeated symbols are accepted with a ``UserWarning`` because every row owns a checkpoint
        row; lookups resolve to the first occurrence. (CellFM's public 80M file has none.)

        Raises
        ------
        ValueError
            Naming the file: it is empty, holds no symbol (a header only), is binary (for
            example a ``.ckpt`` passed by mistake) or not UTF-8 text, or has invalid symbols.
        FileNotFoundError, PermissionError, IsADirectoryError
            If it cannot be opened (the message names it as the vocabulary file).
        """
        path = Path(path)
        what = "vocabulary file"
        text = read_text(path, what)
        first_line = text.split("\n", 1)[0]
        ensembl = None
        if path.suffix.lower() == ".csv" and "," in first_line:
            df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_values=[""])
            names = [x.strip() if isinstance(x, str) else x for x in df.iloc[:, 0]]
            for col in df.columns[1:]:
                if str(col).strip().lower() in _ENSEMBL_COLUMNS:
                    ensembl = df[col].tolist()
                    break
            if not names:
                raise ValueError(
                    f"{what} {path} holds no gene symbols: only the header line "
                    f"{first_line.strip()[:80]!r}"
                )
        else:
            names = text_lines(text)
        arr = as_object_array(names)
        validate_names(arr, what=f"{what} {path}", allow_duplicates=True)
        dup = pd.Index(arr).duplicated(keep="first")
        if dup.any():
            shown = [f"{arr[p]!r} (row {p})" for p in np.flatnonzero(dup)]
            warnings.warn(
                f"{what} {path} repeats {int(dup.sum())} symbol(s): "
                f"{format_examples(shown, len(shown))}; lookups use the first occurrence",
                UserWarning,
                stacklevel=2,
            )
        return cls(arr, ensembl_ids=ensembl, allow_duplicates=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GeneVocab:
        """Read a vocabulary written by :meth:`save` (one symbol per line, UTF-8)."""
        path = Path(path)
        return cls.from_var_names(text_lines(read_text(path, "vocabulary file")))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write one symbol per line (UTF-8), atomically (temp file + ``os.replace``).

        Ensembl ids are not written.
        """
        atomic_write(Path(path), "".join(f"{name}\n" for name in self._names))

    def save_cellfm_file(self, path: str | os.PathLike[str]) -> None:
        """Write the vocabulary in the format of CellFM's ``expand_gene_info.csv``.

        The file pairs with a checkpoint written by
        :func:`cellfm_sc.io.save_trunk_mindspore` (row ``i`` of the file owns ``gene_emb``
        row ``i + 1``), so ``vocabulary_file=`` + ``embedding_init="transfer"`` fine-tune
        from it and the original CellFM code reads it. UTF-8, ``\\n`` line ends, written
        atomically. Columns: the header of ``expand_gene_info.csv``
        (``CELLFM_VOCAB_COLUMNS``: ``HGNC_gene`` = the symbol in token order, the other
        eight empty), plus a trailing ``ensembl_id`` column when :attr:`ensembl_ids` is set
        (read back by :meth:`from_cellfm_file`).

        Parameters
        ----------
        path
            Destination; must end in ``.csv`` (how :meth:`from_cellfm_file` recognises the
            CSV format).

        Examples
        --------
        >>> vocab = GeneVocab.from_var_names(["CD3E", "MS4A1"])
        >>> vocab.save_cellfm_file("vocab.csv")  # doctest: +SKIP
        """
        path = Path(path)
        if path.suffix.lower() != ".csv":
            raise ValueError(
                f"a CellFM vocabulary file must end in .csv (how readers recognise the format), "
                f"got {path.name!r}"
            )
        header = list(CELLFM_VOCAB_COLUMNS)
        extra = [""] * (len(header) - 1)
        if self._ensembl is not None:
            header.append("ensembl_id")
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        for k, name in enumerate(self._names):
            row = [name, *extra]
            if self._ensembl is not None:
                row.append(self._ensembl[k] or "")
            writer.writerow(row)
        atomic_write(path, buf.getvalue())

    # ------------------------------------------------------------------ properties
    @property
    def n_genes(self) -> int:
        """Number of genes (token ids ``1..n_genes``)."""
        return int(self._names.shape[0])

    @property
    def padded_size(self) -> int:
        """Rows of an embedding table, ``n_genes + 1`` rounded up to a multiple of 8."""
        return padded_table_size(self.n_genes)

    @property
    def names(self) -> np.ndarray:
        """Gene symbols, read-only object array of str, shape ``(n_genes,)``."""
        return self._names

    @property
    def ensembl_ids(self) -> np.ndarray | None:
        """Ensembl ids aligned with :attr:`names` (``None`` entries where missing), or ``None``."""
        return self._ensembl

    @property
    def has_duplicates(self) -> bool:
        """Whether some symbol occurs more than once (only possible for a pretrained file)."""
        return len(self._index) != self.n_genes

    # ------------------------------------------------------------------ lookups
    def ids(
        self, names: Iterable[str] | str, *, missing: Literal["raise", "zero"] = "raise"
    ) -> np.ndarray:
        """Token ids of ``names``.

        Parameters
        ----------
        names
            Gene symbols, shape ``(n,)`` (a single string is treated as ``[names]``).
        missing
            ``"raise"`` (default): unknown names raise ``KeyError`` naming up to 5 and the count;
            ``"zero"``: unknown names get id 0 (padding).

        Returns
        -------
        np.ndarray
            int64, shape ``(n,)``, values in ``0..n_genes``.
        """
        if missing not in ("raise", "zero"):
            raise ValueError(f"missing must be 'raise' or 'zero', got {missing!r}")
        query = as_object_array([names] if isinstance(names, str) else names)
        if query.size == 0:
            return np.zeros(0, dtype=np.int64)
        pos = self._index.get_indexer(query)
        out = np.where(pos >= 0, self._index_ids[pos], 0).astype(np.int64)
        if missing == "raise" and (pos < 0).any():
            unknown = [str(x) for x in query[pos < 0]]
            raise KeyError(
                f"{len(unknown)} gene(s) not in the vocabulary: "
                f"{format_examples(unknown, len(unknown))}"
            )
        return out

    def __len__(self) -> int:
        return self.n_genes

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._index

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GeneVocab):
            return NotImplemented
        return self.n_genes == other.n_genes and bool(np.array_equal(self._names, other._names))

    def __hash__(self) -> int:
        if self._hash is None:
            object.__setattr__(self, "_hash", hash(tuple(self._names)))
        return self._hash

    def __repr__(self) -> str:
        head = ", ".join(self._names[:3])
        more = ", ..." if self.n_genes > 3 else ""
        return f"GeneVocab(n_genes={self.n_genes}, padded_size={self.padded_size}, [{head}{more}])"
