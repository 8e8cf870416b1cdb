"""Gene vocabularies, dataset -> pretrained gene mapping, and the new gene-embedding table.

Three pieces:

* :class:`GeneVocab` -- an immutable gene vocabulary. Token id = position + 1, id 0 is padding,
  and an embedding table for it has :attr:`GeneVocab.padded_size` rows (``n_genes + 1`` rounded up
  to a multiple of 8, as in CellFM's checkpoints: 27,855 genes -> 27,856 rows).
* :func:`~cellfm_sc.vocab.map_genes` -> :class:`~cellfm_sc.vocab.GeneMapping` -- which dataset gene maps to which pretrained gene
  (exact symbol, case-insensitive symbol, HGNC previous/alias symbol, Ensembl id).
* :func:`build_gene_embedding` -- a ``(padded_size, D)`` float32 table, Xavier-normal ("random")
  or with the pretrained rows of mapped genes copied in ("transfer").

This package depends on numpy, pandas and torch only. Its modules: ``_vocabulary``
(:class:`GeneVocab`), ``_mapping`` (:func:`map_genes`, the HGNC table), ``_embedding``
(:func:`build_gene_embedding`, :func:`check_transfer_mapping`) and ``_text`` (gene-name checks
and text-file reading they share); import the names from ``cellfm_sc.vocab``.
"""

from cellfm_sc.vocab._embedding import (
    INIT_METHODS,
    TRANSFER_MIN_COVERAGE,
    build_gene_embedding,
    check_transfer_mapping,
)
from cellfm_sc.vocab._mapping import MAPPING_RULES, GeneMapping, map_genes
from cellfm_sc.vocab._vocabulary import (
    CELLFM_VOCAB_COLUMNS,
    ROW_MULTIPLE,
    GeneVocab,
    padded_table_size,
)

__all__ = [
    "CELLFM_VOCAB_COLUMNS",
    "INIT_METHODS",
    "MAPPING_RULES",
    "ROW_MULTIPLE",
    "TRANSFER_MIN_COVERAGE",
    "GeneMapping",
    "GeneVocab",
    "build_gene_embedding",
    "check_transfer_mapping",
    "map_genes",
    "padded_table_size",
]
