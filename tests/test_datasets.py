"""The shipped demo dataset."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from cellfm_sc import datasets

MAX_BYTES = 5 * 1024 * 1024


def test_pbmc3k_file_is_small():
    path = datasets.pbmc3k_path()
    assert path.is_file()
    assert path.stat().st_size <= MAX_BYTES


def test_pbmc3k_contents():
    adata = datasets.pbmc3k()
    assert adata.shape == (1200, 15179)
    assert sp.issparse(adata.X) and adata.X.format == "csr"
    data = adata.X.data
    assert data.size > 0
    assert np.all(data > 0)
    np.testing.assert_array_equal(data, np.round(data))  # raw counts
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    assert "gene_ids" in adata.var
    assert adata.var["gene_ids"].str.startswith("ENSG").all()
    labels = adata.obs["celltype"]
    assert labels.notna().all()
    assert set(labels.cat.categories) == {
        "B",
        "CD14 Monocytes",
        "CD4 T",
        "CD8 T",
        "Dendritic",
        "FCGR3A Monocytes",
        "Megakaryocytes",
        "NK",
    }
    counts = labels.value_counts()
    assert counts.min() >= 13  # every type present, the rarest with all its cells
    # every gene detected in at least one cell, every cell has counts
    assert (np.asarray((adata.X > 0).sum(axis=0)).ravel() > 0).all()
    assert (np.asarray(adata.X.sum(axis=1)).ravel() > 0).all()
    assert "CC BY 4.0" in adata.uns["dataset"]["license"]


def test_pbmc3k_is_a_subset_of_the_source(pbmc3k_path):
    import anndata as ad

    full = ad.read_h5ad(pbmc3k_path)
    sub = datasets.pbmc3k()
    assert sub.obs_names.isin(full.obs_names).all()
    assert sub.var_names.isin(full.var_names).all()
    ref = full[sub.obs_names[:50], sub.var_names].X
    np.testing.assert_array_equal(sub.X[:50].toarray(), ref.toarray())
    assert (full.obs.loc[sub.obs_names, "celltype"] == sub.obs["celltype"]).all()


def test_top_level_alias():
    import cellfm_sc

    assert cellfm_sc.datasets is datasets
