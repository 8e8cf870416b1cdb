"""Splits: whole donors, stratification, obs and JSON splits, and their errors."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from cellfm_sc.data import (
    DataSplit,
    split_by_donor,
    split_from_json,
    split_from_obs,
    split_stratified,
)

STAGES = ["Not AD", "Low", "Intermediate", "High"]


def _donor_adata(n_donors: int = 40, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    cells_per = rng.integers(5, 30, size=n_donors)
    donor = np.repeat([f"H{d:02d}" for d in range(n_donors)], cells_per)
    stage = np.repeat([STAGES[d % 4] for d in range(n_donors)], cells_per)
    obs = pd.DataFrame(
        {"donor": donor, "adnc": pd.Categorical(stage, categories=STAGES, ordered=True)},
        index=[f"c{i}" for i in range(donor.size)],
    )
    obs["celltype"] = rng.choice(["astro", "oligo", "neuron"], size=donor.size)
    return ad.AnnData(obs=obs)


def test_split_by_donor_whole_donors_stratified():
    adata = _donor_adata()
    split = split_by_donor(adata, "donor", "adnc", test_size=0.2, validation_size=0.1, seed=1)
    n = adata.n_obs
    assert np.array_equal(
        np.sort(np.concatenate([split.train, split.validation, split.test])), np.arange(n)
    )
    donor = adata.obs["donor"].to_numpy()
    for name in ("train", "validation", "test"):
        assert set(donor[split[name]]) == set(split.donors[name])
    assert len(split.donors["test"]) == 8 and len(split.donors["validation"]) == 4
    # 40 donors, 10 per stage: 8 test donors = 2 per stage, 4 validation donors = 1 per stage
    stage_of = adata.obs.groupby("donor", observed=True)["adnc"].first()
    assert sorted(stage_of[split.donors["test"]].value_counts().tolist()) == [2, 2, 2, 2]
    assert sorted(stage_of[split.donors["validation"]].value_counts().tolist()) == [1, 1, 1, 1]
    # reproducible, and the seed matters
    again = split_by_donor(adata, "donor", "adnc", seed=1)
    assert np.array_equal(again.test, split.test)
    assert not np.array_equal(split_by_donor(adata, "donor", "adnc", seed=2).test, split.test)


def test_split_by_donor_on_wu2020(wu2020_path):
    adata = ad.read_h5ad(wu2020_path)
    split = split_by_donor(adata, "patient", test_size=0.25, validation_size=0.0, seed=0)
    assert split.validation.size == 0
    assert set(split.donors["train"]).isdisjoint(split.donors["test"])
    assert len(split.donors["test"]) == round(0.25 * adata.obs["patient"].nunique())
    # "source" (Tumor / NAT / Blood) is a per-sample property, not a per-patient one
    with pytest.raises(ValueError, match=r"donor '[^']+' has labels \[") as err:
        split_by_donor(adata, "patient", "source")
    assert "labels_key=None" in str(err.value)


def test_labels_with_nan_report_the_count():
    adata = _donor_adata()
    adnc = adata.obs["adnc"].copy()
    adnc.iloc[[0, 5, 9]] = np.nan
    adata.obs["adnc"] = adnc
    with pytest.raises(ValueError, match=r"labels_key='adnc': the column has 3 missing value"):
        split_by_donor(adata, "donor", "adnc")
    with pytest.raises(ValueError, match=r"has 3 missing value"):
        split_stratified(adata, "adnc")


def test_donor_with_two_labels_is_named():
    adata = _donor_adata()
    stages = adata.obs["adnc"].astype(str).to_numpy()
    first_h07 = np.flatnonzero(adata.obs["donor"].to_numpy() == "H07")[0]
    stages[first_h07] = "Low" if stages[first_h07] != "Low" else "High"
    adata.obs["adnc"] = stages
    with pytest.raises(ValueError, match=r"donor 'H07' has labels \['High', 'Low'\]"):
        split_by_donor(adata, "donor", "adnc")


def test_split_stratified_cells():
    adata = _donor_adata()
    split = split_stratified(adata, "celltype", test_size=0.2, validation_size=0.1, seed=0)
    sizes = split.sizes()
    n = adata.n_obs
    assert sizes["test"] == round(0.2 * n) and sizes["validation"] == round(0.1 * n)
    ct = adata.obs["celltype"]
    overall = ct.value_counts(normalize=True)
    test = ct.iloc[split.test].value_counts(normalize=True)
    assert np.allclose(test[overall.index], overall, atol=0.02)


def test_split_from_obs_and_donor_in_two_splits():
    adata = _donor_adata(8)
    donor = adata.obs["donor"].to_numpy()
    col = np.where(np.isin(donor, ["H00", "H01"]), "Test", np.where(donor == "H02", "val", "train"))
    adata.obs["split"] = col
    split = split_from_obs(adata, "split", donor_key="donor")
    assert np.array_equal(split.test, np.flatnonzero(col == "Test"))
    assert np.array_equal(split.validation, np.flatnonzero(col == "val"))
    assert list(split.donors["test"]) == ["H00", "H01"]
    col2 = col.copy()
    col2[np.flatnonzero(donor == "H05")[0]] = "test"
    adata.obs["split"] = col2
    with pytest.raises(ValueError, match=r"donor 'H05' is in two splits"):
        split_from_obs(adata, "split", donor_key="donor")
    adata.obs["split"] = np.where(col == "train", "holdout", col)
    with pytest.raises(ValueError, match=r"\['holdout'\].*not train / validation / test"):
        split_from_obs(adata, "split")
    with pytest.raises(KeyError, match="'nope'"):
        split_from_obs(adata, "nope")


def test_split_from_json(tmp_path):
    adata = _donor_adata(6)
    donor = adata.obs["donor"].to_numpy()
    train = np.flatnonzero(~np.isin(donor, ["H05"]))
    test = np.flatnonzero(donor == "H05")
    path = tmp_path / "split.json"
    path.write_text(
        json.dumps(
            {
                "train_indices": train.tolist(),
                "test_indices": test.tolist(),
                "donor_col": "donor",
                "adnc_col": "adnc",
            }
        )
    )
    split = split_from_json(path, adata)
    assert np.array_equal(split.train, train) and np.array_equal(split.test, test)
    assert split.labels_key == "adnc" and list(split.donors["test"]) == ["H05"]
    # obs names work too
    path.write_text(
        json.dumps(
            {
                "train_indices": list(adata.obs_names[train]),
                "test_indices": list(adata.obs_names[test]),
            }
        )
    )
    assert np.array_equal(split_from_json(path, adata).test, test)
    # a donor on both sides
    bad_test = np.r_[test, np.flatnonzero(donor == "H02")[:1]]
    bad_train = np.setdiff1d(train, bad_test)
    path.write_text(
        json.dumps(
            {
                "train_indices": bad_train.tolist(),
                "test_indices": bad_test.tolist(),
                "donor_col": "donor",
            }
        )
    )
    with pytest.raises(ValueError, match=r"donor 'H02' is in two splits \('train' and 'test'\)"):
        split_from_json(path, adata)
    path.write_text(json.dumps({"train_indices": [0, 1], "test_indices": [10**6]}))
    with pytest.raises(ValueError, match="outside"):
        split_from_json(path, adata)


def test_datasplit_refuses_overlap_and_too_few_donors():
    with pytest.raises(ValueError, match=r"1 cell\(s\) are in both 'train' and 'test'"):
        DataSplit(train=[0, 1, 2], validation=[], test=[2, 3])
    adata = _donor_adata(2)
    with pytest.raises(ValueError, match="2 donors cannot be split"):
        split_by_donor(adata, "donor", test_size=0.5, validation_size=0.5)
