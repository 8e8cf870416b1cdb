"""Write the saved-model folders ``tests/test_saved_models.py`` loads (run once, kept as made).

The folders were written by the code as it was before the model classes moved onto one base
(issue 20, commit 0ba1d72): a tiny trunk on 40 genes, trained for one epoch on 48 synthetic
cells, so that the new code is checked to load what the old code saved and to predict the
same. Run from the repository root: ``python tests/data/saved_models/make_saved_models.py``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from cellfm_sc import CellFMClassifier, CellFMDonorClassifier, CellFMPretrainer

HERE = Path(__file__).resolve().parent
STAGES = ["A", "B", "C"]


def cells() -> ad.AnnData:
    """48 cells of 12 donors (stage ``donor % 3``), 40 genes; genes 0-5 mark stage and type."""
    rng = np.random.default_rng(0)
    n, genes = 48, 40
    donor = np.repeat(np.arange(12), 4)
    stage = donor % 3
    x = rng.poisson(1.0, (n, genes)).astype(np.float32)
    x[:, -1] += 1
    x[np.arange(n) % 2 == 0, :6] += 5
    x[stage == 2, 6:10] += 4
    obs = pd.DataFrame(
        {
            "celltype": np.where(np.arange(n) % 2 == 0, "T", "B"),
            "donor": [f"d{d:02d}" for d in donor],
            "stage": [STAGES[s] for s in stage],
        },
        index=[f"cell{i}" for i in range(n)],
    )
    return ad.AnnData(
        sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(genes)])
    )


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    adata = cells()
    adata.write_h5ad(HERE / "cells.h5ad")
    fit = dict(
        max_epochs=1, batch_size=16, enable_progress_bar=False, logger=False, accelerator="cpu"
    )
    recorded = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = adata.copy()
        CellFMClassifier.setup_anndata(a, labels_key="celltype")
        clf = CellFMClassifier(a, preset="tiny", max_tokens=16, seed=0)
        clf.train(validation_size=0.25, **fit)
        clf.save(HERE / "classifier", overwrite=True)
        recorded["classifier_proba"] = clf.predict(soft=True).to_numpy()
        recorded["classifier_latent"] = clf.get_latent_representation()

        a = adata.copy()
        CellFMDonorClassifier.setup_anndata(
            a, labels_key="stage", donor_key="donor", label_order=STAGES
        )
        don = CellFMDonorClassifier(
            a, preset="tiny", max_tokens=16, seed=0, trainable="all", bag_size=4
        )
        don.train(validation_size=0.25, test_size=0.0, **fit)
        don.save(HERE / "donor", overwrite=True)
        recorded["donor_proba"] = don.predict_donors().filter(like="p_").to_numpy()

        a = adata.copy()
        CellFMPretrainer.setup_anndata(a)
        pre = CellFMPretrainer(a, preset="tiny", max_tokens=16, seed=0)
        pre.train(validation_size=0.25, **fit)
        pre.save(HERE / "pretrainer", overwrite=True)
        recorded["pretrainer_latent"] = pre.get_latent_representation()
    np.savez(HERE / "recorded.npz", **recorded)


if __name__ == "__main__":
    main()
