"""``cellfm-sc finetune --level donor``: a tiny end-to-end run and its usage errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.test_cli import assert_usage_error, run_cli
from tests.test_donor import toy_donors


@pytest.fixture(scope="module")
def donor_h5ad(tmp_path_factory):
    adata = toy_donors()
    path = tmp_path_factory.mktemp("donor_data") / "donors.h5ad"
    adata.write_h5ad(path)
    return path


def test_level_donor_needs_a_donor_key(donor_h5ad, tmp_path):
    proc = run_cli(
        "finetune", donor_h5ad, "--labels-key", "stage", "--preset", "tiny", "--level", "donor",
        "-o", tmp_path / "o",
    )  # fmt: skip
    assert_usage_error(proc, "--level donor needs --donor-key")


def test_level_donor_refuses_cell_level_options(donor_h5ad, tmp_path):
    proc = run_cli(
        "finetune", donor_h5ad, "--labels-key", "stage", "--donor-key", "donor", "--preset",
        "tiny", "--level", "donor", "--monitor", "validation_macro_f1", "-o", tmp_path / "o",
    )  # fmt: skip
    assert_usage_error(proc, "--monitor validation_macro_f1 is a cell-level quantity")


@pytest.mark.slow
def test_finetune_level_donor_end_to_end(donor_h5ad, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(
        "finetune", donor_h5ad, "--labels-key", "stage", "--donor-key", "donor",
        "--label-order", "A,B,C,D", "--split-key", "split", "--preset", "tiny",
        "--level", "donor", "--bag-size", "8", "--trainable", "head", "--epochs", "2",
        "--max-tokens", "32", "--accelerator", "cpu", "--output-dir", out,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in (
        "training_results.json",
        "donor_predictions.csv",
        "predictions.csv",
        "attention.csv",
        "attention_umap.png",
        "best_model.pth",
        "config_resolved.json",
    ):
        assert (out / name).is_file(), name
    results = json.loads((out / "training_results.json").read_text())
    assert results["level"] == "donor" and results["bag_size"] == 8
    assert results["donor_metrics"]["n_donors"] == 3  # donors 2, 7, 11 are the test split
    assert set(results["donor_intervals"]) >= {"qwk", "accuracy"}
    assert results["qwk_level"] == "donor"
    donors = pd.read_csv(out / "donor_predictions.csv", index_col="donor")
    assert sorted(donors.index) == ["d02", "d07", "d11"]
    attention = pd.read_csv(out / "attention.csv", index_col="obs_name")
    assert len(attention) == 240
    np.testing.assert_allclose(attention.groupby("donor")["attention"].sum(), 1.0, atol=1e-5)
    from cellfm_sc import CellFMDonorClassifier

    assert (out / "model" / "model.pt").is_file()
    assert CellFMDonorClassifier.__name__ in (out / "model" / "config.json").read_text()
    assert "qwk" in proc.stdout


@pytest.mark.slow
def test_finetune_level_auto_selects_on_training_donors_and_reports_the_baseline(
    donor_h5ad, tmp_path
):
    out = tmp_path / "auto"
    proc = run_cli(
        "finetune", donor_h5ad, "--labels-key", "stage", "--donor-key", "donor",
        "--label-order", "A,B,C,D", "--split-key", "split", "--preset", "tiny",
        "--level", "auto", "--auto-folds", "3", "--bag-size", "8", "--epochs", "1",
        "--max-tokens", "16", "--accelerator", "cpu", "--output-dir", out,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "training_results.json").read_text())
    sel = results["level_selection"]
    assert set(sel["scores"]) == {"pseudobulk", "donor", "cell"}
    assert sel["n_donors"] == 9  # the 7 training + 2 validation donors; the test donors unseen
    assert sel["winner"] == max(sel["scores"], key=lambda k: sel["scores"][k] or -9)
    assert results["level"] in ("donor", "cell")
    assert "level selection: inner 3-fold cross-validation on 9 training donors" in proc.stdout
    # the report carries the baseline on the same (test) donors
    base = results["baseline"]
    assert "pseudobulk" in base["results"]
    assert base["results"]["pseudobulk"]["donor_metrics"]["n_donors"] == 3
    assert any(r["metric"] == "qwk" and r["level"] == "donor" for r in base["comparison"])
    assert "model vs baseline (same split)" in proc.stdout


def test_level_auto_needs_a_donor_key(donor_h5ad, tmp_path):
    proc = run_cli(
        "finetune", donor_h5ad, "--labels-key", "stage", "--preset", "tiny", "--level", "auto",
        "-o", tmp_path / "o",
    )  # fmt: skip
    assert_usage_error(proc, "--level auto needs --donor-key")


@pytest.mark.slow
def test_finetune_no_baseline_skips_it(donor_h5ad, tmp_path):
    out = tmp_path / "nb"
    proc = run_cli(
        "finetune", donor_h5ad, "--labels-key", "stage", "--donor-key", "donor",
        "--split-key", "split", "--preset", "tiny", "--epochs", "1", "--max-tokens", "16",
        "--accelerator", "cpu", "--no-baseline", "--output-dir", out,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "training_results.json").read_text())
    assert results["baseline"] is None
    assert "model vs baseline" not in proc.stdout
