"""Small datasets shipped with cellfm-sc, for the demo, the tutorials and tests.

:func:`pbmc3k`
    A 1,200-cell subset of the 10x Genomics PBMC 3k dataset ("3k PBMCs from a Healthy
    Donor"), raw counts with cell-type labels. The data are © 10x Genomics, released under the
    Creative Commons Attribution 4.0 licence (CC BY 4.0); the subset is made by
    ``scripts/make_pbmc3k_subset.py`` in the repository.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["pbmc3k", "pbmc3k_path"]

_PBMC3K_FILE = "pbmc3k_subset.h5ad"


def pbmc3k_path() -> Path:
    """Path of the shipped PBMC 3k subset (``.h5ad``, gzip-compressed, about 3.5 MB).

    Examples
    --------
    >>> from cellfm_sc import datasets
    >>> datasets.pbmc3k_path().name
    'pbmc3k_subset.h5ad'
    """
    path = Path(str(resources.files("cellfm_sc") / "_data" / _PBMC3K_FILE))
    if not path.is_file():
        raise FileNotFoundError(
            f"the shipped dataset {path} is missing; reinstall cellfm-sc, or regenerate it "
            "with scripts/make_pbmc3k_subset.py"
        )
    return path


def pbmc3k() -> AnnData:
    """1,200 peripheral blood mononuclear cells with raw counts and cell-type labels.

    A subset of the 10x Genomics PBMC 3k dataset (2,700 cells of one healthy donor,
    Chromium v1): 1,200 cells drawn with a fixed seed, stratified by cell type (every type
    keeps its share, at least 30 cells or all it has), and the 15,179 genes detected in
    them. Source: 10x Genomics, "3k PBMCs from a Healthy Donor", licensed CC BY 4.0
    (https://creativecommons.org/licenses/by/4.0/); cell types as distributed with it.
    Regenerate with ``scripts/make_pbmc3k_subset.py``.

    Returns
    -------
    anndata.AnnData
        ``n_obs x n_vars = 1200 x 15179``:

        ``X``
            raw UMI counts, ``scipy.sparse.csr_matrix`` of float32 integer values.
        ``obs["celltype"]``
            categorical, 8 types: B, CD14 Monocytes, CD4 T, CD8 T, Dendritic,
            FCGR3A Monocytes, Megakaryocytes, NK.
        ``var_names``
            gene symbols; ``var["gene_ids"]`` the Ensembl ids.
        ``uns["dataset"]``
            source, licence and how the subset was made.

    Examples
    --------
    >>> from cellfm_sc import datasets
    >>> adata = datasets.pbmc3k()
    >>> adata.shape
    (1200, 15179)
    >>> adata.obs["celltype"].nunique()
    8
    """
    import anndata as ad

    return ad.read_h5ad(pbmc3k_path())
