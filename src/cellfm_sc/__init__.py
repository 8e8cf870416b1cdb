"""cellfm-sc: fine-tune the CellFM single-cell foundation model on an AnnData.

Heavy dependencies (scvi-tools, Lightning, matplotlib, scanpy) are imported lazily, so
``import cellfm_sc`` stays fast. Public names are resolved on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (one home per concept)
_LAZY: dict[str, str] = {
    "CellFMConfig": "cellfm_sc.nn",
    "CellFMTrunk": "cellfm_sc.nn",
    "CellFMOutput": "cellfm_sc.nn",
    "LoadReport": "cellfm_sc.io",
    "read_mindspore_checkpoint": "cellfm_sc.io",
    "write_mindspore_checkpoint": "cellfm_sc.io",
    "CheckpointError": "cellfm_sc.io",
    "GeneVocab": "cellfm_sc.vocab",
    "GeneMapping": "cellfm_sc.vocab",
    "map_genes": "cellfm_sc.vocab",
    "build_gene_embedding": "cellfm_sc.vocab",
    "load_pretrained_trunk": "cellfm_sc.pretrained",
    "PretrainedReport": "cellfm_sc.pretrained",
    "apply_trainable": "cellfm_sc.nn",
    "TokenBatch": "cellfm_sc.data",
    "CellFMClassifier": "cellfm_sc.model",
    "CellFMPretrainer": "cellfm_sc.model",
    "CellFMDonorClassifier": "cellfm_sc.model",
    "select_level": "cellfm_sc.model",
    "EmbeddingProbe": "cellfm_sc.model",
}
# public submodule aliases (``cellfm_sc.pl`` is :mod:`cellfm_sc.plotting`, scanpy style)
_MODULES: dict[str, str] = {
    "baselines": "cellfm_sc.baselines",
    "metrics": "cellfm_sc.metrics",
    "pl": "cellfm_sc.plotting",
    "datasets": "cellfm_sc.datasets",
    "data": "cellfm_sc.data",
    "io": "cellfm_sc.io",
    "nn": "cellfm_sc.nn",
    "report": "cellfm_sc.report",
    "vocab": "cellfm_sc.vocab",
    "pretrained": "cellfm_sc.pretrained",
}

__all__ = ["__version__", *sorted(_LAZY), *sorted(_MODULES)]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'cellfm_sc' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
