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
    with pytest.raises(ValueError, match=r"looks log-normalised; pass layer='counts'") as err:
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
