"""Data path: count checks, CellFM normalisation, token batches, loaders, donor-aware splits.

``AnnData (raw counts in X, a layer or raw.X; CSR / CSC / dense / backed)`` -> rows of a batch
-> cap & normalise (:func:`cellfm_normalize`) -> per-cell nonzero tokens, at most ``max_tokens``
drawn by ``log1p(count)`` weight (:func:`~cellfm_sc.data.tokenize`) -> padded :class:`~cellfm_sc.data.TokenBatch`.

Before a run: :func:`~cellfm_sc.data.check_counts` (``full=True``: one streaming pass over every cell that will
be read); :func:`matrix_var_names` + :func:`align_genes` map the columns onto a model's genes.
Loaders (:func:`make_dataloader`, :func:`batches`) bucket cells by length (``bucket=True``) and
count every cell once in distributed evaluation (:attr:`TokenBatch.weight`).
"""

from ._obs import check_labels, obs_column
from .augment import DEPTH_MIN_RATE, thin_depth
from .checks import (
    CountSummary,
    MissingLayerError,
    check_count_source,
    check_counts,
    count_fix_hint,
    empty_cells,
    get_matrix,
    matrix_gene_symbols,
    matrix_var_names,
    row_source,
    validate_count_values,
)
from .genes import GeneAlignment, align_genes
from .loader import BUCKET_BATCHES, CellBatchSampler, CellDataset, batches, make_dataloader
from .normalize import NormalizedRows, cellfm_normalize
from .splits import (
    DataSplit,
    check_donors_disjoint,
    donor_labels,
    split_by_donor,
    split_from_json,
    split_from_obs,
    split_stratified,
)
from .tokenize import DEFAULT_MAX_TOKENS, TokenBatch, name_keys, tokenize, train_keys

__all__ = [
    "BUCKET_BATCHES",
    "DEFAULT_MAX_TOKENS",
    "DEPTH_MIN_RATE",
    "CellBatchSampler",
    "CellDataset",
    "CountSummary",
    "DataSplit",
    "GeneAlignment",
    "MissingLayerError",
    "NormalizedRows",
    "TokenBatch",
    "align_genes",
    "batches",
    "cellfm_normalize",
    "check_count_source",
    "check_counts",
    "check_donors_disjoint",
    "check_labels",
    "count_fix_hint",
    "donor_labels",
    "empty_cells",
    "get_matrix",
    "make_dataloader",
    "matrix_gene_symbols",
    "matrix_var_names",
    "name_keys",
    "obs_column",
    "row_source",
    "split_by_donor",
    "split_from_json",
    "split_from_obs",
    "split_stratified",
    "thin_depth",
    "tokenize",
    "train_keys",
    "validate_count_values",
]
