"""Depth augmentation: binomial thinning of training cells (``train(depth_augmentation=)``).

The thinned counts are checked against the binomial they must follow (mean and variance
over many copies of one cell, the share of cells chosen, the rates' range), their
independence of batching, a fresh draw per epoch, that validation cells and ``0`` leave the
counts as they are, and that a bad value is refused before any work, naming the argument.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from cellfm_sc import CellFMClassifier
from cellfm_sc.data import DEPTH_MIN_RATE, CellDataset, thin_depth

pytestmark = pytest.mark.filterwarnings(
    "ignore:no checkpoint given", "ignore::UserWarning:lightning", "ignore::DeprecationWarning"
)


def _counts(n_cells: int, n_genes: int = 200, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    x = rng.negative_binomial(2, 0.3, size=(n_cells, n_genes)).astype(np.float32)
    x[:, 0] += 1  # no empty cell
    return sp.csr_matrix(x)


def test_thinning_follows_the_binomial():
    # 4,000 copies of one cell: every copy is thinned at its own rate r ~ U(min_rate, 1), so a
    # gene's thinned count has mean c * E[r] and variance c * E[r(1-r)] + c^2 * Var(r)
    one = _counts(1, 50, seed=3)
    n = 4000
    rows = sp.csr_matrix(np.repeat(one.toarray(), n, axis=0))
    out = thin_depth(rows, np.arange(n), probability=1.0, seed=7).toarray()
    c = one.toarray()[0]
    a, b = DEPTH_MIN_RATE, 1.0
    mean_r, var_r = (a + b) / 2, (b - a) ** 2 / 12
    mean_r1r = mean_r - (var_r + mean_r**2)
    np.testing.assert_allclose(out.mean(0), c * mean_r, rtol=0.05, atol=0.05)
    np.testing.assert_allclose(out.var(0), c * mean_r1r + c**2 * var_r, rtol=0.15, atol=0.1)
    assert (out <= c).all() and (out >= 0).all() and np.allclose(out, np.rint(out))
    share = out.sum(1) / c.sum()
    assert share.min() > a - 0.15 and share.max() <= 1.0


def test_probability_is_the_share_of_cells_thinned():
    rows = _counts(2000)
    out = thin_depth(rows, np.arange(2000), probability=0.3, seed=1)
    changed = (out.sum(1).A1 < rows.sum(1).A1).mean()
    assert changed == pytest.approx(0.3, abs=0.04)
    assert thin_depth(rows, np.arange(2000), probability=0.0) is rows


def test_draws_depend_on_the_cell_not_its_batch_and_change_each_epoch():
    rows = _counts(60)
    obs = np.arange(100, 160)
    full = thin_depth(rows, obs, probability=0.7, seed=2, epoch=3).toarray()
    order = np.random.default_rng(0).permutation(60)[:25]
    part = thin_depth(rows[order], obs[order], probability=0.7, seed=2, epoch=3).toarray()
    np.testing.assert_array_equal(part, full[order])
    other_epoch = thin_depth(rows, obs, probability=0.7, seed=2, epoch=4).toarray()
    other_seed = thin_depth(rows, obs, probability=0.7, seed=3, epoch=3).toarray()
    assert not np.array_equal(full, other_epoch) and not np.array_equal(full, other_seed)


def test_a_thinned_cell_never_becomes_empty():
    x = np.zeros((500, 10), dtype=np.float32)
    x[:, 3] = 1  # one molecule each: thinning would empty ~37% of them
    out = thin_depth(sp.csr_matrix(x), np.arange(500), probability=1.0, seed=0)
    assert (out.sum(1).A1 == 1).all()


def test_bad_values_are_refused():
    rows = _counts(4)
    with pytest.raises(ValueError, match="probability must be in"):
        thin_depth(rows, np.arange(4), probability=1.5)
    with pytest.raises(ValueError, match=r"obs_index has shape \(3,\), expected \(4,\)"):
        thin_depth(rows, np.arange(3), probability=0.5)
    with pytest.raises(ValueError, match="depth_augmentation must be in"):
        CellDataset(ad.AnnData(rows), train=True, depth_augmentation=-0.1)


def test_dataset_thins_training_cells_only():
    adata = ad.AnnData(_counts(64))
    idx = np.arange(64)
    plain = CellDataset(adata, train=True, seed=0)[idx]
    thinned = CellDataset(adata, train=True, seed=0, depth_augmentation=1.0)[idx]
    assert (thinned.n_tokens <= plain.n_tokens).all()
    assert thinned.n_tokens.sum() < 0.95 * plain.n_tokens.sum()
    ev = CellDataset(adata, train=False, seed=0, depth_augmentation=1.0)[idx]
    ev0 = CellDataset(adata, train=False, seed=0)[idx]
    assert ev.n_tokens.tolist() == ev0.n_tokens.tolist()
    assert (ev.values == ev0.values).all()


def test_train_records_it_and_refuses_a_bad_value_before_work(pbmc3k_path):
    full = ad.read_h5ad(pbmc3k_path)
    adata = full[np.random.default_rng(0).choice(full.n_obs, 96, replace=False)].copy()
    CellFMClassifier.setup_anndata(adata, labels_key="celltype")
    model = CellFMClassifier(adata, preset="tiny", max_tokens=64)
    with pytest.raises(ValueError, match=r"depth_augmentation must be a number >= 0 and <= 1"):
        model.train(max_epochs=1, depth_augmentation=2.0, enable_progress_bar=False)
    assert model.history is None or len(model.history) == 0
    with pytest.raises(ValueError, match=r"depth_augmentation must be a number"):
        model.train(max_epochs=1, depth_augmentation="on", enable_progress_bar=False)
    model.train(max_epochs=1, depth_augmentation=0.5, enable_progress_bar=False, logger=False)
    assert model.train_settings_["depth_augmentation"] == 0.5
    assert np.isfinite(model.history["train_loss"]).all()
    model.train(max_epochs=1, enable_progress_bar=False, logger=False)
    assert model.train_settings_["depth_augmentation"] == 0.0  # "auto", random trunk: off


def test_auto_is_on_after_a_checkpoint(pbmc3k_path, golden_dir):
    full = ad.read_h5ad(pbmc3k_path)
    adata = full[np.random.default_rng(1).choice(full.n_obs, 64, replace=False)].copy()
    CellFMClassifier.setup_anndata(adata, labels_key="celltype")
    ckpt = golden_dir / "model_d48_h4_l2_g37_backbone.ckpt"
    model = CellFMClassifier(adata, checkpoint=ckpt, num_heads=4, max_tokens=64)
    assert model.pretrained
    model.train(max_epochs=1, enable_progress_bar=False, logger=False)
    assert model.train_settings_["depth_augmentation"] == 1.0


def test_pretrainer_reads_thinned_training_cells(pbmc3k_path, monkeypatch):
    from cellfm_sc import CellFMPretrainer
    from cellfm_sc.data import _dataset

    full = ad.read_h5ad(pbmc3k_path)
    adata = full[np.arange(0, 2700, 30)].copy()
    CellFMPretrainer.setup_anndata(adata)
    model = CellFMPretrainer(adata, preset="tiny", max_tokens=64)
    seen = []
    real = _dataset.thin_depth

    def spy(rows, obs_index, **kw):  # records what the real function is asked, runs it
        seen.append(kw["probability"])
        return real(rows, obs_index, **kw)

    monkeypatch.setattr(_dataset, "thin_depth", spy)
    model.train(max_epochs=1, depth_augmentation=0.4, enable_progress_bar=False, logger=False)
    assert seen and set(seen) == {0.4}  # training batches only, at the asked rate
    assert model.train_settings_["depth_augmentation"] == 0.4
    assert np.isfinite(model.history["train_loss"]).all()
