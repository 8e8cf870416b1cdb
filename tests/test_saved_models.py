"""Model folders saved by the code before issue 20's part B (commit 0ba1d72) still load.

``tests/data/saved_models`` holds one tiny trained model of each class, the cells they were
trained on and what each predicted when it was saved (``make_saved_models.py`` wrote them).
The classes have since moved onto one base with one save/load declaration; these folders
must keep loading and give the same numbers.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from cellfm_sc import CellFMClassifier, CellFMDonorClassifier, CellFMPretrainer

HERE = Path(__file__).resolve().parent / "data" / "saved_models"


@pytest.fixture(scope="module")
def recorded():
    torch.set_num_threads(1)
    return np.load(HERE / "recorded.npz")


@pytest.fixture
def cells():
    return ad.read_h5ad(HERE / "cells.h5ad")


def _load(cls, name, adata):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return cls.load(HERE / name, adata, accelerator="cpu")


def test_an_old_classifier_folder_loads_and_predicts_the_same(cells, recorded):
    model = _load(CellFMClassifier, "classifier", cells)
    assert model.is_trained_ and model.classes_ == ["B", "T"]
    proba = model.predict(soft=True).to_numpy()
    np.testing.assert_allclose(proba, recorded["classifier_proba"], atol=1e-5)
    latent = model.get_latent_representation()
    np.testing.assert_allclose(latent, recorded["classifier_latent"], atol=1e-5)
    assert len(model.history) == 1 and len(model.validation_indices) == 12


def test_an_old_donor_folder_loads_and_predicts_the_same(cells, recorded):
    model = _load(CellFMDonorClassifier, "donor", cells)
    assert model.is_trained_ and model.bag_size == 4
    proba = model.predict_donors().filter(like="p_").to_numpy()
    np.testing.assert_allclose(proba, recorded["donor_proba"], atol=1e-5)


def test_an_old_pretrainer_folder_loads_and_embeds_the_same(cells, recorded):
    model = _load(CellFMPretrainer, "pretrainer", cells)
    assert model.is_trained_ and model.mask_ratio_ == 0.2
    latent = model.get_latent_representation()
    np.testing.assert_allclose(latent, recorded["pretrainer_latent"], atol=1e-5)


def test_a_folder_of_another_class_is_refused(cells):
    with pytest.raises(ValueError, match="holds a CellFMPretrainer"):
        CellFMClassifier.load(HERE / "pretrainer", cells)
