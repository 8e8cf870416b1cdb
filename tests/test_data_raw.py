"""Counts in ``adata.raw`` (CELLxGENE layout): normalised X over a gene subset, counts in raw.X."""

from __future__ import annotations

import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from cellfm_sc.data import (
    CellDataset,
    MissingLayerError,
    batches,
    check_counts,
    empty_cells,
    get_matrix,
    make_dataloader,
    matrix_var_names,
)

N_OBS, N_GENES, N_HVG = 240, 120, 40


def _cellxgene(seed: int = 0) -> tuple[ad.AnnData, sp.csr_matrix]:
    """Normalised log1p values in X over 40 'highly variable' genes; counts of all 120 in raw."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(0.9, size=(N_OBS, N_GENES)).astype(np.float32)
    counts[:, 3] += 1  # no empty cell
    counts[: N_OBS // 2, 10:70] += rng.poisson(4.0, size=(N_OBS // 2, 60))  # long cells
    genes = np.array([f"ENSG{j:011d}" for j in range(N_GENES)])
    hvg = np.sort(rng.choice(N_GENES, size=N_HVG, replace=False))
    norm = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)[:, hvg]
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(N_OBS)])
    adata = ad.AnnData(X=sp.csr_matrix(norm), obs=obs, var=pd.DataFrame(index=genes[hvg]))
    adata.raw = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=genes))
    return adata, sp.csr_matrix(counts)


@pytest.fixture(scope="module")
def cellxgene(tmp_path_factory):
    adata, counts = _cellxgene()
    path = tmp_path_factory.mktemp("cxg") / "cellxgene.h5ad"
    adata.write_h5ad(path)
    return adata, counts, path


def _tokens(batch_iter) -> dict[int, tuple]:
    out = {}
    for b in batch_iter:
        for i, cell in enumerate(b.obs_index.tolist()):
            v = b.valid[i]
            out[cell] = (
                tuple(b.gene_ids[i][v].tolist()),
                tuple(b.values[i][v].tolist()),
                float(b.total_counts[i]),
            )
    return out


@pytest.mark.parametrize("backed", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_tokens_come_from_raw_counts(cellxgene, backed, train):
    adata, counts, path = cellxgene
    ref_adata = ad.AnnData(counts, obs=pd.DataFrame(index=adata.obs_names))
    kw = dict(max_tokens=30, train=train, shuffle=train, seed=2, epoch=1, batch_size=17)
    ref = _tokens(batches(ref_adata, **kw))
    data = ad.read_h5ad(path, backed="r") if backed else adata
    try:
        got = _tokens(batches(data, use_raw=True, **kw))
        loader = _tokens(
            make_dataloader(data, use_raw=True, **{k: kw[k] for k in kw if k != "epoch"})
        )
    finally:
        if backed:
            data.file.close()
    assert got == ref
    assert max(max(ids) for ids, _, _ in got.values()) > N_HVG  # ids index the 120 raw genes
    assert any(len(ids) == 30 for ids, _, _ in got.values())  # long cells were drawn from
    if not train:
        assert loader == ref


def test_backed_raw_is_read_from_the_file_and_in_memory_raw_is_not_copied(cellxgene):
    adata, _, path = cellxgene
    ds = CellDataset(adata, use_raw=True)
    # read in place: the source wraps the arrays of adata.raw.X
    assert np.shares_memory(ds.source._matrix.data, adata.raw.X.data)
    assert np.shares_memory(ds.source._matrix.indices, adata.raw.X.indices)
    assert ds.n_vars == N_GENES
    backed = ad.read_h5ad(path, backed="r")
    try:
        bds = CellDataset(backed, use_raw=True, max_tokens=25)
        assert bds.source.path == str(path) and bds.source.element == "raw/X"
        rows = np.array([5, 200, 17])
        clone = pickle.loads(pickle.dumps(bds))
        a, b = bds[rows], clone[rows]
        assert torch.equal(a.gene_ids, b.gene_ids) and torch.equal(a.values, b.values)
        from_path = CellDataset(str(path), use_raw=True, max_tokens=25)[rows]
        assert torch.equal(from_path.gene_ids, a.gene_ids)
        assert list(matrix_var_names(backed, use_raw=True)) == list(adata.raw.var_names)
    finally:
        backed.file.close()


def test_gene_names_of_the_matrix_in_use(cellxgene):
    adata, _, _ = cellxgene
    raw_names = matrix_var_names(adata, use_raw=True)
    assert len(raw_names) == N_GENES and list(raw_names) == list(adata.raw.var_names)
    assert list(matrix_var_names(adata)) == list(adata.var_names)
    assert len(matrix_var_names(adata)) == N_HVG
    with pytest.raises(ValueError, match=r"gene_id_map has shape \(40,\), expected \(120,\)"):
        CellDataset(adata, use_raw=True, gene_id_map=np.arange(1, N_HVG + 1))


def test_normalised_x_points_to_raw(cellxgene, tmp_path):
    adata, _, path = cellxgene
    with pytest.raises(ValueError, match="looks log-normalised") as err:
        check_counts(adata)
    assert str(err.value).endswith("pass the matrix that holds raw counts: use_raw=True")
    with pytest.raises(ValueError, match="use_raw=True"):
        next(batches(adata, check=False))  # the per-batch check says it too
    for full in (False, True):
        summary = check_counts(adata, use_raw=True, full=full, forbid_empty=True)
        assert summary.n_cells == N_OBS
    backed = ad.read_h5ad(path, backed="r")
    try:
        summary = check_counts(backed, use_raw=True, full=True)
        assert summary.n_values == adata.raw.X.nnz and summary.empty.size == 0
        assert empty_cells(backed, use_raw=True).size == 0
    finally:
        backed.file.close()


def test_bad_raw_counts_are_named_raw_x(tmp_path):
    adata, counts = _cellxgene(seed=1)
    bad = counts.toarray()
    bad[33, 7] = -1
    bad[50] = 0
    adata.raw = ad.AnnData(sp.csr_matrix(bad), obs=adata.obs, var=adata.raw.var)
    adata.layers["counts"] = sp.csr_matrix(adata.X.shape, dtype=np.float32)
    with pytest.raises(ValueError, match=r"adata\.raw\.X .*'cell33' \(row 33\).*negative"):
        check_counts(adata, use_raw=True, full=True)
    with pytest.raises(ValueError, match=r"1 cell\(s\) have no counts in adata\.raw\.X: 'cell50'"):
        check_counts(adata, use_raw=True, full=True, forbid_empty=True, indices=np.arange(34, 60))
    # the fix offered from raw names the layers, not use_raw again
    bad[33, 7] = 0.5
    adata.raw = ad.AnnData(sp.csr_matrix(bad), obs=adata.obs, var=adata.raw.var)
    with pytest.raises(ValueError) as err:
        check_counts(adata, use_raw=True, full=True)
    assert str(err.value).endswith('pass the matrix that holds raw counts: layer="counts"')


def test_layer_and_use_raw_errors(cellxgene, tmp_path):
    adata, _, _ = cellxgene
    adata = adata.copy()
    adata.layers["counts"] = adata.X
    with pytest.raises(ValueError, match="layer='counts' and use_raw=True both given"):
        get_matrix(adata, "counts", use_raw=True)
    with pytest.raises(ValueError, match="both given"):
        make_dataloader(adata, layer="counts", use_raw=True)
    no_raw = ad.AnnData(adata.X.copy())
    with pytest.raises(MissingLayerError, match=r"adata\.raw is None: use_raw=True reads") as err:
        check_counts(no_raw, use_raw=True)
    assert isinstance(err.value, KeyError)
    with pytest.raises(MissingLayerError, match=r"adata\.raw is None"):
        matrix_var_names(no_raw, use_raw=True)
    path = tmp_path / "noraw.h5ad"
    no_raw.write_h5ad(path)
    with pytest.raises(MissingLayerError, match=r"adata\.raw is None"):
        CellDataset(str(path), use_raw=True)
    with pytest.raises(ValueError, match="both given"):
        CellDataset(str(path), layer="x", use_raw=True)
