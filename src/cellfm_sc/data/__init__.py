"""Data path: count checks, CellFM normalisation, token batches, loaders, donor-aware splits.

``AnnData (raw counts; CSR / CSC / dense / backed)`` -> rows of a batch -> cap & normalise
(:func:`cellfm_normalize`) -> per-cell nonzero tokens, at most ``max_tokens`` drawn by
``log1p(count)`` weight (:func:`tokenize`) -> padded :class:`TokenBatch`.
"""

from .checks import (
    CountSummary,
    MissingLayerError,
    check_counts,
    count_fix_hint,
    empty_cells,
    get_matrix,
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
    "check_counts",
    "check_donors_disjoint",
    "count_fix_hint",
    "donor_labels",
    "empty_cells",
    "get_matrix",
    "make_dataloader",
    "matrix_var_names",
    "name_keys",
    "row_source",
    "split_by_donor",
    "split_from_json",
    "split_from_obs",
    "split_stratified",
    "tokenize",
    "train_keys",
    "validate_count_values",
]
