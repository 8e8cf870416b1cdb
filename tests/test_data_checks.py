"""Count checks: clear errors for log-normalised, negative, NaN, inf data, missing layers, empty cells."""

from __future__ import annotations

from contextlib import nullcontext

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellfm_sc.data import (
    MissingLayerError,
    batches,
    check_counts,
    empty_cells,
    get_matrix,
    make_dataloader,
    validate_count_values,
)


def _adata(n_obs: int = 300, n_vars: int = 50, seed: int = 0, fmt: str = "csr") -> ad.AnnData:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(1.5, size=(n_obs, n_vars)).astype(np.float32)
    counts[:, 0] += 1  # no empty cells
    x = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}[fmt](counts)
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(n_obs)])
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_vars)]))


def _set(adata: ad.AnnData, row: int, col: int, value: float) -> None:
    x = adata.X.toarray() if sp.issparse(adata.X) else np.array(adata.X)
    x[row, col] = value
    adata.X = sp.csr_matrix(x)


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
def test_valid_counts_pass(fmt):
    adata = _adata(fmt=fmt)
    with pytest.warns(UserWarning, match="CSC") if fmt == "csc" else nullcontext():
        check_counts(adata, forbid_empty=True)
    # integer dtype too
    adata.X = sp.csr_matrix(_adata().X.astype(np.int32))
    check_counts(adata)


def test_log_normalised_matrix_is_refused_with_hint():
    adata = _adata()
    adata.layers["counts"] = adata.X.copy()
    x = adata.X.toarray()
    x = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    adata.X = sp.csr_matrix(x)
    with pytest.raises(
        ValueError,
        match=r'looks log-normalised; pass the matrix that holds raw counts: layer="counts"',
    ) as err:
        check_counts(adata)
    msg = str(err.value)
    assert "adata.X" in msg and "'cell" in msg
    check_counts(adata, layer="counts")  # the raw layer passes
    with pytest.raises(ValueError, match="log-normalised"):
        next(batches(adata, check=False))  # the streaming check catches it too


@pytest.mark.parametrize(
    ("value", "pattern"),
    [(-1.0, "negative value"), (np.nan, "NaN"), (np.inf, "infinite"), (2.5, "fractional")],
)
def test_bad_value_names_layer_and_first_cell(value, pattern):
    adata = _adata()
    _set(adata, 17, 3, value)
    _set(adata, 40, 3, value)
    with pytest.raises(ValueError, match=pattern) as err:
        check_counts(adata)
    assert "'cell17' (row 17)" in str(err.value) and "adata.X" in str(err.value)
    adata.layers["raw"] = adata.X
    with pytest.raises(ValueError, match=r"adata\.layers\['raw'\]"):
        check_counts(adata, layer="raw")


def test_streaming_check_catches_rows_outside_the_sample():
    adata = _adata(n_obs=5000, n_vars=20)
    _set(adata, 4321, 5, -3.0)
    check_counts(adata, n_rows=64, seed=1)  # the sample misses it (blocks of 64 rows)
    with pytest.raises(ValueError, match=r"'cell4321' \(row 4321\).*negative"):
        for _ in batches(adata, batch_size=500, check=False):
            pass


def test_missing_layer_lists_layers():
    adata = _adata()
    adata.layers["counts"] = adata.X
    adata.layers["spliced"] = adata.X
    with pytest.raises(MissingLayerError) as err:
        get_matrix(adata, "raw_counts")
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)
    msg = str(err.value)
    assert "'raw_counts'" in msg and "'counts'" in msg and "'spliced'" in msg
    with pytest.raises(KeyError, match="raw_counts"):
        make_dataloader(adata, layer="raw_counts")
    assert get_matrix(adata, "counts") is adata.layers["counts"]


def test_empty_cells_error_at_training_documented_at_inference(tmp_path):
    adata = _adata()
    x = adata.X.toarray()
    x[[5, 77, 78]] = 0
    adata.X = sp.csr_matrix(x)
    np.testing.assert_array_equal(empty_cells(adata), [5, 77, 78])
    np.testing.assert_array_equal(empty_cells(adata, indices=np.arange(50)), [5])
    with pytest.raises(ValueError, match=r"3 cell\(s\) have no counts.*'cell5', 'cell77'"):
        check_counts(adata, forbid_empty=True)
    with pytest.raises(ValueError, match="no counts"):
        make_dataloader(adata, train=True)
    # inference: allowed, the cell gets no tokens
    got = {}
    for b in batches(adata, batch_size=64):
        got.update(zip(b.obs_index.tolist(), b.n_tokens.tolist()))
    assert got[5] == 0 and got[77] == 0 and got[6] > 0
    # backed: found from indptr alone
    path = tmp_path / "e.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    np.testing.assert_array_equal(empty_cells(backed), [5, 77, 78])
    with pytest.raises(ValueError, match=r"3 cell\(s\) have no counts"):
        check_counts(backed, forbid_empty=True)
    backed.file.close()


def test_validate_count_values_without_names():
    data = np.array([1.0, 2.0, 0.5])
    with pytest.raises(ValueError, match=r"row 11"):
        validate_count_values(data, np.array([0, 2, 3]), np.array([10, 11]))
    validate_count_values(np.array([1, 2], dtype=np.int64), np.array([0, 2]), np.array([0]))


def _write_backed(tmp_path, adata: ad.AnnData, name: str = "a.h5ad") -> ad.AnnData:
    path = tmp_path / name
    adata.write_h5ad(path)
    return ad.read_h5ad(path, backed="r")


@pytest.mark.parametrize("backed", [False, True])
@pytest.mark.parametrize(
    ("value", "pattern"),
    [(-2.0, "negative value"), (np.nan, "NaN"), (np.inf, "infinite"), (0.5, "fractional")],
)
def test_full_pass_finds_every_bad_value(tmp_path, backed, value, pattern):
    adata = _adata(n_obs=6000, n_vars=20, seed=3)
    adata.layers["counts"] = adata.X.copy()
    _set(adata, 4321, 5, value)
    _set(adata, 5000, 2, value)
    data = _write_backed(tmp_path, adata) if backed else adata
    try:
        check_counts(data, n_rows=64, seed=1)  # the sample misses both
        with pytest.raises(ValueError, match=pattern) as err:
            check_counts(data, full=True, n_rows=64, seed=1)
        msg = str(err.value)
        assert "adata.X" in msg and "'cell4321' (row 4321)" in msg
        assert "'cell5000' (row 5000)" in msg  # the other bad cell of the chunk is named too
        assert 'layer="counts"' in msg  # the fix, as a keyword argument
        # only the cells that will be read are checked
        fine = np.setdiff1d(np.arange(6000), [4321, 5000])
        summary = check_counts(data, indices=fine, full=True)
        assert summary.full and summary.n_cells == fine.size and summary.empty.size == 0
        assert summary.n_values == int(adata.X[fine].nnz)
    finally:
        if backed:
            data.file.close()


def test_full_pass_names_log_normalised_data_and_the_fix(tmp_path):
    adata = _adata(n_obs=500)
    adata.layers["counts"] = adata.X.copy()
    adata.layers["spliced"] = adata.X.copy()
    x = adata.X.toarray()
    adata.X = sp.csr_matrix(np.log1p(x / x.sum(1, keepdims=True) * 1e4))
    with pytest.raises(ValueError) as err:
        check_counts(adata, full=True)
    msg = str(err.value)
    assert msg.startswith("adata.X must hold raw non-negative integer counts")
    assert "'cell0' (row 0) has a fractional value" in msg and "looks log-normalised" in msg
    assert msg.endswith('pass the matrix that holds raw counts: layer="counts" or layer="spliced"')
    check_counts(adata, layer="counts", full=True)
    # no other layer to name: a generic suggestion, same keyword form
    bare = ad.AnnData(adata.X.copy())
    with pytest.raises(ValueError, match=r'e\.g\. layer="counts" or use_raw=True$'):
        check_counts(bare, full=True)


@pytest.mark.parametrize("backed", [False, True])
def test_full_pass_finds_empty_cells_including_stored_zeros(tmp_path, backed):
    adata = _adata(n_obs=400)
    dense = adata.X.toarray()
    dense[7] = 0
    x = sp.csr_matrix(dense)  # row 7: nothing stored
    for r in (9, 300):
        a, b = x.indptr[r], x.indptr[r + 1]
        x.data[a:b] = 0  # rows 9 and 300: values stored, all zero
    adata.X = x
    data = _write_backed(tmp_path, adata) if backed else adata
    try:
        summary = check_counts(data, full=True)
        np.testing.assert_array_equal(summary.empty, [7, 9, 300])
        np.testing.assert_array_equal(empty_cells(data, exact=True), [7, 9, 300])
        if backed:  # indptr alone sees only the row with nothing stored
            np.testing.assert_array_equal(empty_cells(data), [7])
        with pytest.raises(ValueError, match=r"3 cell\(s\) have no counts.*'cell7', 'cell9'"):
            check_counts(data, full=True, forbid_empty=True)
        summary = check_counts(data, indices=np.arange(10, 300), full=True, forbid_empty=True)
        assert summary.empty.size == 0
    finally:
        if backed:
            data.file.close()


@pytest.mark.parametrize("fmt", ["csr", "dense", "h5csr", "h5dense"])
def test_iter_values_matches_row_reads_in_bounded_chunks(tmp_path, fmt):
    from cellfm_sc.data._rows import RowSource

    rng = np.random.default_rng(0)
    dense = rng.poisson(0.3, size=(700, 50)).astype(np.float32)
    if fmt == "csr":
        source = RowSource(sp.csr_matrix(dense))
    elif fmt == "dense":
        source = RowSource(dense)
    else:
        path = tmp_path / "m.h5ad"
        ad.AnnData(sp.csr_matrix(dense) if fmt == "h5csr" else dense).write_h5ad(path)
        source = RowSource(path=str(path), element="X")
    assert source.kind == fmt
    for rows in (np.arange(700), np.sort(rng.choice(700, 250, replace=False))):
        seen = []
        for chunk, data, indptr in source.iter_values(rows, max_nnz=200):
            ref = sp.csr_matrix(dense[chunk])
            ref.eliminate_zeros()
            np.testing.assert_array_equal(np.asarray(data)[np.asarray(data) != 0], ref.data)
            assert indptr[0] == 0 and indptr[-1] == len(data) and indptr.size == chunk.size + 1
            if fmt in ("csr", "h5csr"):
                assert len(data) <= 200 or chunk.size == 1
            else:
                assert chunk.size <= 200 // 50
            seen.append(chunk)
        np.testing.assert_array_equal(np.concatenate(seen), rows)
    source.close()
