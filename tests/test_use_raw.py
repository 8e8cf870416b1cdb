"""Counts in ``adata.raw`` through the model and the CLI (the CELLxGENE layout).

The file: normalised log1p values in ``X`` over a highly-variable subset of the genes, raw
counts of every gene in ``raw.X``, Ensembl ids as ``var_names`` with symbols in
``feature_name``, donors in ``donor_id`` and an ordinal ``ADNC`` label, as a CELLxGENE
download after ``sc.pp.highly_variable_genes(..., subset=True)``. Every result is compared
with the same data laid out the plain way (counts of every gene in ``X``): reading ``raw``
must give the same genes, the same tokens and so the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellfm_sc import CellFMClassifier

N_DONORS, CELLS_PER_DONOR, N_GENES, N_HVG = 12, 16, 90, 30
STAGES = ["Not AD", "Low", "Intermediate", "High"]
FAST = dict(max_epochs=1, batch_size=32, validation_size=0.25, enable_progress_bar=False)
#: the same training on the same tokens, up to float summation order on CPU (a run that read
#: X's normalised values, or other genes, is off by more than 1e-2)
ATOL = 5e-4


def _cellxgene(seed: int = 0) -> tuple[ad.AnnData, ad.AnnData]:
    """(CELLxGENE-shaped AnnData, the same counts of every gene in X)."""
    rng = np.random.default_rng(seed)
    n = N_DONORS * CELLS_PER_DONOR
    donors = np.repeat([f"H{d:02d}.33.{d:03d}" for d in range(N_DONORS)], CELLS_PER_DONOR)
    stage = np.repeat([d % 4 for d in range(N_DONORS)], CELLS_PER_DONOR)
    counts = rng.poisson(0.8, size=(n, N_GENES)).astype(np.float32)
    counts[:, 0] += 1  # no empty cell
    counts[:, 5 + stage] += rng.poisson(3.0, size=n)  # a stage signal outside the HVGs too
    genes = np.array([f"ENSG{j:011d}" for j in range(N_GENES)])
    var = pd.DataFrame(
        {"feature_name": pd.Categorical([f"GENE{j}" for j in range(N_GENES)])}, index=genes
    )
    obs = pd.DataFrame(
        {
            "donor_id": pd.Categorical(donors),
            "ADNC": pd.Categorical([STAGES[s] for s in stage], categories=STAGES, ordered=True),
            "cell_type": pd.Categorical(rng.choice(["astrocyte", "microglial cell"], n)),
        },
        index=[f"AAACCC{i:06d}-1" for i in range(n)],
    )
    hvg = np.sort(rng.choice(N_GENES, size=N_HVG, replace=False))
    norm = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)[:, hvg].astype(np.float32)
    cxg = ad.AnnData(X=sp.csr_matrix(norm), obs=obs.copy(), var=var.iloc[hvg].copy())
    cxg.raw = ad.AnnData(X=sp.csr_matrix(counts), obs=obs.copy(), var=var.copy())
    plain = ad.AnnData(X=sp.csr_matrix(counts), obs=obs.copy(), var=var.copy())
    return cxg, plain


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    cxg, plain = _cellxgene()
    folder = tmp_path_factory.mktemp("cellxgene")
    cxg.write_h5ad(folder / "cellxgene.h5ad")
    plain.write_h5ad(folder / "plain.h5ad")
    return folder / "cellxgene.h5ad", folder / "plain.h5ad"


def _digest(matrix) -> str:
    m = sp.csr_matrix(matrix)
    h = hashlib.sha256()
    for part in (m.data, m.indices, m.indptr):
        h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()


def _model(adata, **setup) -> CellFMClassifier:
    CellFMClassifier.setup_anndata(adata, labels_key="ADNC", donor_key="donor_id", **setup)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no checkpoint given")
        return CellFMClassifier(adata, preset="tiny", max_tokens=48, trainable="all", seed=3)


@pytest.fixture(scope="module")
def reference(files):
    """The plain layout, trained one epoch: what every raw-layout run must reproduce."""
    plain = ad.read_h5ad(files[1])
    model = _model(plain)
    # the untrained trunk's embedding, on purpose: the layouts must agree before training too
    init = model.get_latent_representation(plain, enable_progress_bar=False, allow_untrained=True)
    model.train(**FAST)
    return plain, model, init


@pytest.mark.slow
@pytest.mark.parametrize("backed", [False, True], ids=["in_memory", "backed"])
def test_model_reads_raw_counts(files, reference, backed, tmp_path):
    plain, ref, ref_init = reference
    adata = ad.read_h5ad(files[0], backed="r" if backed else None)
    assert adata.n_vars == N_HVG and adata.raw.n_vars == N_GENES
    if not backed:
        before = (_digest(adata.X), _digest(adata.raw.X))

    model = _model(adata, use_raw=True)
    # the genes are raw's (all 90), not the 30 highly variable genes of X
    assert list(model.vocab.names) == list(plain.var_names)
    np.testing.assert_allclose(
        model.get_latent_representation(adata, enable_progress_bar=False, allow_untrained=True),
        ref_init,
        atol=1e-5,
    )
    model.train(**FAST)  # one epoch
    assert model.is_trained_
    np.testing.assert_array_equal(model.train_indices, ref.train_indices)
    np.testing.assert_allclose(
        model.history["train_loss"].to_numpy(), ref.history["train_loss"].to_numpy(), rtol=1e-4
    )
    np.testing.assert_allclose(
        model.predict(adata, soft=True, enable_progress_bar=False),
        ref.predict(plain, soft=True, enable_progress_bar=False),
        atol=ATOL,
    )
    if not backed:  # nothing the user owns is modified
        assert (_digest(adata.X), _digest(adata.raw.X)) == before
        assert adata.n_vars == N_HVG and "counts" not in adata.layers

    # saved and loaded: still reads raw; and a query whose counts are in X
    model.save(tmp_path / "model")
    again = CellFMClassifier.load(tmp_path / "model", adata)
    assert again.use_raw
    expected = model.predict(adata, enable_progress_bar=False)
    np.testing.assert_array_equal(again.predict(adata, enable_progress_bar=False), expected)
    query = ad.read_h5ad(files[1])
    with pytest.raises(Exception, match=r"adata\.raw is None"):
        CellFMClassifier.load(tmp_path / "model", query)
    as_x = CellFMClassifier.load(tmp_path / "model", query, use_raw=False)
    np.testing.assert_array_equal(as_x.predict(query, enable_progress_bar=False), expected)


def test_setup_errors_name_raw(files):
    cxg = ad.read_h5ad(files[0])
    # normalised X: the count check says where the counts are
    with pytest.raises(ValueError, match=r"adata\.X .*use_raw=True"):
        CellFMClassifier.setup_anndata(cxg, labels_key="ADNC")
    with pytest.raises(ValueError, match="either layer='counts' or use_raw=True"):
        CellFMClassifier.setup_anndata(cxg, labels_key="ADNC", layer="counts", use_raw=True)
    # raw holding normalised values is caught in raw.X
    bad = cxg.copy()
    bad.raw = ad.AnnData(
        X=sp.csr_matrix(np.log1p(cxg.raw.X.toarray())), obs=cxg.obs, var=cxg.raw.var
    )
    with pytest.raises(ValueError, match=r"adata\.raw\.X"):
        CellFMClassifier.setup_anndata(bad, labels_key="ADNC", use_raw=True)


def test_gene_symbols_from_raw_var_or_var(files):
    """Symbols come from raw.var; from var when it lists every raw gene (CELLxGENE)."""
    cxg, _ = _cellxgene()
    model = _model(cxg, use_raw=True, gene_symbols="feature_name")
    assert model._gene_symbols(cxg) == [f"GENE{j}" for j in range(N_GENES)]

    # CELLxGENE: var and raw.var list the same genes; the symbols only in var
    full = ad.AnnData(
        X=sp.csr_matrix(cxg.raw.X.shape, dtype=np.float32), obs=cxg.obs, var=cxg.raw.var.copy()
    )
    full.raw = ad.AnnData(X=cxg.raw.X, obs=cxg.obs, var=pd.DataFrame(index=cxg.raw.var_names))
    model = _model(full, use_raw=True, gene_symbols="feature_name")
    assert model._gene_symbols(full) == [f"GENE{j}" for j in range(N_GENES)]

    # an HVG subset of var cannot give the symbols of every raw gene: the error says so
    cxg.raw = ad.AnnData(X=cxg.raw.X, obs=cxg.obs, var=pd.DataFrame(index=cxg.raw.var_names))
    with pytest.raises(KeyError, match=r"adata\.raw\.var.*not for 60 of the 90 genes"):
        CellFMClassifier.setup_anndata(
            cxg, labels_key="ADNC", use_raw=True, gene_symbols="feature_name"
        )


@pytest.mark.slow
def test_cli_use_raw(files, tmp_path):
    from tests.test_cli import run_cli

    cxg_path, plain_path = files
    plain = ad.read_h5ad(plain_path)
    out = tmp_path / "run"
    proc = run_cli(
        "finetune", cxg_path, "--labels-key", "ADNC", "--donor-key", "donor_id", "--use-raw",
        "--backed", "--preset", "tiny", "--trainable", "all", "--max-tokens", "48",
        "--seed", "3", "--epochs", "1", "--batch-size", "32", "--validation-size", "0.25",
        "--test-size", "0", "--output-dir", out, "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "training_results.json").read_text())
    assert results["n_genes"] == N_GENES  # raw's genes, not X's 30
    # predict reads raw as the model was set up; --no-use-raw reads a counts-in-X query
    first = None
    for data, flags in ((cxg_path, []), (plain_path, ["--no-use-raw"])):
        target = tmp_path / f"pred_{data.stem}_{len(flags)}.h5ad"
        proc = run_cli("predict", out / "model", data, "-o", target, "--quiet", *flags)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = ad.read_h5ad(target).obsm["cellfm_probabilities"]
        first = got if first is None else first
        np.testing.assert_allclose(got, first, atol=1e-6)  # one model, the same counts
    # and they are the Python API's on the counts in X
    model = CellFMClassifier.load(out / "model", ad.read_h5ad(plain_path), use_raw=False)
    np.testing.assert_allclose(
        first, model.predict(plain, soft=True, enable_progress_bar=False), atol=1e-6
    )

    # embed with --use-raw --backed: the embedding of raw's counts
    target = tmp_path / "emb.h5ad"
    proc = run_cli(
        "embed", out / "model", cxg_path, "-o", target, "--use-raw", "--backed", "--quiet"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(
        ad.read_h5ad(target).obsm["X_cellfm"],
        model.get_latent_representation(plain, enable_progress_bar=False),
        atol=1e-5,
    )

    # a query without raw and no --no-use-raw: one error line naming the flag to use
    proc = run_cli("predict", out / "model", plain_path, "-o", tmp_path / "x.h5ad")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "adata.raw is None" in proc.stderr and "--no-use-raw" in proc.stderr
