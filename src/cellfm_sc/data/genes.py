"""Query data with another gene set: columns -> the model's token ids (:func:`align_genes`).

A model knows the genes of its vocabulary (token id = position + 1). A query AnnData may hold
them in another order, only some of them, and genes the model never saw. :func:`align_genes`
gives one token id per query column, 0 for a gene the model does not know; the tokeniser
(:func:`~cellfm_sc.data.tokenize`) then drops the 0 columns, and the model's genes that the
query lacks never appear, exactly as a zero count would.

Normalisation. A cell's total ``T`` (CellFM's ``log1p(c / T * 1e4)``) is taken over every
column of the query's count matrix, the dropped genes included. ``T`` stands for the cell's
library size, which the genes the model does not know are part of: a query that measures the
same transcripts under partly different names (other annotation release, symbols the
vocabulary lacks) then gives exactly the values the model would see on the same cells with all
its genes, whereas totals over the known genes alone would shift every value by
``log(T_all / T_known)``. Where the query simply lacks genes, no choice of total can recover
their counts; their share of the library (the missing model genes' counts) is then left out.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellfm_sc.vocab import GeneVocab

__all__ = ["GeneAlignment", "align_genes"]

_N_SHOWN = 5


def _examples(names: Sequence[str] | np.ndarray, total: int | None = None) -> str:
    total = len(names) if total is None else total
    shown = ", ".join(repr(str(x)) for x in list(names)[:_N_SHOWN])
    return f"[{shown}{', ...' if total > _N_SHOWN else ''}]"


@dataclass(frozen=True)
class GeneAlignment:
    """How the columns of a query matrix map onto a model's genes.

    Attributes
    ----------
    gene_id_map
        int64 ``(n_query_genes,)``: the model's token id of each query column (``1..n``),
        0 for a gene the model does not know (its column produces no token). Pass it as
        ``gene_id_map=`` to :class:`~cellfm_sc.data.CellDataset` / ``make_dataloader`` /
        ``batches``.
    n_model_genes
        Genes of the model's vocabulary.
    n_found
        Model genes present in the query.
    unknown_genes
        Query genes the model does not know (query order), object array of str.
    missing_genes
        Model genes absent from the query (vocabulary order), object array of str.
    """

    gene_id_map: np.ndarray
    n_model_genes: int
    n_found: int
    unknown_genes: np.ndarray
    missing_genes: np.ndarray

    @property
    def n_query_genes(self) -> int:
        """Columns of the query matrix."""
        return int(self.gene_id_map.shape[0])

    @property
    def coverage(self) -> float:
        """Fraction of the model's genes present in the query (``n_found / n_model_genes``)."""
        return self.n_found / self.n_model_genes if self.n_model_genes else 0.0

    @property
    def is_identity(self) -> bool:
        """The query columns are the model's genes, in order (``gene_id_map`` may be None)."""
        n = self.n_query_genes
        return n == self.n_model_genes and bool(
            np.array_equal(self.gene_id_map, np.arange(1, n + 1))
        )

    def describe(self) -> str:
        """One line: coverage, missing and unknown genes."""
        return (
            f"the query has {self.n_found:,} of the model's {self.n_model_genes:,} genes "
            f"({100 * self.coverage:.1f}%); {self.missing_genes.size:,} model gene(s) missing "
            f"(treated as not expressed), {self.unknown_genes.size:,} of the query's "
            f"{self.n_query_genes:,} gene(s) unknown to the model (dropped; they still count "
            "toward each cell's total)"
        )


def _duplicates_error(names: np.ndarray, what: str) -> ValueError | None:
    dup = pd.Index(names).duplicated(keep=False)
    if not dup.any():
        return None
    groups: dict[str, list[int]] = {}
    for pos in np.flatnonzero(dup):
        groups.setdefault(str(names[pos]), []).append(int(pos))
    shown = ", ".join(f"{k!r} (columns {v})" for k, v in list(groups.items())[:_N_SHOWN])
    more = ", ..." if len(groups) > _N_SHOWN else ""
    return ValueError(
        f"{what} has {len(groups)} duplicated gene name(s): {shown}{more}; a gene must be one "
        "column. Make the names unique (adata.var_names_make_unique()) or drop the duplicates."
    )


def align_genes(
    model_genes: Sequence[str] | GeneVocab,
    var_names: Sequence[str],
    min_gene_coverage: float = 0.5,
    *,
    what: str = "adata.var_names",
) -> GeneAlignment:
    """Map the query's genes (matrix columns) onto a model's genes, by exact name.

    Parameters
    ----------
    model_genes
        The model's genes in token order (token id = position + 1), or its :class:`~cellfm_sc.vocab.GeneVocab`.
    var_names
        ``(n_query_genes,)`` names of the query matrix's columns, e.g.
        :func:`~cellfm_sc.data.matrix_var_names` (``adata.raw.var_names`` with ``use_raw``).
        Same identifiers as the model's (symbols vs Ensembl ids are not translated here).
    min_gene_coverage
        Least fraction of the model's genes the query must hold; below it is an error.
    what
        How the query's names are called in messages.

    Returns
    -------
    GeneAlignment
        ``gene_id_map`` int64 ``(n_query_genes,)`` (0 = unknown to the model) and the
        coverage facts.

    Raises
    ------
    ValueError
        Duplicated query names (naming them and their columns); coverage below
        ``min_gene_coverage`` (naming both counts, the fraction and examples of unknown and
        missing genes); no model gene in the query; ``min_gene_coverage`` outside [0, 1].

    Warns
    -----
    UserWarning
        When the coverage is below 100%: :meth:`GeneAlignment.describe() <cellfm_sc.data.GeneAlignment.describe>`.

    Examples
    --------
    >>> import warnings
    >>> with warnings.catch_warnings(record=True):  # "the query has 4 of the model's 5 genes"
    ...     al = align_genes(["A", "B", "C", "D", "E"], ["E", "X", "A", "C", "B"])
    >>> al.gene_id_map.tolist(), al.coverage, al.unknown_genes.tolist()
    ([5, 0, 1, 3, 2], 0.8, ['X'])
    """
    if not 0.0 <= float(min_gene_coverage) <= 1.0:
        raise ValueError(f"min_gene_coverage must be in [0, 1], got {min_gene_coverage}")
    vocab = model_genes if isinstance(model_genes, GeneVocab) else GeneVocab(model_genes)
    names = np.asarray([str(x) for x in var_names], dtype=object)
    err = _duplicates_error(names, what)
    if err is not None:
        raise err
    gene_id_map = vocab.ids(names, missing="zero")
    present = np.zeros(vocab.n_genes + 1, dtype=bool)
    present[gene_id_map] = True
    present[0] = False
    found = present[1:]
    alignment = GeneAlignment(
        gene_id_map=gene_id_map,
        n_model_genes=vocab.n_genes,
        n_found=int(found.sum()),
        unknown_genes=names[gene_id_map == 0],
        missing_genes=np.asarray(vocab.names, dtype=object)[~found],
    )
    if alignment.n_found == 0 or alignment.coverage < min_gene_coverage:
        raise ValueError(
            f"only {alignment.n_found:,} of the model's {vocab.n_genes:,} genes "
            f"({100 * alignment.coverage:.1f}%) are in {what} ({names.size:,} genes), below "
            f"min_gene_coverage={min_gene_coverage}; {alignment.unknown_genes.size:,} query "
            f"gene(s) are unknown to the model, e.g. {_examples(alignment.unknown_genes)}; "
            f"model genes missing, e.g. {_examples(alignment.missing_genes)}. Check that both "
            "use the same identifiers (gene symbols vs Ensembl ids, species, case)"
            + (
                f", or accept it: min_gene_coverage={np.floor(alignment.coverage * 100) / 100:g}"
                if alignment.n_found
                else ""
            )
        )
    if alignment.coverage < 1.0:
        warnings.warn(alignment.describe(), UserWarning, stacklevel=2)
    return alignment
