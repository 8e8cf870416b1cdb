"""The scvi-tools model class, its torch module and training plan.

``CellFMClassifier`` (which imports scvi-tools) is resolved on first access, so the torch
module can be used where scvi-tools is not installed (e.g. a bare GPU benchmark machine).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cellfm_sc.model._module import CellFMClassifierModule

if TYPE_CHECKING:  # pragma: no cover
    from cellfm_sc.model._model import CellFMClassifier

__all__ = ["CellFMClassifier", "CellFMClassifierModule", "write_report"]


def __getattr__(name: str) -> Any:
    if name == "CellFMClassifier":
        from cellfm_sc.model._model import CellFMClassifier

        return CellFMClassifier
    raise AttributeError(f"module 'cellfm_sc.model' has no attribute {name!r}")


def write_report(model: CellFMClassifier, result: Any, out_dir: Any, *, umap: bool | None = None):
    """Write a run's report files (see :func:`cellfm_sc.report.write_report_files`).

    ``result`` is :meth:`CellFMClassifier.evaluate`'s; the embedding of the evaluated cells
    is computed for ``umap.png``.

    Examples
    --------
    >>> result = model.evaluate()  # doctest: +SKIP
    >>> files = write_report(model, result, "runs/adnc")  # doctest: +SKIP
    >>> sorted(files)  # doctest: +SKIP
    ['confusion_matrix', 'donor_predictions', 'predictions', 'training_curves', ...]
    """
    import numpy as np

    from cellfm_sc.report import write_report_files

    adata = model.adata
    pos = adata.obs_names.get_indexer(result.predictions.index)
    embedding = model.get_latent_representation(adata, indices=np.asarray(pos))
    return write_report_files(
        out_dir,
        result,
        history=model.history,
        info=model.report_info(),
        embedding=embedding,
        umap=umap,
    )
