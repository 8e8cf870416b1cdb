"""The scvi-tools model class, its torch module and training plan."""

from cellfm_sc.model._model import CellFMClassifier
from cellfm_sc.model._module import CellFMClassifierModule

__all__ = ["CellFMClassifier", "CellFMClassifierModule", "write_report"]


def write_report(model: CellFMClassifier, result, out_dir, *, umap=None):
    """Write a run's report files (see :func:`cellfm_sc.report.write_report_files`).

    ``result`` is :meth:`CellFMClassifier.evaluate`'s; the embedding of the evaluated cells
    is computed for ``umap.png``.
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
