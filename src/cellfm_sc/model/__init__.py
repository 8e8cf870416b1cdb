"""The model classes, their torch modules and the training core they share.

``CellFMClassifier`` and ``CellFMPretrainer`` (which import scvi-tools and Lightning) are
resolved on first access, so the torch modules can be used where scvi-tools is not installed
(e.g. a bare GPU benchmark machine).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cellfm_sc.model._module import CellFMClassifierModule
from cellfm_sc.model._pretrain_module import CellFMPretrainModule, select_masked_tokens

if TYPE_CHECKING:  # pragma: no cover
    from cellfm_sc._errors import UntrainedModelError
    from cellfm_sc.model._classifier import CellFMClassifier
    from cellfm_sc.model._donor import CellFMDonorClassifier
    from cellfm_sc.model._pretrainer import CellFMPretrainer
    from cellfm_sc.model._probe import EmbeddingProbe
    from cellfm_sc.model._select import LevelSelection, select_level
    from cellfm_sc.model.base import auto_lr

__all__ = [
    "CellFMClassifier",
    "CellFMClassifierModule",
    "CellFMDonorClassifier",
    "CellFMPretrainModule",
    "CellFMPretrainer",
    "EmbeddingProbe",
    "LevelSelection",
    "UntrainedModelError",
    "auto_lr",
    "select_level",
    "select_masked_tokens",
]

_LAZY = {
    "CellFMClassifier": "cellfm_sc.model._classifier",
    "CellFMDonorClassifier": "cellfm_sc.model._donor",
    "CellFMPretrainer": "cellfm_sc.model._pretrainer",
    "UntrainedModelError": "cellfm_sc._errors",
    "EmbeddingProbe": "cellfm_sc.model._probe",
    "auto_lr": "cellfm_sc.model.base",
    "LevelSelection": "cellfm_sc.model._select",
    "select_level": "cellfm_sc.model._select",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cellfm_sc.model' has no attribute {name!r}")
