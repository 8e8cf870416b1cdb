"""Dataset gene -> pretrained gene: :func:`map_genes` and its result :class:`GeneMapping`."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellfm_sc.vocab._text import format_examples, is_missing, read_text, strip_version
from cellfm_sc.vocab._vocabulary import GeneVocab

#: Mapping rules of :func:`~cellfm_sc.vocab.map_genes`, in the order they are tried.
MAPPING_RULES: tuple[str, ...] = ("exact", "case", "previous", "alias", "ensembl")
_RULE_LABELS = {
    "exact": "exact",
    "case": "case-insensitive",
    "alias": "alias",
    "previous": "previous symbol",
    "ensembl": "Ensembl id",
}


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
                f"{format_examples(shown, len(shown))}"
            )
        return text


def _split_symbols(cell: Any) -> list[str]:
    if is_missing(cell):
        return []
    return [s.strip() for s in str(cell).split(",") if s.strip()]


def _read_hgnc(path: str | os.PathLike[str]) -> pd.DataFrame:
    text = read_text(Path(path), "HGNC table")
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
        if is_missing(approved):
            continue
        for syn in _split_symbols(cell):
            out.setdefault(syn.upper(), set()).add(str(approved).strip())
    return out


class _Assignment:
    """The mapping being built: at most one pretrained gene per dataset gene and vice versa.

    ``ids[i]`` is dataset gene ``i``'s pretrained id (0 = none yet), ``rule[i]`` the rule that
    mapped it, ``reason[i]`` why a gene is still unmapped; ``taken`` marks pretrained ids
    already given to some dataset gene.
    """

    def __init__(self, n: int, n_pretrained: int, later: np.ndarray) -> None:
        self.ids = np.zeros(n, dtype=np.int64)
        self.rule = np.full(n, "", dtype=object)
        self.taken = np.zeros(n_pretrained + 1, dtype=bool)
        self.reason = np.full(n, "", dtype=object)
        self.reason[later] = "duplicate_symbol"
        self.counts: dict[str, int] = dict.fromkeys(MAPPING_RULES, 0)

    def assign(self, cand: np.ndarray, rule_name: str) -> None:
        """Assign candidate targets (0 = none) of still-unmapped genes under one rule."""
        cand = np.where(self.ids == 0, cand, 0)
        idx = np.flatnonzero(cand > 0)
        if idx.size == 0:
            return
        targets = cand[idx]
        _, first = np.unique(targets, return_index=True)
        win = np.zeros(idx.size, dtype=bool)
        win[first] = True
        win &= ~self.taken[targets]
        self.ids[idx[win]] = targets[win]
        self.rule[idx[win]] = rule_name
        self.taken[targets[win]] = True
        self.reason[idx[win]] = ""
        self.reason[idx[~win]] = "duplicate_target"
        self.counts[rule_name] += int(win.sum())

    def resolved(self) -> np.ndarray:
        """Genes that are mapped, or lost their target to another gene (bool, ``(n,)``)."""
        return (self.ids > 0) | (self.reason == "duplicate_target")

    def result(self, names: np.ndarray, duplicate_symbols: dict[str, list[int]]) -> GeneMapping:
        unmapped = self.ids == 0
        counts = dict(self.counts)
        counts["unmapped"] = int(unmapped.sum())
        for key in ("ambiguous_alias", "ambiguous_case", "duplicate_target", "duplicate_symbol"):
            counts[key] = int(np.count_nonzero(unmapped & (self.reason == key)))
        examples = [str(s) for s in names[unmapped][:10]]
        rule_arr = self.rule.astype(str)
        self.ids.setflags(write=False)
        rule_arr.setflags(write=False)
        return GeneMapping(
            pretrained_ids=self.ids,
            rule=rule_arr,
            counts=counts,
            unmapped_examples=examples,
            duplicate_symbols=duplicate_symbols,
        )


class _SymbolLookup:
    """Pretrained ids of symbols: exact, or case-insensitive where that names one gene."""

    def __init__(self, pretrained: GeneVocab) -> None:
        self.pretrained = pretrained
        p_upper = pd.Series(
            [s.upper() for s in pretrained.names], index=np.arange(1, pretrained.n_genes + 1)
        )
        # first occurrence per exact symbol only (duplicated symbols are one gene for lookups)
        p_upper = p_upper[~pd.Index(pretrained.names).duplicated(keep="first")]
        n_per_upper = p_upper.groupby(p_upper.values).size()
        unique_upper = p_upper[p_upper.map(n_per_upper).to_numpy() == 1]
        self._upper_index = pd.Index(unique_upper.to_numpy(dtype=object))
        self._upper_ids = unique_upper.index.to_numpy(dtype=np.int64)
        self.ambiguous_upper = set(n_per_upper.index[n_per_upper.to_numpy() > 1])

    def case(self, query: np.ndarray) -> np.ndarray:
        """Case-insensitive ids of ``query`` (0 where none or ambiguous), int64 ``(n,)``."""
        upper = np.asarray([q.upper() for q in query], dtype=object)
        pos = self._upper_index.get_indexer(upper)
        return np.where(pos >= 0, self._upper_ids[pos], 0).astype(np.int64)

    def symbol(self, symbols: np.ndarray) -> np.ndarray:
        """Ids of approved symbols: exact, then case-insensitive, int64 ``(n,)``."""
        out = self.pretrained.ids(symbols, missing="zero")
        miss = out == 0
        if miss.any():
            out[miss] = self.case(symbols[miss])
        return out


def _map_case(
    mapping: _Assignment, lookup: _SymbolLookup, names: np.ndarray, by_symbol: np.ndarray
) -> None:
    """Rule 2: the same symbol ignoring case, if it names exactly one pretrained gene."""
    todo = ~mapping.resolved() & by_symbol
    cand = np.zeros(names.shape[0], dtype=np.int64)
    if todo.any():
        cand[todo] = lookup.case(names[todo])
        upper_amb = np.array([s.upper() in lookup.ambiguous_upper for s in names])
        mapping.reason[todo & (cand == 0) & upper_amb] = "ambiguous_case"
    mapping.assign(cand, "case")


def _map_synonyms(
    mapping: _Assignment,
    lookup: _SymbolLookup,
    hgnc: pd.DataFrame,
    names: np.ndarray,
    by_symbol: np.ndarray,
) -> None:
    """Rule 3: previous, then alias symbols of the HGNC table naming one approved symbol."""
    approved_upper = {str(s).strip().upper() for s in hgnc["Approved symbol"] if not is_missing(s)}
    for rule_name, column in (("previous", "Previous symbols"), ("alias", "Alias symbols")):
        table = _synonym_targets(hgnc, column)
        cand = np.zeros(names.shape[0], dtype=np.int64)
        hit_pos: list[int] = []
        hit_sym: list[str] = []
        for i in np.flatnonzero(~mapping.resolved() & by_symbol):
            key = names[i].upper()
            if key in approved_upper or mapping.reason[i] == "ambiguous_alias":
                continue  # an approved symbol is never re-read as someone's synonym
            targets = table.get(key)
            if not targets:
                continue
            if len(targets) > 1:
                mapping.reason[i] = "ambiguous_alias"
                continue
            hit_pos.append(int(i))
            hit_sym.append(next(iter(targets)))
        if hit_pos:
            cand[hit_pos] = lookup.symbol(np.asarray(hit_sym, dtype=object))
        mapping.assign(cand, rule_name)


def _ensembl_index(
    lookup: _SymbolLookup,
    pretrained_ensembl: Sequence[Any] | None,
    hgnc: pd.DataFrame | None,
) -> tuple[pd.Index, np.ndarray] | None:
    """Version-stripped Ensembl id -> pretrained id, from the pretrained side or the HGNC table.

    ``None`` when neither has Ensembl ids.
    """
    pretrained = lookup.pretrained
    p_ens_raw = pretrained_ensembl if pretrained_ensembl is not None else pretrained.ensembl_ids
    if p_ens_raw is not None:
        p_ens = strip_version(list(p_ens_raw))
        if p_ens.shape[0] != pretrained.n_genes:
            raise ValueError(
                f"pretrained_ensembl has {p_ens.shape[0]} entries but the pretrained "
                f"vocabulary has {pretrained.n_genes} genes"
            )
        keep = np.array([e is not None for e in p_ens]) & ~pd.Index(p_ens).duplicated("first")
        return pd.Index(p_ens[keep], dtype=object), (np.flatnonzero(keep) + 1).astype(np.int64)
    col = None if hgnc is None else next((c for c in hgnc.columns if "ensembl" in c.lower()), None)
    if hgnc is None or col is None:
        return None
    h_ens = strip_version(hgnc[col].tolist())
    sym = hgnc["Approved symbol"].to_numpy(dtype=object)
    keep = np.array([e is not None for e in h_ens]) & ~pd.Index(h_ens).duplicated(keep=False)
    h_ids = lookup.symbol(np.asarray([str(s).strip() for s in sym[keep]], dtype=object))
    return pd.Index(h_ens[keep], dtype=object), h_ids


def _map_ensembl(
    mapping: _Assignment,
    lookup: _SymbolLookup,
    ensembl_ids: Sequence[Any],
    pretrained_ensembl: Sequence[Any] | None,
    hgnc: pd.DataFrame | None,
) -> None:
    """Rule 4: the version-stripped Ensembl id (warns, and skips, when nothing to match)."""
    n = mapping.ids.shape[0]
    d_ens = strip_version(list(ensembl_ids))
    if d_ens.shape[0] != n:
        raise ValueError(f"ensembl_ids has {d_ens.shape[0]} entries but the dataset has {n} genes")
    index = _ensembl_index(lookup, pretrained_ensembl, hgnc)
    if index is None:
        warnings.warn(
            "ensembl_ids were given but neither the pretrained vocabulary (no Ensembl column; "
            "pass pretrained_ensembl=) nor hgnc_table (no Ensembl column) has Ensembl ids; "
            "the Ensembl rule was skipped",
            UserWarning,
            stacklevel=3,  # the caller of map_genes
        )
        return
    ens_index, ens_ids = index
    q = np.where(~mapping.resolved(), d_ens, None)
    q_ok = np.array([x is not None for x in q])
    cand = np.zeros(n, dtype=np.int64)
    if q_ok.any():
        pos = ens_index.get_indexer(q[q_ok])
        cand[q_ok] = np.where(pos >= 0, ens_ids[pos], 0)
    mapping.assign(cand, "ensembl")


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
    # only the first occurrence of a repeated dataset symbol goes through the symbol rules
    later = pd.Index(names).duplicated(keep="first")
    by_symbol = ~later
    duplicate_symbols: dict[str, list[int]] = {}
    for pos in np.flatnonzero(later):
        duplicate_symbols.setdefault(str(names[pos]), []).append(int(pos))
    mapping = _Assignment(dvocab.n_genes, pretrained.n_genes, later)
    lookup = _SymbolLookup(pretrained)
    mapping.assign(np.where(by_symbol, pretrained.ids(names, missing="zero"), 0), "exact")
    _map_case(mapping, lookup, names, by_symbol)
    hgnc = _read_hgnc(hgnc_table) if hgnc_table is not None else None
    if hgnc is not None:
        _map_synonyms(mapping, lookup, hgnc, names, by_symbol)
    if ensembl_ids is None and dvocab.ensembl_ids is not None:
        ensembl_ids = dvocab.ensembl_ids
    if ensembl_ids is not None:
        _map_ensembl(mapping, lookup, ensembl_ids, pretrained_ensembl, hgnc)
    return mapping.result(names, duplicate_symbols)
