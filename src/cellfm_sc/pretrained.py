"""One entry point: a pretrained CellFM trunk for a dataset's own gene vocabulary."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cellfm_sc._constants import EMBEDDING_INITS
from cellfm_sc.io.mapping import LoadReport, load_trunk_state, read_trunk_checkpoint
from cellfm_sc.nn import CellFMTrunk
from cellfm_sc.vocab import (
    GeneMapping,
    GeneVocab,
    build_gene_embedding,
    check_transfer_mapping,
    map_genes,
)

__all__ = ["EMBEDDING_INITS", "PretrainedReport", "load_pretrained_trunk"]


@dataclass
class PretrainedReport:
    """What :func:`~cellfm_sc.pretrained.load_pretrained_trunk` did.

    Attributes
    ----------
    load
        the checkpoint load report (variant, loaded, skipped entries).
    embedding_init
        ``"random"`` or ``"transfer"``. ``"transfer"`` refuses a mapping of 0 genes and
        warns below 50% coverage (:func:`cellfm_sc.vocab.check_transfer_mapping`).
    old_shape, new_shape
        gene-embedding table shape in the checkpoint and in the new trunk.
    mapping
        dataset -> pretrained gene mapping (``None`` without a vocabulary file).
    """

    load: LoadReport
    embedding_init: str
    old_shape: tuple[int, int]
    new_shape: tuple[int, int]
    mapping: GeneMapping | None = None

    @property
    def variant(self) -> str:
        """The checkpoint variant (``"A"``, ``"A'"`` or ``"B"``)."""
        return self.load.variant

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python summary (JSON-ready): variant, source, counts, shapes, coverage."""
        out: dict[str, Any] = {
            "variant": self.load.variant,
            "source": self.load.source,
            "n_loaded": len(self.load.loaded),
            "n_skipped": len(self.load.skipped),
            "embedding_init": self.embedding_init,
            "gene_emb_checkpoint": list(self.old_shape),
            "gene_emb_new": list(self.new_shape),
        }
        if self.mapping is not None:
            out["coverage"] = float(self.mapping.coverage)
            out["n_mapped"] = int(self.mapping.n_mapped)
            out["mapping_counts"] = {k: int(v) for k, v in self.mapping.counts.items()}
            out["duplicate_symbols"] = {
                k: list(v) for k, v in self.mapping.duplicate_symbols.items()
            }
        return out

    def __str__(self) -> str:
        lines = [str(self.load)]
        lines.append(
            f"  gene embedding: {self.old_shape} -> {self.new_shape}, init '{self.embedding_init}'"
            + (" (every row re-initialised)" if self.embedding_init == "random" else "")
        )
        if self.mapping is not None:
            lines.append("  " + str(self.mapping).replace("\n", "\n  "))
        return "\n".join(lines)


def load_pretrained_trunk(
    checkpoint: str | os.PathLike[str],
    var_names: Sequence[str],
    vocabulary_file: str | os.PathLike[str] | None = None,
    embedding_init: str = "random",
    num_heads: int | None = None,
    hgnc_table: str | os.PathLike[str] | None = None,
    seed: int = 0,
    ensembl_ids: Sequence[Any] | None = None,
    max_abs: float | None = 1e6,
) -> tuple[CellFMTrunk, PretrainedReport]:
    """A CellFM trunk for ``var_names`` with every other layer from the checkpoint.

    The gene id of ``var_names[i]`` is ``i + 1``. Every parameter except ``gene_emb`` is
    loaded (strictly) from the MindSpore checkpoint; the new ``gene_emb`` has
    ``len(var_names) + 1`` rows rounded up to a multiple of 8 and is either re-initialised
    (``"random"``, Xavier normal, the default) or takes the pretrained row of every gene
    that maps into CellFM's vocabulary (``"transfer"``; needs ``vocabulary_file``).

    Parameters
    ----------
    checkpoint
        MindSpore ``.ckpt`` (variants A, A', B).
    var_names
        The dataset's genes, in column order: gene ``var_names[i]`` gets token id ``i + 1``.
        Unique, unless ``ensembl_ids`` is given: then these are the gene symbols used for
        mapping (e.g. a 10x ``gene_symbols`` column) and may repeat; a repeated symbol's
        first occurrence takes its pretrained row, the later ones map by Ensembl id only and
        are listed in ``report.mapping.duplicate_symbols``.
    vocabulary_file
        The checkpoint's vocabulary (CellFM's ``expand_gene_info.csv``); required for
        ``"transfer"``, optional otherwise (then the report gives the coverage).
    embedding_init
        ``"random"`` or ``"transfer"``. ``"transfer"`` refuses a mapping of 0 genes and
        warns below 50% coverage (:func:`cellfm_sc.vocab.check_transfer_mapping`).
    num_heads
        Retention heads: by default the number the checkpoint records (cellfm-sc's exports,
        e.g. :meth:`~cellfm_sc.model.CellFMPretrainer.export_mindspore`), else 48 for the released
        1536-wide models.
    hgnc_table
        Optional HGNC table for alias / previous-symbol mapping.
    seed
        Seed of the random rows.
    ensembl_ids
        Optional Ensembl ids aligned with ``var_names`` (last mapping rule).
    max_abs
        Refuse a checkpoint tensor (``gene_emb`` included) holding a value with
        ``|value| > max_abs`` (``None``: no bound); NaN/inf are always refused
        (:func:`cellfm_sc.io.check_state_values`).

    Returns
    -------
    (trunk, report)

    Examples
    --------
    >>> trunk, report = load_pretrained_trunk("CellFM_80M_weight.ckpt", adata.var_names,
    ...     vocabulary_file="expand_gene_info.csv", embedding_init="transfer")  # doctest: +SKIP
    >>> print(report)  # doctest: +SKIP
    """
    if embedding_init not in EMBEDDING_INITS:
        raise ValueError(
            f"unknown embedding_init {embedding_init!r}; choose one of {EMBEDDING_INITS}"
        )
    if embedding_init == "transfer" and vocabulary_file is None:
        raise ValueError(
            "embedding_init='transfer' needs the checkpoint's gene vocabulary: pass "
            "vocabulary_file= (CellFM's expand_gene_info.csv for the released models)"
        )
    if ensembl_ids is None:
        vocab = GeneVocab.from_var_names(var_names)
    else:  # the ids identify the genes, so the names (symbols) may repeat (10x references)
        vocab = GeneVocab(var_names, ensembl_ids=ensembl_ids, allow_duplicates=True)
    pretrained_vocab = (
        GeneVocab.from_cellfm_file(vocabulary_file) if vocabulary_file is not None else None
    )
    mapping = None
    if pretrained_vocab is not None:  # cheap: before the checkpoint is read
        mapping = map_genes(vocab, pretrained_vocab, hgnc_table=hgnc_table, ensembl_ids=ensembl_ids)
        if embedding_init == "transfer":
            check_transfer_mapping(mapping, vocab.names)
    ckpt = read_trunk_checkpoint(checkpoint, num_heads=num_heads, max_abs=max_abs)
    config, rows = ckpt.config, ckpt.emb_rows
    if pretrained_vocab is not None and pretrained_vocab.n_genes + 1 > rows:
        raise ValueError(
            f"vocabulary file {os.fspath(vocabulary_file)!r} has {pretrained_vocab.n_genes} "
            f"genes but the checkpoint's gene_emb has {rows} rows (shape {(rows, config.enc_dims)}); "
            "is it the vocabulary of this checkpoint?"
        )
    trunk = CellFMTrunk(config, n_genes=vocab.n_genes)
    load = load_trunk_state(
        trunk, ckpt.state, exclude=("gene_emb",), source=os.fspath(checkpoint), check=False
    )
    table = build_gene_embedding(
        vocab,
        pretrained=ckpt.model["gene_emb"],
        mapping=mapping,
        init=embedding_init,
        seed=seed,
    )
    with torch.no_grad():
        trunk.gene_emb.copy_(table)
    report = PretrainedReport(
        load=load,
        embedding_init=embedding_init,
        old_shape=(rows, config.enc_dims),
        new_shape=tuple(trunk.gene_emb.shape),
        mapping=mapping,
    )
    trunk.load_report = load
    return trunk, report
