"""Gene vocabularies, dataset -> pretrained gene mapping, and the new gene-embedding table.

Three pieces:

* :class:`GeneVocab` -- an immutable gene vocabulary. Token id = position + 1, id 0 is padding,
  and an embedding table for it has :attr:`GeneVocab.padded_size` rows (``n_genes + 1`` rounded up
  to a multiple of 8, as in CellFM's checkpoints: 27,855 genes -> 27,856 rows).
* :func:`~cellfm_sc.vocab.map_genes` -> :class:`~cellfm_sc.vocab.GeneMapping` -- which dataset gene maps to which pretrained gene
  (exact symbol, case-insensitive symbol, HGNC previous/alias symbol, Ensembl id).
* :func:`build_gene_embedding` -- a ``(padded_size, D)`` float32 table, Xavier-normal ("random")
  or with the pretrained rows of mapped genes copied in ("transfer").

This module depends on numpy, pandas and torch only.
"""

from __future__ import annotations

import csv
import io
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from cellfm_sc._atomic import atomic_write
from cellfm_sc.nn.config import padded_rows

__all__ = [
    "CELLFM_VOCAB_COLUMNS",
    "INIT_METHODS",
    "MAPPING_RULES",
    "GeneMapping",
    "GeneVocab",
    "build_gene_embedding",
    "check_transfer_mapping",
    "map_genes",
    "padded_table_size",
]

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
#: Valid ``init=`` values of :func:`build_gene_embedding`.
INIT_METHODS: tuple[str, ...] = ("random", "transfer")
#: Mapping rules of :func:`~cellfm_sc.vocab.map_genes`, in the order they are tried.
MAPPING_RULES: tuple[str, ...] = ("exact", "case", "previous", "alias", "ensembl")

_N_EXAMPLES = 5
_RULE_LABELS = {
    "exact": "exact",
    "case": "case-insensitive",
    "alias": "alias",
    "previous": "previous symbol",
    "ensembl": "Ensembl id",
}
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


def _is_missing(x: Any) -> bool:
    if x is None:
        return True
    try:
        return bool(pd.isna(x))
    except (TypeError, ValueError):
        return False


def _format_examples(items: Sequence[str], total: int) -> str:
    shown = ", ".join(items[:_N_EXAMPLES])
    more = f", ... ({total} in total)" if total > min(len(items), _N_EXAMPLES) else ""
    return shown + more


def _validate_names(names: np.ndarray, *, what: str, allow_duplicates: bool) -> None:
    """Raise ``ValueError`` naming missing / empty / non-string / duplicated entries."""
    bad: list[str] = []
    n_bad = 0
    for pos, x in enumerate(names):
        if _is_missing(x):
            problem = "missing (None/NaN)"
        elif not isinstance(x, str):
            problem = f"not a string ({type(x).__name__} {x!r})"
        elif not x.strip():
            problem = f"empty ({x!r})"
        elif "\n" in x or "\r" in x:
            problem = f"contains a line break ({x!r})"
        else:
            continue
        n_bad += 1
        if len(bad) < _N_EXAMPLES:
            bad.append(f"position {pos}: {problem}")
    if n_bad:
        raise ValueError(
            f"{n_bad} invalid gene name(s) in {what}: {_format_examples(bad, n_bad)}. "
            "Every gene needs a non-empty string symbol."
        )
    if allow_duplicates:
        return
    dup_mask = pd.Index(names).duplicated(keep=False)
    if dup_mask.any():
        positions = np.flatnonzero(dup_mask)
        groups: dict[str, list[int]] = {}
        for pos in positions:
            groups.setdefault(names[pos], []).append(int(pos))
        examples = [f"{name!r} at positions {pos}" for name, pos in groups.items()]
        raise ValueError(
            f"{len(groups)} duplicated gene name(s) in {what}: "
            f"{_format_examples(examples, len(groups))}. Make them unique first "
            "(e.g. adata.var_names_make_unique()) or drop the duplicates."
        )


def _as_object_array(names: Iterable[Any]) -> np.ndarray:
    if isinstance(names, str):
        raise TypeError("expected a sequence of gene names, got a single string")
    if isinstance(names, pd.Index | pd.Series):
        values = names.to_numpy(dtype=object)
    else:
        values = np.asarray(list(names), dtype=object)
    if values.ndim != 1:
        raise ValueError(f"gene names must be 1-D, got shape {values.shape}")
    # numpy string scalars -> plain str (pd.isna and isinstance checks stay simple)
    return np.array([str(x) if isinstance(x, np.str_) else x for x in values], dtype=object)


def _strip_version(ids: Iterable[Any]) -> np.ndarray:
    """Ensembl ids without their ``.N`` version suffix; missing/empty -> ``None``."""
    out = []
    for x in ids:
        if _is_missing(x) or not str(x).strip():
            out.append(None)
            continue
        s = str(x).strip()
        head, dot, tail = s.rpartition(".")
        out.append(head if dot and tail.isdigit() else s)
    return np.asarray(out, dtype=object)


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
        arr = _as_object_array(names)
        _validate_names(arr, what="the gene names", allow_duplicates=allow_duplicates)
        arr.setflags(write=False)
        ens = None
        if ensembl_ids is not None:
            ens = np.asarray(list(ensembl_ids), dtype=object)
            if ens.shape != arr.shape:
                raise ValueError(
                    f"ensembl_ids has {ens.shape[0]} entries but there are {arr.shape[0]} genes"
                )
            ens = np.array([None if _is_missing(x) else str(x) for x in ens], dtype=object)
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
        text = _read_text(path, what)
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
            names = _text_lines(text)
        arr = _as_object_array(names)
        _validate_names(arr, what=f"{what} {path}", allow_duplicates=True)
        dup = pd.Index(arr).duplicated(keep="first")
        if dup.any():
            shown = [f"{arr[p]!r} (row {p})" for p in np.flatnonzero(dup)]
            warnings.warn(
                f"{what} {path} repeats {int(dup.sum())} symbol(s): "
                f"{_format_examples(shown, len(shown))}; lookups use the first occurrence",
                UserWarning,
                stacklevel=2,
            )
        return cls(arr, ensembl_ids=ensembl, allow_duplicates=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GeneVocab:
        """Read a vocabulary written by :meth:`save` (one symbol per line, UTF-8)."""
        path = Path(path)
        return cls.from_var_names(_text_lines(_read_text(path, "vocabulary file")))

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
        query = _as_object_array([names] if isinstance(names, str) else names)
        if query.size == 0:
            return np.zeros(0, dtype=np.int64)
        pos = self._index.get_indexer(query)
        out = np.where(pos >= 0, self._index_ids[pos], 0).astype(np.int64)
        if missing == "raise" and (pos < 0).any():
            unknown = [str(x) for x in query[pos < 0]]
            raise KeyError(
                f"{len(unknown)} gene(s) not in the vocabulary: "
                f"{_format_examples(unknown, len(unknown))}"
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


#: bytes looked at for NUL bytes before a file is decoded as text
_SNIFF_BYTES = 8192


def _read_text(path: Path, what: str) -> str:
    """A whole UTF-8 text file (BOM stripped); clear errors for unusable files.

    Raises ``ValueError`` naming ``what`` and ``path`` for an empty, binary or non-UTF-8 file,
    and the ``OSError`` subclass of the failure, with a message naming them, when the file
    cannot be opened or read.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise type(err)(f"{what} {path} cannot be read: {reason}") from err
    if not data.strip():
        raise ValueError(f"{what} {path} is empty: it holds no gene symbols")
    zero = data.find(b"\x00", 0, _SNIFF_BYTES)
    hint = (
        "; is it a checkpoint (.ckpt) or another binary file passed by mistake? A vocabulary "
        "file holds one gene symbol per line, or is a CSV like CellFM's expand_gene_info.csv"
    )
    if zero >= 0:
        raise ValueError(f"{what} {path} is binary, not text (a NUL byte at offset {zero}){hint}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
            f"{err.start}){hint}"
        ) from None


def _text_lines(text: str) -> list[str]:
    """Stripped lines of a one-symbol-per-line file, trailing blank lines dropped."""
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


# ---------------------------------------------------------------------------- mapping
@dataclass(frozen=True)
class GeneMapping:
    """Dataset gene -> pretrained gene, as computed by :func:`~cellfm_sc.vocab.map_genes`.

    Attributes
    ----------
    pretrained_ids
        int64, shape ``(n_dataset_genes,)``: entry ``i`` is the pretrained token id of dataset
        gene ``i`` (dataset token id ``i + 1``); 0 = unmapped.
    rule
        str, shape ``(n_dataset_genes,)``: the rule that mapped the gene (``"exact"``, ``"case"``,
        ``"previous"``, ``"alias"``, ``"ensembl"``) or ``""`` when unmapped.
    counts
        Genes per rule, plus ``"unmapped"`` and its breakdown ``"ambiguous_alias"`` (a symbol that
        is an alias/previous symbol of several approved genes), ``"ambiguous_case"`` (matches
        several pretrained symbols case-insensitively), ``"duplicate_target"`` (its target was
        taken by another dataset gene) and ``"duplicate_symbol"`` (its symbol repeats an earlier
        dataset gene's, see ``duplicate_symbols``, and no Ensembl id mapped it).
    unmapped_examples
        The first 10 unmapped dataset genes (dataset order).
    duplicate_symbols
        Symbols that occur more than once among the dataset genes (a 10x ``gene_symbols``
        column has some) -> 0-based positions of the later occurrences. The first occurrence
        goes through the symbol rules; the later ones can only map by Ensembl id.
    """

    pretrained_ids: np.ndarray
    rule: np.ndarray
    counts: dict[str, int]
    unmapped_examples: list[str] = field(default_factory=list)
    duplicate_symbols: dict[str, list[int]] = field(default_factory=dict)

    @property
    def n_dataset(self) -> int:
        """Number of dataset genes."""
        return int(self.pretrained_ids.shape[0])

    @property
    def n_mapped(self) -> int:
        """Number of dataset genes with a pretrained row."""
        return int(np.count_nonzero(self.pretrained_ids))

    @property
    def coverage(self) -> float:
        """Fraction of dataset genes that map (0.0 for an empty dataset)."""
        return self.n_mapped / self.n_dataset if self.n_dataset else 0.0

    def __str__(self) -> str:
        c = self.counts
        rules = ", ".join(f"{_RULE_LABELS[r]} {c.get(r, 0):,}" for r in MAPPING_RULES)
        text = (
            f"{self.n_mapped:,} of {self.n_dataset:,} genes ({100 * self.coverage:.1f}%) map to "
            f"the pretrained vocabulary: {rules}; unmapped {c.get('unmapped', 0):,} "
            f"(ambiguous alias {c.get('ambiguous_alias', 0):,}, "
            f"ambiguous case {c.get('ambiguous_case', 0):,}, "
            f"duplicate target {c.get('duplicate_target', 0):,}, "
            f"repeated symbol {c.get('duplicate_symbol', 0):,})"
        )
        if self.unmapped_examples:
            text += ", e.g. " + ", ".join(self.unmapped_examples)
        if self.duplicate_symbols:
            n_later = sum(len(v) for v in self.duplicate_symbols.values())
            shown = [f"{sym} at {pos}" for sym, pos in self.duplicate_symbols.items()]
            text += (
                f"\n{len(self.duplicate_symbols):,} symbol(s) occur more than once among the "
                f"dataset genes ({n_later:,} later occurrence(s); the first occurrence takes the "
                f"symbol's row, later ones map by Ensembl id only): "
                f"{_format_examples(shown, len(shown))}"
            )
        return text


def _split_symbols(cell: Any) -> list[str]:
    if _is_missing(cell):
        return []
    return [s.strip() for s in str(cell).split(",") if s.strip()]


def _read_hgnc(path: str | os.PathLike[str]) -> pd.DataFrame:
    text = _read_text(Path(path), "HGNC table")
    df = pd.read_csv(io.StringIO(text), sep="\t", dtype=str, keep_default_na=False, na_values=[""])
    df.columns = [str(c).strip() for c in df.columns]
    if "Approved symbol" not in df.columns:
        raise ValueError(
            f"HGNC table {path} has no 'Approved symbol' column (columns: {list(df.columns)}); "
            "expected a tab-separated HGNC download with 'Approved symbol', 'Alias symbols', "
            "'Previous symbols'"
        )
    return df


def _synonym_targets(df: pd.DataFrame, column: str) -> dict[str, set[str]]:
    """Upper-cased synonym -> set of approved symbols."""
    out: dict[str, set[str]] = {}
    if column not in df.columns:
        return out
    for approved, cell in zip(df["Approved symbol"], df[column]):
        if _is_missing(approved):
            continue
        for syn in _split_symbols(cell):
            out.setdefault(syn.upper(), set()).add(str(approved).strip())
    return out


def map_genes(
    dataset: GeneVocab | Iterable[str],
    pretrained: GeneVocab,
    *,
    hgnc_table: str | os.PathLike[str] | None = None,
    ensembl_ids: Sequence[Any] | None = None,
    pretrained_ensembl: Sequence[Any] | None = None,
) -> GeneMapping:
    """Map dataset genes onto a pretrained vocabulary.

    Rules, tried in this order for every gene still unmapped:

    1. ``"exact"``: the same symbol.
    2. ``"case"``: the same symbol ignoring case (only if it matches exactly one pretrained gene,
       else counted ``"ambiguous_case"``).
    3. ``"previous"`` / ``"alias"`` (with ``hgnc_table``): a dataset symbol that is not itself an
       approved symbol is looked up (case-insensitively) among previous symbols, then aliases; if
       it names exactly one approved symbol, that symbol is looked up exactly, then
       case-insensitively, in ``pretrained``. A symbol naming several approved symbols is ambiguous
       and counted ``"ambiguous_alias"`` (it may still map by Ensembl id).
    4. ``"ensembl"`` (with ``ensembl_ids``): the version-stripped Ensembl id matched against
       ``pretrained_ensembl`` (default: ``pretrained.ensembl_ids``) or, when the pretrained side
       has none, against an ``Ensembl`` column of ``hgnc_table`` (id -> approved symbol ->
       pretrained symbol).

    Each pretrained gene receives at most one dataset gene: a target already taken by an earlier
    rule stays with that rule's gene (an exact match is never displaced); within one rule the
    first dataset gene (dataset order) wins. The losers are left unmapped and counted
    ``"duplicate_target"``.

    A symbol that occurs several times among the dataset genes (10x references have a few, e.g.
    two Ensembl genes named ``TBCE``) is mapped by symbol at its first occurrence only; the later
    occurrences can map by Ensembl id alone (rule 4), are otherwise counted
    ``"duplicate_symbol"``, and are all listed in :attr:`GeneMapping.duplicate_symbols`.

    Parameters
    ----------
    dataset
        The dataset's :class:`GeneVocab` or its gene symbols, shape ``(n_dataset_genes,)``
        (``adata.var_names`` or a ``gene_symbols`` column; repeats allowed, see above).
    pretrained
        The pretrained vocabulary, e.g. ``GeneVocab.from_cellfm_file("expand_gene_info.csv")``.
    hgnc_table
        Path of a tab-separated HGNC table with columns ``"Approved symbol"``, ``"Alias symbols"``,
        ``"Previous symbols"`` (comma-separated lists; spaces allowed).
    ensembl_ids
        Ensembl ids aligned with the dataset genes, shape ``(n_dataset_genes,)``
        (e.g. ``adata.var["gene_ids"]``); ``.N`` version suffixes are ignored.
    pretrained_ensembl
        Ensembl ids aligned with the pretrained vocabulary, shape ``(pretrained.n_genes,)``.

    Returns
    -------
    GeneMapping
    """
    dvocab = (
        dataset if isinstance(dataset, GeneVocab) else GeneVocab(dataset, allow_duplicates=True)
    )
    names = dvocab.names
    n = dvocab.n_genes
    ids = np.zeros(n, dtype=np.int64)
    rule = np.full(n, "", dtype=object)
    taken = np.zeros(pretrained.n_genes + 1, dtype=bool)
    reason = np.full(n, "", dtype=object)  # why an unmapped gene is unmapped
    counts: dict[str, int] = dict.fromkeys(MAPPING_RULES, 0)
    # only the first occurrence of a repeated dataset symbol goes through the symbol rules
    later = pd.Index(names).duplicated(keep="first")
    by_symbol = ~later
    reason[later] = "duplicate_symbol"
    duplicate_symbols: dict[str, list[int]] = {}
    for pos in np.flatnonzero(later):
        duplicate_symbols.setdefault(str(names[pos]), []).append(int(pos))

    def assign(cand: np.ndarray, rule_name: str) -> None:
        """Assign candidate targets (0 = none) of still-unmapped genes under one rule."""
        cand = np.where(ids == 0, cand, 0)
        idx = np.flatnonzero(cand > 0)
        if idx.size == 0:
            return
        targets = cand[idx]
        _, first = np.unique(targets, return_index=True)
        win = np.zeros(idx.size, dtype=bool)
        win[first] = True
        win &= ~taken[targets]
        ids[idx[win]] = targets[win]
        rule[idx[win]] = rule_name
        taken[targets[win]] = True
        reason[idx[win]] = ""
        reason[idx[~win]] = "duplicate_target"
        counts[rule_name] += int(win.sum())

    def resolved() -> np.ndarray:
        return (ids > 0) | (reason == "duplicate_target")

    # 1. exact
    assign(np.where(by_symbol, pretrained.ids(names, missing="zero"), 0), "exact")

    # 2. case-insensitive: upper-cased pretrained symbol -> id, ambiguous when several
    p_upper = pd.Series(
        [s.upper() for s in pretrained.names], index=np.arange(1, pretrained.n_genes + 1)
    )
    # first occurrence per exact symbol only (duplicated symbols are one gene for lookups)
    p_upper = p_upper[~pd.Index(pretrained.names).duplicated(keep="first")]
    n_per_upper = p_upper.groupby(p_upper.values).size()
    unique_upper = p_upper[p_upper.map(n_per_upper).to_numpy() == 1]
    upper_index = pd.Index(unique_upper.to_numpy(dtype=object))
    upper_ids = unique_upper.index.to_numpy(dtype=np.int64)
    ambiguous_upper = set(n_per_upper.index[n_per_upper.to_numpy() > 1])

    def lookup_case(query: np.ndarray) -> np.ndarray:
        pos = upper_index.get_indexer(np.asarray([q.upper() for q in query], dtype=object))
        return np.where(pos >= 0, upper_ids[pos], 0).astype(np.int64)

    todo = ~resolved() & by_symbol
    cand = np.zeros(n, dtype=np.int64)
    if todo.any():
        cand[todo] = lookup_case(names[todo])
        amb = todo & (cand == 0) & np.array([s.upper() in ambiguous_upper for s in names])
        reason[amb] = "ambiguous_case"
    assign(cand, "case")

    # 3. previous / alias symbols from HGNC
    hgnc = _read_hgnc(hgnc_table) if hgnc_table is not None else None

    def lookup_symbol(symbols: np.ndarray) -> np.ndarray:
        """Pretrained id of approved symbols: exact, then case-insensitive."""
        out = pretrained.ids(symbols, missing="zero")
        miss = out == 0
        if miss.any():
            out[miss] = lookup_case(symbols[miss])
        return out

    if hgnc is not None:
        approved_upper = {
            str(s).strip().upper() for s in hgnc["Approved symbol"] if not _is_missing(s)
        }
        for rule_name, column in (("previous", "Previous symbols"), ("alias", "Alias symbols")):
            table = _synonym_targets(hgnc, column)
            todo = np.flatnonzero(~resolved() & by_symbol)
            cand = np.zeros(n, dtype=np.int64)
            hit_pos: list[int] = []
            hit_sym: list[str] = []
            for i in todo:
                key = names[i].upper()
                if key in approved_upper or reason[i] == "ambiguous_alias":
                    continue  # an approved symbol is never re-read as someone's synonym
                targets = table.get(key)
                if not targets:
                    continue
                if len(targets) > 1:
                    reason[i] = "ambiguous_alias"
                    continue
                hit_pos.append(int(i))
                hit_sym.append(next(iter(targets)))
            if hit_pos:
                cand[hit_pos] = lookup_symbol(np.asarray(hit_sym, dtype=object))
            assign(cand, rule_name)

    # 4. Ensembl ids
    if ensembl_ids is None and dvocab.ensembl_ids is not None:
        ensembl_ids = dvocab.ensembl_ids
    if ensembl_ids is not None:
        d_ens = _strip_version(list(ensembl_ids))
        if d_ens.shape[0] != n:
            raise ValueError(
                f"ensembl_ids has {d_ens.shape[0]} entries but the dataset has {n} genes"
            )
        p_ens_raw = pretrained_ensembl if pretrained_ensembl is not None else pretrained.ensembl_ids
        ens_index: pd.Index | None = None
        ens_ids: np.ndarray | None = None
        if p_ens_raw is not None:
            p_ens = _strip_version(list(p_ens_raw))
            if p_ens.shape[0] != pretrained.n_genes:
                raise ValueError(
                    f"pretrained_ensembl has {p_ens.shape[0]} entries but the pretrained "
                    f"vocabulary has {pretrained.n_genes} genes"
                )
            keep = np.array([e is not None for e in p_ens]) & ~pd.Index(p_ens).duplicated("first")
            ens_index = pd.Index(p_ens[keep], dtype=object)
            ens_ids = (np.flatnonzero(keep) + 1).astype(np.int64)
        elif hgnc is not None:
            col = next((c for c in hgnc.columns if "ensembl" in c.lower()), None)
            if col is not None:
                h_ens = _strip_version(hgnc[col].tolist())
                sym = hgnc["Approved symbol"].to_numpy(dtype=object)
                keep = np.array([e is not None for e in h_ens]) & ~pd.Index(h_ens).duplicated(
                    keep=False
                )
                h_ids = lookup_symbol(np.asarray([str(s).strip() for s in sym[keep]], dtype=object))
                ens_index = pd.Index(h_ens[keep], dtype=object)
                ens_ids = h_ids
        if ens_index is None or ens_ids is None:
            warnings.warn(
                "ensembl_ids were given but neither the pretrained vocabulary (no Ensembl column; "
                "pass pretrained_ensembl=) nor hgnc_table (no Ensembl column) has Ensembl ids; "
                "the Ensembl rule was skipped",
                UserWarning,
                stacklevel=2,
            )
        else:
            todo = ~resolved()
            q = np.where(todo, d_ens, None)
            q_ok = np.array([x is not None for x in q])
            cand = np.zeros(n, dtype=np.int64)
            if q_ok.any():
                pos = ens_index.get_indexer(q[q_ok])
                cand[q_ok] = np.where(pos >= 0, ens_ids[pos], 0)
            assign(cand, "ensembl")

    unmapped = ids == 0
    counts["unmapped"] = int(unmapped.sum())
    for key in ("ambiguous_alias", "ambiguous_case", "duplicate_target", "duplicate_symbol"):
        counts[key] = int(np.count_nonzero(unmapped & (reason == key)))
    examples = [str(s) for s in names[unmapped][:10]]
    rule_arr = rule.astype(str)
    ids.setflags(write=False)
    rule_arr.setflags(write=False)
    return GeneMapping(
        pretrained_ids=ids,
        rule=rule_arr,
        counts=counts,
        unmapped_examples=examples,
        duplicate_symbols=duplicate_symbols,
    )


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
    arr = _as_object_array(names)
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


# ---------------------------------------------------------------------------- embedding table
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
