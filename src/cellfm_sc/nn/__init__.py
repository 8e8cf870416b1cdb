"""Pure-torch CellFM modules (know nothing of AnnData or file formats; the one file-reading
convenience, ``CellFMTrunk.from_mindspore``, delegates to :mod:`cellfm_sc.io` when called)."""

from cellfm_sc.nn.config import PRESETS, CellFMConfig, padded_rows
from cellfm_sc.nn.decoders import CellwiseDecoder, ValueDecoder
from cellfm_sc.nn.heads import ClassificationHead
from cellfm_sc.nn.layers import (
    GatedLinearUnit,
    MultiHeadRetention,
    RetentionLayer,
    SoftBinEncoder,
    ValueEncoder,
    srms_norm,
)
from cellfm_sc.nn.trainable import (
    RECIPES,
    TRAINABLE_POLICIES,
    FinetuneRecipe,
    ParamGroup,
    RowRateScaler,
    TrainableSummary,
    apply_trainable,
    recipe_param_groups,
    resolve_recipe,
)
from cellfm_sc.nn.trunk import CellFMOutput, CellFMTrunk, require_valid_tokens

__all__ = [
    "PRESETS",
    "RECIPES",
    "TRAINABLE_POLICIES",
    "CellFMConfig",
    "CellFMOutput",
    "CellFMTrunk",
    "CellwiseDecoder",
    "ClassificationHead",
    "FinetuneRecipe",
    "GatedLinearUnit",
    "MultiHeadRetention",
    "ParamGroup",
    "RetentionLayer",
    "RowRateScaler",
    "SoftBinEncoder",
    "TrainableSummary",
    "ValueDecoder",
    "ValueEncoder",
    "apply_trainable",
    "padded_rows",
    "recipe_param_groups",
    "require_valid_tokens",
    "resolve_recipe",
    "srms_norm",
]
