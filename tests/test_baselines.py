"""``cellfm_sc.baselines``: sums, features and fits against dense / sklearn recomputations,
the same results from backed files, and the baselines of ``evaluate()``."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import cohen_kappa_score

from cellfm_sc.baselines import (
    CellLogisticRegression,
    PseudobulkLogisticRegression,
    cell_baseline,
    compare_on_split,
    gene_variances,
    log_cpm,
    pseudobulk,
    pseudobulk_baseline,
)

STAGES = ["A", "B", "C", "D"]


def _donor_data(n_donors: int = 24, cells: int = 30, genes: int = 40, seed: int = 0):
    """Donor ``i`` has stage ``i % 4``; genes 0-5 rise with the stage in a share of cells."""
    rng = np.random.default_rng(seed)
    n = n_donors * cells
    donor = np.repeat(np.arange(n_donors), cells)
    stage = donor % 4
    x = rng.poisson(rng.gamma(1.5, 1.0, genes), (n, genes)).astype(np.float32)
    x[:, -1] += 1
    hit = rng.random(n) < 0.2 * stage
    x[hit, :6] += rng.poisson(3.0, (int(hit.sum()), 6))
    obs = pd.DataFrame(
        {
            "donor": [f"d{d:02d}" for d in donor],
            "stage": pd.Categorical([STAGES[s] for s in stage], categories=STAGES, ordered=True),
        },
        index=[f"c{i}" for i in range(n)],
    )
    return ad.AnnData(sp.csr_matrix(x), obs=obs), stage, obs["donor"].to_numpy()


def _parts(donors: np.ndarray):
    """Donors 0-15 train, 16-19 validate, 20-23 test (cells of each)."""
    d = np.array([int(s[1:]) for s in donors])
    return np.flatnonzero(d < 16), np.flatnonzero((d >= 16) & (d < 20)), np.flatnonzero(d >= 20)


def _backed(adata: ad.AnnData, tmp_path) -> ad.AnnData:
    path = tmp_path / "x.h5ad"
    adata.write_h5ad(path)
    return ad.read_h5ad(path, backed="r")


def _log_norm_dense(x: np.ndarray) -> np.ndarray:
    """CellFM's normalisation of small-total rows: ``log1p(c / T * 1e4)``, float64."""
    t = x.sum(axis=1, keepdims=True)
    return np.log1p(x / t * 1e4)


# --------------------------------------------------------------------------------------------
# sums and features
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["csr", "dense", "backed"])
def test_pseudobulk_sums_equal_a_dense_groupby(kind, tmp_path):
    adata, _, donors = _donor_data()
    dense = adata.X.toarray().astype(np.float64)
    if kind == "dense":
        adata = ad.AnnData(dense.astype(np.float32), obs=adata.obs)
    elif kind == "backed":
        adata = _backed(adata, tmp_path)
    rows = np.random.default_rng(1).choice(adata.n_obs, 300, replace=False)
    # a small chunk size: many indicator products add up
    names, sums = pseudobulk(adata, donors, rows=rows, max_nnz=500)
    expect = pd.DataFrame(dense[rows]).groupby(donors[rows]).sum()
    assert names.tolist() == expect.index.tolist()
    np.testing.assert_allclose(sums, expect.to_numpy(), rtol=0, atol=1e-9)


def test_pseudobulk_names_a_bad_group_shape():
    adata, _, donors = _donor_data()
    with pytest.raises(ValueError, match=r"groups has shape \(10,\)"):
        pseudobulk(adata, donors[:10])


def test_gene_variances_equal_numpy(tmp_path):
    adata, _, _ = _donor_data()
    rows = np.arange(0, adata.n_obs, 3)
    expect = _log_norm_dense(adata.X.toarray().astype(np.float64))[rows].var(axis=0)
    for source in (adata, _backed(adata, tmp_path)):
        got = gene_variances(source, rows, max_nnz=700)
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# pseudo-bulk logistic regression
# --------------------------------------------------------------------------------------------


def _donor_sums():
    adata, stage, donors = _donor_data()
    names, sums = pseudobulk(adata, donors)
    y = pd.Series(stage, index=donors).groupby(level=0).first().reindex(names).to_numpy()
    return sums, y


def test_pseudobulk_lr_equals_sklearn_on_the_same_matrix():
    sums, y = _donor_sums()
    tr, va, te = np.arange(16), np.arange(16, 20), np.arange(20, 24)
    clf = PseudobulkLogisticRegression(4, ordered=True, Cs=(0.3,), min_cpm=1000.0)
    clf.fit(sums[tr], y[tr], sums[va], y[va])
    both = np.concatenate([tr, va])
    cpm = sums / sums.sum(axis=1, keepdims=True) * 1e6
    keep = np.flatnonzero(cpm[both].mean(axis=0) >= 1000.0)
    assert 0 < keep.size < sums.shape[1]  # the filter did something
    np.testing.assert_array_equal(clf.genes_, keep)
    x = np.log1p(cpm[:, keep])
    ref = LogisticRegression(C=0.3, max_iter=5000).fit(x[both], y[both])
    np.testing.assert_allclose(clf.predict_proba(sums[te]), ref.predict_proba(x[te]), atol=1e-6)
    # ordered labels: the prediction is the median class of those probabilities
    tail = np.cumsum(ref.predict_proba(x[te])[:, ::-1], axis=1)[:, ::-1][:, 1:]
    np.testing.assert_array_equal(clf.predict(sums[te]), (tail > 0.5).sum(axis=1))


def test_pseudobulk_c_is_the_best_validation_qwk():
    sums, y = _donor_sums()
    tr, va = np.arange(16), np.arange(16, 24)
    cs = (0.001, 0.1, 10.0)
    clf = PseudobulkLogisticRegression(4, ordered=True, Cs=cs).fit(sums[tr], y[tr], sums[va], y[va])
    x = log_cpm(sums)[:, clf.genes_]
    kappas = []
    for c in cs:
        p = LogisticRegression(C=c, max_iter=5000).fit(x[tr], y[tr]).predict_proba(x[va])
        tail = np.cumsum(p[:, ::-1], axis=1)[:, ::-1][:, 1:]
        pred = (tail > 0.5).sum(axis=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            k = cohen_kappa_score(y[va], pred, weights="quadratic", labels=range(4))
        kappas.append(k if np.isfinite(k) else 0.0)
    assert clf.validation_scores_.keys() == set(cs)
    # the score is the QWK up to a 1e-3 x log-loss tie-breaker
    for c, k in zip(cs, kappas):
        assert abs(clf.validation_scores_[c] - k) < 0.01
    assert kappas[cs.index(clf.C_)] == max(kappas)


def test_pseudobulk_gene_filter_is_chosen_on_the_validation_donors():
    sums, y = _donor_sums()
    tr, va, te = np.arange(16), np.arange(16, 20), np.arange(20, 24)
    cands = (10.0, 1000.0, 5000.0)
    clf = PseudobulkLogisticRegression(4, ordered=True, min_cpm=cands)
    clf.fit(sums[tr], y[tr], sums[va], y[va])
    # each filter alone: its best validation score; the choice is the best of them
    alone = {}
    for m in cands:
        one = PseudobulkLogisticRegression(4, ordered=True, min_cpm=m)
        one.fit(sums[tr], y[tr], sums[va], y[va])
        alone[m] = (max(one.validation_scores_.values()), one)
    assert clf.min_cpm_scores_ == pytest.approx({m: s for m, (s, _) in alone.items()})
    best = max(alone.values(), key=lambda t: t[0])[0]
    first = next(m for m in cands if alone[m][0] == best)
    assert clf.min_cpm_ == first
    ref = alone[first][1]
    np.testing.assert_array_equal(clf.genes_, ref.genes_)
    assert clf.C_ == ref.C_
    np.testing.assert_allclose(clf.predict_proba(sums[te]), ref.predict_proba(sums[te]))
    # without validation donors: the first filter
    assert PseudobulkLogisticRegression(4, min_cpm=cands).fit(sums, y).min_cpm_ == 10.0
    with pytest.raises(ValueError, match="min_cpm must be >= 0"):
        PseudobulkLogisticRegression(4, min_cpm=(10.0, -1.0))


def test_pseudobulk_ordinal_variant_is_frank_hall():
    sums, y = _donor_sums()
    tr, te = np.arange(20), np.arange(20, 24)
    clf = PseudobulkLogisticRegression(4, ordered=True, ordinal=True, Cs=(1.0,)).fit(
        sums[tr], y[tr]
    )
    x = log_cpm(sums)[:, clf.genes_]
    gt = np.stack(
        [
            LogisticRegression(C=1.0, max_iter=5000)
            .fit(x[tr], (y[tr] > k).astype(int))
            .predict_proba(x[te])[:, 1]
            for k in range(3)
        ],
        axis=1,
    )
    gt = np.minimum.accumulate(gt, axis=1)
    expect = np.concatenate([1 - gt[:, :1], gt[:, :-1] - gt[:, 1:], gt[:, -1:]], axis=1)
    np.testing.assert_allclose(clf.predict_proba(sums[te]), expect, atol=1e-6)
    np.testing.assert_array_equal(clf.predict(sums[te]), (gt > 0.5).sum(axis=1))


def test_pseudobulk_settings_are_checked():
    with pytest.raises(ValueError, match="ordinal=True needs ordered labels"):
        PseudobulkLogisticRegression(4, ordinal=True)
    with pytest.raises(ValueError, match="Cs must be positive"):
        PseudobulkLogisticRegression(4, Cs=(0.0,))
    sums, y = _donor_sums()
    with pytest.raises(ValueError, match="no gene has a mean CPM >= min_cpm"):
        PseudobulkLogisticRegression(4, min_cpm=1e7).fit(sums, y)


def test_pseudobulk_baseline_backed_equals_in_memory(tmp_path):
    adata, stage, donors = _donor_data()
    tr, va, te = _parts(donors)
    kw = {"train": tr, "validation": va, "test": te, "classes": STAGES, "ordered": True}
    mem = pseudobulk_baseline(adata, stage, donors, **kw)
    back = pseudobulk_baseline(_backed(adata, tmp_path), stage, donors, **kw)
    assert mem.donor_metrics == back.donor_metrics
    pd.testing.assert_frame_equal(mem.donor_table, back.donor_table)
    assert mem.donor_table.index.tolist() == [f"d{i}" for i in range(20, 24)]
    assert mem.donor_metrics["n_donors"] == 4 and mem.cell_metrics is None


# --------------------------------------------------------------------------------------------
# cell logistic regression
# --------------------------------------------------------------------------------------------


def test_cell_lr_equals_sklearn_on_the_same_matrix(tmp_path):
    adata, stage, donors = _donor_data()
    tr, _, te = _parts(donors)
    clf = CellLogisticRegression(4, ordered=True, Cs=(0.05,), n_top_genes=12).fit(
        adata, tr, stage[tr]
    )
    x = _log_norm_dense(adata.X.toarray().astype(np.float64))
    top = np.sort(np.argsort(-x[tr].var(axis=0), kind="stable")[:12])
    np.testing.assert_array_equal(clf.genes_, top)
    ref = LogisticRegression(C=0.05, max_iter=1000).fit(x[tr][:, top], stage[tr])
    np.testing.assert_allclose(
        clf.predict_proba(adata, te), ref.predict_proba(x[te][:, top]), atol=1e-4
    )
    # rows in any order; a backed file gives the same
    rev = te[::-1]
    np.testing.assert_allclose(
        clf.predict_proba(_backed(adata, tmp_path), rev),
        ref.predict_proba(x[rev][:, top]),
        atol=1e-4,
    )


def test_cell_lr_reads_at_most_max_cells():
    adata, stage, donors = _donor_data()
    tr, va, _ = _parts(donors)
    clf = CellLogisticRegression(4, max_cells=50).fit(adata, tr, stage[tr], va, stage[va])
    assert clf.n_train_cells_ == 50
    with pytest.raises(ValueError, match="max_cells must be an integer >= 1"):
        CellLogisticRegression(4, max_cells=0)


def test_cell_baseline_scores_donors_by_their_mean_probability():
    adata, stage, donors = _donor_data()
    tr, va, te = _parts(donors)
    res = cell_baseline(
        adata, stage, train=tr, validation=va, evaluate=te, classes=STAGES, ordered=True,
        donors=donors,
    )  # fmt: skip
    assert res.cell_metrics["n_cells"] == te.size and res.donor_metrics["n_donors"] == 4
    p = res.donor_table[[f"p_{c}" for c in STAGES]].to_numpy()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)
    assert (res.donor_table["predicted"].cat.codes.to_numpy() == p.argmax(axis=1)).all()


def test_compare_on_split_skips_pseudobulk_for_cell_labels():
    adata, stage, donors = _donor_data()
    tr, va, te = _parts(donors)
    mixed = stage.copy()
    mixed[::7] = (mixed[::7] + 1) % 4  # labels vary within donors
    out = compare_on_split(
        adata, mixed, train=tr, validation=va, evaluate=te, classes=STAGES, ordered=True,
        donors=donors,
    )  # fmt: skip
    assert list(out.results) == ["cell_logistic_regression"]
    assert any("not constant within donors" in n for n in out.notes)
    rows = out.rows({"cell": {"qwk": 0.5, "accuracy": 0.5}, "donor": None})
    assert {r["metric"] for r in rows} == {"qwk", "accuracy"}
    assert all(r["level"] == "cell" for r in rows)


# --------------------------------------------------------------------------------------------
# evaluate(): the baselines of a model, on its split
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_donor_model_evaluate_reports_pseudobulk_on_its_split():
    import torch

    from cellfm_sc import CellFMDonorClassifier
    from cellfm_sc.data import split_from_obs

    torch.set_num_threads(1)
    adata, stage, donors = _donor_data(genes=30)
    tr, va, te = _parts(donors)
    adata.obs["split"] = "train"
    adata.obs.iloc[va, adata.obs.columns.get_loc("split")] = "validation"
    adata.obs.iloc[te, adata.obs.columns.get_loc("split")] = "test"
    CellFMDonorClassifier.setup_anndata(adata, labels_key="stage", donor_key="donor")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CellFMDonorClassifier(
            adata, preset="tiny", max_tokens=16, bag_size=16, trainable="head"
        )
        model.train(
            max_epochs=1,
            split=split_from_obs(adata, "split", donor_key="donor"),
            enable_progress_bar=False,
            logger=False,
        )
    res = model.evaluate(n_bootstrap=0)
    expect = pseudobulk_baseline(
        adata, stage, donors, train=tr, validation=va, test=te, classes=STAGES, ordered=True
    )
    got = res.baseline.results["pseudobulk"]
    assert got.donor_metrics == expect.donor_metrics
    pd.testing.assert_frame_equal(got.donor_table, expect.donor_table)
    block = res.to_dict()["baseline"]
    qwk = next(r for r in block["comparison"] if r["metric"] == "qwk")
    assert qwk["model"] == pytest.approx(res.donor_metrics["qwk"])
    assert qwk["baseline_value"] == pytest.approx(expect.donor_metrics["qwk"])
    assert "model vs baseline (same split)" in str(res)
    assert model.evaluate(n_bootstrap=0, baseline=False).to_dict()["baseline"] is None
